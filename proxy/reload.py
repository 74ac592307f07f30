"""Config hot reload: SIGHUP, or a change of the config file, swaps in a new gateway.

The new file is checked the way `meshgate check` does first; a bad one is
refused with its file, line and key in the log, and the old config stays live.
A good one becomes a new Gateway that takes over what did not change (upstream
clients and connection pools, the state backend, breakers, the plugins when
nothing they depend on changed: proxy/gateway.py). The swap is one assignment:
a request keeps the gateway it started with to its end, new requests get the
new one, and what the new one did not take over is closed once the old one's
last request has ended (or `server.graceful_timeout_s` later). Each worker
watches the file, so all of them follow it; `meshgate_config_info{hash}` and a
log line say which config is live. Settings of the server itself (address,
workers, connection limits) take a restart, and the log says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
from pathlib import Path

from proxy.config import ConfigError, parse_config
from proxy.gateway import Gateway

log = logging.getLogger("meshgate.reload")

# server settings a running worker cannot change: hypercorn and the socket have them
RESTART_ONLY = (
    "host", "port", "workers", "backlog", "max_connections", "keep_alive_timeout_s",
    "keep_alive_max_requests", "graceful_timeout_s", "access_log", "log_level",
)  # fmt: skip


class Live:
    """The gateway that serves new requests."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Reloader:
    def __init__(self, live: Live, path: str, interval_s: float) -> None:
        self.live = live
        self.path = Path(path)
        self.interval_s = interval_s
        self.hash = digest(self._read())
        self._seen = self._stamp()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None
        self._show(self.hash, None)
        log.info("serving config %s (%s)", self.hash, self.path)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.trigger, "SIGHUP")
        if self.interval_s > 0:
            self._watcher = asyncio.create_task(self._watch())

    def trigger(self, why: str) -> None:
        task = asyncio.create_task(self.reload(why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop watching; let retiring gateways finish and close."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload(self, why: str) -> bool:
        """Read the file and, if it is valid, make it live. True when it was applied."""
        async with self._lock:
            old = self.live.gateway
            metrics = old.metrics
            try:
                text = self._read()
            except OSError as exc:
                metrics.config_reloads.labels("rejected").inc()
                log.error("config reload (%s) failed: cannot read %s: %s", why, self.path, exc)
                return False
            new_hash = digest(text)
            if new_hash == self.hash:
                return False
            try:
                config = parse_config(text, str(self.path))
                Gateway(config)  # every setting checked, on nothing the live one uses
                new = Gateway(config, previous=old)
                await new.start(previous=old)
            except (ConfigError, ValueError, ImportError, OSError) as exc:
                metrics.config_reloads.labels("rejected").inc()
                log.error("config reload (%s) rejected, %s stays live: %s", why, self.hash, exc)
                return False
            new.started = True
            self.live.gateway = new  # the swap: requests from now on get the new gateway
            for key in RESTART_ONLY:
                if getattr(old.config.server, key) != getattr(config.server, key):
                    log.warning("config reload: server.%s changed; it takes a restart", key)
            if old.config.tracing != config.tracing:
                log.warning("config reload: tracing changed; it takes a restart")
            old_hash, self.hash = self.hash, new_hash
            self._show(new_hash, old_hash)
            metrics.config_reloads.labels("applied").inc()
            log.info("config reloaded (%s): %s -> %s, %d models", why, old_hash, new_hash,
                     len(new.catalog.models))  # fmt: skip
            retiring = asyncio.create_task(self._retire(old, new))
            self._tasks.add(retiring)
            retiring.add_done_callback(self._tasks.discard)
            return True

    async def _retire(self, old: Gateway, new: Gateway) -> None:
        """Close what `new` did not take over, once `old` serves no request."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + old.config.server.graceful_timeout_s
        while old.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if old.active:
            log.warning("config reload: %d request(s) still on the old config", old.active)
        await old.close(successor=new)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            stamp = self._stamp()
            if stamp != self._seen:
                self._seen = stamp
                await self.reload("the file changed")

    def _read(self) -> str:
        return self.path.read_text()

    def _stamp(self) -> tuple:
        try:
            info = os.stat(self.path)
        except OSError:
            return ()
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _show(self, new: str, old: str | None) -> None:
        gauge = self.live.gateway.metrics.config_info
        if old is not None:
            with contextlib.suppress(KeyError):
                gauge.remove(old)
        gauge.labels(new).set(1)
