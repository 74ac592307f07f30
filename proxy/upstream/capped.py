"""An httpx transport that caps an answer's size, for the HTTP clients litellm uses.

litellm reads answers itself, so the cap the other adapters apply as they read
(a provider's `max_response_bytes`) is applied here, beneath litellm: the
transport asks for an uncompressed answer, counts its bytes as they arrive and
fails the read once they pass the cap of the provider being called. The clients
are litellm's, shared by every litellm provider, so the cap is set per call
(`answers_capped`, in the call's task) rather than per client. An answer compressed
though none was asked for is refused: its size could not be bounded as it
inflates. A call's deadline is checked as each piece of the answer arrives:
httpx's timeouts are per read, so an answer that comes a byte at a time would
otherwise never end (through the SDK's stream reader, which waits for a whole
event, not even the adapter would see it). It also notes whether the call sent
anything (a failure before any request went out is litellm's translation of the
request, not the provider's) and the status of the answer (a failure after a
success is litellm unable to read what the provider said).

An answer to a stream call that the OpenAI SDK would read as server-sent events
(`text/event-stream`, or JSON, which it reads the same way) is also held to
`EVENT_BYTES` and `EVENT_LINES` per event: the SDK's reader adds each line of an
event to a copy of what came before, so an event costs its size times its lines.
Measured (the SDK's `_aiter_chunks` over 64 KiB reads): 1 MiB of 2-byte lines
without a blank line took 8.7 s of the event loop, 16 MiB on one line 1.2 s.
At the limits below, one event costs at most 64 copies of 1 MiB.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpx

EVENT_BYTES = 1024 * 1024  # of one event of a stream the SDK reads as events
EVENT_LINES = 64  # an LLM's event has a few: `event:`, `data:`, `id:`
EVENT_TYPES = frozenset({"text/event-stream", "application/json"})


class Outgoing:
    """A provider call under way in a task: the cap on its answers, and whether any
    request of it has gone out."""

    __slots__ = ("deadline", "most", "sent", "status", "stream")

    def __init__(self, most: int, deadline: float = math.inf, stream: bool = False) -> None:
        self.most = most
        self.deadline = deadline  # on time.perf_counter's clock
        self.stream = stream  # its answer may be read as events
        self.sent = False
        self.status: int | None = None  # of the last answer's head


_CALL: ContextVar[Outgoing | None] = ContextVar("meshgate_outgoing", default=None)


class AnswerTooLarge(httpx.ReadError):
    """The answer passed the cap of the provider being called."""


class EventTooLarge(AnswerTooLarge):
    """An event of a stream passed `EVENT_BYTES` or `EVENT_LINES`."""


class AnswerTooSlow(httpx.ReadTimeout):
    """The answer was still coming at the call's deadline."""


class UncappableAnswer(httpx.ReadError):
    """The answer came compressed though none was asked for."""


@contextmanager
def answers_capped(most: int, deadline: float = math.inf,
                   stream: bool = False) -> Iterator[Outgoing]:  # fmt: skip
    """Cap the answers of the HTTP calls this task makes inside at `most` bytes (and
    their events, for a `stream` call), and end them at `deadline` (perf_counter)."""
    outgoing = Outgoing(most, deadline, stream)
    token = _CALL.set(outgoing)
    try:
        yield outgoing
    finally:
        _CALL.reset(token)


class CappedTransport(httpx.AsyncBaseTransport):
    """Wraps the transport an httpx client sends through."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        outgoing = _CALL.get()
        if outgoing is None:  # not a provider's call (litellm fetching something of its own)
            return await self.inner.handle_async_request(request)
        outgoing.sent = True
        most = outgoing.most
        request.headers["accept-encoding"] = "identity"
        response = await self.inner.handle_async_request(request)
        outgoing.status = response.status_code
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            await response.aclose()
            raise UncappableAnswer(
                f"the answer came {encoding}-compressed though none was asked for", request=request
            )
        kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        events = _Events() if outgoing.stream and kind in EVENT_TYPES else None
        response.stream = _Capped(response.stream, most, outgoing.deadline, request, events)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Events:
    """The event being read, across the reads of an answer: counted, not kept, so
    each byte is looked at once however the answer is torn."""

    __slots__ = ("lines", "size", "tail")

    def __init__(self) -> None:
        self.size = self.lines = 0  # of the event not yet ended
        self.tail = b""  # the last bytes read: a blank line can straddle two reads

    def fit(self, chunk: bytes) -> bool:
        """Count `chunk`; whether every event it ends or continues is within the limits."""
        data = self.tail + chunk
        seen = len(self.tail)  # counted already
        size, lines, start = self.size, self.lines, seen
        for blank in _BLANK_LINE.finditer(data):
            if blank.end() <= seen:
                continue  # ended an event in the last read
            ended = max(blank.start(), seen)
            size += ended - start
            lines += _line_ends(data, start, ended)
            if size > EVENT_BYTES or lines >= EVENT_LINES:
                return False  # (the blank line's first line end ends one more line)
            size, lines, start = 0, 0, blank.end()
        self.size = size + len(data) - start
        self.lines = lines + _line_ends(data, start)
        self.tail = data[-3:]
        return self.size <= EVENT_BYTES and self.lines <= EVENT_LINES


_BLANK_LINE = re.compile(rb"\r\n\r\n|\n\n|\r\r")  # what ends an event


def _line_ends(data: bytes, start: int, end: int | None = None) -> int:
    """As the SDK splits lines, give or take a CRLF (counted twice)."""
    return data.count(b"\n", start, end) + data.count(b"\r", start, end)


class _Capped(httpx.AsyncByteStream):
    def __init__(self, inner, most: int, deadline: float, request: httpx.Request,
                 events: _Events | None) -> None:  # fmt: skip
        self.inner = inner
        self.most = most
        self.deadline = deadline
        self.request = request
        self.events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self.inner:
            size += len(chunk)
            if size > self.most:
                raise AnswerTooLarge(f"the answer passed {self.most} bytes", request=self.request)
            if time.perf_counter() > self.deadline:
                raise AnswerTooSlow("the answer outlasted its deadline", request=self.request)
            if self.events is not None and not self.events.fit(chunk):
                raise EventTooLarge(
                    f"a stream event past {EVENT_BYTES} bytes or {EVENT_LINES} lines",
                    request=self.request,
                )
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


def cause(exc: BaseException, kinds: tuple[type[BaseException], ...] = (AnswerTooLarge,
          AnswerTooSlow, UncappableAnswer)) -> BaseException | None:  # fmt: skip
    """The first error of `kinds` behind `exc` (by default the cap's own), however
    litellm or the SDK wrapped it."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
