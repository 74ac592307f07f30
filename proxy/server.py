"""hypercorn, mended where three of its faults live; `install()` applies it in each
worker before serving.

- A client that closes an idle keep-alive connection left it in CLOSE-WAIT until
  `keep_alive_timeout`: on EOF, `H11Protocol.handle(Closed)` does nothing when no
  request is in flight, and `TCPServer.run` closes the socket only when its task
  group exits, which waits for the idle task's keep-alive sleep. Measured by the
  hardening probe: 400 one-shot connections held 401 sockets for 75 s. Here the
  idle task stops at EOF, and no keep-alive wait starts after it.
- HTTP-level errors (431 header too large, 400 malformed request, 501 unknown
  Transfer-Encoding) were bare status lines: they carry OpenAI error bodies.
- A request with both Content-Length and Transfer-Encoding was served on a
  connection kept open; RFC 9112 section 6.3 calls it a smuggling attempt: it is
  refused with 400 and the connection closed.
"""

from __future__ import annotations

from itertools import chain

import h11
import hypercorn.asyncio.run as hypercorn_run
import hypercorn.protocol as hypercorn_protocol
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Closed, Updated
from hypercorn.protocol.h11 import H11Protocol

from proxy.errors import GatewayError

_MESSAGES = {
    400: ("The request is not valid HTTP/1.1.", "invalid_request_error", "bad_request"),
    413: ("The request is too large.", "invalid_request_error", "request_too_large"),
    431: (
        "The request's header fields are too large.",
        "invalid_request_error",
        "request_header_fields_too_large",
    ),
    501: (
        "The request uses a Transfer-Encoding this server does not implement.",
        "invalid_request_error",
        "not_implemented",
    ),
}


SMUGGLING = (
    "A request with both Content-Length and Transfer-Encoding is refused (RFC 9112, 6.3).",
    "invalid_request_error",
    "ambiguous_framing",
)


def error_body(status: int, reason: tuple[str, str, str | None] | None = None) -> bytes:
    message, kind, code = reason or _MESSAGES.get(
        status, ("The request could not be processed.", "invalid_request_error", None)
    )
    error = GatewayError(message, code=code)
    error.type = kind
    return error.body()


class MeshgateTCPServer(TCPServer):
    """Closes a connection as soon as its client has, instead of after keep-alive."""

    _client_gone = False

    async def _read_data(self) -> None:
        await super()._read_data()  # returns at EOF or a read error
        self._client_gone = True
        await self.idle_task.stop()  # nothing more can arrive: no keep-alive wait

    async def protocol_send(self, event) -> None:
        if isinstance(event, Updated) and event.idle and self._client_gone:
            return  # a request that finished after its client left: close, do not idle
        await super().protocol_send(event)


class MeshgateH11Protocol(H11Protocol):
    """OpenAI error bodies for HTTP-level errors; no request smuggling."""

    async def _send_error_response(self, status_code: int, reason=None) -> None:
        body = error_body(status_code, reason)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await self._send_h11_event(
            h11.Response(
                status_code=status_code,
                headers=list(chain(headers, self.config.response_headers("h11"))),
            )
        )
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    async def _create_stream(self, request: h11.Request) -> None:
        names = {name.lower() for name, _ in request.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            await self._send_error_response(400, SMUGGLING)
            await self.send(Closed())
            return
        await super()._create_stream(request)


def install() -> None:
    """Make hypercorn use the classes above (idempotent; per process)."""
    hypercorn_run.TCPServer = MeshgateTCPServer  # type: ignore[misc]
    hypercorn_protocol.H11Protocol = MeshgateH11Protocol  # type: ignore[misc]
