"""An upstream's connections in use, bounded and visible: no hidden queue.

Each provider has `max_connections` per worker. A call past them waits for one
to free, `pool_timeout_s` at most, first come first served, and then fails
with a 503 that names the provider and its limit. The gateway counts the wait
(a histogram) and the waiters (a gauge), and
the access log shows each request's wait as `pool_wait_ms`, apart from the
upstream's own time. A slot free at once costs no clock read and no metric
update. The adapters' own client pools are sized at or above this
one, so they never queue out of sight.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from proxy.errors import UpstreamPoolExhausted


class Pool:
    __slots__ = ("_waiters", "in_use", "limit", "on_change", "provider", "timeout_s")

    def __init__(self, provider: str, limit: int, timeout_s: float, on_change=None) -> None:
        self.provider = provider
        self.limit = limit
        self.timeout_s = timeout_s
        self.in_use = 0
        self._waiters: deque[asyncio.Future] = deque()
        self.on_change = on_change  # on_change(waiting): the waiters' gauge

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> float:
        """Take a connection slot; the seconds waited for it (0.0 when one was free)."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return 0.0
        started = time.perf_counter()
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        self._changed()
        try:
            async with asyncio.timeout(self.timeout_s):
                await slot
        except (TimeoutError, asyncio.CancelledError) as exc:
            if slot.done() and not slot.cancelled():
                self.release()  # handed over just as the wait ended: pass it on
            if isinstance(exc, TimeoutError):
                raise UpstreamPoolExhausted(
                    f"All {self.limit} connections to provider '{self.provider}' stayed busy "
                    f"for {self.timeout_s:g} s (providers.{self.provider}.max_connections, "
                    "pool_timeout_s). Please retry shortly.",
                    headers={"retry-after": "1"},
                ) from None
            raise
        finally:
            if not slot.done() or slot.cancelled():
                self._remove(slot)
            self._changed()
        return time.perf_counter() - started

    def release(self) -> None:
        """Give a slot back: to the longest waiter, or to the pool."""
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # in_use unchanged: the slot changes hands
                return
        self.in_use -= 1

    def _remove(self, slot: asyncio.Future) -> None:
        try:
            self._waiters.remove(slot)
        except ValueError:
            pass

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self._waiters))
