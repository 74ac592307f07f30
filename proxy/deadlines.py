"""Deadlines for many calls at once, on few timers.

`asyncio.timeout` puts one timer per call in the event loop's heap; at the
gateway's request rates the heap's churn (a push per call, cancelled timers
swept out later) costs about 8 µs a call, measured in-process with every plugin
on (auth, quotas, cache, routing, fallback). Here calls whose deadlines fall in
the same tick share one timer: entering is adding to the tick's set, leaving
is removing from it. A tick is a thousandth of the time allowed, at least
`MIN_TICK_S`, so a deadline fires late by at most that and never early.

    deadlines = Deadlines()
    try:
        with deadlines.within(120.0):
            return await work()
    except TimeoutError:
        ...

The semantics are asyncio.timeout's: when the deadline passes, the task is
cancelled, and the `with` turns that cancellation into TimeoutError unless the
task was also cancelled from elsewhere (a client that went away), which stays
a cancellation.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

MIN_TICK_S = 0.005


class Deadlines:
    """Shared timers, one per tick of deadlines; used from one event loop at a time
    (a timer set on a loop that has since closed simply never fires)."""

    __slots__ = ("_ticks",)

    def __init__(self) -> None:
        self._ticks: dict[tuple[asyncio.AbstractEventLoop, float, int], set[Scope]] = {}

    def within(self, seconds: float) -> Scope:
        """A context manager: the current task may run `seconds` more inside it."""
        return Scope(self, seconds)

    def _join(self, scope: Scope, loop: asyncio.AbstractEventLoop, seconds: float) -> set[Scope]:
        tick_s = max(MIN_TICK_S, seconds / 1000)
        index = math.ceil((loop.time() + seconds) / tick_s)
        key = (loop, tick_s, index)
        members = self._ticks.get(key)
        if members is None:
            members = self._ticks[key] = set()
            loop.call_at(index * tick_s, self._expire, key)
        members.add(scope)
        return members

    def _expire(self, key: tuple[asyncio.AbstractEventLoop, float, int]) -> None:
        for scope in self._ticks.pop(key, ()):
            scope.expire()

    def pending(self) -> int:
        """Scopes not yet left or expired (for tests and diagnostics)."""
        return sum(len(members) for members in self._ticks.values())


class Scope:
    __slots__ = ("_cancelling", "_deadlines", "_members", "_seconds", "_task", "expired")

    def __init__(self, deadlines: Deadlines, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError("a deadline must be a positive number of seconds")
        self._deadlines = deadlines
        self._seconds = seconds
        self.expired = False

    def __enter__(self) -> Scope:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline is kept inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._members = self._deadlines._join(self, task.get_loop(), self._seconds)
        return self

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._members.discard(self)
        if self.expired and self._task.uncancel() <= self._cancelling:
            if exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
