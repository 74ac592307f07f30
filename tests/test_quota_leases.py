"""Quota leases (plugins/quota_leases.py) on the in-process state with clocks that
move only when told: blocks, what they give back, and never more than the limits."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.quota_leases import LeaseConfig, Leases
from proxy.state import Limit, StateConfig, StateUnavailable
from proxy.state.base import MAX_SLOTS
from proxy.state.memory import MemoryState

KINDS = ("requests", "tokens", "concurrency", "budget")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counted(MemoryState):
    """The in-process state, counting the checks made against it."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(StateConfig(), clock=clock)
        self.checks = 0

    async def acquire(self, limits, lease):
        self.checks += 1
        return await super().acquire(limits, lease)


def limits(rpm=1000.0, tpm=1e6, concurrent=100.0, budget=100.0) -> tuple[Limit, ...]:
    return (
        Limit("rate", "r", rpm, 60.0, 1.0),
        Limit("rate", "t", tpm, 60.0, 0.0),
        Limit("concurrency", "c", concurrent),
        Limit("budget", "spend:d", budget, cost=0.0, field="team:t"),
    )


def leases(state, clock, share=0.05, seconds=1.0) -> Leases:
    return Leases(state, LeaseConfig(share=share, seconds=seconds), lambda *_: None, clock)


def used(state: MemoryState, limit: Limit) -> float:
    """Units a rate limit has counted (the state's clock does not move)."""
    tat = state.tats.get(limit.key, state.clock())
    return max(0.0, tat - state.clock()) * limit.limit / limit.period_s


def test_a_block_admits_a_callers_calls_without_asking_the_state():
    async def main():
        clock = Clock()
        state = Counted(clock)
        blocks = leases(state, clock)
        held = []
        for _ in range(4):  # one at a time: the first block holds two slots
            held.append(await blocks.take("k", KINDS, limits(), 100, 0.001))
            blocks.done(held[-1], 100, 0.001)
        checks_after_four = state.checks
        fifth = await blocks.take("k", KINDS, limits(), 100, 0.001)
        return held, checks_after_four, fifth, state.checks

    held, checks_after_four, fifth, checks = asyncio.run(main())
    assert all(h is not None for h in held) and checks_after_four == 1
    assert fifth is not None and checks == 2  # the first block ran out of requests


def test_a_block_grows_to_what_its_caller_uses():
    async def main():
        clock = Clock()
        state = Counted(clock)
        blocks = leases(state, clock)
        for _ in range(200):
            held = await blocks.take("k", KINDS, limits(rpm=100_000), 100, 0.0)
            assert held is not None
            blocks.done(held, 100, 0.0)
        return state.checks

    assert asyncio.run(main()) <= 7  # 4, 8, 16, ... requests: doubling, not one per call


def test_limits_too_small_for_a_block_are_checked_one_by_one():
    async def main():
        clock = Clock()
        state = Counted(clock)
        blocks = leases(state, clock)
        first = await blocks.take("k", KINDS, limits(rpm=30), 100, 0.0)  # 5% is 1.5 calls
        again = await blocks.take("k", KINDS, limits(rpm=30), 100, 0.0)
        return first, again, state.checks

    assert asyncio.run(main()) == (None, None, 0)


def test_a_block_that_does_not_fit_leaves_the_caller_checked_one_by_one_for_a_while():
    async def main():
        clock = Clock()
        state = Counted(Clock())  # its own clock, which stands still: no refill
        blocks = leases(state, clock)
        await state.acquire([Limit("rate", "r", 1000, 60.0, 998.0)], "x")  # 2 requests left
        refused = await blocks.take("k", KINDS, limits(), 100, 0.0)
        checks = state.checks
        still = await blocks.take("k", KINDS, limits(), 100, 0.0)
        same_checks = state.checks == checks
        clock.now += 1.0
        tried_again = await blocks.take("k", KINDS, limits(), 100, 0.0)
        return refused, still, same_checks, tried_again, state.checks - checks

    refused, still, same_checks, tried_again, later_checks = asyncio.run(main())
    assert refused is None and still is None and same_checks
    assert tried_again is None and later_checks == 1


def test_unused_requests_and_tokens_go_back_and_tokens_settle_on_real_usage():
    async def main():
        clock = Clock()
        state = Counted(clock)
        blocks = leases(state, clock)
        for _ in range(3):
            held = await blocks.take("k", KINDS, limits(), 100, 0.0)
            blocks.done(held, 30, 0.0)  # 30 tokens used of the 100 reserved
        await blocks.close()
        return state

    state = asyncio.run(main())
    rpm, tpm, slots, _ = limits()
    assert used(state, rpm) == pytest.approx(3)
    assert used(state, tpm) == pytest.approx(90)
    assert not state.leases.get(slots.key)


def test_slots_and_budget_stay_held_until_the_last_call_of_a_block_ends():
    async def main():
        clock = Clock()
        state = Counted(clock)
        blocks = leases(state, clock)
        limit_set = limits(concurrent=40, budget=1.0)
        first = await blocks.take("k", KINDS, limit_set, 100, 0.01)
        clock.now += 1.0  # the block's time is up: the next call gives it back
        second = await blocks.take("k", KINDS, limit_set, 100, 0.01)
        held_slots = len(state.leases.get("c", {}))
        assert first is not None and second is not None and first.block is not second.block
        blocks.done(first, 100, 0.01)
        after_first = len(state.leases.get("c", {}))
        blocks.done(second, 100, 0.01)
        await blocks.close()
        return held_slots, after_first, state

    held_slots, after_first, state = asyncio.run(main())
    assert held_slots == 4  # two blocks of two
    assert after_first == 2  # the first block's slots went back with its last call
    assert state.spend["spend:d"]["team:t"] == pytest.approx(0.0)  # reservations gone


def test_an_idle_callers_block_is_given_back_by_the_sweeper():
    async def main():
        clock = Clock()
        state = Counted(clock)
        blocks = leases(state, clock, seconds=0.05)
        await blocks.start()
        held = await blocks.take("k", KINDS, limits(concurrent=40), 100, 0.0)
        assert held is not None
        blocks.done(held, 100, 0.0)
        clock.now += 1.0
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not blocks.blocks:
                break
        slots = len(state.leases.get("c", {}))
        await blocks.close()
        return blocks.blocks, slots

    assert asyncio.run(main()) == ({}, 0)


# An operation of the model below: take on process 0 or 1, end a call, or let time pass.
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.integers(0, 1)),
        st.tuples(st.just("take"), st.integers(0, 1)),
        st.tuples(st.just("done"), st.integers(0, 10**6), st.integers(0, 100), st.booleans()),
        st.tuples(st.just("tick"), st.sampled_from([0.2, 1.0])),
    ),
    min_size=40,
    max_size=150,
)


@settings(max_examples=200, deadline=None)
@given(
    rpm=st.integers(8, 200),
    tpm=st.integers(200, 5_000),
    concurrent=st.integers(4, 40),
    budget=st.sampled_from([0.002, 0.01, 0.05]),
    share=st.sampled_from([0.05, 0.2, 0.5]),
    estimate=st.integers(1, 30),
    cents=st.integers(0, 3),
    ops=OPS,
)
def test_two_processes_with_leases_never_admit_more_than_the_limits(
    rpm, tpm, concurrent, budget, share, estimate, cents, ops
):
    """Two processes share one state; each admits from its blocks or checks a call on
    its own, as the quotas plugin does. The state's clock stands still, so no limit
    refills: whatever the operations, no more requests, tokens, concurrent calls or
    spend get through than the limits allow, and once every call has ended and both
    processes have given their blocks back, the state holds exactly what was used."""

    async def main():
        clock = Clock()
        state = MemoryState(StateConfig(), clock=lambda: 0.0)
        procs = [leases(state, clock, share=share), leases(state, clock, share=share)]
        limit_set = limits(rpm, tpm, concurrent, budget)
        names = itertools.count()
        live: list[tuple] = []  # (process, held or None, lease, estimate, usd)
        usd = cents / 10_000
        requests = tokens = 0
        spent = 0.0
        for op in ops:
            if op[0] == "take":
                p = op[1]
                held = await procs[p].take("k", KINDS, limit_set, estimate, usd)
                if held is not None:
                    live.append((p, held, None, estimate, usd))
                else:
                    lease = f"one{next(names)}"
                    single = (Limit("rate", "r", rpm, 60.0, 1.0),
                              Limit("rate", "t", tpm, 60.0, float(estimate)),
                              Limit("concurrency", "c", concurrent),
                              Limit("budget", "spend:d", budget, cost=usd, field="team:t"))  # fmt: skip
                    if not (await state.acquire(single, lease)).allowed:
                        continue
                    live.append((p, None, lease, estimate, usd))
                requests += 1
                assert requests <= rpm
                assert len(live) <= concurrent
            elif op[0] == "done" and live:
                _, which, percent, spends = op
                p, held, lease, reserved, _ = live.pop(which % len(live))
                actual = reserved * percent // 100
                cost = usd if spends else 0.0
                tokens += actual
                spent += cost
                if cost:
                    state.add_spend([("spend:d", "team:t", cost)], 86400)
                if held is not None:
                    procs[p].done(held, actual, cost)
                else:
                    state.adjust(limit_set[1], actual - reserved)
                    state.release(["c"], lease)
                    state.add_spend([("spend:d", "team:t", -usd)], 86400)
            elif op[0] == "tick":
                clock.now += op[1]
        for p, held, lease, reserved, _ in live:  # the rest end without spending
            tokens += reserved
            if held is not None:
                procs[p].done(held, reserved, 0.0)
            else:
                state.release(["c"], lease)
                state.add_spend([("spend:d", "team:t", -usd)], 86400)
        for proc in procs:
            await proc.close()
        return state, requests, tokens, spent

    state, requests, tokens, spent = asyncio.run(main())
    rpm_limit, tpm_limit, _, _ = limits(rpm, tpm, concurrent, budget)
    assert used(state, rpm_limit) == pytest.approx(requests)
    assert used(state, tpm_limit) == pytest.approx(tokens)
    assert tokens <= tpm
    assert not state.leases.get("c")
    assert state.spend.get("spend:d", {}).get("team:t", 0.0) == pytest.approx(spent, abs=1e-9)
    assert spent <= budget + cents / 10_000 + 1e-9  # one call's estimate at most


def test_a_block_of_slots_admits_that_many_calls_at_once_and_no_more():
    async def main():
        clock = Clock()
        state = Counted(Clock())
        blocks = leases(state, clock, share=0.5)
        limit_set = limits(concurrent=4)
        first = [await blocks.take("k", KINDS, limit_set, 10, 0.0) for _ in range(2)]
        blocks.done(first[0], 10, 0.0)  # its slot goes back to the block, once
        first.append(await blocks.take("k", KINDS, limit_set, 10, 0.0))
        second = [await blocks.take("k", KINDS, limit_set, 10, 0.0) for _ in range(2)]
        fifth = await blocks.take("k", KINDS, limit_set, 10, 0.0)  # all 4 slots are out
        slot = Limit("concurrency", "c", 4)
        while_out = await state.acquire([slot], "single")
        for held in second:
            blocks.done(held, 10, 0.0)
        after = await state.acquire([slot], "single")  # the second block's two came back
        return first, second, fifth, while_out, after

    first, second, fifth, while_out, after = asyncio.run(main())
    assert all(h is not None for h in (*first, *second))
    assert first[0].block is first[1].block is first[2].block
    assert first[0].block is not second[0].block is second[1].block
    assert fifth is None and not while_out.allowed and after.allowed


def test_a_budget_block_is_refused_when_the_rest_of_the_budget_is_smaller():
    async def main():
        clock = Clock()
        state = Counted(Clock())
        state.add_spend([("spend:d", "team:t", 0.95)], 86400)
        blocks = leases(state, clock, share=0.5)
        held = await blocks.take("k", KINDS, limits(budget=1.0), 10, 0.02)  # wants 0.08
        return held, state.spend["spend:d"]["team:t"]

    held, spent = asyncio.run(main())
    assert held is None  # checked on its own, which admits one call past 0.95
    assert spent == pytest.approx(0.95)  # and the refused block reserved nothing


def test_a_caller_that_goes_away_mid_reservation_loses_no_block():
    """The reservation is a task of its own: granted after its caller was cancelled,
    the block is still the caller's to use, and goes back whole at close."""

    class Slow(Counted):
        def __init__(self, clock: Clock) -> None:
            super().__init__(clock)
            self.answer = asyncio.Event()

        async def acquire(self, limits, lease):
            await self.answer.wait()
            return await super().acquire(limits, lease)

    async def main():
        clock = Clock()
        state = Slow(Clock())
        blocks = leases(state, clock)
        caller = asyncio.ensure_future(blocks.take("k", KINDS, limits(concurrent=40), 10, 0.01))
        await asyncio.sleep(0)
        caller.cancel()
        state.answer.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        for _ in range(10):
            await asyncio.sleep(0)
        kept = dict(blocks.blocks)
        next_call = await blocks.take("k", KINDS, limits(concurrent=40), 10, 0.01)
        blocks.done(next_call, 10, 0.0)
        await blocks.close()
        return kept, next_call, state

    kept, next_call, state = asyncio.run(main())
    assert list(kept) == ["k"] and next_call.block is kept["k"]
    assert not state.leases.get("c")
    assert state.spend["spend:d"]["team:t"] == pytest.approx(0.0)


def test_a_block_never_holds_more_slots_than_one_lease_may():
    async def main():
        clock = Clock()
        state = Counted(Clock())
        blocks = leases(state, clock, share=0.5)
        state.on_dropped = dropped.append
        held = [await blocks.take("k", KINDS, limits(rpm=1e7, concurrent=100_000), 1, 0.0)
                for _ in range(3000)]  # fmt: skip
        sizes = {h.block.limits[2].cost for h in held if h is not None}
        return held, sizes

    dropped: list[int] = []
    held, sizes = asyncio.run(main())
    assert all(h is not None for h in held) and max(sizes) == MAX_SLOTS and not dropped


def test_while_the_state_is_unavailable_a_caller_is_checked_on_its_own_without_retrying_a_block():
    class Down(Counted):
        async def acquire(self, limits, lease):
            self.checks += 1
            raise StateUnavailable("redis: no answer in time")

    async def main():
        clock = Clock()
        state = Down(Clock())
        blocks = leases(state, clock)
        first = await blocks.take("k", KINDS, limits(), 10, 0.0)
        second = await blocks.take("k", KINDS, limits(), 10, 0.0)
        checks = state.checks
        clock.now += 1.0
        later = await blocks.take("k", KINDS, limits(), 10, 0.0)
        return first, second, checks, later, state.checks

    assert asyncio.run(main()) == (None, None, 1, None, 2)
