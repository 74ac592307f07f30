"""Where cached answers live: an in-process LRU, or Redis with a TTL per entry.

Entries are opaque bytes; those over `compress_min_bytes` are LZ4-compressed (a
one-byte marker says which). LZ4 rather than zlib: on a streamed answer of 4 KB
zlib (level 1) took 28 µs of the gateway's time per cache miss, profiled with
py-spy under `python -m load.bench --pipeline full`, and LZ4 0.7 µs for about
the same size. Entries zlib-compressed by earlier versions are still read.
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict
from fnmatch import fnmatchcase

import lz4.block
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.state import StateUnavailable
from proxy.state.outage import Outage

RAW, ZLIB, LZ4 = b"r", b"z", b"l"
MAX_UNPACKED_BYTES = 256 * 1024 * 1024  # an LZ4 entry saying it is larger is refused


def pack(value: bytes, compress_min_bytes: int) -> bytes:
    if len(value) >= compress_min_bytes:
        return LZ4 + lz4.block.compress(value)  # the original size is stored with it
    return RAW + value


def unpack(stored: bytes) -> bytes:
    """An entry's bytes; ValueError when it cannot be read back (a corrupt entry)."""
    marker = stored[:1]
    try:
        if marker == LZ4:
            if int.from_bytes(stored[1:5], "little") > MAX_UNPACKED_BYTES:
                raise ValueError("a cache entry claims to unpack past the limit")
            return lz4.block.decompress(stored[1:])
        if marker == ZLIB:
            return zlib.decompress(stored[1:])
    except (lz4.block.LZ4BlockError, zlib.error) as exc:
        raise ValueError(f"a cache entry cannot be unpacked: {exc}") from None
    if marker != RAW:
        raise ValueError("a cache entry has no known marker")
    return stored[1:]


class MemoryStore:
    """LRU bounded by entry count and bytes; expired entries are dropped on read."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    async def get(self, key: str) -> bytes | None:
        return self.read(key)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self.write(key, value, ttl_s)

    def read(self, key: str) -> bytes | None:
        """`get` without an await, for the plugin's hot path."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if time.monotonic() >= expires:
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return value

    def write(self, key: str, value: bytes, ttl_s: float) -> None:
        """`set` without an await."""
        if len(value) > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = (time.monotonic() + ttl_s, value)
        self.bytes += len(value)
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, evicted) = self.entries.popitem(last=False)  # the least recently used
            self.bytes -= len(evicted)

    async def delete(self, pattern: str) -> int:
        doomed = [k for k in self.entries if fnmatchcase(k, pattern)]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    async def size(self) -> tuple[int, int]:
        return len(self.entries), self.bytes

    def _drop(self, key: str) -> None:
        _, value = self.entries.pop(key)
        self.bytes -= len(value)

    async def close(self) -> None:
        pass


class RedisStore:
    def __init__(self, url: str, prefix: str, timeout_s: float) -> None:
        self.prefix = prefix
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.outage = Outage("the cache's redis")

    async def get(self, key: str) -> bytes | None:
        return await self._run(self.redis.get(self.prefix + key))

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._run(self.redis.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000))))

    async def delete(self, pattern: str) -> int:
        deleted = 0
        try:
            # answers only: the semantic index keeps its entries (hashes) under the
            # same prefix, and deletes them itself
            keys = self.redis.scan_iter(match=self.prefix + pattern, count=500, _type="STRING")
            async for key in keys:
                deleted += await self.redis.delete(key)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis: {exc}") from exc
        return deleted

    async def size(self) -> tuple[int, int]:
        entries = size = 0
        try:
            keys = self.redis.scan_iter(match=self.prefix + "*", count=500, _type="STRING")
            async for key in keys:
                entries += 1
                size += await self.redis.strlen(key)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis: {exc}") from exc
        return entries, size

    async def _run(self, awaitable):
        """An entry's read or write; none while Redis is known to hang."""
        with self.outage.guarded(awaitable):
            return await awaitable

    async def close(self) -> None:
        await self.redis.aclose()
