"""The transport that caps litellm's answers, over httpx's mock transport."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.upstream.capped import (
    AnswerTooLarge,
    CappedTransport,
    UncappableAnswer,
    answers_capped,
    cause,
)


def fetch(size: int, cap: int | None, encoding: str | None = None, chunks: int = 1):
    """What a client over the capped transport reads of a `size`-byte answer sent in
    `chunks` pieces, and the accept-encoding it asked with."""
    asked = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("accept-encoding"))
        body = b"x" * size
        step = max(1, -(-size // chunks))
        pieces = [body[i : i + step] for i in range(0, size, step)]
        headers = {"content-encoding": encoding} if encoding is not None else {}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(b"".join(pieces)))

    async def main():
        async with httpx.AsyncClient(transport=CappedTransport(httpx.MockTransport(answer))) as c:
            if cap is None:
                return (await c.get("http://up/")).content
            with answers_capped(cap):
                return (await c.get("http://up/")).content

    return asyncio.run(main()), asked[0]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 5000), st.integers(1, 8))
def test_an_answer_is_read_exactly_when_it_is_within_the_cap(size, cap, chunks):
    if size <= cap:
        body, asked = fetch(size, cap, chunks=chunks)
        assert body == b"x" * size and asked == "identity"
    else:
        with pytest.raises(AnswerTooLarge) as refused:
            fetch(size, cap, chunks=chunks)
        assert cause(RuntimeError("wrapped")) is None
        wrapper = RuntimeError("as litellm wraps it")
        wrapper.__context__ = refused.value
        assert cause(wrapper) is refused.value


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip"])
def test_a_compressed_answer_is_refused(encoding):
    with pytest.raises(UncappableAnswer):
        fetch(10, 100, encoding)


@pytest.mark.parametrize("encoding", ["", "identity", " Identity "])
def test_an_uncompressed_answer_passes(encoding):
    assert fetch(10, 100, encoding)[0] == b"x" * 10


def test_outside_a_capped_call_nothing_changes():
    body, asked = fetch(10_000, None)
    assert body == b"x" * 10_000 and asked != "identity"


@pytest.mark.parametrize("requests", [0, 1, 2])
def test_a_call_knows_whether_anything_went_out(requests):
    """What tells litellm's own refusal of a request (nothing sent) from the
    provider's failure (proxy/upstream/litellm.py)."""

    async def main():
        transport = CappedTransport(httpx.MockTransport(lambda request: httpx.Response(200)))
        async with httpx.AsyncClient(transport=transport) as c:
            with answers_capped(1000) as outgoing:
                assert not outgoing.sent
                for _ in range(requests):
                    await c.get("http://up/")
            return outgoing.sent

    assert asyncio.run(main()) == (requests > 0)


def test_cause_finds_an_error_of_the_kinds_asked_through_any_wrapping():
    refused = httpx.ConnectError("refused")
    try:
        try:
            raise refused
        except httpx.ConnectError as exc:
            raise RuntimeError("litellm's InternalServerError, status 500") from exc
    except RuntimeError as wrapper:
        assert cause(wrapper, (httpx.TransportError,)) is refused
        assert cause(wrapper) is None  # not the cap's own
        assert cause(wrapper, (httpx.TimeoutException,)) is None
