"""Where cached answers live: an in-process LRU, or Redis with a TTL per entry.

Entries are opaque bytes; those over `compress_min_bytes` are zlib-compressed
(a one-byte marker says which).
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict
from fnmatch import fnmatchcase

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.state import StateUnavailable

RAW, ZLIB = b"r", b"z"


def pack(value: bytes, compress_min_bytes: int) -> bytes:
    if len(value) >= compress_min_bytes:
        return ZLIB + zlib.compress(value, 1)
    return RAW + value


def unpack(stored: bytes) -> bytes:
    return zlib.decompress(stored[1:]) if stored[:1] == ZLIB else stored[1:]


class MemoryStore:
    """LRU bounded by entry count and bytes; expired entries are dropped on read."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    async def get(self, key: str) -> bytes | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if time.monotonic() >= expires:
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = (time.monotonic() + ttl_s, value)
        self.bytes += len(value)
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

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
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis: {exc}") from exc

    async def close(self) -> None:
        await self.redis.aclose()
