"""The in-process state backend: dicts, atomic because nothing here awaits."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from proxy.state.base import (
    LEASE_TTL_S,
    MAX_TAT_S,
    SPEND_TTL_S,
    Limit,
    State,
    StateConfig,
    Verdict,
    slot_names,
    valid_amount,
)


class MemoryState(State):
    def __init__(self, config: StateConfig, clock=time.time) -> None:
        self.config = config
        self.clock = clock
        self.tats: dict[str, float] = {}
        self.leases: dict[str, dict[str, float]] = {}
        self.spend: dict[str, dict[str, float]] = {}
        self.spend_expiry: dict[str, float] = {}
        self._ops = 0

    async def acquire(self, limits: Sequence[Limit], lease: str) -> Verdict:
        self.refuse_invalid(limits)
        now = self.clock()
        self._sweep(now)
        new_tats: dict[str, float] = {}
        remaining: list[float] = []
        resets: list[float] = []
        for i, limit in enumerate(limits):
            if limit.kind == "rate":
                interval = limit.period_s / limit.limit
                tat = max(new_tats.get(limit.key, self.tats.get(limit.key, now)), now)
                new_tat = tat + limit.cost * interval
                used = new_tat - now
                if used > limit.period_s + 1e-9:
                    return _deny(i, used - limit.period_s, len(limits))
                new_tats[limit.key] = new_tat
                remaining.append(math.floor((limit.period_s - used) / interval + 1e-3))
                resets.append(used)
            elif limit.kind == "concurrency":
                held = self.leases.get(limit.key, {})
                live = sum(1 for expiry in held.values() if expiry > now)
                if live + limit.cost > limit.limit:
                    return _deny(i, 1.0, len(limits))
                remaining.append(limit.limit - live - limit.cost)
                resets.append(0.0)
            else:
                spent = self.spend.get(limit.key, {}).get(limit.field, 0.0)
                if spent + 1e-9 >= limit.limit or (
                    limit.whole and spent + limit.cost > limit.limit + 1e-9
                ):
                    return _deny(i, 0.0, len(limits))
                remaining.append(limit.limit - spent - limit.cost)
                resets.append(0.0)
        self.tats.update(new_tats)
        for limit in limits:
            if limit.kind == "concurrency":
                held = self.leases.setdefault(limit.key, {})
                for member in slot_names(lease, int(limit.cost)):
                    held[member] = now + LEASE_TTL_S
            elif limit.kind == "budget" and limit.cost > 0:  # reserve the estimated cost
                fields = self.spend.setdefault(limit.key, {})
                fields[limit.field] = fields.get(limit.field, 0.0) + limit.cost
                self.spend_expiry.setdefault(limit.key, now + SPEND_TTL_S)
        return Verdict(True, remaining=tuple(remaining), reset_s=tuple(resets))

    def adjust(self, limit: Limit, delta: float) -> None:
        if not valid_amount(delta):
            return self.dropped(1)
        now = self.clock()
        tat = max(self.tats.get(limit.key, now), now)
        self.tats[limit.key] = min(
            now + MAX_TAT_S, max(now, tat + delta * limit.period_s / limit.limit)
        )

    def release(self, keys: list[str], lease: str, slots: int = 1) -> None:
        for key in keys:
            held = self.leases.get(key)
            if held is not None:
                for member in slot_names(lease, slots):
                    held.pop(member, None)
                if not held:
                    del self.leases[key]

    def add_spend(self, entries: list[tuple[str, str, float]], ttl_s: float) -> None:
        now = self.clock()
        for key, field, amount in entries:
            if not valid_amount(amount):
                self.dropped(1)
                continue
            fields = self.spend.setdefault(key, {})
            fields[field] = fields.get(field, 0.0) + amount
            self.spend_expiry.setdefault(key, now + ttl_s)

    async def read_spend(self, key: str) -> dict[str, float]:
        return dict(self.spend.get(key, {}))

    def _sweep(self, now: float) -> None:
        """Drop expired entries now and then, so memory stays bounded by live keys."""
        self._ops += 1
        if self._ops % 1024:
            return
        self.tats = {k: t for k, t in self.tats.items() if t > now}
        for key in [k for k, e in self.spend_expiry.items() if e <= now]:
            self.spend.pop(key, None)
            del self.spend_expiry[key]


def _deny(index: int, retry_after_s: float, n: int) -> Verdict:
    return Verdict(False, denied=index, retry_after_s=max(0.0, retry_after_s))
