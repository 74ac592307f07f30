"""The core benchmark: the gateway against calling the fake upstream directly.

    python -m load.bench                      # one worker, default pipeline
    python -m load.bench --against litellm    # also LiteLLM's proxy on the same upstream
    python -m load.bench --workers 2          # also compare 2 workers with 1
    python -m load.bench --pipeline quotas    # also auth + quotas on Redis
    python -m load.bench --pipeline full      # also auth, quotas on Redis, an exact cache
                                              # that misses, routing and fallback
    python -m load.bench --baseline 4407100   # also every gateway above as that commit
                                              # runs it, side by side in the same rounds

Starts the fake upstream (load/fake_upstream.py) and the gateway as separate
processes, runs load/loadgen.py against each in alternating rounds, and prints
medians over the rounds: requests/s at fixed concurrency and the latency the
gateway adds at concurrency 1, for non-streaming and streaming chat. The
machine is shared and noisy, so compare the ratios, not single figures. Every
request asks something new (loadgen --unique), so a cache never answers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Say something short about benchmarks."}]
BODIES = {
    "chat": {"model": "bench", "messages": PROMPT},
    "chat-stream": {"model": "bench", "messages": PROMPT, "stream": True},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60, proc=None, log: str = "") -> None:
    """Wait for `url` to answer; fail at once if `proc`, which should serve it, exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout_s}s")


@contextlib.contextmanager
def process(args: list[str], env: dict | None = None, log: str = "/dev/null", cwd: Path = ROOT):
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def fake_upstream(port: int, tokens: int, *knobs: str):
    cmd = [sys.executable, "-m", "load.fake_upstream", "--port", str(port), "--tokens", str(tokens)]
    return process([*cmd, *knobs])


BENCH_KEY = "sk-bench-0123456789"

QUOTAS = f"""
pipeline:
  - auth:
      keys: [{{name: bench, key: {BENCH_KEY}, team: perf}}]
  - quotas:
      limits:
        - {{per: key, rpm: 100000000, tpm: 1000000000, concurrent: 1000}}
        - {{per: team, budget_usd_day: 1000000}}
"""


ROUTING = """
  - routing: {strategy: least-busy}
  - fallback: {attempts: 3, backoff_s: 0.25}
"""

# Everything a production pipeline has in front of the upstream; the cache misses.
FULL = (
    QUOTAS
    + """  - cache: {}
"""
    + ROUTING.lstrip("\n")
)


def gateway_config(
    port: int,
    upstream_ports: list[int],
    workers: int,
    tmp: Path,
    state: str | None = None,
    routing: bool = False,
    full: bool = False,
    tracing: str = "",
    lease_s: float | None = None,
) -> Path:
    """The config file of a gateway over one deployment per upstream port. With
    `state` ("memory" or a Redis URL), with auth and quotas on it (quota blocks of
    `lease_s` seconds, when given); with `routing`, routing and fallback; with
    `full`, all of them and the cache."""
    config = tmp / f"gateway-{port}.yaml"
    extra = ""
    if state == "memory":
        extra = QUOTAS
    elif state:
        extra = f'state: {{backend: redis, url: "{state}"}}\n{FULL if full else QUOTAS}'
    if lease_s is not None:
        lease = f"  - quotas:\n      lease: {{seconds: {lease_s}}}\n"
        extra = extra.replace("  - quotas:\n", lease)
    if routing:
        extra = "pipeline:" + ROUTING
    if tracing:
        extra += f"\ntracing: {tracing}\n"
    providers = "".join(
        f'  up{i}: {{type: openai, base_url: "http://127.0.0.1:{p}/v1", api_key: sk-bench}}\n'
        for i, p in enumerate(upstream_ports)
    )
    deployments = "".join(
        f"      - {{provider: up{i}, model: bench, name: d{i}, "
        "price: {input_usd_per_mtok: 1, output_usd_per_mtok: 1}}\n"
        for i in range(len(upstream_ports))
    )
    config.write_text(
        f"""
server: {{host: 127.0.0.1, port: {port}, workers: {workers}, access_log: false, log_level: warning}}
{extra}
providers:
{providers}
models:
  - name: bench
    deployments:
{deployments}
"""
    )
    return config


def gateway(port: int, upstream_ports: list[int], workers: int, tmp: Path, *how,
            cwd: Path = ROOT, **kw):  # fmt: skip
    """The gateway of `gateway_config` (`how` and `kw` are its further arguments),
    run from the source tree `cwd`."""
    config = gateway_config(port, upstream_ports, workers, tmp, *how, **kw)
    cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    return process(cmd, log=str(tmp / f"gateway-{port}.log"), cwd=cwd)


def source_tree(rev: str, tmp: Path) -> Path:
    """The project's files at commit `rev`, unpacked under `tmp`."""
    tree = tmp / f"src-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True,
                             check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def litellm_proxy(port: int, upstream_port: int, tmp: Path):
    config = tmp / "litellm.yaml"
    config.write_text(
        f"""
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: "http://127.0.0.1:{upstream_port}/v1"
      api_key: sk-bench
litellm_settings:
  telemetry: false
"""
    )
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    # LiteLLM's proxy extra pins packages the gateway's own need newer (rich,
    # cryptography): install it in a virtualenv of its own and name its command here.
    command = os.environ.get("MESHGATE_BENCH_LITELLM", "litellm")
    cmd = [command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    return process(cmd, env=env, log=str(tmp / "litellm.log"))


def redis_server(port: int, tmp: Path):
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--dir", str(tmp)]  # fmt: skip
    return process(cmd)


def load(port: int, mode: str, concurrency: int, seconds: float) -> dict:
    cmd = [
        sys.executable, "-m", "load.loadgen",
        "--url", f"http://127.0.0.1:{port}/v1/chat/completions",
        "--body", orjson.dumps(BODIES[mode]).decode(),
        "--concurrency", str(concurrency), "--seconds", str(seconds),
        "--header", f"authorization: Bearer {BENCH_KEY}",
        "--unique", "50000",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, check=True, cwd=ROOT, text=True).stdout
    return orjson.loads(out)


def rss_mb(pid: int) -> float:
    total = 0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return round(total / 1024, 1)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def median(results: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in results), 3)


def compare(targets: dict[str, int], mode: str, args) -> dict[str, dict]:
    """Alternate rounds over the targets, so drift in the machine hits each alike. In
    a round the throughput runs come back to back, then the latency runs, and every
    other round takes the targets in reverse: the runs compared with each other are
    neighbours in time, and a steady drift cancels over two rounds."""
    runs: dict[str, list[dict]] = {name: [] for name in targets}
    lat: dict[str, list[dict]] = {name: [] for name in targets}
    for port in targets.values():  # warm-up
        load(port, mode, args.concurrency, 1)
    for i in range(args.rounds):
        order = list(targets.items())[:: -1 if i % 2 else 1]
        for name, port in order:
            runs[name].append(load(port, mode, args.concurrency, args.seconds))
        for name, port in order:
            lat[name].append(load(port, mode, 1, args.seconds / 2))
    out = {}
    for name in targets:
        failed = sum(
            r["requests"] - r["statuses"].get("200", 0) + r["errors"]
            for r in runs[name] + lat[name]
        )
        out[name] = {
            "requests": sum(r["requests"] + r["errors"] for r in runs[name] + lat[name]),
            "rps": median(runs[name], "rps"),
            "rps_rounds": [r["rps"] for r in runs[name]],
            "p50_ms": median(lat[name], "p50_ms"),
            "p99_ms": median(lat[name], "p99_ms"),
            "ttfb_p50_ms": median(lat[name], "ttfb_p50_ms"),
            "failed": failed,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per load run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per fake answer")
    parser.add_argument("--against", choices=["litellm"], help="also run LiteLLM's proxy")
    parser.add_argument("--workers", type=int, default=1, help="also measure N workers")
    parser.add_argument(
        "--pipeline",
        choices=["quotas", "quotas-memory", "full"],
        help="also a gateway with auth + quotas, on Redis or on the memory backend; full: "
        "auth, quotas on Redis, an exact cache that misses, routing and fallback",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run each gateway from this commit's source, in the same rounds",
    )
    parser.add_argument(
        "--routing", action="store_true", help="also routing + fallback over two deployments"
    )
    parser.add_argument(
        "--faults",
        action="store_true",
        help="also routing + fallback over three upstreams, one failing 30%% of requests",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also tracing on, at 1%% and 100%% sampling, exporting to an OTLP receiver",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    results: dict = {"args": vars(args), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as tmpdir:
        tmp = Path(tmpdir)
        up = free_port()
        stack = contextlib.ExitStack()
        with stack:
            stack.enter_context(fake_upstream(up, args.tokens))
            wait_http(f"http://127.0.0.1:{up}/health")
            trees = {"": ROOT}
            if args.baseline:
                trees["@" + args.baseline] = source_tree(args.baseline, tmp)

            def start(name: str, *how, **kw) -> None:
                """One gateway per source tree, named `name` and `name@<rev>`."""
                for suffix, tree in trees.items():
                    port = free_port()
                    proc = stack.enter_context(gateway(port, *how, cwd=tree, **kw))
                    wait_http(f"http://127.0.0.1:{port}/ready", 60, proc,
                              str(tmp / f"gateway-{port}.log"))  # fmt: skip
                    targets[name + suffix] = port
                    pids.setdefault(name + suffix, proc.pid)

            targets = {"direct": up}
            pids: dict[str, int] = {}
            start("meshgate", [up], 1, tmp)
            if args.against == "litellm":
                ll = free_port()
                proc = stack.enter_context(litellm_proxy(ll, up, tmp))
                wait_http(f"http://127.0.0.1:{ll}/health/liveliness", 180, proc,
                          str(tmp / "litellm.log"))  # fmt: skip
                targets["litellm"] = ll
            if args.routing:
                start("meshgate+routing", [up, up], 1, tmp, routing=True)
            if args.faults:
                good, flaky = free_port(), free_port()
                stack.enter_context(fake_upstream(good, args.tokens))
                stack.enter_context(fake_upstream(flaky, args.tokens, "--error-rate", "0.3"))
                wait_http(f"http://127.0.0.1:{good}/health")
                wait_http(f"http://127.0.0.1:{flaky}/health")
                start("meshgate+faults", [up, good, flaky], 1, tmp, routing=True)
            if args.pipeline:
                state = "memory"
                if args.pipeline in ("quotas", "full"):
                    rp = free_port()
                    stack.enter_context(redis_server(rp, tmp))
                    time.sleep(0.3)
                    state = f"redis://127.0.0.1:{rp}/0"
                if args.pipeline == "full":
                    start("meshgate+full", [up, up], 1, tmp, state, full=True)
                else:
                    start("meshgate+quotas", [up], 1, tmp, state)
            if args.workers > 1:
                start(f"meshgate-{args.workers}w", [up], args.workers, tmp)
            if args.tracing:
                op = free_port()
                receiver = [sys.executable, "-m", "load.otlp_receiver", "--port", str(op),
                            "--count-only"]  # fmt: skip
                stack.enter_context(process(receiver))
                wait_http(f"http://127.0.0.1:{op}/health")
                endpoint = f"http://127.0.0.1:{op}/v1/traces"
                for ratio, label in ((0.01, "1%"), (1.0, "100%")):
                    how = f'{{enabled: true, sample_ratio: {ratio}, endpoint: "{endpoint}"}}'
                    start(f"meshgate+tracing {label}", [up], 1, tmp, tracing=how)
            for mode in BODIES:
                results["modes"][mode] = compare(targets, mode, args)
            results["meshgate_rss_mb"] = rss_mb(pids["meshgate"])
    report(results, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


def report(results: dict, args) -> None:
    print(f"concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds}s, medians")
    for mode, by_target in results["modes"].items():
        direct = by_target["direct"]
        print(f"\n{mode}")
        print(f"  {'target':<26}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'+p50 ms':>10}"
              f"{'+p99 ms':>10}{'+ttfb p50':>11}{'failed':>8}")  # fmt: skip
        for name, r in by_target.items():
            print(
                f"  {name:<26}{r['rps']:>10.1f}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
                f"{r['p50_ms'] - direct['p50_ms']:>10.3f}{r['p99_ms'] - direct['p99_ms']:>10.3f}"
                f"{r['ttfb_p50_ms'] - direct['ttfb_p50_ms']:>11.3f}{r['failed']:>8}"
            )
        mg = by_target["meshgate"]["rps"]
        if "litellm" in by_target and by_target["litellm"]["rps"]:
            print(f"  meshgate / litellm throughput: {mg / by_target['litellm']['rps']:.1f}x")
        if "meshgate+quotas" in by_target:
            q = by_target["meshgate+quotas"]
            loss = 1 - q["rps"] / mg
            added = q["p50_ms"] - by_target["meshgate"]["p50_ms"]
            where = "Redis" if args.pipeline == "quotas" else "the memory backend"
            print(f"  auth+quotas on {where}: {loss:.1%} fewer req/s, +{added:.3f} ms p50")
        if "meshgate+full" in by_target:
            f = by_target["meshgate+full"]
            # each round's pair, run back to back: how far the share moves within a run
            paired = [a / b for a, b in zip(f["rps_rounds"], by_target["meshgate"]["rps_rounds"],
                                            strict=True) if b]  # fmt: skip
            print(f"  auth+quotas(Redis)+cache miss+routing+fallback keeps "
                  f"{f['rps'] / mg:.1%} of the bare gateway's req/s "
                  f"(rounds: {min(paired):.1%} to {max(paired):.1%}), "
                  f"+{f['p50_ms'] - by_target['meshgate']['p50_ms']:.3f} ms p50")  # fmt: skip
        if args.baseline:
            for name, r in by_target.items():
                base = by_target.get(f"{name}@{args.baseline}")
                if base and base["rps"]:
                    print(f"  {name} vs {args.baseline}: {r['rps'] / base['rps']:.1%} req/s, "
                          f"{r['p50_ms'] - base['p50_ms']:+.3f} ms p50")  # fmt: skip
        if "meshgate+routing" in by_target:
            r = by_target["meshgate+routing"]
            print(f"  routing+fallback, no faults: {1 - r['rps'] / mg:.1%} fewer req/s")
        if "meshgate+faults" in by_target:
            f = by_target["meshgate+faults"]
            ok = f["requests"] - f["failed"]
            base = by_target.get("meshgate+routing", by_target["meshgate"])
            print(
                f"  one upstream of three failing 30%: {ok / f['requests']:.4%} of "
                f"{f['requests']} calls succeeded; p99 at concurrency 1 "
                f"+{f['p99_ms'] - base['p99_ms']:.3f} ms over no faults"
            )
        for label in ("1%", "100%"):
            traced = by_target.get(f"meshgate+tracing {label}")
            if traced:
                added = traced["p50_ms"] - by_target["meshgate"]["p50_ms"]
                print(f"  tracing on, {label} sampled: {1 - traced['rps'] / mg:.1%} fewer req/s, "
                      f"+{added:.3f} ms p50")  # fmt: skip
        name = f"meshgate-{args.workers}w"
        if name in by_target:
            ratio = by_target[name]["rps"] / mg
            print(f"  {args.workers} workers / 1 worker throughput: {ratio:.2f}x")
    print(f"\nmeshgate resident memory after the run: {results['meshgate_rss_mb']} MB")


if __name__ == "__main__":
    raise SystemExit(main())
