"""One embedding model per host: the host process (plugins/cache/embedder_host.py)
with the real all-MiniLM-L6-v2, reached by several HostedEmbedders as workers do."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import struct
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from plugins.cache.embedder_host import HEADER, HostedEmbedder, socket_path
from plugins.cache.parts import EmbedderConfig

pytest.importorskip("sentence_transformers", reason="needs the semantic extra")


def hosts(path: str) -> list[psutil.Process]:
    """The host processes listening at `path`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if "plugins.cache.embedder_host" in cmdline and path in cmdline:
            found.append(p)
    return found


def gone(path: str, within_s: float = 60) -> bool:
    deadline = time.monotonic() + within_s
    while hosts(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def config(tmp_path):
    path = str(tmp_path / "e.sock")
    yield EmbedderConfig(share="always", socket=path, idle_s=2)
    for p in hosts(path):
        p.kill()


def test_workers_started_together_spawn_one_host_and_share_it(config):
    async def main():
        workers = [HostedEmbedder(config) for _ in range(3)]
        await asyncio.gather(*(w.start() for w in workers))
        try:
            texts = [f"How do I sort a list, take {i}?" for i in range(20)]
            answers = await asyncio.gather(*(w.embed(t) for w in workers for t in texts))
            assert len(hosts(config.socket)) == 1
            vectors = np.array(answers)
            assert vectors.shape == (60, 384)
            assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
            # the same text from any worker: the same vector
            assert np.allclose(vectors[0], vectors[20], atol=1e-5)
            assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
        finally:
            for w in workers:
                await w.close()

    asyncio.run(main())
    assert gone(config.socket)  # idle: no worker connected for idle_s


def test_a_killed_host_is_spawned_again_by_the_next_lookup(config):
    async def main():
        worker = HostedEmbedder(config)
        await worker.start()
        try:
            first = await worker.embed("What is the capital of France?")
            (host,) = hosts(config.socket)
            host.send_signal(signal.SIGKILL)
            host.wait(10)
            again = None
            for _ in range(3):  # a lookup already on its way when it died fails; then one spawns
                try:
                    again = await worker.embed("What is the capital of France?")
                    break
                except ConnectionError:
                    continue
            assert again is not None and np.allclose(first, again, atol=1e-5)
            (new,) = hosts(config.socket)
            assert new.pid != host.pid
        finally:
            await worker.close()

    asyncio.run(main())


def test_the_socket_is_for_this_user_only(config, tmp_path):
    async def main():
        worker = HostedEmbedder(config)
        await worker.start()
        await worker.close()

    asyncio.run(main())
    mode = stat.S_IMODE(os.stat(config.socket).st_mode)
    assert mode & 0o077 == 0
    default = Path(socket_path(EmbedderConfig()))
    assert stat.S_IMODE(default.parent.stat().st_mode) == 0o700
    assert default.parent.stat().st_uid == os.getuid()


def test_a_garbled_frame_drops_that_client_only(config):
    async def main():
        worker = HostedEmbedder(config)
        await worker.start()
        try:
            with socket.socket(socket.AF_UNIX) as rogue:
                rogue.connect(config.socket)
                rogue.sendall(HEADER.pack(1, 9) + b"not json!")
                rogue.settimeout(10)
                assert rogue.recv(100) == b""  # closed
            with socket.socket(socket.AF_UNIX) as huge:
                huge.connect(config.socket)
                huge.sendall(struct.pack("!II", 1, 2**31))  # past the frame limit
                huge.settimeout(10)
                assert huge.recv(100) == b""
            with socket.socket(socket.AF_UNIX) as wrong:
                wrong.connect(config.socket)
                wrong.sendall(HEADER.pack(7, 4) + b"[42]")  # a list, but not of texts
                wrong.settimeout(10)
                ident, length = HEADER.unpack(wrong.recv(HEADER.size))
                assert ident == 7 | 0x8000_0000 and b"texts" in wrong.recv(length)
            vector = await worker.embed("still served")
            assert vector.shape == (384,)
        finally:
            await worker.close()

    asyncio.run(main())


def test_a_host_that_never_answers_fails_lookups_instead_of_holding_them(tmp_path):
    path = str(tmp_path / "silent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)  # accepts, reads nothing, answers nothing
    try:

        async def main():
            worker = HostedEmbedder(EmbedderConfig(share="always", socket=path, host_timeout_s=0.5))
            await worker.start()
            try:
                for _ in range(2):  # and again, on a fresh connection
                    with pytest.raises(ConnectionError, match="did not answer"):
                        await worker.embed("anyone there?")
                assert not worker.waiting
            finally:
                await worker.close()

        asyncio.run(main())
    finally:
        listener.close()
