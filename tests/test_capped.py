"""The transport that caps litellm's answers, over httpx's mock transport."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.upstream import capped
from proxy.upstream.capped import (
    AnswerTooLarge,
    AnswerTooSlow,
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


def read(pieces: list[bytes], content_type: str, stream: bool, deadline: float = math.inf):
    """What a client over the capped transport reads of an answer sent in `pieces`."""

    def answer(request: httpx.Request) -> httpx.Response:
        async def body():
            for piece in pieces:
                yield piece

        return httpx.Response(200, headers={"content-type": content_type}, stream=body())

    async def main():
        async with httpx.AsyncClient(transport=CappedTransport(httpx.MockTransport(answer))) as c:
            with answers_capped(1 << 30, deadline, stream):
                return (await c.get("http://up/")).content

    return asyncio.run(main())


def torn(data: bytes, cuts: list[int]) -> list[bytes]:
    at = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(at)]


LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])
EVENTS = st.lists(
    st.tuples(
        st.lists(st.text(alphabet='abc{}: "', max_size=200), min_size=1, max_size=4), LINE_ENDS
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=150, deadline=None)
@given(EVENTS, st.lists(st.integers(0, 10_000), max_size=12),
       st.sampled_from(["text/event-stream", "text/event-stream; charset=utf-8",
                        "application/json"]))  # fmt: skip
def test_a_stream_of_events_within_the_limits_is_read_whole_however_it_is_torn(events, cuts,
                                                                                content_type):  # fmt: skip
    data = "".join(end.join(f"data: {line}" for line in lines) + end * 2
                   for lines, end in events).encode()  # fmt: skip
    assert read(torn(data, cuts), content_type, stream=True) == data
    bytewise = [data[i : i + 1] for i in range(len(data))]  # every blank line straddles
    assert read(bytewise, content_type, stream=True) == data


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["lines", "bytes"]), st.sampled_from(["\n", "\r", "\r\n"]),
       st.lists(st.integers(0, 3 << 20), max_size=12))  # fmt: skip
def test_an_event_past_the_limits_is_refused_in_a_stream_read_as_events(past, end, cuts):
    """The SDK reads such an answer at a cost of its size times its lines; an answer
    that is not read as events (a buffered call, NDJSON) has only the answer's cap."""
    if past == "lines":
        event = (f"data: x{end}" * (capped.EVENT_LINES + 1)).encode()
    else:
        event = b"data: " + b"x" * capped.EVENT_BYTES + end.encode()
    data = b"data: {}\n\n" + event + end.encode()
    pieces = torn(data, cuts)
    with pytest.raises(capped.EventTooLarge):
        read(pieces, "text/event-stream", stream=True)
    assert read(pieces, "text/event-stream", stream=False) == data
    assert read(pieces, "application/x-ndjson", stream=True) == data


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_still_coming_at_the_deadline_is_cut_off(stream):
    pieces = [b"data: {}\n\n"] * 3
    assert read(pieces, "text/event-stream", stream, deadline=math.inf) == b"".join(pieces)
    with pytest.raises(AnswerTooSlow):
        read(pieces, "text/event-stream", stream, deadline=time.perf_counter() - 1)
