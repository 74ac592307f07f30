"""Quota leases: a caller far from its limits is admitted from a block held in memory.

With a shared state (Redis), checking a call's limits is a round trip and a
script run. A caller far from its limits does not need one per call: the
process reserves a block of units for the caller's limits at once (requests,
tokens, concurrency slots, budget), through the same atomic check as one call,
and admits the caller's next calls from the block in memory.

- **Never more than the limits.** A block is reserved in the shared state before
  a call uses it, and a call is admitted only from what its block has left, so
  leases let through no more than checking each call would: rate and
  concurrency limits hold exactly, a budget overshoots by at most one call's
  estimation error, as without leases.
- **What they cost.** Units a process holds and has not used are not available
  to other processes until it gives them back (after `seconds`, or when the
  block runs out), so near a limit another process can be refused a little
  early. A block is sized to twice what the caller used from the last one,
  is at most `share` of each limit, and is not taken when it does not fit: then
  calls are checked one by one, as without leases, for `seconds`.
- **A process that dies** keeps its block: requests and tokens it held count as
  used, its slots expire with their lease TTL, and its budget block stays
  reserved until the period ends.

Headers (`x-ratelimit-remaining-*`) are what the shared state said when the
block was granted plus what the block has left: what a one-by-one check would
say, less what other processes used since.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from proxy.background import stop
from proxy.state import Limit, State, StateUnavailable, Verdict
from proxy.state.base import MAX_SLOTS, SPEND_TTL_S

# What each kind of limit needs from a block for one call, at least: requests,
# concurrency slots, and multiples of the call's own tokens or estimated cost.
FIRST_BLOCK = {"requests": 4.0, "tokens": 4.0, "concurrency": 2.0, "budget": 4.0}
KINDS = tuple(FIRST_BLOCK)
SMALLEST_BLOCK = 2.0  # calls a block must admit to be worth taking


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseConfig:
    share: float = 0.05  # the most of a limit one block holds; 0 checks every call
    seconds: float = 1.0  # how long a block admits calls before its rest goes back

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 0.5:
            raise ValueError("share must be between 0 and 0.5")
        if not 0.05 <= self.seconds <= 60:
            raise ValueError("seconds must be between 0.05 and 60")


class Block:
    """Units this process holds for one caller's limits.

    A call takes the same from every limit of a kind (a request, its tokens, a
    slot, its estimated cost), so what is out of the block is counted once per
    kind, and a call fits when each kind's count stays within the smallest of
    its limits: no loop over the limits on a call's path."""

    __slots__ = ("base", "expires", "headers", "high", "in_flight", "key", "kinds", "limits",
                 "most", "name", "out", "returned")  # fmt: skip

    def __init__(self, key: tuple, name: str, kinds: tuple[str, ...],
                 limits: tuple[Limit, ...], verdict: Verdict, expires: float) -> None:  # fmt: skip
        self.key = key  # the caller's
        self.name = name  # names its concurrency slots in the shared state
        self.kinds = kinds
        self.limits = limits  # as reserved: each cost is the units held
        self.most = dict.fromkeys(KINDS, math.inf)  # the smallest limit of each kind
        for kind, limit in zip(kinds, limits, strict=True):
            self.most[kind] = min(self.most[kind], limit.cost)
        self.out = dict.fromkeys(KINDS, 0.0)  # units out of the block, by kind
        self.high = dict.fromkeys(KINDS, 0.0)  # the most out at once, by kind
        self.base = verdict.remaining  # what the state had left, the block counted
        self.expires = expires
        self.in_flight = 0
        self.returned = False
        self.headers: list | None = None  # how the quotas plugin writes its rate headers

    def take(self, tokens: float, usd: float) -> bool:
        """Admit one call of `tokens` tokens and `usd` estimated cost, if it fits."""
        out, most = self.out, self.most
        requests, slots = out["requests"] + 1.0, out["concurrency"] + 1.0
        tokens, usd = out["tokens"] + tokens, out["budget"] + usd
        if (requests > most["requests"] or tokens > most["tokens"]
                or slots > most["concurrency"] or usd > most["budget"]):  # fmt: skip
            return False
        out["requests"], out["tokens"], out["concurrency"], out["budget"] = (
            requests,
            tokens,
            slots,
            usd,
        )
        high = self.high
        high["requests"] = requests  # requests never come back
        if tokens > high["tokens"]:
            high["tokens"] = tokens
        if slots > high["concurrency"]:
            high["concurrency"] = slots
        if usd > high["budget"]:
            high["budget"] = usd
        self.in_flight += 1
        return True

    @property
    def left(self) -> list[float]:
        """Units left in the block, by limit."""
        pairs = zip(self.kinds, self.limits, strict=True)
        return [limit.cost - self.out[kind] for kind, limit in pairs]

    def remaining(self, i: int) -> float:
        """Units left for everyone under limit `i`, as far as this process knows."""
        left = self.limits[i].cost - self.out[self.kinds[i]]
        return self.base[i] + left if i < len(self.base) else left


class Held:
    """One call's share of a block."""

    __slots__ = ("block", "estimate", "usd")

    def __init__(self, block: Block, estimate: int, usd: float) -> None:
        self.block = block
        self.estimate = estimate
        self.usd = usd


class Leases:
    """The blocks of one process, one per caller (a template of limits)."""

    def __init__(self, state: State, config: LeaseConfig,
                 on_grant: Callable[[tuple[Limit, ...], Verdict], None],
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.state = state
        self.config = config
        self.on_grant = on_grant
        self.clock = clock
        self.blocks: dict[tuple, Block] = {}
        self.last: dict[tuple, Block] = {}  # the block before, which sizes the next
        self._pending: dict[tuple, asyncio.Future[Block | None]] = {}
        self._checked_until: dict[tuple, float] = {}  # callers checked one by one
        self._names = itertools.count()
        self._prefix = "b" + os.urandom(6).hex() + ":"
        self._sweeper: asyncio.Task | None = None
        self._closed = False

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        """Give back every block; slots and budget of calls still in flight go back as
        they end."""
        await stop(self._sweeper)
        self._closed = True
        if self._pending:  # reservations under way end as given back
            await asyncio.gather(*self._pending.values(), return_exceptions=True)
        for block in list(self.blocks.values()):
            self._give_back(block)
        self.blocks.clear()

    def take_now(self, key: tuple, estimate: int, usd: float) -> Held | None:
        """Admit a call from its caller's current block, without waiting: the path of
        almost every call, kept free of awaits. None when there is no block, or it
        expired or is short: then `take`."""
        block = self.blocks.get(key)
        if block is None or self.clock() >= block.expires:
            return None
        if block.take(estimate, usd):
            return Held(block, estimate, usd)
        return None

    async def take(self, key: tuple, kinds: tuple[str, ...], limits: tuple[Limit, ...],
                   estimate: int, usd: float) -> Held | None:  # fmt: skip
        """Admit a call from its caller's block, reserving a new block when needed;
        None when this call must be checked on its own."""
        block = self.blocks.get(key)
        now = self.clock()
        if block is not None:
            if now < block.expires and block.take(estimate, usd):
                return Held(block, estimate, usd)
            self._give_back(block)
        pending = self._pending.get(key)
        if pending is None:  # no other call is reserving this caller's block
            if self._checked_until.get(key, 0.0) > now:
                return None
            sizes = self._sizes(key, kinds, limits, _needs(kinds, estimate, usd))
            if sizes is None:
                self._checked_until[key] = now + self.config.seconds
                return None
            # A task of its own: a caller that goes away mid-reservation (a client
            # hanging up) must not lose a block Redis has granted.
            pending = asyncio.ensure_future(self._reserve(key, kinds, limits, sizes))
            self._pending[key] = pending
        block = await asyncio.shield(pending)
        if block is not None and block.take(estimate, usd):
            return Held(block, estimate, usd)
        return None

    async def _reserve(self, key: tuple, kinds: tuple[str, ...], limits: tuple[Limit, ...],
                       sizes: list[float]) -> Block | None:  # fmt: skip
        """Reserve a block in the shared state and make it the caller's."""
        block_limits = tuple(
            replace(limit, cost=size, whole=limit.kind == "budget")
            for limit, size in zip(limits, sizes, strict=True)
        )
        name = f"{self._prefix}{next(self._names)}"
        try:
            verdict = await self.state.acquire(block_limits, name)
        except StateUnavailable:
            # The call's own check meets the same and applies on_state_error; the
            # caller's next calls skip the block for a while, so an outage costs one
            # wait per call, not two.
            self._checked_until[key] = self.clock() + self.config.seconds
            return None
        finally:
            del self._pending[key]
        now = self.clock()
        if not verdict.allowed:
            self._checked_until[key] = now + self.config.seconds
            if len(self._checked_until) > 100_000:
                self._checked_until.clear()
            return None
        self.on_grant(block_limits, verdict)
        block = Block(key, name, kinds, block_limits, verdict, now + self.config.seconds)
        if self._closed:  # granted as the process closed: straight back
            self._give_back(block)
            return None
        self.blocks[key] = block
        return block

    def _sizes(self, key: tuple, kinds: tuple[str, ...], limits: tuple[Limit, ...],
               needs: list[float]) -> list[float] | None:  # fmt: skip
        """Units to hold per limit: twice the most the last block had out at once, at
        least a few calls' worth, at most `share` of the limit; None when a limit is too small for
        a block of two calls."""
        last = self.last.get(key)
        sizes = []
        for kind, limit, need in zip(kinds, limits, needs, strict=True):
            cap = limit.limit * self.config.share
            unit = need if kind in ("tokens", "budget") else 1.0
            if cap < SMALLEST_BLOCK * unit:
                return None
            want = FIRST_BLOCK[kind] * unit
            if last is not None:
                want = max(want, 2.0 * last.high[kind])
            size = min(cap, want)
            if kind == "concurrency":  # a lease holds at most MAX_SLOTS slots
                size = float(int(min(size, MAX_SLOTS)))
            elif kind == "requests":
                size = float(int(size))
            sizes.append(size)
        slots = [size for kind, size in zip(kinds, sizes, strict=True) if kind == "concurrency"]
        if slots:  # a block holds as many slots under each of its concurrency limits
            sizes = [min(slots) if kind == "concurrency" else size
                     for kind, size in zip(kinds, sizes, strict=True)]  # fmt: skip
        return sizes

    def done(self, held: Held, tokens: int | None, cost: float | None) -> None:
        """A call admitted from a block ended: its slot, unused tokens and unspent
        estimate go back to the block, or once the block is back in the shared
        state, the unused tokens go back there, and the block's slots and budget
        with its last call. `tokens` None keeps the token reservation; `cost` None
        spends the estimate."""
        block = held.block
        block.in_flight -= 1
        if block.returned:
            if tokens is not None:
                for kind, limit in zip(block.kinds, block.limits, strict=True):
                    if kind == "tokens":
                        self.state.adjust(limit, tokens - held.estimate)
            if not block.in_flight:
                self._release(block)
            return
        out = block.out
        out["concurrency"] -= 1.0
        if tokens is not None:
            out["tokens"] -= held.estimate - tokens
        if cost is not None:
            out["budget"] -= held.usd - cost

    def _give_back(self, block: Block) -> None:
        """Stop admitting from a block: unused requests and tokens go back now, slots
        and the budget reservation once its last call has ended."""
        if block.returned:
            return
        block.returned = True
        if self.blocks.get(block.key) is block:
            del self.blocks[block.key]
        if len(self.last) > 100_000:
            self.last.clear()
        self.last[block.key] = block
        for kind, limit, left in zip(block.kinds, block.limits, block.left, strict=True):
            if kind in ("requests", "tokens") and left:
                self.state.adjust(limit, -left)
        if not block.in_flight:  # else the last call to end releases it (done)
            self._release(block)

    def _release(self, block: Block) -> None:
        held = list(zip(block.kinds, block.limits, strict=True))
        slots = [limit for kind, limit in held if kind == "concurrency"]
        if slots:  # as many under each concurrency limit
            self.state.release([s.key for s in slots], block.name, int(slots[0].cost))
        budget = [(limit.key, limit.field, -limit.cost)
                  for kind, limit in held if kind == "budget" and limit.cost]  # fmt: skip
        if budget:
            self.state.add_spend(budget, ttl_s=SPEND_TTL_S)

    async def _sweep_forever(self) -> None:
        """Give back blocks past their time, so an idle caller holds nothing."""
        while True:
            await asyncio.sleep(self.config.seconds)
            now = self.clock()
            for block in [b for b in self.blocks.values() if b.expires <= now]:
                self._give_back(block)


def _needs(kinds: tuple[str, ...], estimate: int, usd: float) -> list[float]:
    """What one call takes from each limit of a block."""
    return [float(estimate) if kind == "tokens" else usd if kind == "budget" else 1.0
            for kind in kinds]  # fmt: skip
