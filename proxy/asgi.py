"""The few raw ASGI moves the gateway makes on its hot path."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterator

from starlette.datastructures import Headers

from proxy.errors import GatewayError, PayloadTooLarge, RequestTimeout


class RequestHeaders(Headers):
    """A request's headers, case-insensitive: starlette's, with a `get` that costs no
    exception when the header is absent (plugins ask for many that usually are),
    from a table built at the first `get` (a call asks for five or so)."""

    _first: dict[bytes, bytes] | None = None

    def get(self, key: str, default=None):
        first = self._first
        if first is None:
            first = self._first = {}
            for field, value in self._list:
                first.setdefault(field, value)  # a repeated field: its first, as starlette
        found = first.get(key.lower().encode("latin-1"))
        return default if found is None else found.decode("latin-1")


class ClientDisconnected(Exception):
    """The client went away before its request was read."""


async def read_body(receive, content_length: str | None, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes, and with
    408 when it has not all arrived `timeout_s` after the headers."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise _too_large(limit)
    message = await receive()  # usually the whole body: no timer for the common case
    if message["type"] == "http.request" and not message.get("more_body", False):
        if len(message.get("body", b"")) > limit:
            raise _too_large(limit)
        return message.get("body", b"")
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_rest(receive, message, limit)
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout_s:g} seconds."
        ) from None


async def _read_rest(receive, message, limit: int) -> bytes:
    chunks = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding value lets the answer be gzipped (RFC 9110 12.5.3):
    `gzip` (or `*`) with a quality above zero, and gzip not refused by name."""
    if not accept_encoding:
        return False
    named = star = None
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            named = quality if named is None else max(named, quality)
        elif coding == "*":
            star = quality
    if named is not None:
        return named > 0
    return star is not None and star > 0


def gzipped(body: bytes, headers: dict[str, str]) -> bytes:
    """`body` gzipped, with the headers that say so. Level 1: the answer is already
    paid for upstream; the gateway's CPU is the scarce thing."""
    headers["content-encoding"] = "gzip"
    headers["vary"] = "accept-encoding"
    return gzip.compress(body, compresslevel=1, mtime=0)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body too large: the limit is {limit} bytes.")


async def watch_disconnect(receive, task: asyncio.Task, flag: list) -> None:
    """Cancel `task` when the client disconnects; `flag` records that it did."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            flag.append(True)
            task.cancel()
            return


class ResponseFields:
    """A response's fields as the gateway makes them, names and values in a dict of
    str, with the body's length apart. In an ASGI message it is the iterable of
    (name, value) byte pairs ASGI asks for; the gateway's own server writes the
    fields from the dict at once (proxy/server.py), rather than encoding each into
    a pair of its own, then writing and checking it: 2.5% fewer instructions per
    request for the bare gateway (`python -m load.instructions --baseline e5ebf08`),
    more for a pipeline that adds fields."""

    __slots__ = ("fields", "length")

    def __init__(self, fields: dict[str, str], length: int | None = None) -> None:
        self.fields = fields
        self.length = length  # content-length; None for a stream

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for name, value in self.fields.items():
            yield name.encode("latin-1"), value.encode("latin-1")
        if self.length is not None:
            yield b"content-length", b"%d" % self.length


async def send_bytes(send, status: int, body: bytes, headers: dict[str, str]) -> None:
    headers.pop("content-length", None)  # the body's own length, never a plugin's
    fields = ResponseFields(headers, len(body))
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


async def send_error(send, error: GatewayError, headers: dict[str, str]) -> None:
    headers["content-type"] = "application/json"
    headers.update(error.headers)
    await send_bytes(send, error.status, error.body(), headers)
