"""Keep provider secrets out of what the gateway says: error bodies, stream
events, error messages and logs.

An upstream may quote the gateway's credential whole (a hostile or careless
server echoing its request), in part, or masked the way providers do
(`sk-UPSTR*****caaa`). `Redactor.text` and `Redactor.bytes` remove all three,
plus anything shaped like a well-known key. `Redactor.answer` is the cheap check
for every answer, buffered or streamed: whole credentials only (the key, and
settings named as one), since an answer's words are the model's; `stream_bytes`
gives a streamed event that is an error the full treatment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"
FRAGMENT = 8  # this many characters of a secret, quoted anywhere, count as the secret

# Key-shaped tokens worth hiding whoever they belong to: masked keys (three or more
# asterisks or bullets inside key characters), OpenAI-style, AWS and Google keys,
# and bearer tokens.
_PATTERNS = (
    r"[A-Za-z0-9_\-]{2,}(?:\*|\u2022){3,}[A-Za-z0-9_\-]{0,16}",
    r"\bsk-[A-Za-z0-9_\-]{6,}",
    r"\bAKIA[0-9A-Z]{16}\b",
    r"\bAIza[0-9A-Za-z_\-]{30,}",
    r"\b[Bb](?i:earer)\s+[A-Za-z0-9._\-~+/]{8,}=*",
)
_TEXT = re.compile("|".join(_PATTERNS))
_BYTES = re.compile("|".join(_PATTERNS).encode().replace(b"\\u2022", "\u2022".encode()))
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.*")


Bytes = bytes  # inside Redactor, `bytes` names its method


class Redactor:
    """Redacts a fixed set of secrets (a provider's key and header values)."""

    __slots__ = ("_credentials", "_raw", "secrets")

    def __init__(
        self, secrets: Iterable[str | None], credentials: Iterable[str | None] | None = None
    ) -> None:
        """`credentials`, hidden from answers too, are `secrets` unless given."""
        found = {s for s in secrets if isinstance(s, str) and len(s) >= 4}
        self.secrets = tuple(sorted(found, key=len, reverse=True))
        self._raw = tuple(s.encode() for s in self.secrets)
        # long enough not to be a word a model may say
        given = self.secrets if credentials is None else credentials
        kept = {s for s in given if isinstance(s, str) and len(s) >= FRAGMENT}
        self._credentials = tuple(s.encode() for s in sorted(kept, key=len, reverse=True))

    def text(self, text: str) -> str:
        """`text` with every secret, fragment of one, and key-shaped token replaced."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = self._fragments(text)
        return _TEXT.sub(REDACTED, text)

    def bytes(self, raw: bytes) -> bytes:
        """The same for bytes (an error body); `raw` itself when nothing needs hiding."""
        clean = raw
        for secret in self._raw:
            if secret in clean:
                clean = clean.replace(secret, REDACTED.encode())
        text = clean.decode("utf-8", "replace")
        if any(self._fragment_at(text, s) >= 0 for s in self.secrets):
            clean = self._fragments(text).encode()
        return _BYTES.sub(REDACTED.encode(), clean)

    def stream_bytes(self, raw: Bytes) -> Bytes:
        """For every event of a stream: whole credentials always, everything in an
        error."""
        if b'"error"' in raw:
            return self.bytes(raw)
        return self.answer(raw)

    def answer(self, raw: Bytes) -> Bytes:
        """For an answer (a body, or one event's bytes): whole credentials, the cheap
        check; the rest of its text is the model's to say (a header value that is no
        credential, a word, may well be in it)."""
        for secret in self._credentials:
            if secret in raw:
                raw = raw.replace(secret, REDACTED.encode())
        return raw

    def _fragments(self, text: str) -> str:
        """Replace each key-shaped token that contains FRAGMENT characters of a secret."""
        for secret in self.secrets:
            at = self._fragment_at(text, secret)
            while at >= 0:
                start, end = at, at + FRAGMENT
                while start > 0 and text[start - 1] in _KEY_CHARS:
                    start -= 1
                while end < len(text) and text[end] in _KEY_CHARS:
                    end += 1
                text = text[:start] + REDACTED + text[end:]
                at = self._fragment_at(text, secret)
        return text

    @staticmethod
    def _fragment_at(text: str, secret: str) -> int:
        if len(secret) < FRAGMENT:
            return text.find(secret)
        for i in range(len(secret) - FRAGMENT + 1):
            at = text.find(secret[i : i + FRAGMENT])
            if at >= 0:
                return at
        return -1


def scrub(text: str, limit: int = 500) -> str:
    """A third-party error message fit to show: its first lines before any Python
    traceback, on one line, at most `limit` characters."""
    head = text.split("Traceback (most recent call last", 1)[0]
    head = " ".join(head.split())
    return head if len(head) <= limit else head[: limit - 1] + "…"


# Where an HTTP client library's message starts quoting the peer: its bytes
# (aiohttp: `Invalid HTTP header: b'...'`, `Bad status line:\n  b'...'`; h11:
# `illegal header line: bytearray(b'...')`) or the URL (aiohttp: `, url='...'`).
_QUOTING_PEER = re.compile(r":\s*(?:b'|b\"|bytearray\(|\n)|,?\s*url=")
_URL = re.compile(r"\b[a-z][a-z0-9+.\-]*://\S+", re.IGNORECASE)


def transport_reason(text: str) -> str:
    """What an HTTP client library says went wrong with a connection or with an
    answer's framing, fit to show a client: without what it quotes of the
    upstream's bytes (a hostile upstream's words, in the gateway's voice) or the
    URL (an internal host, a credential in its query)."""
    text = _QUOTING_PEER.split(text, 1)[0]
    text = _URL.sub("the upstream", text)
    return scrub(text, 200).rstrip(" .:,") or "the answer is not valid HTTP"
