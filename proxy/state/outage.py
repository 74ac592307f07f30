"""Failing fast while Redis hangs.

A Redis that refuses connections fails each call at once. One that does not
answer (paused, swapping, a network path that drops packets) costs each call
the whole `timeout_s` before it counts as unavailable: every request would wait
that long once per Redis call it makes (a quota check, a cache lookup) for as
long as the hang lasts. So after a call times out, calls fail at once for a
hold (0.5 s, doubling while the hang goes on, at most 5 s); then one call tries
Redis again while the others still fail fast, and an answer ends the outage.
Refused connections and errors Redis answers with do not start a hold: they
cost no wait.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Coroutine, Iterator
from typing import Any

from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from proxy.state.base import StateUnavailable

log = logging.getLogger("meshgate.state")

FIRST_HOLD_S = 0.5
MOST_HOLD_S = 5.0


def describe(exc: BaseException) -> str:
    """A Redis failure in words (a bare timeout says nothing of itself)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def is_hang(exc: BaseException) -> bool:
    """Whether a failed call waited out its timeout (rather than being refused)."""
    return isinstance(exc, (TimeoutError, RedisTimeout))


class Outage:
    """One Redis client's view of whether Redis is answering."""

    __slots__ = ("held_until", "hold_s", "name", "reason")

    def __init__(self, name: str) -> None:
        self.name = name  # what is held, for messages: "redis" or "the cache's redis"
        self.held_until = 0.0
        self.hold_s = 0.0  # 0 while Redis answers
        self.reason = ""

    def check(self) -> None:
        """Raise StateUnavailable during a hold. Past it, the caller is the one that
        tries Redis again: the others keep failing fast until it has an answer."""
        if not self.hold_s:
            return
        now = time.monotonic()
        if now < self.held_until:
            raise StateUnavailable(f"{self.name}: not answering ({self.reason})")
        self.held_until = now + self.hold_s

    @contextlib.contextmanager
    def guarded(self, unsent: Coroutine[Any, Any, Any] | None = None) -> Iterator[None]:
        """One Redis call: not made during a hold (`unsent`, its coroutine, is then
        closed); its failure raised as StateUnavailable, and counted."""
        try:
            self.check()
        except StateUnavailable:
            if unsent is not None:
                unsent.close()
            raise
        try:
            yield
        except (RedisError, OSError, TimeoutError) as exc:
            if isinstance(exc, ResponseError):
                self.answered()  # Redis is there: it refused this one call
            else:
                self.failed(exc)
            raise StateUnavailable(f"redis: {describe(exc)}") from exc
        self.answered()

    def failed(self, exc: BaseException) -> None:
        """A call failed: a hang starts or lengthens a hold; anything else does not."""
        if not is_hang(exc):
            return
        reason = describe(exc)
        if not self.hold_s:
            log.warning("%s is not answering (%s): calls fail at once for now", self.name, reason)
        self.hold_s = min(MOST_HOLD_S, max(FIRST_HOLD_S, 2 * self.hold_s))
        self.held_until = time.monotonic() + self.hold_s
        self.reason = reason

    def answered(self) -> None:
        if self.hold_s:
            log.warning("%s is answering again", self.name)
            self.hold_s = 0.0
            self.held_until = 0.0
