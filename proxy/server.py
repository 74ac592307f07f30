"""hypercorn, mended where its faults live; `install()` applies it in each
worker before serving.

- A client that closes an idle keep-alive connection left it in CLOSE-WAIT until
  `keep_alive_timeout`: on EOF, `H11Protocol.handle(Closed)` does nothing when no
  request is in flight, and `TCPServer.run` closes the socket only when its task
  group exits, which waits for the idle task's keep-alive sleep. Measured by the
  hardening probe: 400 one-shot connections held 401 sockets for 75 s. Here the
  idle task stops at EOF, and no keep-alive wait starts after it.
- HTTP-level errors (431 header too large, 400 malformed request, 501 unknown
  Transfer-Encoding) were bare status lines: they carry OpenAI error bodies.
  Such a request reaches no access record, so each is counted by its code and
  logged (at most once a second).
- A request with both Content-Length and Transfer-Encoding was served on a
  connection kept open; RFC 9112 section 6.3 calls it a smuggling attempt: it is
  refused with 400 and the connection closed.
- A request's head could arrive a byte at a time for as long as keep-alive
  allowed (75 s by default), holding a connection: it must arrive within
  `header_timeout_s` of its first byte, else a 408 and the connection closed.
  An idle keep-alive connection, no byte sent, still waits `keep_alive_timeout`.
- Past the open-file limit, accepting fails: uvloop (libuv) then accepts and
  closes pending connections with no response and nothing logged, asyncio logs
  in plain text and leaves them waiting. Here a worker holds at most
  `max_connections`, below the limit: one more gets a 503 with an OpenAI body
  and is closed, and that is logged and counted.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import re
import resource
import time
from collections.abc import Callable, Iterable
from itertools import chain
from operator import itemgetter

import h11
import hypercorn.asyncio.run as hypercorn_run
import hypercorn.protocol as hypercorn_protocol
import hypercorn.protocol.h11 as hypercorn_h11
from hypercorn.asyncio.tcp_server import MAX_RECV, TCPServer
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H11Protocol, H11WSConnection
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.utils import build_and_validate_headers

from proxy.asgi import ResponseFields
from proxy.errors import GatewayError

log = logging.getLogger("meshgate.server")

# File descriptors kept back from the connection cap: the worker's own files,
# sockets to Redis and the like.
_RESERVED_FDS = 128

_MESSAGES: dict[int, tuple[str, str, str | None]] = {
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


BUSY = (
    "The gateway is at its connection limit; retry shortly.",
    "server_error",
    "too_many_connections",
)

SLOW_HEAD = (
    "The request's line and header fields did not arrive in time.",
    "invalid_request_error",
    "request_timeout",
)


class _Tally:
    """A count of events, logged at most once a second with how many since the last."""

    __slots__ = ("count", "logged_at", "since_log")

    def __init__(self) -> None:
        self.count = 0
        self.logged_at = 0.0
        self.since_log = 0

    def add(self, warn: Callable[[int], None]) -> None:
        self.count += 1
        self.since_log += 1
        now = time.monotonic()
        if now - self.logged_at >= 1.0:
            warn(self.since_log)
            self.logged_at, self.since_log = now, 0


class Connections:
    """The worker's client connections: how many are open, the cap on them, and an
    account of each: accepted, refused at the cap, or reset by the client; and the
    requests the HTTP layer refused before the app saw them."""

    def __init__(self, limit: int, counters: dict[str, Callable[..., None]] | None = None) -> None:
        self.limit = limit
        self.open = 0
        # "accepted", "refused", "reset" -> a metric's inc; "rejected" -> one taking a code
        self.counters = counters or {}
        self._refused = _Tally()
        self._reset = _Tally()
        self._rejected = _Tally()

    @property
    def refused(self) -> int:
        return self._refused.count

    @property
    def reset(self) -> int:
        return self._reset.count

    def _count(self, what: str) -> None:
        if (count := self.counters.get(what)) is not None:
            count()

    def accepted(self) -> None:
        self._count("accepted")

    def was_reset(self, error: BaseException) -> None:
        """Count a connection the client broke off (reset, read error); logged."""
        self._count("reset")
        self._reset.add(lambda n: log.warning(
            "%d client connection(s) broken off by the client (last: %s)",
            n, type(error).__name__,
        ))  # fmt: skip

    def rejected(self, status: int, code: str | None) -> None:
        """Count a request the HTTP layer answered with an error itself (malformed,
        fields too large, a head too slow, ambiguous framing); logged."""
        if (count := self.counters.get("rejected")) is not None:
            count(code or str(status))
        self._rejected.add(lambda n: log.warning(
            "refused %d request(s) at the HTTP layer (last: %d %s)", n, status, code,
        ))  # fmt: skip

    def refuse(self) -> None:
        """Count one refused connection; logged."""
        self._count("refused")
        self._refused.add(lambda n: log.warning(
            "refused %d connection(s): %d open, the limit is %d (server.max_connections)",
            n, self.open, self.limit,
        ))  # fmt: skip


def default_max_connections() -> int:
    """Half of what the open-file limit leaves: each client connection may need one
    to an upstream too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(16, (soft - _RESERVED_FDS) // 2)


class MeshgateTCPServer(TCPServer):
    """Closes a connection as soon as its client has, instead of after keep-alive;
    refuses connections past the worker's cap with a 503."""

    _client_gone = False
    _awaiting = True  # no request under way: the next byte starts one's head
    _head_timer: asyncio.TimerHandle | None = None  # a head has begun and not ended
    _head_timed_out: asyncio.Future | None = None
    connections = Connections(default_max_connections())
    header_timeout_s = 20.0

    async def run(self) -> None:
        connections = MeshgateTCPServer.connections
        if connections.open >= connections.limit:
            connections.refuse()
            await self._refuse()
            return
        connections.open += 1
        connections.accepted()
        try:
            await super().run()
        except asyncio.CancelledError:
            # Cancelled at shutdown, past graceful_timeout: the app has ended its
            # answer. Ending normally spares asyncio's stream callback a traceback
            # (Python 3.11 calls exception() on the cancelled task).
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        finally:
            connections.open -= 1

    async def _refuse(self) -> None:
        await self._answer_and_close("503 Service Unavailable", BUSY, "retry-after: 1\r\n")

    async def _answer_and_close(self, status: str, reason, extra: str = "") -> None:
        """An error written straight to the socket (h11 is not asked: no request was
        read), and the connection closed."""
        body = error_body(int(status[:3]), reason)
        head = (
            f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
        )
        try:
            self.writer.write(head.encode() + body)
            async with asyncio.timeout(1.0):
                await self.writer.drain()
        except (OSError, RuntimeError, TimeoutError):
            pass
        finally:
            self.writer.close()

    async def _read_data(self) -> None:
        # hypercorn's loop, with broken connections counted instead of passed over
        while not self.reader.at_eof():
            try:
                data = await asyncio.wait_for(self.reader.read(MAX_RECV), self.config.read_timeout)
            except (ConnectionError, OSError) as exc:
                MeshgateTCPServer.connections.was_reset(exc)
                break
            except TimeoutError:
                break
            if self._head_timed_out is not None:
                break  # answered with a 408 and closed: nothing since is a request
            await self.protocol.handle(RawData(data))
            if self._awaiting and self._head_timer is None and data:
                # a head begun and not ended by these bytes (nearly always, a whole
                # request comes at once, and no timer is made)
                loop = asyncio.get_running_loop()
                self._head_timer = loop.call_later(self.header_timeout_s, self._head_too_slow)
        if self._head_timer is not None:  # the client left mid-head: nothing to answer
            self._head_timer.cancel()
        await self.protocol.handle(Closed())
        self._client_gone = True
        await self.idle_task.stop()  # nothing more can arrive: no keep-alive wait

    async def protocol_send(self, event) -> None:
        if isinstance(event, Updated):
            self._awaiting = event.idle
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if event.idle and self._client_gone:
                return  # a request that finished after its client left: close, do not idle
        await super().protocol_send(event)

    def _head_too_slow(self) -> None:
        """header_timeout_s after a head began, it has not ended: a 408, and close."""
        self._head_timer = None
        MeshgateTCPServer.connections.rejected(408, SLOW_HEAD[2])
        self._head_timed_out = asyncio.ensure_future(
            self._answer_and_close("408 Request Timeout", SLOW_HEAD)
        )


# What a field may be: a name is one or more token characters (RFC 9110); a
# value holds no NUL, CR, LF, VT or FF, and spaces and tabs at its ends are the
# line's optional whitespace (RFC 9112), which h11 would have had stripped first.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_NAMES = re.compile(rb"%s(?:\n%s)*" % (_TOKEN, _TOKEN))  # one a line
_LINES = re.compile(rb"(?:%s: [^\x00\r\n\x0b\x0c]*\r\n)*" % _TOKEN)
_TEXT_TOKEN = re.compile(_TOKEN.decode())

# The fields h11 reads to frame a response and to decide on keep-alive.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_TEXT_FRAMING = frozenset(name.decode() for name in _FRAMING)

# Names the gateway has set, each checked once: a token, and not a framing field.
_PLAIN_NAMES: set[str] = set()
_MOST_NAMES = 4096


def response_head(
    connection: h11.Connection | H11WSConnection,
    status: int,
    headers: Iterable,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A response's status line and fields (the app's `headers`, then the server's
    own `extra`), with `connection` moved on to sending the body;
    h11.LocalProtocolError for a field h11 would refuse once its value is stripped
    of spaces and tabs (raised before `connection` is touched, unless h11 itself
    refuses a framing field's value). The fields are checked all at once, where
    h11 would take several steps per field; h11 is then given only the framing
    fields, to frame the response from them and write them, and the others are
    written here."""
    extra = extra or []
    if type(headers) is ResponseFields:
        head = _gateway_head(connection, status, headers, extra)
        if head is not None:
            return head
    framing, written, lines, names = [], [], [], []
    try:
        for name, value in chain(headers, extra):
            line = b"%s: %s\r\n" % (name, value)
            names.append(name)
            lines.append(line)
            if name.lower() in _FRAMING:
                framing.append((bytes(name), bytes(value).strip(b" \t")))
            else:
                written.append(line)
    except UnicodeEncodeError:  # a ResponseFields name or value outside Latin-1
        raise h11.LocalProtocolError("illegal header field in the response") from None
    if not _valid(b"".join(lines), b"\n".join(names), len(names)):
        raise h11.LocalProtocolError("illegal header field in the response")
    return _head(connection, status, framing, b"".join(written))


def _gateway_head(
    connection: h11.Connection | H11WSConnection,
    status: int,
    made: ResponseFields,
    extra: list[tuple[bytes, bytes]],
) -> bytes | None:
    """`response_head` of the fields the gateway made, written from their dict at
    once; None when a name is a framing field's (a plugin's) or is not a token:
    then field by field."""
    fields = made.fields
    theirs = _server_lines(tuple(extra))
    if theirs is None or not _plain(fields):
        return None
    values = "".join(fields.values())
    if "\r" in values or "\n" in values or "\x00" in values or "\x0b" in values or "\x0c" in values:
        raise h11.LocalProtocolError("illegal header field in the response")
    ours = b""
    if fields:  # a line each, CRLF included
        try:
            ours = ("\r\n".join(map(": ".join, fields.items())) + "\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise h11.LocalProtocolError("illegal header field in the response") from None
    framing = [] if made.length is None else [(b"content-length", b"%d" % made.length)]
    return _head(connection, status, framing, ours + theirs)


@functools.lru_cache(maxsize=8)
def _server_lines(extra: tuple[tuple[bytes, bytes], ...]) -> bytes | None:
    """The server's own fields (date, server) as lines, checked; None when one is a
    framing field. Remembered: they change once a second."""
    if any(name.lower() in _FRAMING for name, _ in extra):
        return None
    lines = b"".join(map(b"%s: %s\r\n".__mod__, extra))
    if not _valid(lines, b"\n".join(map(itemgetter(0), extra)), len(extra)):
        raise h11.LocalProtocolError("illegal header field in the response")
    return lines


def _plain(names: dict[str, str]) -> bool:
    """Whether every name is a token and none is a framing field's; each checked
    once, then remembered (up to `_MOST_NAMES`)."""
    if _PLAIN_NAMES.issuperset(names):
        return True
    new = [name for name in names if name not in _PLAIN_NAMES]
    for name in new:
        if type(name) is not str or not _TEXT_TOKEN.fullmatch(name):
            return False
        if name.lower() in _TEXT_FRAMING:
            return False
    if len(_PLAIN_NAMES) + len(new) > _MOST_NAMES:
        _PLAIN_NAMES.clear()
    _PLAIN_NAMES.update(new)
    return True


def _valid(lines: bytes, names: bytes, count: int) -> bool:
    """Whether `count` fields, written out as `lines` (`name: value` and CRLF each)
    with their `names` one a line, are fields h11 accepts once their values are
    stripped of spaces and tabs. A CR or LF inside a field would make a line of
    its own: hence the count."""
    if not count:
        return not lines
    return (
        _NAMES.fullmatch(names) is not None
        and lines.count(b"\n") == count
        and _LINES.fullmatch(lines) is not None
    )


def _head(
    connection: h11.Connection | H11WSConnection,
    status: int,
    framing: list[tuple[bytes, bytes]],
    lines: bytes,
) -> bytes:
    head = connection.send(h11.Response(headers=framing, status_code=status, _parsed=True))
    assert head is not None  # None only for ConnectionClosed
    return head[:-2] + lines + b"\r\n"  # before the blank line that ends h11's


class MeshgateHTTPStream(HTTPStream):
    """hypercorn's stream, handing a response's fields on as the app sent them: the
    protocol checks them all at once (`response_head`), where hypercorn's check
    copies and strips each field first."""

    async def app_send(self, message) -> None:
        if (
            message is not None
            and message["type"] == "http.response.start"
            and self.state == ASGIHTTPState.REQUEST
        ):
            self.response = message
            fields = message.get("headers", [])
            await self.send(Response(stream_id=self.stream_id, headers=fields,
                                     status_code=int(message["status"])))  # fmt: skip
            self.state = ASGIHTTPState.RESPONSE
            return
        await super().app_send(message)


class MeshgateH11Protocol(H11Protocol):
    """OpenAI error bodies for HTTP-level errors; no request smuggling; response
    fields checked once per response rather than once per field."""

    async def stream_send(self, event) -> None:
        if not isinstance(event, Response) or event.status_code < 200:
            return await super().stream_send(event)
        extra = self.config.response_headers("h11")
        if self.keep_alive_requests >= self.config.keep_alive_max_requests:
            extra.append((b"connection", b"close"))
        try:
            try:
                head = response_head(self.connection, event.status_code, event.headers, extra)
            except h11.LocalProtocolError:
                if self.connection.our_state != h11.SEND_RESPONSE:
                    raise  # refused by h11 (a bad Content-Length): stripping cannot mend it
                # hypercorn strips each name and value before checking; here, only
                # when the fields as sent are refused
                stripped = build_and_validate_headers(chain(event.headers, extra))
                head = response_head(self.connection, event.status_code, stripped)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return  # as hypercorn's _send_h11_event: the peer broke the protocol first
        await self.send(RawData(data=head))

    async def _send_error_response(self, status_code: int, reason=None) -> None:
        reason = reason or _MESSAGES.get(status_code)
        MeshgateTCPServer.connections.rejected(status_code, reason[2] if reason else None)
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


GC_THRESHOLDS = (50_000, 50, 100)  # CPython's defaults: 700, 10, 10


def tune_gc() -> None:
    """Once a worker has started: what it loaded stays for its life, so keep it out
    of every collection, and collect less often (a request allocates hundreds of
    objects, nearly all freed by reference counting, not by the collector).
    Measured with `python -m load.bench --pipeline full --baseline <the commit
    before>` (3 rounds): chat +7% req/s bare and +9% with the full pipeline;
    streams within noise (-5% bare, -0.2% full)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def install(
    max_connections: int | None = None, counters=None, header_timeout_s: float = 20.0
) -> None:
    """Make hypercorn use the classes above (idempotent; per process), capping the
    worker's client connections at `max_connections` (default: from the fd limit)."""
    MeshgateTCPServer.header_timeout_s = header_timeout_s
    hypercorn_run.TCPServer = MeshgateTCPServer  # type: ignore[misc]
    hypercorn_protocol.H11Protocol = MeshgateH11Protocol  # type: ignore[misc]
    hypercorn_h11.HTTPStream = MeshgateHTTPStream  # type: ignore[misc]
    MeshgateTCPServer.connections = Connections(
        max_connections or default_max_connections(), counters
    )


def loop_errors(on_accept_error: Callable[[], None]):
    """An event-loop exception handler: errors as JSON log lines, failed accepts
    (asyncio's loop: out of file descriptors) counted as well."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        message = context.get("message") or "event loop error"
        exc = context.get("exception")
        if message.startswith("socket.accept()"):
            on_accept_error()
            log.error("cannot accept connections: %s; retrying in 1 s", exc or message)
            return
        log.error("%s", message, exc_info=exc)

    return handle
