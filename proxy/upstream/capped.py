"""An httpx transport that caps an answer's size, for the HTTP clients litellm uses.

litellm reads answers itself, so the cap the other adapters apply as they read
(a provider's `max_response_bytes`) is applied here, beneath litellm: the
transport asks for an uncompressed answer, counts its bytes as they arrive and
fails the read once they pass the cap of the provider being called. The clients
are litellm's, shared by every litellm provider, so the cap is set per call
(`answers_capped`, in the call's task) rather than per client. An answer compressed
though none was asked for is refused: its size could not be bounded as it
inflates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpx

_CAP: ContextVar[int | None] = ContextVar("meshgate_answer_cap", default=None)


class AnswerTooLarge(httpx.ReadError):
    """The answer passed the cap of the provider being called."""


class UncappableAnswer(httpx.ReadError):
    """The answer came compressed though none was asked for."""


@contextmanager
def answers_capped(most: int) -> Iterator[None]:
    """Cap the answers of the HTTP calls this task makes inside at `most` bytes."""
    token = _CAP.set(most)
    try:
        yield
    finally:
        _CAP.reset(token)


class CappedTransport(httpx.AsyncBaseTransport):
    """Wraps the transport an httpx client sends through."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        most = _CAP.get()
        if most is None:  # not a provider's call (litellm fetching something of its own)
            return await self.inner.handle_async_request(request)
        request.headers["accept-encoding"] = "identity"
        response = await self.inner.handle_async_request(request)
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            await response.aclose()
            raise UncappableAnswer(
                f"the answer came {encoding}-compressed though none was asked for", request=request
            )
        response.stream = _Capped(response.stream, most, request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Capped(httpx.AsyncByteStream):
    def __init__(self, inner, most: int, request: httpx.Request) -> None:
        self.inner = inner
        self.most = most
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self.inner:
            size += len(chunk)
            if size > self.most:
                raise AnswerTooLarge(f"the answer passed {self.most} bytes", request=self.request)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


def cause(exc: BaseException) -> httpx.ReadError | None:
    """The cap's own error behind `exc`, however litellm or the SDK wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (AnswerTooLarge, UncappableAnswer)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None
