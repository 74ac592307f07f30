"""The `meshgate` command: `serve` a config under hypercorn, or `check` it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from proxy import __version__, logs
from proxy.config import Config, ConfigError, load_config

log = logging.getLogger("meshgate.server")


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
    commands.add_parser("schema", help="print the JSON Schema of the config file")
    args = parser.parse_args(argv)
    if args.command == "schema":
        from proxy.config_schema import config_schema

        print(json.dumps(config_schema(), indent=2))
        return 0
    try:
        config = load_config(args.config)
        _check_plugins(config)
    except ConfigError as exc:
        return _fail(args.command, f"invalid config: {exc}")
    if args.command == "check":
        print(describe(config))
        return 0
    for name, low, high in (("port", 1, 65535), ("workers", 1, 1024)):
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            return _fail("serve", f"--{name} must be from {low} to {high}, not {value}")
    return run(config, args)


def _fail(command: str, message: str) -> int:
    """Report why the command cannot go on: for `check`, a line for a person; for
    `serve`, a JSON line like the rest of the gateway's log. Returns the exit code."""
    if command == "check":
        print(f"meshgate: {message}", file=sys.stderr)
    else:
        logs.configure()
        log.error(message)
    return 1


def _check_plugins(config: Config) -> None:
    """Build the plugins once, as a worker will, so that settings that name models or
    providers (fallbacks, health checks, a served embedder) fail here, not in a worker.
    Building does no I/O: connections open when the gateway starts."""
    from proxy.gateway import Gateway

    try:
        Gateway(config)
    except ConfigError:
        raise
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
    stateful = config.shared_state_users()
    logs.configure(server.log_level, server.access_log)
    if workers > 1 and stateful and not config.state.shared:
        return _fail(
            "serve",
            f"{workers} workers cannot share the memory state backend that "
            f"{', '.join(stateful)} use(s): each worker would count on its own. Set "
            "`state: {backend: redis, url: ...}` or run one worker.",
        )
    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.graceful_timeout = server.graceful_timeout_s
    hc.keep_alive_timeout = server.keep_alive_timeout_s
    hc.keep_alive_max_requests = server.keep_alive_max_requests
    hc.backlog = server.backlog
    _raise_fd_limit()
    hc.accesslog = None  # the gateway writes its own access log
    hc.errorlog = log  # hypercorn's banner and errors, as JSON lines
    hc.worker_class = _worker_class()
    try:
        _try_bind(hc)
    except OSError as exc:
        return _fail("serve", f"cannot listen on {hc.bind[0]}: {exc.strerror or exc}")
    os.environ["MESHGATE_CONFIG"] = str(Path(config.source).resolve())
    os.environ["MESHGATE_WORKERS"] = str(workers)  # read by each worker's gateway
    if workers == 1:
        from proxy.app import create_app

        app = create_app(config)
        try:
            _run_loop(_serve(app, hc), hc.worker_class)
        except Exception:
            error = app.state.live.gateway.start_error
            if error is None:
                raise
            return _fail("serve", f"cannot start: {error}")
        return 0
    return _run_workers(hc, workers)


def _run_workers(hc, workers: int) -> int:
    """Serve with hypercorn's worker processes, sharing metrics through files in a
    directory of their own, removed when they have stopped."""
    from hypercorn.run import run as hypercorn_run

    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = tempfile.mkdtemp(prefix="meshgate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    hc.workers = workers
    hc.application_path = "proxy.app:create_app()"
    signal.signal(signal.SIGHUP, _forward_to_workers)  # a config reload, for every worker
    try:
        return hypercorn_run(hc)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _forward_to_workers(signum, frame) -> None:
    """SIGHUP to the parent of hypercorn's workers: each worker reloads its config."""
    me = os.getpid()
    try:
        children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    except OSError:
        return
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                os.kill(int(pid), signal.SIGHUP)
        except (OSError, ValueError):
            continue


def _try_bind(hc) -> None:
    """Bind the configured address once, so that a busy port is one clear error
    here rather than a traceback from inside the server."""
    sockets = hc.create_sockets()
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets, *sockets.quic_sockets):
        sock.close()


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
    log.info("open file limit: %d", soft)


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
