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
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpx


class Outgoing:
    """A provider call under way in a task: the cap on its answers, and whether any
    request of it has gone out."""

    __slots__ = ("deadline", "most", "sent", "status")

    def __init__(self, most: int, deadline: float = math.inf) -> None:
        self.most = most
        self.deadline = deadline  # on time.perf_counter's clock
        self.sent = False
        self.status: int | None = None  # of the last answer's head


_CALL: ContextVar[Outgoing | None] = ContextVar("meshgate_outgoing", default=None)


class AnswerTooLarge(httpx.ReadError):
    """The answer passed the cap of the provider being called."""


class AnswerTooSlow(httpx.ReadTimeout):
    """The answer was still coming at the call's deadline."""


class UncappableAnswer(httpx.ReadError):
    """The answer came compressed though none was asked for."""


@contextmanager
def answers_capped(most: int, deadline: float = math.inf) -> Iterator[Outgoing]:
    """Cap the answers of the HTTP calls this task makes inside at `most` bytes, and
    end them at `deadline` (time.perf_counter)."""
    outgoing = Outgoing(most, deadline)
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
        response.stream = _Capped(response.stream, most, outgoing.deadline, request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Capped(httpx.AsyncByteStream):
    def __init__(self, inner, most: int, deadline: float, request: httpx.Request) -> None:
        self.inner = inner
        self.most = most
        self.deadline = deadline
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self.inner:
            size += len(chunk)
            if size > self.most:
                raise AnswerTooLarge(f"the answer passed {self.most} bytes", request=self.request)
            if time.perf_counter() > self.deadline:
                raise AnswerTooSlow("the answer outlasted its deadline", request=self.request)
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
