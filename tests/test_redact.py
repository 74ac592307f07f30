"""Redaction of provider secrets: whole, in part, masked, in text and bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.redact import FRAGMENT, Redactor, scrub, transport_reason

KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
secrets = st.text(KEY_CHARS, min_size=16, max_size=64).map(lambda s: "sk-" + s)
noise = st.text(st.characters(codec="utf-8"), max_size=80)


def fragments(secret: str) -> list[str]:
    return [secret[i : i + FRAGMENT] for i in range(len(secret) - FRAGMENT + 1)]


@settings(max_examples=400)
@given(secrets, noise, noise, st.sampled_from(["full", "prefix", "suffix", "middle", "masked"]))
def test_no_fragment_of_a_secret_survives(secret, before, after, how):
    quoted = {
        "full": secret,
        "prefix": secret[:12],
        "suffix": secret[-10:],
        "middle": secret[3 : 3 + FRAGMENT + 2],
        "masked": f"{secret[:8]}****{secret[-4:]}",
    }[how]
    text = f"{before}Incorrect API key provided: {quoted}{after}"
    redactor = Redactor([secret])
    for out in (redactor.text(text), redactor.bytes(text.encode()).decode("utf-8", "replace")):
        assert not any(f in out for f in fragments(secret)), out
        assert "****" not in out


@given(noise)
def test_text_without_secrets_is_left_alone(text):
    redactor = Redactor(["sk-THIS-IS-THE-ONLY-SECRET-123456"])
    if "*" not in text and "sk-" not in text and "earer" not in text.lower():
        assert redactor.text(text) == text


def test_stream_events_are_cheap_unless_they_are_errors():
    redactor = Redactor(["sk-SECRET-abcdefgh12345678"])
    normal = b'data: {"choices":[{"delta":{"content":"say sk-SECRET-abcdefgh12345678"}}]}\n\n'
    assert b"sk-SECRET" not in redactor.stream_bytes(normal)
    plain = b'data: {"choices":[{"delta":{"content":"hello"}}]}\n\n'
    assert redactor.stream_bytes(plain) is plain
    error = b'data: {"error":{"message":"bad key sk-SECRET-ab****5678"}}\n\n'
    assert b"****" not in redactor.stream_bytes(error)


def test_scrub_drops_tracebacks_and_bounds_length():
    message = 'litellm.APIError: boom\nTraceback (most recent call last):\n  File "x.py"'
    assert scrub(message) == "litellm.APIError: boom"
    assert len(scrub("x" * 5000)) == 500


def test_answers_lose_credentials_only_errors_lose_every_secret():
    """A provider's key, and a header value named as a credential, are taken out of
    answers; a header value that is no credential (a flag, an organisation) is a
    word a model may say: taken out of error bodies only."""
    from proxy.upstream.base import credentials_of, secrets_of
    from proxy.upstream.openai import Config

    config = Config(type="openai", base_url="http://x/v1", api_key="sk-live-0123456789",
                    headers={"X-Api-Token": "tok-abcdef123456", "x-feature": "enabled-mode"})  # fmt: skip
    redact = Redactor(secrets_of(config), credentials_of(config))
    said = b'{"content": "sk-live-0123456789 tok-abcdef123456 enabled-mode"}'
    assert redact.answer(said) == b'{"content": "[redacted] [redacted] enabled-mode"}'
    assert (
        redact.stream_bytes(b"data: " + said)
        == b'data: {"content": "[redacted] [redacted] enabled-mode"}'
    )
    error = redact.bytes(b'{"error": {"message": "enabled-mode"}}')
    assert b"enabled-mode" not in error


# How HTTP client libraries quote an upstream in their errors: aiohttp's parser
# (raised as ClientResponseError, whose str adds the URL) and h11's (through httpx).
QUOTINGS = [
    "{reason}: {raw!r}",
    "{reason}: {raw!r}.",
    "{reason}:\n  Invalid status code:\n\n  {raw!r}\n     ^",
    "{reason}:\n\n  {raw!r}\n    ^",
    "{reason}: bytearray({raw!r})",
    "400, message={reason!r}, url='http://10.0.0.7:8000/{peer}/v1/chat/completions'",
    "{reason} at https://user:pw@internal.example/{peer}?key=1",
]
REASONS = ["Bad status line", "Invalid HTTP header", "illegal header line",
           "Invalid character in chunk size", "Got more than 8190 bytes when reading"]  # fmt: skip


@settings(max_examples=300)
@given(
    st.sampled_from(QUOTINGS), st.sampled_from(REASONS), st.text(KEY_CHARS, min_size=6, max_size=40)
)
def test_a_transport_error_keeps_its_reason_and_loses_the_peer_s_bytes_and_the_url(
    quoting, reason, peer
):
    said = transport_reason(quoting.format(reason=reason, raw=peer.encode(), peer=peer))
    assert reason in said
    assert peer not in said and "b'" not in said
    assert "://" not in said and "10.0.0.7" not in said and "pw" not in said


@given(st.text(max_size=600))
def test_a_transport_reason_is_one_bounded_line(text):
    said = transport_reason(text)
    assert said and "\n" not in said and len(said) <= 200
