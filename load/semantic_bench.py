"""The cache's speed: start-up with the semantic cache, exact hits, semantic lookups.

    python -m load.semantic_bench                 # 3 rounds of 5 s per figure
    python -m load.semantic_bench --rounds 5 --out semantic.json

Starts the fake upstream and the gateway with `cache: {semantic: {}}` (the
real all-MiniLM-L6-v2), times start-up to `/ready`, caches the first prompt of
every paraphrase pair in load/semantic_pairs.tsv, then loads the gateway with
(1) those same requests, which are exact hits, and (2) their paraphrases that
the lookup serves, each of which is an exact miss followed by a semantic
lookup and hit (a semantic hit is not stored under the paraphrase's own key, so
every request repeats the whole lookup). Figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
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


def write_config(tmp: Path, port: int, upstream_port: int) -> Path:
    config = tmp / "semantic-bench.yaml"
    config.write_text(
        f"""
server: {{host: 127.0.0.1, port: {port}, access_log: false, log_level: warning, admin_key: {ADMIN}}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1", api_key: sk-bench}}
models:
  - {{name: bench, deployments: [{{provider: up, model: bench}}]}}
pipeline:
  - auth:
      keys: [{{name: bench, key: {KEY}, team: perf}}]
  - cache: {{semantic: {{}}}}
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--startups", type=int, default=3, help="start-ups to time")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)

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
