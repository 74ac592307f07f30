"""Thousands of streams held at once, through the gateway and directly, in one run.

    python -m load.streams --concurrency 10000 [--clients 4] [--ramp-s 10]
                           [--tokens 30 --token-delay-ms 500] [--against litellm]

The fake upstream streams `tokens` tokens `token-delay-ms` apart (by default 30
at 500 ms: 15-s streams). Client processes (`--clients`, each a bare asyncio
protocol per connection, so the load generator is not the bottleneck) open
`concurrency` streams in all, spread over `ramp-s`, and hold them to the end.
The same load goes to the upstream directly, then through one gateway worker
(and LiteLLM's proxy with `--against litellm`). Printed per target: streams
ok and failed (connection errors, statuses, cut-short streams), time to first
token percentiles, and for the gateway the requests in its access log, the
calls that waited for an upstream connection, peak resident memory and open
file descriptors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from load.bench import ROOT, free_port, litellm_proxy, process, wait_http

BODY = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": True}
METRICS_KEY = "sk-streams-metrics-0123456789"  # server.metrics_key of its gateway


class Stream(asyncio.Protocol):
    """One streamed request: when its first event came, whether it ended cleanly."""

    def __init__(self, payload: bytes, done: asyncio.Future) -> None:
        self.payload = payload
        self.done = done
        self.sent = 0.0
        self.first: float | None = None
        self.head = b""
        self.tail = b""

    def connection_made(self, transport) -> None:
        self.sent = time.perf_counter()
        transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        if len(self.head) < 64:
            self.head += data[:64]
        if self.first is None and b"data:" in data:
            self.first = time.perf_counter()
        self.tail = (self.tail + data)[-64:]
        if self.tail.endswith(b"0\r\n\r\n") and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def one(host: str, port: int, payload: bytes, timeout_s: float) -> dict:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    try:
        transport, stream = await asyncio.wait_for(
            loop.create_connection(lambda: Stream(payload, done), host, port), timeout_s
        )
    except (OSError, TimeoutError) as exc:
        return {"error": f"connect: {type(exc).__name__}"}
    try:
        await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        return {"error": "timeout"}
    finally:
        transport.close()
    status = stream.head[9:12].decode(errors="replace")
    if status != "200":
        return {"error": f"status {status or 'none'}"}
    if b"[DONE]" not in stream.tail:
        return {"error": "cut short"}
    assert stream.first is not None
    return {"ttft_ms": (stream.first - stream.sent) * 1000}


async def client(url: str, n: int, ramp_s: float, timeout_s: float) -> dict:
    parts = urlsplit(url)
    body = orjson.dumps(BODY)
    payload = (
        f"POST {parts.path} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tasks = []
    start = time.perf_counter()
    for i in range(n):
        delay = start + ramp_s * i / max(1, n) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(host, port, payload, timeout_s)))
    results = await asyncio.gather(*tasks)
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {"ttft_ms": [r["ttft_ms"] for r in results if "ttft_ms" in r], "errors": errors}


def run_clients(url: str, total: int, clients: int, ramp_s: float, timeout_s: float) -> dict:
    share = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    procs = []
    for n in share:
        if n:
            cmd = [sys.executable, "-m", "load.streams", "--client", url, "--concurrency",
                   str(n), "--ramp-s", str(ramp_s), "--timeout-s", str(timeout_s)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT))
    ttfts: list[float] = []
    errors: dict[str, int] = {}
    for proc in procs:
        out, _ = proc.communicate()
        result = orjson.loads(out)
        ttfts += result["ttft_ms"]
        for kind, count in result["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    return {"ok": len(ttfts), "errors": errors, "ttft_ms": ttfts}


class Watch:
    """Peak resident memory and open file descriptors of a process, sampled."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_mb = 0.0
        self.fds = 0

    def sample(self) -> None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss_mb = max(self.rss_mb, int(line.split()[1]) / 1024)
            self.fds = max(self.fds, len(os.listdir(f"/proc/{self.pid}/fd")))


def measure(url: str, args, watch: Watch | None) -> dict:
    import threading

    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(0.5):
            if watch is not None:
                watch.sample()

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    started = time.perf_counter()
    result = run_clients(url, args.concurrency, args.clients, args.ramp_s, args.timeout_s)
    result["seconds"] = round(time.perf_counter() - started, 1)
    stop.set()
    thread.join()
    ttfts = sorted(result.pop("ttft_ms"))
    if ttfts:
        result["ttft_p50_ms"] = round(statistics.median(ttfts), 1)
        result["ttft_p90_ms"] = round(ttfts[int(0.9 * (len(ttfts) - 1))], 1)
        result["ttft_p99_ms"] = round(ttfts[int(0.99 * (len(ttfts) - 1))], 1)
    if watch is not None:
        result["peak_rss_mb"] = round(watch.rss_mb, 1)
        result["peak_fds"] = watch.fds
    return result


def raise_fd_limit(needed: int) -> None:
    """Every process here inherits it: the upstream, the gateway, the clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(needed, soft)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))


def gateway_config(port: int, upstream_port: int) -> str:
    return f"""
server: {{host: 127.0.0.1, port: {port}, access_log: true, log_level: info, backlog: 4096,
         metrics_key: {METRICS_KEY}}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1", api_key: sk-streams}}
models:
  - name: bench
    deployments: [{{provider: up, model: bench}}]
"""


def pool_waits(port: int) -> float:
    import urllib.request

    scrape = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                    headers={"authorization": f"Bearer {METRICS_KEY}"})  # fmt: skip
    with urllib.request.urlopen(scrape, timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("meshgate_upstream_pool_wait_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4, help="load generator processes")
    parser.add_argument("--ramp-s", type=float, default=10.0, help="open the streams over this")
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--token-delay-ms", type=float, default=500.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--against", choices=["litellm"])
    parser.add_argument("--client", help=argparse.SUPPRESS)  # run as one client process
    args = parser.parse_args(argv)
    if args.client:
        result = asyncio.run(client(args.client, args.concurrency, args.ramp_s, args.timeout_s))
        sys.stdout.write(json.dumps(result))
        return
    raise_fd_limit(4 * args.concurrency + 4096)
    tmp = Path(tempfile.mkdtemp())
    up, gp = free_port(), free_port()
    results = {}
    with contextlib.ExitStack() as stack:
        knobs = ["--tokens", str(args.tokens), "--token-delay-ms", str(args.token_delay_ms)]
        cmd = [sys.executable, "-m", "load.fake_upstream", "--port", str(up), *knobs]
        stack.enter_context(process(cmd))
        wait_http(f"http://127.0.0.1:{up}/health")
        config = tmp / "gateway.yaml"
        log = tmp / "gateway.log"
        config.write_text(gateway_config(gp, up))
        serve = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
        gateway = stack.enter_context(process(serve, log=str(log)))
        wait_http(f"http://127.0.0.1:{gp}/ready")
        results["direct"] = measure(f"http://127.0.0.1:{up}/v1/chat/completions", args, None)
        time.sleep(2)
        watch = Watch(gateway.pid)
        results["meshgate"] = measure(f"http://127.0.0.1:{gp}/v1/chat/completions", args, watch)
        lines = [x for x in log.read_text().splitlines() if '"request_id"' in x]
        results["meshgate"]["requests_logged"] = len(lines)
        results["meshgate"]["pool_waits"] = pool_waits(gp)
        if args.against == "litellm":
            lp = free_port()
            proxy = stack.enter_context(litellm_proxy(lp, up, tmp))
            wait_http(f"http://127.0.0.1:{lp}/health/liveliness", timeout_s=180, proc=proxy,
                      log=str(tmp / "litellm.log"))  # fmt: skip
            results["litellm"] = measure(f"http://127.0.0.1:{lp}/v1/chat/completions", args, None)
    report(results, args)


def report(results: dict, args) -> None:
    print(f"{args.concurrency} concurrent streams of {args.tokens} tokens "
          f"{args.token_delay_ms:g} ms apart, opened over {args.ramp_s:g} s, "
          f"{args.clients} client processes")  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
