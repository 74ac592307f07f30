"""The HTTP layer below the app, over raw sockets: connections closed by clients
are closed at once, protocol errors carry OpenAI bodies, request smuggling and
trickled bodies are refused, and no redirect is built from the client's Host."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Iterator

import h11
import orjson
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.asgi import ResponseFields
from proxy.server import install, response_head
from tests.conftest import METRICS_KEY, Server, free_port, start_gateway

CLOSE_WAIT = "08"
SCRAPE = (b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
          b"authorization: Bearer " + METRICS_KEY.encode() + b"\r\n\r\n")  # fmt: skip


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream) -> Iterator[Server]:
    server = start_gateway(
        tmp_path_factory.mktemp("http-layer"),
        f"""
server: {{host: 127.0.0.1, keep_alive_timeout_s: 60, body_timeout_s: 1, metrics_key: {METRICS_KEY}}}
providers: {{up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}}}
models: [{{name: m, deployments: [{{provider: up, model: m}}]}}]
""",
    )
    yield server
    server.stop()


def exchange(port: int, raw: bytes, *, wait_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
            if not wait_close and b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = [int(h.split(b":")[1]) for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length:")]  # fmt: skip
                if length and len(body) >= length[0]:
                    return data


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def sockets_in_close_wait(port: int) -> int:
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == CLOSE_WAIT:
                    count += 1
    return count


def test_connections_closed_by_clients_do_not_linger(gateway):
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b'content-length: 56\r\n\r\n{"model":"m","messages":[{"role":"user","content":"x"}]}')  # fmt: skip
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
            s.sendall(request)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        # closed here, with the connection idle in keep-alive (60 s in this config)
    deadline = time.monotonic() + 5  # far below the keep-alive: nothing waits for it
    while sockets_in_close_wait(gateway.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sockets_in_close_wait(gateway.port) == 0


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /health HTTP/1.1\r\nhost: x\r\nx-bad: a\x00b\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nhost: x\r\nx-bad: a\rb\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n", 501),
        (b"NOT-HTTP\r\n\r\n", 400),
    ],
    ids=["nul", "bare-cr", "huge-header", "gzip-encoding", "not-http"],
)
def test_protocol_errors_are_openai_error_bodies(gateway, raw, status):
    got, headers, body = split(exchange(gateway.port, raw))
    assert got == status
    assert headers["content-type"] == "application/json"
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_content_length_with_transfer_encoding_is_refused_and_closed(gateway):
    body = b'{"model":"m","messages":[{"role":"user","content":"x"}]}'
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n"
           b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
           b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n") % (len(body), len(body), body)  # fmt: skip
    response = exchange(gateway.port, raw)  # returns when the server closes
    status, headers, body = split(response)
    assert status == 400 and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "ambiguous_framing"
    assert response.count(b"\r\nHTTP/1.1 ") == 0  # the smuggled second request was not served


def test_a_trickled_body_times_out_with_408(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                  b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{")  # fmt: skip
        data = b""
        for piece in b'"model"':  # a byte at a time, slower than the 1 s allowed in all
            time.sleep(0.3)
            try:
                s.sendall(bytes([piece]))
            except OSError:
                break
        while chunk := s.recv(65536):
            data += chunk
    status, _, body = split(data)
    assert status == 408
    assert orjson.loads(body)["error"]["code"] == "request_timeout"


@pytest.fixture(scope="module")
def quick_heads(tmp_path_factory, upstream) -> Iterator[Server]:
    """A gateway allowing a request's head 1 s from its first byte, and keep-alive 60 s."""
    server = start_gateway(
        tmp_path_factory.mktemp("heads"),
        f"""
server: {{host: 127.0.0.1, keep_alive_timeout_s: 60, header_timeout_s: 1, metrics_key: {METRICS_KEY}}}
providers: {{up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}}}
models: [{{name: m, deployments: [{{provider: up, model: m}}]}}]
""",
    )
    yield server
    server.stop()


_BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
CHAT = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY))  # fmt: skip


@pytest.mark.parametrize("pause", [0.0, 0.3])
def test_a_trickled_head_times_out_with_408_however_it_trickles(quick_heads, pause):
    """A head still incomplete 1 s after its first byte gets a 408 and is closed,
    whether it stalls (pause 0) or goes on trickling a byte every `pause` seconds:
    keep-alive (60 s) would have held it far longer."""
    with socket.create_connection(("127.0.0.1", quick_heads.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        for _ in range(200 if pause else 0):
            time.sleep(pause)
            try:
                s.sendall(b"x")
            except OSError:
                break
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status, headers, body = split(data)
    assert status == 408 and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "request_timeout"


REFUSALS = [
    (b"GET /health HTTP/1.1\r\nhost: x\r\nx-bad: a\x00b\r\n\r\n", "bad_request"),
    (b"NOT-HTTP\r\n\r\n", "bad_request"),
    (b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n",
     "request_header_fields_too_large"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
     "not_implemented"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
     b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n", "ambiguous_framing"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n", "request_timeout"),
]  # fmt: skip


def rejected(port: int) -> dict[str, float]:
    text = split(exchange(port, SCRAPE))[2].decode()
    prefix = 'meshgate_http_rejected_total{code="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_requests_the_http_layer_refuses_are_counted_by_code_and_logged(quick_heads):
    """Refused before the app reads them, they are in no access record: a fuzzer or a
    slow-head attack shows in `meshgate_http_rejected_total` and a log line."""
    before = rejected(quick_heads.port)
    for raw, _ in REFUSALS:
        exchange(quick_heads.port, raw)  # the 408 comes after header_timeout_s (1 s)
    after = rejected(quick_heads.port)
    for code in {code for _, code in REFUSALS}:
        expected = sum(1 for _, c in REFUSALS if c == code)
        assert after.get(code, 0) - before.get(code, 0) == expected, (code, before, after)
    assert "at the HTTP layer" in quick_heads.output()


def test_an_idle_connection_waits_for_keep_alive_not_for_a_head(quick_heads):
    """No byte sent for longer than header_timeout_s: the connection is still open,
    and a request on it, its head in two pieces, is served; so is the next one."""
    with socket.create_connection(("127.0.0.1", quick_heads.port), timeout=30) as s:
        time.sleep(1.5)
        for _ in range(2):
            s.sendall(CHAT[:20])
            time.sleep(0.1)
            s.sendall(CHAT[20:])
            data = b""
            while b"\r\n\r\n" not in data or len(split(data)[2]) < int(
                split(data)[1]["content-length"]
            ):
                data += s.recv(65536)
            assert split(data)[0] == 200
            time.sleep(1.5)  # idle again, past the head's allowance


def test_no_redirect_is_built_from_the_clients_host(gateway):
    raw = b"GET /health/ HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n"
    status, headers, body = split(exchange(gateway.port, raw))
    assert "location" not in headers
    assert status == 404 and orjson.loads(body)["error"]["code"] == "unknown_url"


def test_connections_past_the_cap_get_a_503_and_are_logged_and_counted(tmp_path, upstream):
    # Without the cap a worker out of file descriptors drops connections with no
    # response and nothing logged (uvloop accepts and closes them).
    gateway = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1, max_connections: 6, metrics_key: {METRICS_KEY}}}
providers: {{up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}}}
models: [{{name: m, deployments: [{{provider: up, model: m}}]}}]
""")  # fmt: skip
    held = []
    try:
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")  # served: it counts as open
            held.append(s)
        for _ in range(3):
            refused = exchange(gateway.port, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            status, headers, body = split(refused)
            assert (status, headers["retry-after"]) == (503, "1")
            assert orjson.loads(body)["error"]["code"] == "too_many_connections"
        held.pop().close()
        refusals, deadline = 3, time.monotonic() + 20
        while True:  # the gateway notices the close, then has room for one more
            status, _, body = split(exchange(gateway.port, SCRAPE))
            if status == 200 or time.monotonic() > deadline:
                break
            refusals += 1
            time.sleep(0.05)
        assert status == 200
        counted = [
            x for x in body.split(b"\n") if x.startswith(b"meshgate_connections_refused_total")
        ]
        assert counted == [f"meshgate_connections_refused_total {refusals}.0".encode()]
        assert "refused 1 connection(s): 6 open, the limit is 6" in gateway.output()
    finally:
        for s in held:
            s.close()
        gateway.stop()


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_loop_errors_are_logged_and_failed_accepts_counted():
    import asyncio
    import errno

    from proxy.server import loop_errors

    failed: list[int] = []
    handle = loop_errors(lambda: failed.append(1))
    loop = asyncio.new_event_loop()
    logger = logging.getLogger("meshgate.server")
    kept = Kept()
    logger.addHandler(kept)
    try:
        emfile = OSError(errno.EMFILE, "Too many open files")
        handle(loop, {"message": "socket.accept() out of system resource", "exception": emfile})
        handle(loop, {"message": "Task exception was never retrieved", "exception": ValueError()})
    finally:
        logger.removeHandler(kept)
        loop.close()
    assert failed == [1]
    messages = [r.getMessage() for r in kept.records]
    assert messages[0].startswith("cannot accept connections: [Errno 24] Too many open files")
    assert messages[1] == "Task exception was never retrieved"
    assert kept.records[1].exc_info[0] is ValueError


FIELD_BYTES = st.binary(max_size=12) | st.sampled_from(
    [b"x-ok", b"a b", b" lead", b"trail ", b"in\tside", b"cr\rlf", b"nl\n", b"\x00", b"\xff",
     b"", b"content-length", b"Transfer-Encoding", b"chunked", b"12", b"1,2", b"v\r\nx-in: 1",
     b"v\r\n", b":status", b"a:b", b"a: b", b"x\r\n\r\nbody"]
)  # fmt: skip


def accepted(fields) -> bool:
    """Whether h11, checking every field itself, sends a response with these fields."""
    try:
        server_after(POST).send(h11.Response(status_code=200, headers=fields))
    except h11.LocalProtocolError:
        return False
    return True


def trimmed(fields) -> list:
    """The fields with the spaces and tabs at their values' ends taken off: a line's
    optional whitespace, which h11 refuses inside a value it is given."""
    return [(name, value.strip(b" \t")) for name, value in fields]


def checked(fields) -> bool:
    try:
        response_head(server_after(POST), 200, fields)
    except h11.LocalProtocolError:
        return False
    return True


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(FIELD_BYTES, FIELD_BYTES), max_size=5))
def test_response_fields_are_checked_exactly_as_h11_checks_them(fields):
    """The server's one check over all of a response's fields, with h11's framing
    checks, refuses exactly what h11's own check of each field refuses, spaces and
    tabs at a value's ends aside: no field can end a line early and add one of its
    own."""
    assert checked(fields) == accepted(trimmed(fields))


TEXT = FIELD_BYTES.map(lambda raw: raw.decode("latin-1")) | st.sampled_from(["\u20ac", "x-\u2028"])
SERVERS = st.lists(st.tuples(st.sampled_from([b"date", b"server", b"alt-svc", b"bad name",
                                              b"connection"]),
                             st.sampled_from([b"v", b"close", b"a\r\nb"])), max_size=2)  # fmt: skip


def encodable(fields: ResponseFields) -> list | None:
    """The pairs a ResponseFields stands for; None when one is not Latin-1."""
    try:
        return list(fields)
    except UnicodeEncodeError:
        return None


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(TEXT, TEXT, max_size=5), st.none() | st.integers(0, 10**6), SERVERS)
def test_the_gateways_fields_are_checked_exactly_as_h11_checks_them(fields, length, extra):
    """Fields the gateway hands the server as a dict (written from it at once, not
    pair by pair), with the server's own: refused exactly when h11, checking each
    field, refuses them (spaces and tabs at a value's ends aside), or one is not
    Latin-1."""
    made = ResponseFields(fields, length)
    pairs = encodable(made)
    try:
        response_head(server_after(POST), 200, made, list(extra))
        ours = True
    except h11.LocalProtocolError:
        ours = False
    assert ours == (pairs is not None and accepted(trimmed(pairs + extra)))


NAMES = st.sampled_from(
    [
        b"content-length",
        b"Content-Length",
        b"transfer-encoding",
        b"connection",
        b"Connection",
        b"x-a",
        b"X-B",
        b"server",
        b"date",
    ]
)
VALUES = st.sampled_from([b"0", b"12", b"chunked", b"close", b"keep-alive", b"v", b"a, b"])
POST = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
REQUESTS = st.sampled_from([
    POST,
    b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
])  # fmt: skip


def server_after(request: bytes) -> h11.Connection:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(request)
    assert isinstance(connection.next_event(), h11.Request)
    return connection


def read_back(request: bytes, head: bytes) -> tuple[int, list]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=request.split()[0], target="/", headers=[("host", "x")]))
    client.receive_data(head)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    fields = sorted(response.headers.raw_items(), key=lambda f: f[0].lower())  # stable
    return response.status_code, [(n.lower(), v) for n, v in fields]


@settings(max_examples=500, deadline=None)
@given(REQUESTS, st.sampled_from([200, 204, 304, 404, 500]),
       st.lists(st.tuples(NAMES, VALUES), max_size=6))  # fmt: skip
def test_a_response_head_is_what_h11_alone_would_send(request, status, fields):
    """The server hands h11 only the framing fields and writes the rest itself: a
    client reads the same status and fields, and h11 frames the body and decides on
    keep-alive the same, as when h11 is given every field."""
    assume(accepted(fields))
    sent_as_h11_sends(request, status, fields, fields)


@settings(max_examples=500, deadline=None)
@given(REQUESTS, st.sampled_from([200, 204, 304, 404, 500]),
       st.dictionaries(NAMES.map(bytes.decode), VALUES.map(bytes.decode), max_size=5),
       st.none() | st.integers(0, 3), st.lists(st.tuples(NAMES, VALUES), max_size=2))  # fmt: skip
def test_the_gateways_response_head_is_what_h11_alone_would_send(
    request, status, fields, length, extra
):
    """As above, for fields the gateway hands the server as a dict and a body length,
    framing fields among them or not."""
    made = ResponseFields(fields, length)
    pairs = [*made, *extra]
    assume(accepted(pairs))
    sent_as_h11_sends(request, status, made, pairs, extra)


def sent_as_h11_sends(request: bytes, status: int, fields, pairs: list, extra=None) -> None:
    """The head `response_head` makes of `fields` (and the server's `extra`) reads
    back as the one h11 makes given every field (`pairs`) itself, and leaves the
    connection in the same state."""
    ours, theirs = server_after(request), server_after(request)
    head = response_head(ours, status, fields, extra)
    expected = theirs.send(h11.Response(status_code=status, headers=pairs))
    assert read_back(request, head) == read_back(request, expected)
    assert (ours.our_state, ours._cstate.keep_alive) == (
        theirs.our_state,
        theirs._cstate.keep_alive,
    )
    assert body_sent(ours) == body_sent(theirs)


def body_sent(connection: h11.Connection) -> list:
    """What a connection makes of a two-byte body and its end: bytes, or the error."""
    sent = []
    for event in (h11.Data(data=b"ab"), h11.EndOfMessage()):
        try:
            sent.append(connection.send(event))
        except h11.LocalProtocolError as exc:
            return [*sent, str(exc)]
    return sent


def test_every_connection_is_accounted_for_accepted_or_reset_by_its_client(gateway):
    def counter(name: str) -> float:
        raw = exchange(gateway.port, SCRAPE)
        line = next(x for x in split(raw)[2].splitlines() if x.startswith(name.encode() + b" "))
        return float(line.split()[1])

    accepted, reset = (
        counter("meshgate_connections_accepted_total"),
        counter("meshgate_connections_reset_total"),
    )
    for _ in range(5):  # half a request, then a reset (RST, not FIN)
        s = socket.create_connection(("127.0.0.1", gateway.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-le")
        time.sleep(0.05)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    deadline = time.monotonic() + 10
    while counter("meshgate_connections_reset_total") < reset + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter("meshgate_connections_reset_total") == reset + 5
    # the 5 reset, plus the 2 that read the metrics above and the one reading now
    assert counter("meshgate_connections_accepted_total") >= accepted + 7
    assert "broken off by the client" in gateway.output()


async def fields_app(scope, receive, send) -> None:
    """An app that answers with the fields its path names (`/padded`, `/bad`)."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    fields = {
        "/padded": [(b"x-a", b" padded\t"), (b" x-b ", b"v"), (b"content-length", b" 2")],
        "/bad": [(b"x-a", b"v\r\nx-injected: 1"), (b"content-length", b"2")],
        "/made-padded": ResponseFields({"x-a": " padded\t", "x-b": "v"}, 2),
        "/made-bad": ResponseFields({"x-a": "v\r\nx-injected: 1"}, 2),
    }[scope["path"]]
    await send({"type": "http.response.start", "status": 200, "headers": fields})
    await send({"type": "http.response.body", "body": b"ok"})


def test_fields_the_app_pads_are_sent_stripped_and_bad_ones_refused():
    """Under hypercorn with the server's classes installed: fields with spaces or tabs
    around them are sent stripped, as hypercorn's own check strips them; a field that
    stripping cannot mend gets a 500, not a line of its own."""
    install()
    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = config.errorlog = None

    async def run() -> list[bytes]:
        stop = asyncio.Event()
        server = asyncio.ensure_future(serve(fields_app, config, shutdown_trigger=stop.wait))
        try:
            for _ in range(200):
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            raw = "GET {} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            return [
                await asyncio.to_thread(exchange, port, raw.format(path).encode())
                for path in ("/padded", "/bad", "/made-padded", "/made-bad")
            ]
        finally:
            stop.set()
            await server

    padded, bad, made_padded, made_bad = asyncio.run(run())
    for response in (padded, made_padded):
        status, headers, body = split(response)
        assert (status, headers["x-a"], headers["x-b"], body) == (200, "padded", "v", b"ok")
    assert b" x-b " not in padded  # a padded name is refused, then sent stripped
    assert b"x-a:  padded\t\r\n" in made_padded  # a value's blank ends: optional whitespace
    for response in (bad, made_bad):
        status, headers, _ = split(response)
        assert status == 500 and "x-injected" not in headers and b"x-injected" not in response
