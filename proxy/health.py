"""Deployment health: the core's one view of which deployments may be tried now."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("meshgate.health")


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    failures: int = 5  # failures within window_s that open the breaker
    window_s: float = 60.0
    cooldown_s: float = 30.0  # open this long, then one probe decides


class Health:
    """Which deployments may be tried now. Per deployment, a circuit breaker
    (closed; open for a cooldown; then half-open for one probe whose outcome closes
    or reopens it), breakers opened by other replicas, and failed health checks.
    The gateway owns one; routing reads it, fallback records outcomes into it."""

    def __init__(self, config: BreakerConfig | None = None, clock=time.monotonic) -> None:
        self.config = config or BreakerConfig()
        self.clock = clock
        self.failures: dict[str, deque[float]] = {}
        self.open_until: dict[str, float] = {}
        self.probing: set[str] = set()
        self.remote_until: dict[str, float] = {}  # opened by any replica, as last synced
        self.down: set[str] = set()  # failing their active health check

    def allows(self, name: str) -> bool:
        if name in self.down or self.clock() < self.remote_until.get(name, 0.0):
            return False
        until = self.open_until.get(name)
        if until is None:
            return True
        if self.clock() < until or name in self.probing:
            return False
        self.probing.add(name)  # half-open: this caller is the probe
        return True

    def is_open(self, name: str) -> bool:
        if name in self.down or self.clock() < self.remote_until.get(name, 0.0):
            return True
        until = self.open_until.get(name)
        return until is not None and (self.clock() < until or name in self.probing)

    def was_troubled(self, name: str) -> bool:
        """Open, probing or opened elsewhere: a success here should close it everywhere."""
        return name in self.open_until or name in self.remote_until

    def success(self, name: str) -> None:
        if name in self.open_until:
            log.info("circuit breaker for %s closed", name)
        self.open_until.pop(name, None)
        self.remote_until.pop(name, None)
        self.probing.discard(name)
        self.failures.pop(name, None)

    def failure(self, name: str) -> None:
        now = self.clock()
        if name in self.probing:  # the probe failed: open again
            self.probing.discard(name)
            self.open_until[name] = now + self.config.cooldown_s
            return
        recent = self.failures.setdefault(name, deque())
        recent.append(now)
        while recent and recent[0] < now - self.config.window_s:
            recent.popleft()
        if len(recent) >= self.config.failures and name not in self.open_until:
            self.open_until[name] = now + self.config.cooldown_s
            recent.clear()
            log.warning("circuit breaker for %s opened for %gs", name, self.config.cooldown_s)

    def configure(self, config: BreakerConfig) -> None:
        """Use these thresholds (the fallback plugin's `breaker:` settings)."""
        self.config = config
