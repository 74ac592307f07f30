"""State shared by plugins across requests, processes and replicas.

Two backends with one contract: `memory` (one process, the default) and `redis`
(any number of processes). Limits are checked and counted in one atomic step:

- `rate`: GCRA (generic cell rate algorithm). A limit of L per period P lets
  one unit through every P/L seconds with bursts up to L, and no burst at
  window boundaries. A request of cost c moves the key's theoretical arrival
  time (TAT) by c·P/L; settling later moves it back or on, so token
  reservations are refunded exactly.
- `concurrency`: a sorted set of leases, each expiring on its own, so a crashed
  process cannot hold a slot forever. A lease of `cost` slots holds that many
  (a process's block of slots, plugins/quota_leases.py).
- `budget`: the amount spent so far (a field of a spend hash), reservations of
  calls in flight included, must be below the limit; an admitted call reserves
  its estimated cost (`cost`) there at once, so concurrent calls cannot all pass
  a budget that only a few of them fit in. Overshoot is bounded by one call.
  With `whole`, the cost must fit under the limit entirely (a block of budget a
  process holds for calls to come).

No single operation can poison the state: values are checked before they are
counted (finite, in range), a rate limit's debt is bounded (MAX_TAT_S), and an
operation the backend refuses is dropped and counted, never retried forever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("meshgate.state")

LEASE_TTL_S = 900.0  # longest a concurrency slot is held without being released
MAX_TAT_S = 7 * 86400  # how far a rate limit's debt may reach
MAX_SLOTS = 1_000  # the most concurrency slots one lease holds
SPEND_TTL_S = 40 * 86400  # how long a day's or month's spend is kept


class StateUnavailable(Exception):
    """The state backend did not answer (Redis down or slow)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StateConfig:
    backend: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    timeout_s: float = 0.25  # a slower Redis counts as unavailable
    max_connections: int = 64
    prefix: str = "meshgate:"

    @property
    def shared(self) -> bool:
        return self.backend == "redis"


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit to check: `key` names its counter."""

    kind: Literal["rate", "concurrency", "budget"]
    key: str
    limit: float
    period_s: float = 60.0  # rate only
    cost: float = 1.0  # rate: requests or tokens; concurrency: slots; budget: USD reserved
    field: str = ""  # budget only: the spend hash field
    whole: bool = False  # budget only: the cost must fit under the limit


@dataclass(slots=True)
class Verdict:
    allowed: bool
    denied: int = -1  # index of the limit that refused
    retry_after_s: float = 0.0
    remaining: tuple[float, ...] = ()  # per limit (rate: units left now)
    reset_s: tuple[float, ...] = ()  # per limit (rate: until fully replenished)


def valid_limit(limit: Limit) -> bool:
    """Whether a limit's numbers can be counted: finite, positive limits and periods,
    and a cost that is not negative. (NaN fails every comparison; a value that is not
    a number cannot be compared.)"""
    try:
        if limit.kind == "concurrency" and not (
            1 <= limit.cost <= MAX_SLOTS and limit.cost == int(limit.cost)
        ):
            return False
        return 0 < limit.limit < _BIG and 0 < limit.period_s < _BIG and 0 <= limit.cost < _BIG
    except TypeError:
        return False


def slot_names(lease: str, slots: int) -> list[str]:
    """The members a lease of `slots` concurrency slots holds: the lease's own name for
    one slot, `<lease>#1`... for more."""
    return [lease] if slots == 1 else [f"{lease}#{i}" for i in range(1, slots + 1)]


def valid_amount(amount: float) -> bool:
    """Whether an amount can be added to a counter: a finite number under 1e15."""
    try:
        return -_BIG < amount < _BIG
    except TypeError:
        return False


_BIG = 1e15


class State:
    """The contract both backends implement."""

    config: StateConfig

    on_dropped: Callable[[int], None] | None = None  # counts dropped operations (metrics)

    def dropped(self, count: int) -> None:
        """`count` operations were refused (a value out of range): dropped, not retried."""
        log.warning("state: dropped %d operation(s) with values that cannot be counted", count)
        if self.on_dropped is not None:
            self.on_dropped(count)

    def refuse_invalid(self, limits: Sequence[Limit]) -> None:
        if not all(valid_limit(limit) for limit in limits):
            self.dropped(1)
            raise StateUnavailable("a limit with values that cannot be counted was refused")

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(self, limits: Sequence[Limit], lease: str) -> Verdict:
        """Check every limit; if all pass, count them all (atomically) and take a lease."""
        raise NotImplementedError

    # After-call work (adjust, release, add_spend) never waits and never fails: the
    # memory backend applies it at once, Redis sends it with its next batch (and
    # keeps it through an outage). So a call's end costs no await, and no caller
    # has an outage of its own to handle there.

    def adjust(self, limit: Limit, delta: float) -> None:
        """Move a rate limit by `delta` units (negative refunds part of a reservation)."""
        raise NotImplementedError

    def release(self, keys: list[str], lease: str, slots: int = 1) -> None:
        """Give back the concurrency slots `lease` holds under `keys` (`slots` each)."""
        raise NotImplementedError

    def add_spend(self, entries: list[tuple[str, str, float]], ttl_s: float) -> None:
        """Add amounts to spend hashes: (hash key, field, amount)."""
        raise NotImplementedError

    def add_spend_to(
        self, places: tuple[tuple[str, str], ...], amount: float, ttl_s: float
    ) -> None:
        """Add one amount to each (hash key, field) of `places`: a call's cost, counted for
        its key, team, user, model and the whole gateway, for the day and the month."""
        self.add_spend([(key, field, amount) for key, field in places], ttl_s)

    async def read_spend(self, key: str) -> dict[str, float]:
        raise NotImplementedError

    async def flush(self) -> None:
        """Make after-call work (adjust, release, add_spend) visible to every process now."""

    async def breaker_failure(self, name: str, failures: int, window_s: float, cooldown_s: float):
        """Count a failure of `name` for every process; True when that opened its breaker.
        None when breakers are not shared (one process)."""
        return None

    async def breaker_close(self, name: str) -> None:
        """Close `name`'s breaker for every process."""

    async def breakers_open(self, names: list[str]) -> dict[str, float] | None:
        """Seconds each open breaker among `names` stays open, for every process;
        None when breakers are not shared."""
        return None
