"""One embedding model per host: a process that embeds for every worker, over a Unix socket.

With the semantic cache on, a worker that loads all-MiniLM-L6-v2 itself holds
about 525 MB (torch and the model); four workers hold 2 GB. Instead, the first
worker to start spawns this process (under a file lock, so two workers never
spawn two), and every worker reaches it through `HostedEmbedder`, which imports
neither torch nor the model. The process batches the texts of all its clients
into one model call (the micro-batching of embedder.py, across workers), and
exits once no worker has been connected for `idle_s`.

The socket is made by the same user with mode 0600, in a directory only that
user can write (the temporary directory's `meshgate-<uid>`), so no other user
can reach the model or stand in for it.

Frames, both ways: a 4-byte request id and a 4-byte length, then the payload:
a JSON list of texts; back, float32 vectors (length = n * dim * 4, dim first
as 4 bytes), or an error message with the id's high bit set.

    python -m plugins.cache.embedder_host --socket PATH [--model DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import orjson

from plugins.cache.embedder import Embedder, LocalEmbedder
from plugins.cache.parts import EmbedderConfig
from proxy import logs

log = logging.getLogger("meshgate.cache")

HEADER = struct.Struct("!II")
FAILED = 0x8000_0000
MAX_FRAME_BYTES = 64 * 1024 * 1024


def socket_path(config: EmbedderConfig) -> str:
    """Where the host for this model listens: one per user and model directory."""
    if config.socket:
        return config.socket
    digest = hashlib.sha256(f"{config.path or 'bundled'}\0{config.threads}".encode()).hexdigest()
    return os.path.join(_private_dir(), f"embedder-{digest[:16]}.sock")


def _private_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"meshgate-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} must belong to this user with mode 0700")
    return path


class HostedEmbedder(Embedder):
    """An embedder whose model runs in the host process, spawned if none is running."""

    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__(config.max_batch)
        self.config = config
        self.path = socket_path(config)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.waiting: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.receiver: asyncio.Task | None = None
        self.connecting = asyncio.Lock()

    async def start(self) -> None:
        await self._connect()
        await super().start()

    async def close(self) -> None:
        await super().close()
        await self._drop(ConnectionError("embedder closed"))

    async def encode(self, texts: list[str]) -> np.ndarray:
        if self.writer is None or self.writer.is_closing():
            await self._connect()  # the host exited or was killed: reach (or spawn) it again
        assert self.writer is not None
        self.next_id = ident = (self.next_id + 1) % FAILED
        future = asyncio.get_running_loop().create_future()
        self.waiting[ident] = future
        payload = orjson.dumps(texts)
        self.writer.write(HEADER.pack(ident, len(payload)) + payload)
        try:
            await self.writer.drain()
            return await asyncio.wait_for(future, self.config.host_timeout_s)
        except TimeoutError:
            await self._drop(ConnectionError("the embedder host did not answer"))
            raise ConnectionError(
                f"the embedder host did not answer in {self.config.host_timeout_s:g} s"
            ) from None
        finally:
            self.waiting.pop(ident, None)

    async def _connect(self) -> None:
        async with self.connecting:
            if self.writer is not None and not self.writer.is_closing():
                return
            await self._drop(ConnectionError("reconnecting"))
            try:
                self.reader, self.writer = await asyncio.open_unix_connection(self.path)
            except OSError:
                await asyncio.get_running_loop().run_in_executor(None, self._spawn)
                self.reader, self.writer = await asyncio.open_unix_connection(self.path)
            self.receiver = asyncio.create_task(self._receive(self.reader))

    def _spawn(self) -> None:
        """Start the host unless another worker just did; blocks until it listens."""
        with open(self.path + ".lock", "a+") as lock:
            os.chmod(lock.name, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _listening(self.path):
                return
            command = [sys.executable, "-m", "plugins.cache.embedder_host", "--socket", self.path,
                       "--threads", str(self.config.threads), "--max-batch",
                       str(self.config.max_batch), "--idle-s", str(self.config.idle_s),
                       "--detach"]  # fmt: skip
            if self.config.path:
                command += ["--model", self.config.path]
            # It detaches (a session of its own, its parent init): it outlives the worker
            # that spawned it, for the others, and is never this worker's zombie.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + ".pid")
            subprocess.run(command, stdin=subprocess.DEVNULL, check=True, timeout=30)
            deadline = time.monotonic() + self.config.start_timeout_s
            while not _listening(self.path):
                pid = _pid(self.path + ".pid")
                if pid is not None and not _alive(pid):
                    raise RuntimeError("the embedder host exited before it listened")
                if time.monotonic() > deadline:
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                    raise RuntimeError("the embedder host did not start in time")
                time.sleep(0.05)
            pid = _pid(self.path + ".pid")
            log.info("embedder host started (pid %s) at %s", pid, self.path)

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                ident, length = HEADER.unpack(await reader.readexactly(HEADER.size))
                data = await reader.readexactly(length)
                future = self.waiting.get(ident & ~FAILED)
                if future is None or future.done():
                    continue
                if ident & FAILED:
                    future.set_exception(RuntimeError(f"embedder host: {data.decode()[:200]}"))
                else:
                    dim = int.from_bytes(data[:4], "big")
                    vectors = np.frombuffer(data[4:], dtype=np.float32).reshape(-1, dim)
                    future.set_result(vectors)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            await self._drop(ConnectionError(f"embedder host gone: {exc!r}"))

    async def _drop(self, exc: Exception) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(exc)
        self.waiting.clear()
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


def _pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _detach() -> None:
    """Fork, and let the parent exit: the child runs on, its own session's leader."""
    if os.fork():
        os._exit(0)
    os.setsid()


def _listening(path: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


class Host:
    """The process side: one model, every worker's texts batched together."""

    def __init__(self, embedder: LocalEmbedder, idle_s: float) -> None:
        self.embedder = embedder
        self.idle_s = idle_s
        self.clients = 0
        self.idle_since = time.monotonic()

    async def serve(self, path: str) -> None:
        await self.embedder.start()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by a host that died; the spawner holds the lock
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self.client, path)
        finally:
            os.umask(old)
        log.info("embedder host listening at %s", path)
        self.idle_since = time.monotonic()  # the model took a while to load
        async with server:
            while self.clients or time.monotonic() - self.idle_since < self.idle_s:
                await asyncio.sleep(min(1.0, self.idle_s))
        log.info("embedder host: no worker for %.0f s, exiting", self.idle_s)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                ident, length = HEADER.unpack(await reader.readexactly(HEADER.size))
                if length > MAX_FRAME_BYTES:
                    break
                texts = orjson.loads(await reader.readexactly(length))
                task = asyncio.create_task(self.answer(writer, ident, texts))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, orjson.JSONDecodeError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            self.clients -= 1
            self.idle_since = time.monotonic()
            writer.close()

    async def answer(self, writer: asyncio.StreamWriter, ident: int, texts) -> None:
        try:
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("a frame is a JSON list of texts")
            vectors = await asyncio.gather(*(self.embedder.embed(t) for t in texts))
            matrix = np.asarray(vectors, dtype=np.float32)
            payload = matrix.shape[1].to_bytes(4, "big") + matrix.tobytes()
        except Exception as exc:
            ident, payload = ident | FAILED, str(exc).encode()
        if not writer.is_closing():
            writer.write(HEADER.pack(ident, len(payload)) + payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model", help="a sentence-transformers model directory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--detach", action="store_true", help="run on in the background")
    args = parser.parse_args(argv)
    if args.detach:
        _detach()
    with open(args.socket + ".pid", "w") as f:
        f.write(str(os.getpid()))
    logs.configure("info", access_log=False)  # JSON lines on stderr, as the gateway's
    config = EmbedderConfig(path=args.model, threads=args.threads, max_batch=args.max_batch)
    asyncio.run(Host(LocalEmbedder(config), args.idle_s).serve(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
