"""A lean HTTP/1.1 load generator: fixed concurrency, keep-alive, one POST body.

    python -m load.loadgen --url http://127.0.0.1:8080/v1/chat/completions \
        --body '{"model": "m", "messages": [...]}' --concurrency 16 --seconds 10

Prints one JSON line: requests/s, latency percentiles, and status counts. Each
connection runs its requests back to back on a bare asyncio protocol, so the
generator itself costs little CPU on a machine it shares with what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from urllib.parse import urlsplit

import orjson


class Client(asyncio.Protocol):
    """One keep-alive connection; `request()` sends and waits for the full response."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.done: asyncio.Future | None = None
        self.first_byte: float | None = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
        self.buffer += data
        status = _complete(self.buffer)
        if status is not None and self.done is not None and not self.done.done():
            self.done.set_result(status)

    @property
    def closing(self) -> bool:
        """The server said `connection: close`: open a new connection for the next request."""
        end = self.buffer.find(b"\r\n\r\n")
        return b"\r\nconnection: close" in bytes(self.buffer[:end]).lower()

    async def request(self, payload: bytes) -> tuple[int, float]:
        self.buffer.clear()
        self.first_byte = None
        self.done = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        self.transport.write(payload)
        status = await self.done
        return status, self.first_byte - started


def _complete(buffer: bytearray) -> int | None:
    """The status once `buffer` holds a whole response, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    status = int(head[9:12])
    at = head.find(b"content-length:")
    if at >= 0:
        length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
        return status if len(buffer) >= end + 4 + length else None
    if b"transfer-encoding: chunked" in head:
        return status if buffer.endswith(b"0\r\n\r\n") and _chunked_done(buffer, end + 4) else None
    return None


def _chunked_done(buffer: bytearray, at: int) -> bool:
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return False
        size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        if size == 0:
            return True
        at = line_end + 2 + size + 2
        if at > len(buffer):
            return False


async def run(
    url: str, body: bytes | list[bytes], concurrency: int, seconds: float, headers: dict
) -> dict:
    """Load `url` with `body`, or with each of several bodies in turn."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    head = [f"POST {parts.path} HTTP/1.1", f"host: {host}:{port}", "content-type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    payloads = [
        ("\r\n".join([*head, f"content-length: {len(b)}"]) + "\r\n\r\n").encode() + b
        for b in ([body] if isinstance(body, bytes) else body)
    ]
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    firsts: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    deadline = time.perf_counter() + seconds
    sent = 0  # one count over every connection: bodies are taken in turn

    async def worker(n: int) -> None:
        nonlocal errors, sent
        transport, client = await loop.create_connection(Client, host, port)
        try:
            while time.perf_counter() < deadline:
                payload = payloads[sent % len(payloads)]
                sent += 1
                started = time.perf_counter()
                try:
                    status, first = await client.request(payload)
                except ConnectionError:
                    errors += 1
                    transport, client = await loop.create_connection(Client, host, port)
                    continue
                latencies.append(time.perf_counter() - started)
                firsts.append(first)
                statuses[status] = statuses.get(status, 0) + 1
                if client.closing:
                    transport.close()
                    transport, client = await loop.create_connection(Client, host, port)
        finally:
            transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i * 7) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return summarize(latencies, firsts, statuses, errors, elapsed)


def summarize(latencies, firsts, statuses, errors, elapsed) -> dict:
    def pct(values, q):
        if not values:
            return None
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(latencies, 0.50),
        "p90_ms": pct(latencies, 0.90),
        "p99_ms": pct(latencies, 0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
        "ttfb_p50_ms": pct(firsts, 0.50),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors,
    }


def unique_bodies(body: dict, count: int) -> list[bytes]:
    """`count` copies of a chat body, each asking something no other run asked."""
    salt = os.urandom(6).hex()
    messages = body["messages"]
    out = []
    for i in range(count):
        last = {**messages[-1], "content": f"{messages[-1]['content']} ({salt}-{i})"}
        out.append(orjson.dumps({**body, "messages": [*messages[:-1], last]}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fixed-concurrency HTTP/1.1 POST load.")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="JSON body, or @file")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--header", action="append", default=[], help="name: value")
    parser.add_argument(
        "--unique",
        type=int,
        default=0,
        help="send N different bodies in turn (the last message's text made unique), so "
        "a cache misses",
    )
    args = parser.parse_args(argv)
    body = args.body
    if body.startswith("@"):
        with open(body[1:], "rb") as f:
            body = f.read().decode()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    payload: bytes | list[bytes] = body.encode()
    if args.unique:
        payload = unique_bodies(orjson.loads(body), args.unique)
    with runner:
        result = runner.run(run(args.url, payload, args.concurrency, args.seconds, headers))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
