"""A fast fake OpenAI-compatible upstream, for tests and benchmarks.

    python -m load.fake_upstream --port 9000 [--ttft-ms 50 --token-delay-ms 5 ...]

It speaks just enough HTTP/1.1 (keep-alive, content-length requests, chunked
streams) on a bare asyncio protocol, so it costs little CPU next to the
gateway under load. Every knob has a CLI default and can be set per request,
by an `x-fake-<knob>` header or by a `fake` object in the JSON body (bodies pass
through the gateway, so tests script faults that way):

    latency_ms       delay before a buffered answer
    ttft_ms          delay before a stream's first event
    token_delay_ms   delay between streamed tokens
    tokens           completion length in tokens
    error_rate       share of requests (0..1) answered with error_status
    error_status     status of injected errors (default 500)
    error_code       `code` of injected errors (e.g. context_length_exceeded)
    retry_after      Retry-After header on injected errors, as sent (seconds, a date, garbage)
    abort_after      streams: drop the connection after this many events
    error_event      streams: send an error event as the first event (0/1)
    keepalives       streams: send this many comment events (`: keep-alive`) first
    echo             add an `echo` field: the request body and headers as received (0/1)
    fail_times       fail the first N requests that carry the same fail_key, then answer
    fail_key         names the counter fail_times counts on (default "default")
    fail_mode        how injected failures look: status (error_status), error_event (a
                     stream that opens with an error event) or abort (connection dropped)

A hostile upstream, for the gateway's defences:

    redirect_to      answer 307 with this Location instead of answering
    leak             injected errors quote the credential received: full, masked
                     (sk-UPST****caaa, as providers mask keys) or prefix (its first 12)
    error_event_after streams: an error event after this many events
    malformed_event  streams: the first event's data is not JSON (0/1)
    flood            an answer of flood_bytes: body (a declared length), chunked (none
                     declared), gzip (a small gzip body inflating to it), event (a stream
                     whose one event is that long) or error (a 500 of that size)
    flood_bytes      how large a flood is (default 4 MiB)
    raw_body         answer 200 with exactly these bytes, whatever the endpoint
    raw_status       the status raw_body is answered with (default 200)
    require_key      (command line only) answer 401 to any request but GET /health,
                     GET /v1/models included, without this key as a bearer token or
                     an api-key header

Scripted answers, for checks of what an answer says:

    reply            the answer's text, instead of `tokens` tokens
    replies          a JSON list of texts: the k-th request with the same fail_key gets
                     the k-th (the last one after that), e.g. a bad answer, then a good one
    reply_by_model   a JSON object: upstream model name -> text (consensus over models)
    tool_calls       a JSON list of tool calls for the assistant message

TGI's native API is spoken too: POST /generate and /generate_stream answer as
text-generation-inference does (the same knobs apply, except echo and tool_calls).

GET /_stats returns request counts, so tests can tell what reached the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gzip
import random
import time
import uuid
from collections.abc import Iterator

import orjson

KNOBS = {
    "latency_ms": float,
    "ttft_ms": float,
    "token_delay_ms": float,
    "tokens": int,
    "error_rate": float,
    "error_status": int,
    "error_code": str,
    "retry_after": str,
    "abort_after": int,
    "error_event": int,
    "keepalives": int,
    "echo": int,
    "fail_times": int,
    "fail_key": str,
    "fail_mode": str,
    "redirect_to": str,
    "leak": str,
    "error_event_after": int,
    "malformed_event": int,
    "reply": str,
    "replies": str,
    "reply_by_model": str,
    "tool_calls": str,
    "flood": str,
    "flood_bytes": int,
    "raw_body": str,
    "raw_status": int,
    "require_key": str,
}
DEFAULTS = {
    "latency_ms": 0.0,
    "ttft_ms": 0.0,
    "token_delay_ms": 0.0,
    "tokens": 16,
    "error_rate": 0.0,
    "error_status": 500,
    "error_code": "",
    "retry_after": "",
    "abort_after": 0,
    "error_event": 0,
    "keepalives": 0,
    "echo": 0,
    "fail_times": 0,
    "fail_key": "default",
    "fail_mode": "status",
    "redirect_to": "",
    "leak": "",
    "error_event_after": 0,
    "malformed_event": 0,
    "reply": "",
    "replies": "",
    "reply_by_model": "",
    "tool_calls": "",
    "flood": "",
    "flood_bytes": 4 * 1024 * 1024,
    "raw_body": "",
    "raw_status": 200,
    "require_key": "",
}
REASONS = {
    200: b"OK",
    307: b"Temporary Redirect",
    400: b"Bad Request",
    404: b"Not Found",
    429: b"Too Many Requests",
}


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.completed_streams = 0
        self.aborted_streams = 0  # the client went away mid-stream
        self.open_streams = 0


class Connection(asyncio.Protocol):
    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.buffer = b""
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.task: asyncio.Future | None = None  # the request being handled
        self.corked: list[bytes] | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", 0))
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        self.busy = True
        self.task = asyncio.ensure_future(self._handle(method, path.split("?")[0], headers, body))

    async def _handle(self, method, path, headers, body) -> None:
        try:
            await self.server.handle(self, method, path, headers, body)
        except ConnectionError:
            pass
        self.busy = False
        if not self.closed and self.buffer:
            self._next()

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError
        if self.corked is not None:
            self.corked.append(data)
        else:
            self.transport.write(data)

    def cork(self) -> None:
        """Gather writes until uncork(): one syscall for an answer with no delays in it."""
        self.corked = []

    def uncork(self) -> None:
        data, self.corked = self.corked, None
        if data:
            self.write(b"".join(data))

    def respond(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        head = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Error"))]
        head.append(b"content-type: application/json")
        head.append(b"content-length: %d" % len(body))
        for name, value in (extra or {}).items():
            head.append(f"{name}: {value}".encode())
        self.write(b"\r\n".join(head) + b"\r\n\r\n" + body)


class FakeUpstream:
    def __init__(self, defaults: dict) -> None:
        self.defaults = defaults
        self.stats = Stats()
        self.failed: dict[str, int] = {}  # fail_key -> failures injected so far
        self.replied: dict[str, int] = {}  # fail_key -> scripted replies given so far

    def knobs(self, headers: dict, body: dict) -> dict:
        knobs = dict(self.defaults)
        for name, kind in KNOBS.items():
            header = headers.get("x-fake-" + name.replace("_", "-"))
            if header is not None:
                knobs[name] = kind(header)
        scripted = body.get("fake") if isinstance(body, dict) else None
        if isinstance(scripted, dict):
            for name, value in scripted.items():
                if name in KNOBS:
                    is_json = isinstance(value, (list, dict)) and KNOBS[name] is str
                    knobs[name] = orjson.dumps(value).decode() if is_json else KNOBS[name](value)
        return knobs

    def scripted(self, knobs: dict, model: str) -> str | None:
        """The scripted answer text, if the request scripts one."""
        if knobs["reply_by_model"]:
            by_model = orjson.loads(knobs["reply_by_model"])
            if model in by_model:
                return str(by_model[model])
        if knobs["replies"]:
            texts = orjson.loads(knobs["replies"])
            k = self.replied.get(knobs["fail_key"], 0)
            self.replied[knobs["fail_key"]] = k + 1
            return str(texts[min(k, len(texts) - 1)])
        return knobs["reply"] or None

    async def handle(self, conn: Connection, method, path, headers, raw: bytes) -> None:
        key = self.defaults["require_key"]  # the server's own setting, never a request's
        if (
            key
            and path not in ("/health", "/_stats")  # as vLLM's --api-key: /health is open
            and key not in (headers.get("api-key"), headers.get("authorization", "")[7:])
        ):
            return conn.respond(401, _error("Incorrect API key provided", "invalid_request_error",
                                            "invalid_api_key"))  # fmt: skip
        if method == "GET":
            if path.endswith("/models"):
                return conn.respond(200, orjson.dumps({"object": "list", "data": []}))
            if path == "/_stats":
                return conn.respond(200, orjson.dumps(vars(self.stats)))
            return conn.respond(200, b'{"status":"ok"}')
        self.stats.requests += 1
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return conn.respond(400, _error("invalid JSON", "invalid_request_error", None))
        knobs = self.knobs(headers, body)
        if knobs["redirect_to"]:
            return conn.respond(307, b"", {"location": knobs["redirect_to"]})
        if knobs["raw_body"]:
            return conn.respond(knobs["raw_status"], knobs["raw_body"].encode())
        if knobs["flood"]:
            return _flood(conn, knobs["flood"], knobs["flood_bytes"])
        knobs["leaked"] = _leaked(headers, knobs["leak"])
        inject = bool(knobs["error_rate"]) and random.random() < knobs["error_rate"]
        if knobs["fail_times"] and self.failed.get(knobs["fail_key"], 0) < knobs["fail_times"]:
            self.failed[knobs["fail_key"]] = self.failed.get(knobs["fail_key"], 0) + 1
            inject = True
        if inject and knobs["fail_mode"] == "abort":
            conn.transport.abort()
            return None
        if inject and knobs["fail_mode"] == "error_event" and body.get("stream"):
            knobs["error_event"] = 1
            inject = False
        if inject:
            extra = {}
            if knobs["retry_after"]:
                extra["retry-after"] = knobs["retry_after"]
            status = knobs["error_status"]
            kind = "invalid_request_error" if status == 400 else "server_error"
            if status == 429:
                kind = "rate_limit_error"
            message = f"injected error {status}{knobs['leaked']}"
            return conn.respond(status, _error(message, kind, knobs["error_code"] or None), extra)
        if path in ("/generate", "/generate_stream"):
            return await self.tgi(conn, path == "/generate_stream", body, knobs)
        kind = (
            "embeddings"
            if path.endswith("/embeddings")
            else ("chat" if path.endswith("/chat/completions") else "completions")
        )
        model = body.get("model", "fake")
        prompt_tokens = max(1, len(raw) // 16)
        echo = {"body": body, "headers": headers} if knobs["echo"] else None
        if kind == "embeddings":
            return conn.respond(200, _embeddings(body, model, prompt_tokens))
        if body.get("stream"):
            return await self.stream(conn, kind, body, model, prompt_tokens, knobs, echo)
        if knobs["latency_ms"]:
            await asyncio.sleep(knobs["latency_ms"] / 1000)
        n = knobs["tokens"]
        text = self.scripted(knobs, model)
        if text is None:
            text = " ".join(["tok"] * n)
        else:
            n = max(1, len(text) // 4)
        chat = kind == "chat"
        choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            if knobs["tool_calls"]:
                choice["message"]["tool_calls"] = orjson.loads(knobs["tool_calls"])
                choice["message"]["content"] = None
                choice["finish_reason"] = "tool_calls"
        else:
            choice["text"] = text
        answer = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            },
            "system_fingerprint": "fp_fake",
        }
        if echo is not None:
            answer["echo"] = echo
        conn.respond(200, orjson.dumps(answer))

    async def stream(self, conn, kind, body, model, prompt_tokens, knobs, echo) -> None:
        chat = kind == "chat"
        conn.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        with self._counting():
            instant = not (knobs["ttft_ms"] or knobs["token_delay_ms"] or knobs["abort_after"])
            if instant:
                conn.cork()
            try:
                for _ in range(knobs["keepalives"]):
                    _chunk(conn, b": keep-alive\n\n")
                if knobs["ttft_ms"]:
                    await asyncio.sleep(knobs["ttft_ms"] / 1000)
                if knobs["error_event"]:
                    message = "injected stream error" + knobs["leaked"]
                    _chunk(conn, b"data: " + _error(message, "server_error", None) + b"\n\n")
                    conn.write(b"0\r\n\r\n")
                    return
                if knobs["malformed_event"]:
                    _chunk(conn, b"data: {not json\n\n")
                head = {
                    "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_fake",
                }
                options = body.get("stream_options")
                usage_wanted = isinstance(options, dict) and options.get("include_usage")
                n = knobs["tokens"]
                sent = 0
                text = self.scripted(knobs, model)
                if text is None:
                    pieces = [None] + ["tok" if i == 0 else " tok" for i in range(n)]
                else:
                    pieces = [None] + [text[i : i + 4] for i in range(0, len(text), 4)]
                    n = len(pieces) - 1
                for i, piece in enumerate(pieces):
                    if knobs["abort_after"] and sent >= knobs["abort_after"]:
                        conn.transport.abort()
                        return
                    if knobs["error_event_after"] and sent == knobs["error_event_after"]:
                        message = "injected stream error" + knobs["leaked"]
                        _chunk(conn, b"data: " + _error(message, "server_error", None) + b"\n\n")
                        conn.write(b"0\r\n\r\n")
                        return
                    if i > 1 and knobs["token_delay_ms"]:
                        await asyncio.sleep(knobs["token_delay_ms"] / 1000)
                    if chat:
                        delta = (
                            {"role": "assistant", "content": ""}
                            if piece is None
                            else {"content": piece}
                        )
                        choice = {
                            "index": 0,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    else:
                        choice = {
                            "index": 0,
                            "text": piece or "",
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    event = {**head, "choices": [choice]}
                    if usage_wanted:
                        event["usage"] = None
                    if echo is not None and i == 0:
                        event["echo"] = echo
                    _chunk(conn, b"data: " + orjson.dumps(event) + b"\n\n")
                    sent += 1
                last = {"index": 0, "finish_reason": "stop", "logprobs": None}
                last.update({"delta": {}} if chat else {"text": ""})
                final = {**head, "choices": [last]}
                if usage_wanted:
                    final["usage"] = None
                _chunk(conn, b"data: " + orjson.dumps(final) + b"\n\n")
                if usage_wanted:
                    usage = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": n,
                        "total_tokens": prompt_tokens + n,
                    }
                    _chunk(
                        conn,
                        b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n",
                    )
                _chunk(conn, b"data: [DONE]\n\n")
                conn.write(b"0\r\n\r\n")
                self.stats.completed_streams += 1
            finally:
                if instant and not conn.closed:
                    conn.uncork()

    async def tgi(self, conn, stream: bool, body: dict, knobs: dict) -> None:
        """An answer in TGI's native dialect: /generate, or /generate_stream's token events."""
        text = self.scripted(knobs, "")
        pieces = ["tok" if i == 0 else " tok" for i in range(knobs["tokens"])]
        if text is not None:
            pieces = [text[i : i + 4] for i in range(0, len(text), 4)] or [""]
        details = {"finish_reason": "length", "generated_tokens": len(pieces), "seed": None}
        if not stream:
            if knobs["latency_ms"]:
                await asyncio.sleep(knobs["latency_ms"] / 1000)
            prefill = [{"id": 0, "text": "x", "logprob": None}] * max(1, len(body) // 16)
            answer = {"generated_text": "".join(pieces), "details": {**details, "prefill": prefill}}
            return conn.respond(200, orjson.dumps(answer))
        conn.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        with self._counting():
            if knobs["ttft_ms"]:
                await asyncio.sleep(knobs["ttft_ms"] / 1000)
            if knobs["error_event"]:
                error = {"error": "injected stream error", "error_type": "generation"}
                _chunk(conn, b"data: " + orjson.dumps(error) + b"\n\n")
                conn.write(b"0\r\n\r\n")
                return
            for i, piece in enumerate(pieces):
                if knobs["abort_after"] and i >= knobs["abort_after"]:
                    conn.transport.abort()
                    return
                if i and knobs["token_delay_ms"]:
                    await asyncio.sleep(knobs["token_delay_ms"] / 1000)
                last = i == len(pieces) - 1
                event = {
                    "index": i + 1,
                    "token": {"id": i, "text": piece, "logprob": -0.1, "special": False},
                    "generated_text": "".join(pieces) if last else None,
                    "details": details if last else None,
                }
                _chunk(conn, b"data:" + orjson.dumps(event) + b"\n\n")
            conn.write(b"0\r\n\r\n")
            self.stats.completed_streams += 1

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        """Count a stream open while it is written, and aborted if its client went away."""
        self.stats.open_streams += 1
        try:
            yield
        except ConnectionError:
            self.stats.aborted_streams += 1
            raise
        finally:
            self.stats.open_streams -= 1


def _leaked(headers: dict, how: str) -> str:
    """The credential this request carried, quoted as a careless provider would."""
    if not how:
        return ""
    key = headers.get("api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    quoted = {"full": key, "masked": f"{key[:8]}****{key[-4:]}", "prefix": key[:12]}[how]
    return f": Incorrect API key provided: {quoted}"


def _flood(conn: Connection, mode: str, size: int) -> None:
    """An answer too large to hold: see the `flood` knob."""
    piece = 64 * 1024
    if mode in ("body", "error"):
        return conn.respond(200 if mode == "body" else 500, b"x" * size)
    if mode == "gzip":
        return conn.respond(200, _inflating_to(size), {"content-encoding": "gzip"})
    kind = b"text/event-stream" if mode == "event" else b"application/json"
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % kind)
    if mode == "event":
        _chunk(conn, b"data: ")
    for start in range(0, size, piece):
        _chunk(conn, b"x" * min(piece, size - start))
    if mode == "event":
        _chunk(conn, b"\n\ndata: [DONE]\n\n")
    conn.write(b"0\r\n\r\n")


@functools.lru_cache(maxsize=4)
def _inflating_to(size: int) -> bytes:
    return gzip.compress(b" " * size, compresslevel=9)


def _chunk(conn: Connection, data: bytes) -> None:
    conn.write(b"%x\r\n%s\r\n" % (len(data), data))


def _error(message: str, kind: str, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def _embeddings(body: dict, model: str, prompt_tokens: int) -> bytes:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1 * ((i + j) % 7) for j in range(8)]}
        for i in range(len(items))
    ]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})


async def serve(host: str, port: int, defaults: dict, ready=None) -> None:
    upstream = FakeUpstream(defaults)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(upstream), host, port, backlog=1024)
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    for name, kind in KNOBS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=DEFAULTS[name])
    args = parser.parse_args(argv)
    defaults = {name: getattr(args, name) for name in KNOBS}

    def announce(port: int) -> None:
        print(f"fake upstream listening on {args.host}:{port}", flush=True)

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args.host, args.port, defaults, announce))


if __name__ == "__main__":
    main()
