"""proxy/deadlines.py: shared-timer deadlines with asyncio.timeout's semantics."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.deadlines import MIN_TICK_S, Deadlines


def run(coro):
    return asyncio.run(coro)


def test_a_deadline_that_passes_raises_timeout_and_never_early():
    deadlines = Deadlines()

    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            with deadlines.within(0.05):
                await asyncio.sleep(10)
        return loop.time() - started

    assert run(main()) >= 0.05
    assert deadlines.pending() == 0


def test_work_that_ends_in_time_is_untouched_and_leaves_nothing_behind():
    deadlines = Deadlines()

    async def main():
        with deadlines.within(5.0) as scope:
            await asyncio.sleep(0)
            assert deadlines.pending() == 1
        assert not scope.expired
        assert asyncio.current_task().cancelling() == 0
        return "done"

    assert run(main()) == "done"
    assert deadlines.pending() == 0


def test_a_cancellation_from_elsewhere_stays_a_cancellation():
    """A client that goes away while the deadline also passes: the caller must see
    CancelledError, not a timeout it would answer."""
    deadlines = Deadlines()

    async def inner(entered: asyncio.Event):
        with deadlines.within(0.01):
            entered.set()
            await asyncio.sleep(10)

    async def main():
        entered = asyncio.Event()
        task = asyncio.create_task(inner(entered))
        await entered.wait()
        task.cancel()  # from outside, before the deadline's tick
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


@pytest.mark.parametrize("client_leaves", [False, True])
def test_a_deadline_and_a_client_leaving_in_the_same_instant(client_leaves):
    """Both cancels land before the task runs again: the client's wins, so the call
    is abandoned rather than answered with a timeout; alone, the deadline's is a
    TimeoutError."""
    deadlines = Deadlines()
    scopes = []

    async def victim():
        with deadlines.within(10.0) as scope:
            scopes.append(scope)
            await asyncio.sleep(10)

    async def main():
        task = asyncio.create_task(victim())
        await asyncio.sleep(0)
        scopes[0].expire()  # the deadline's tick fires
        if client_leaves:
            task.cancel()
        with pytest.raises(asyncio.CancelledError if client_leaves else TimeoutError):
            await task

    run(main())
    assert deadlines.pending() == 0


def test_nested_deadlines_the_inner_one_fires_and_the_outer_one_holds():
    deadlines = Deadlines()

    async def main():
        with deadlines.within(5.0) as outer:
            with pytest.raises(TimeoutError):
                with deadlines.within(0.02):
                    await asyncio.sleep(10)
            await asyncio.sleep(0)  # no stray cancellation left for the outer scope
        assert not outer.expired

    run(main())
    assert deadlines.pending() == 0


def test_a_deadline_is_kept_inside_a_task_and_is_positive():
    deadlines = Deadlines()
    with pytest.raises(RuntimeError):
        with deadlines.within(1.0):
            pass
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            deadlines.within(bad)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.floats(0.005, 0.08), st.floats(0.0, 0.08)), min_size=1, max_size=30))
def test_many_calls_at_once_each_keeps_its_own_deadline(calls):
    """Calls sharing ticks: a timeout never comes before the call's own deadline, and
    work that outlasts its deadline by more than a tick always times out (the
    deadline's timer is due first, however late the loop runs)."""
    deadlines = Deadlines()

    async def one(allowed: float, work: float) -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with deadlines.within(allowed):
                await asyncio.sleep(work)
        except TimeoutError:
            return "timeout", loop.time() - started
        return "done", loop.time() - started

    async def main():
        return await asyncio.gather(*(one(a, w) for a, w in calls))

    outcomes = run(main())
    for (allowed, work), (outcome, took) in zip(calls, outcomes, strict=True):
        tick = max(MIN_TICK_S, allowed / 1000)
        if outcome == "timeout":
            assert took >= allowed - 1e-6
        if work > allowed + tick:
            assert outcome == "timeout"
    assert deadlines.pending() == 0
