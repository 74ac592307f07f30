"""The `meshgate` command: `serve` a config under hypercorn, or `check` it."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import orjson

from proxy import __version__
from proxy.config import Config, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshgate", description="An OpenAI-compatible LLM gateway."
    )
    parser.add_argument("--version", action="version", version=f"meshgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the gateway")
    serve.add_argument("--config", default="proxy.yaml", help="config file (default: proxy.yaml)")
    serve.add_argument("--host", help="address to bind (overrides server.host)")
    serve.add_argument("--port", type=int, help="port to bind (overrides server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides server.workers)")
    check = commands.add_parser("check", help="validate a config and print what it would serve")
    check.add_argument("--config", default="proxy.yaml", help="config file (default: proxy.yaml)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        _check_plugins(config)
    except ConfigError as exc:
        print(f"meshgate: invalid config: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(describe(config))
        return 0
    return run(config, args)


def _check_plugins(config: Config) -> None:
    """Build the plugins once, as a worker will, so that settings that name models or
    providers (fallbacks, health checks, a served embedder) fail here, not in a worker.
    Building does no I/O: connections open when the gateway starts."""
    from proxy.gateway import Gateway

    try:
        Gateway(config)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"{config.source}: {exc}") from None


def describe(config: Config) -> str:
    lines = [f"config {config.source}: valid", "", "providers:"]
    for name, provider in config.providers.items():
        note = ""
        if provider.missing_env:
            note = f"  NOT USABLE: {', '.join(provider.missing_env)} not set"
        lines.append(f"  {name} ({provider.type}){note}")
    lines.append("models:")
    for model in config.models:
        lines.append(f"  {model.name}")
        for d in model.deployments:
            lines.append(f"    -> {d.label} (provider {d.provider}, model {d.model})")
    lines.append("pipeline:" + ("" if config.pipeline else " (empty)"))
    for spec in config.pipeline:
        lines.append(f"  {spec.name}")
    s = config.server
    lines.append(f"server: {s.host}:{s.port}, {s.workers} worker(s)")
    lines.append(f"state: {config.state.backend}")
    return "\n".join(lines)


def run(config: Config, args: argparse.Namespace) -> int:
    from hypercorn.config import Config as HypercornConfig

    server = config.server
    host = args.host or server.host
    port = args.port or server.port
    workers = args.workers or server.workers
    stateful = config.shared_state_plugins()
    if workers > 1 and stateful and not config.state.shared:
        print(
            f"meshgate: {workers} workers cannot share the memory state backend that "
            f"{', '.join(stateful)} use(s): each worker would count on its own. Set "
            "`state: {backend: redis, url: ...}` or run one worker.",
            file=sys.stderr,
        )
        return 1
    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.graceful_timeout = server.graceful_timeout_s
    hc.keep_alive_timeout = server.keep_alive_timeout_s
    hc.keep_alive_max_requests = server.keep_alive_max_requests
    hc.backlog = server.backlog
    _raise_fd_limit()
    hc.accesslog = None  # the gateway writes its own access log
    hc.errorlog = "-"
    hc.worker_class = _worker_class()
    os.environ["MESHGATE_CONFIG"] = str(Path(config.source).resolve())
    if workers == 1:
        from proxy.app import create_app

        app = create_app(config)
        try:
            _run_loop(_serve(app, hc), hc.worker_class)
        except Exception:
            error = app.state.gateway.start_error
            if error is None:
                raise
            print(f"meshgate: cannot start: {error}", file=sys.stderr)
            return 1
        return 0
    from hypercorn.run import run as hypercorn_run

    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="meshgate-metrics-"))
    hc.workers = workers
    hc.application_path = "proxy.app:create_app()"
    return hypercorn_run(hc)


def _raise_fd_limit() -> None:
    """Every open connection is a file descriptor: take the hard limit, and say so."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return
        soft = hard
    line = {"level": "info", "logger": "meshgate.server", "message": f"open file limit: {soft}"}
    print(orjson.dumps(line).decode(), file=sys.stderr)


async def _serve(app, hc) -> None:
    from hypercorn.asyncio import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(app, hc, shutdown_trigger=stop.wait)


def _worker_class() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _run_loop(coro, worker_class: str) -> None:
    factory = None
    if worker_class == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)
