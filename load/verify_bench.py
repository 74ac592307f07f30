"""The verify plugin's targets, measured in one run:

    python -m load.verify_bench [--runs 50] [--rounds 3]

- sandbox: start-to-result of a trivial Python snippet (p50, p90), sequentially,
  at the isolation level this host allows (target: p50 <= 40 ms);
- concurrency: 20 sandbox runs at once, several rounds (target: no errors);
- consensus: a gateway asking three upstreams of 20, 40 and 60 ms, against the
  slowest of them called alone (target: at most its latency + 2 ms), with a
  quorum of 3 (every answer awaited) and of 2 (the third may be cancelled);
- repair: upstream calls per request when the first answer fails the schema and
  the next passes, and when two fail (target: exactly 1 + repairs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx
import orjson

from load.bench import fake_upstream, free_port, process, wait_http
from plugins.verify.sandbox import LANGUAGES, Sandbox, SandboxConfig


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sandbox_figures(runs: int, rounds: int) -> dict:
    box = Sandbox(SandboxConfig(max_concurrent=20))
    await box.start()
    if not box.available:
        return {"level": "none", "reason": box.reason}
    python = LANGUAGES["python"]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = await box.run(python, "print('ok')")
        times.append((time.perf_counter() - started) * 1000)
        assert result.outcome == "passed", result.excerpt()
    errors = 0
    walls = []
    for _ in range(rounds):
        started = time.perf_counter()
        results = await asyncio.gather(*(box.run(python, f"print({i})") for i in range(20)))
        walls.append((time.perf_counter() - started) * 1000)
        errors += sum(r.outcome != "passed" or r.stdout != f"{i}\n" for i, r in enumerate(results))
    box.close()
    return {
        "level": box.level,
        "trivial_p50_ms": round(statistics.median(times), 1),
        "trivial_p90_ms": round(percentile(times, 0.9), 1),
        "concurrent_20_errors": errors,
        "concurrent_20_wall_ms_median": round(statistics.median(walls), 1),
    }


CONFIG = """
server: {{host: 127.0.0.1, port: {port}, access_log: false, log_level: warning}}
providers:
{providers}
models:
{models}
  - name: vote3
    deployments: [{{provider: p20, model: vote3}}]
  - name: vote2
    deployments: [{{provider: p20, model: vote2}}]
  - name: json
    deployments: [{{provider: p20, model: json}}]
pipeline:
  - verify:
      rules:
        - models: [vote3]
          checks: [consensus]
          consensus: {{models: [m20, m40, m60], quorum: 3}}
        - models: [vote2]
          checks: [consensus]
          consensus: {{models: [m20, m40, m60], quorum: 2}}
        - models: [json]
          checks: [json_schema]
          max_repairs: 2
"""


def gateway_figures(tmp: Path, requests: int) -> dict:
    latencies = {"p20": 20, "p40": 40, "p60": 60}
    ports = {name: free_port() for name in latencies}
    port = free_port()
    providers = "".join(
        f'  {n}: {{type: openai, base_url: "http://127.0.0.1:{p}/v1"}}\n' for n, p in ports.items()
    )
    models = "".join(
        f"  - name: m{ms}\n    deployments: [{{provider: p{ms}, model: m{ms}}}]\n"
        for ms in latencies.values()
    )
    config = tmp / "verify-bench.yaml"
    config.write_text(CONFIG.format(port=port, providers=providers, models=models))
    with contextlib.ExitStack() as stack:
        for name, p in ports.items():
            knobs = ["--latency-ms", str(latencies[name]), "--reply", "the same answer"]
            stack.enter_context(fake_upstream(p, 16, *knobs))
            wait_http(f"http://127.0.0.1:{p}/health")
        stack.enter_context(process(["python", "-m", "proxy", "serve", "--config", str(config)]))
        wait_http(f"http://127.0.0.1:{port}/ready")
        client = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}/v1"))

        def timed(model: str, fake: dict | None = None) -> float:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            if fake:
                body["fake"] = fake
            started = time.perf_counter()
            r = client.post("/chat/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            return (time.perf_counter() - started) * 1000

        for model in ("m60", "vote3", "vote2"):
            timed(model)  # connections up
        slowest, quorum3, quorum2 = [], [], []
        for _ in range(requests):  # interleaved, so drift hits all three alike
            slowest.append(timed("m60"))
            quorum3.append(timed("vote3"))
            quorum2.append(timed("vote2"))
        schema = {"type": "object", "required": ["ok"]}
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}

        def calls_per_request(replies: list[str], tag: str) -> float:
            before = _requests(ports["p20"])
            for i in range(requests):
                fake = {"replies": replies, "fail_key": f"{tag}-{i}"}
                body = {"model": "json", "messages": [{"role": "user", "content": "hi"}],
                        "response_format": fmt, "fake": fake}  # fmt: skip
                assert client.post("/chat/completions", json=body, timeout=30).status_code == 200
            return (_requests(ports["p20"]) - before) / requests

        one_repair = calls_per_request(["nope", '{"ok": 1}'], "one")
        two_repairs = calls_per_request(["no", "nope", '{"ok": 1}'], "two")
    return {
        "slowest_upstream_alone_p50_ms": round(statistics.median(slowest), 2),
        "consensus_quorum3_p50_ms": round(statistics.median(quorum3), 2),
        "consensus_quorum3_added_ms": round(
            statistics.median(quorum3) - statistics.median(slowest), 2
        ),
        "consensus_quorum2_p50_ms": round(statistics.median(quorum2), 2),
        "upstream_calls_per_request_one_repair": one_repair,
        "upstream_calls_per_request_two_repairs": two_repairs,
    }


def _requests(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as r:
        return orjson.loads(r.read())["requests"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="sequential sandbox runs")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 20 concurrent runs")
    parser.add_argument("--requests", type=int, default=40, help="gateway requests per figure")
    args = parser.parse_args(argv)
    figures = {"sandbox": asyncio.run(sandbox_figures(args.runs, args.rounds))}
    with tempfile.TemporaryDirectory() as tmp:
        figures["gateway"] = gateway_figures(Path(tmp), args.requests)
    print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
