"""Machine instructions per request, counted by valgrind: a benchmark without noise.

    python -m load.instructions                       # the bare gateway and the full pipeline
    python -m load.instructions --baseline 70b9ba7    # also both as that commit runs them

Requests/s on a shared two-core machine move by ±5% from run to run, more than
most single changes to the request path weigh. This runs each gateway under
callgrind (`apt-get install valgrind`), sends it the benchmark's non-streaming
chat for a while after a warm-up, and divides the instructions the gateway ran
by the requests it answered: the same figure, to a fraction of a percent, on
every run. It counts work, not time, so it misses what memory caches cost (a
bigger working set), and it is a complement to `python -m load.bench`, not a
replacement.

Under valgrind the gateway runs about 40 times slower, so work that runs on a
clock would be spread over 40 times fewer requests: the Redis state's flusher
(every 50 ms) and quota blocks (1 s). Both are stretched by `--slowdown` to
keep about as many requests per flush and per block as at full speed.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from load.bench import (
    BENCH_KEY,
    BODIES,
    ROOT,
    fake_upstream,
    free_port,
    gateway_config,
    process,
    redis_server,
    source_tree,
    wait_http,
)

# The gateway's CLI, with the Redis flusher's interval stretched by argv[1].
SLOWED = (
    "import sys, proxy.state.redis as r; r.FLUSH_INTERVAL_S *= float(sys.argv.pop(1)); "
    "from proxy.cli import main; sys.exit(main(sys.argv[1:]))"
)


def count(tree: Path, config: Path, port: int, args, tmp: Path) -> dict:
    """Instructions per request of the gateway `config` describes, run from `tree`."""
    dump = tmp / f"callgrind-{port}.out"
    cmd = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}",
        sys.executable, "-c", SLOWED, str(args.slowdown), "serve", "--config", str(config),
    ]  # fmt: skip
    log = tmp / f"gateway-{port}.log"
    with process(cmd, log=str(log), cwd=tree) as proc:
        wait_http(f"http://127.0.0.1:{port}/ready", 600, proc, str(log))
        drive(port, args.warmup)
        control(proc.pid, "--zero")
        answered = drive(port, args.seconds)
        control(proc.pid, "--dump=measured")
        time.sleep(1)
    for part in sorted(tmp.glob(f"callgrind-{port}.out*")):
        text = part.read_text(errors="replace")
        if "measured" in text[:2000]:
            totals = next(line for line in text.splitlines() if line.startswith("summary:"))
            instructions = int(totals.split()[1])
            return {"requests": answered, "per_request": round(instructions / answered)}
    raise RuntimeError(f"callgrind wrote no dump for the gateway on port {port}")


def control(pid: int, action: str) -> None:
    subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True)


def drive(port: int, seconds: float) -> int:
    """Requests answered in `seconds` of the benchmark's non-streaming chat."""
    cmd = [
        sys.executable, "-m", "load.loadgen",
        "--url", f"http://127.0.0.1:{port}/v1/chat/completions",
        "--body", orjson.dumps(BODIES["chat"]).decode(),
        "--concurrency", "4", "--seconds", str(seconds),
        "--header", f"authorization: Bearer {BENCH_KEY}", "--unique", "50000",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, check=True, cwd=ROOT, text=True).stdout
    result = orjson.loads(out)
    if result["errors"] or result["statuses"].get("200", 0) != result["requests"]:
        raise RuntimeError(f"the gateway failed requests under valgrind: {result}")
    return result["requests"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="of counted load")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds, not counted")
    parser.add_argument("--slowdown", type=float, default=40.0,
                        help="how much slower the gateway runs under valgrind")  # fmt: skip
    parser.add_argument("--baseline", metavar="REV", help="also both gateways as REV runs them")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshgate-instructions-") as tmpdir, \
            contextlib.ExitStack() as stack:  # fmt: skip
        tmp = Path(tmpdir)
        up, redis_port = free_port(), free_port()
        stack.enter_context(fake_upstream(up, 16))
        stack.enter_context(redis_server(redis_port, tmp))
        wait_http(f"http://127.0.0.1:{up}/health")
        redis = f"redis://127.0.0.1:{redis_port}/0"
        trees = {"": ROOT}
        if args.baseline:
            trees["@" + args.baseline] = source_tree(args.baseline, tmp)
        results = {}
        for suffix, tree in trees.items():
            for name, full in (("meshgate", False), ("meshgate+full", True)):
                port = free_port()
                config = gateway_config(
                    port, [up, up] if full else [up], 1, tmp, redis if full else None,
                    full=full, lease_s=min(60.0, args.slowdown) if full else None,
                )  # fmt: skip
                results[name + suffix] = found = count(tree, config, port, args, tmp)
                print(f"{name + suffix:28} {found['per_request']:>10,} instructions/request"
                      f"  ({found['requests']} requests)", flush=True)  # fmt: skip
        for suffix in trees:
            bare, full = results["meshgate" + suffix], results["meshgate+full" + suffix]
            share = bare["per_request"] / full["per_request"]
            print(f"full pipeline{suffix}: the bare gateway's instructions are {share:.1%} of its")
        if args.baseline:
            for name in ("meshgate", "meshgate+full"):
                now, then = results[name], results[f"{name}@{args.baseline}"]
                ratio = now["per_request"] / then["per_request"]
                print(f"{name} vs {args.baseline}: {ratio:.1%} of its instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
