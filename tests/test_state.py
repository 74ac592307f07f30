"""Both state backends, the same assertions: memory, and a real redis-server."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.state import (
    Limit,
    StateConfig,
    StateUnavailable,
    create_state,
    outage,
    valid_amount,
    valid_limit,
)
from tests.conftest import Clock, RedisServer, held_after_a_hang


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def make_state(request, redis_server):
    def make():
        if request.param == "memory":
            return create_state(StateConfig())
        return create_state(StateConfig(backend="redis", url=redis_server.url,
                                        prefix=f"t{id(request)}:"))  # fmt: skip

    return make


def run(coro):
    return asyncio.run(coro)


def test_rate_limit_admits_exactly_the_limit_then_refuses(make_state):
    async def main():
        state = make_state()
        rpm = Limit("rate", "rpm:k", 5, 60)
        started = time.monotonic()
        verdicts = [await state.acquire([rpm], f"l{i}") for i in range(7)]
        took = time.monotonic() - started
        await state.close()
        return verdicts, took

    verdicts, took = run(main())
    assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 2
    assert [v.remaining[0] for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    # One slot comes back every 12 s, counted from the first call: less however long
    # the calls took, on a machine busy enough to make them slow.
    assert 12 - took - 0.01 <= verdicts[5].retry_after_s <= 12


def test_all_or_nothing_and_token_refund(make_state):
    async def main():
        state = make_state()
        rpm = Limit("rate", "rpm:a", 100, 60)
        tpm = Limit("rate", "tpm:a", 1000, 60, cost=800)
        first = await state.acquire([rpm, Limit("rate", "tpm:a", 1000, 60, cost=800)], "x")
        second = await state.acquire([rpm, tpm], "y")  # 800 more tokens do not fit
        state.adjust(tpm, -700)  # the first call used 100 of its 800
        await state.flush()
        third = await state.acquire([rpm, tpm], "z")
        await state.close()
        return first, second, third

    first, second, third = run(main())
    assert first.allowed and not second.allowed and second.denied == 1
    assert third.allowed
    assert third.remaining[0] == 98  # the refused call did not count a request
    assert third.remaining[1] == 100  # 1000 - 100 - 800


def test_concurrency_leases(make_state):
    async def main():
        state = make_state()
        slots = Limit("concurrency", "conc:k", 2)
        a = await state.acquire([slots], "a")
        b = await state.acquire([slots], "b")
        c = await state.acquire([slots], "c")
        state.release(["conc:k"], "a")
        await state.flush()
        d = await state.acquire([slots], "d")
        await state.close()
        return a, b, c, d

    assert [v.allowed for v in run(main())] == [True, True, False, True]


def test_budget_and_spend(make_state):
    async def main():
        state = make_state()
        budget = Limit("budget", "spend:d", 1.0, cost=0.0, field="key:k")
        ok = await state.acquire([budget], "a")
        state.add_spend([("spend:d", "key:k", 0.6), ("spend:d", "team:t", 0.6)], 86400)
        await state.flush()
        still = await state.acquire([budget], "b")
        state.add_spend([("spend:d", "key:k", 0.5)], 86400)
        await state.flush()
        over = await state.acquire([budget], "c")
        spent = await state.read_spend("spend:d")
        await state.close()
        return ok, still, over, spent

    ok, still, over, spent = run(main())
    assert ok.allowed and still.allowed and not over.allowed
    assert spent == pytest.approx({"key:k": 1.1, "team:t": 0.6})


def test_one_amount_spread_over_places_adds_up_with_single_entries(make_state):
    async def main():
        state = make_state()
        places = (("spend:d", "key:k"), ("spend:d", "team:t"), ("spend:m", "key:k"))
        for _ in range(3):
            state.add_spend_to(places, 0.25, 86400)
        state.add_spend([("spend:d", "key:k", -0.1)], 86400)  # a reservation given back
        state.add_spend_to(places, float("nan"), 86400)  # dropped, never counted
        await state.flush()
        spent = await state.read_spend("spend:d"), await state.read_spend("spend:m")
        await state.close()
        return spent

    day, month = run(main())
    assert day == pytest.approx({"key:k": 0.65, "team:t": 0.75})
    assert month == pytest.approx({"key:k": 0.75})


def test_budgets_reserve_the_estimated_cost_of_calls_in_flight(make_state):
    async def main():
        state = make_state()
        budget = Limit("budget", "spend:d", 0.10, cost=0.01, field="team:t")
        verdicts = [await state.acquire([budget], f"l{i}") for i in range(100)]
        spent = await state.read_spend("spend:d")
        await state.close()
        return verdicts, spent

    verdicts, spent = run(main())
    assert sum(v.allowed for v in verdicts) == 10  # not 100: each in-flight call holds $0.01
    assert spent["team:t"] == pytest.approx(0.10)


@pytest.mark.parametrize(
    "bad",
    [
        Limit("rate", "r", 10, 60.0, -9.2e18),
        Limit("rate", "r", 10, 60.0, float("inf")),
        Limit("rate", "r", 10, 60.0, float("nan")),
        Limit("budget", "spend:d", 1.0, cost=float("nan"), field="f"),
        Limit("rate", "r", 0, 60.0, 1.0),
    ],
)
def test_one_bad_operation_cannot_poison_the_state(make_state, bad):
    """A value out of range is refused alone: limits keep holding for every call
    after it, on both backends."""

    async def main():
        state = make_state()
        good = Limit("concurrency", "c", 2)
        rate = Limit("rate", "r", 10, 60.0, 1.0)
        with pytest.raises(StateUnavailable):
            await state.acquire([bad, good], "bad")
        state.adjust(rate, float("-inf"))
        state.adjust(rate, -9.2e18)
        state.add_spend([("spend:d", "f", float("nan")), ("spend:d", "g", 1.0)], 86400)
        await state.flush()
        held = [await state.acquire([good, rate], f"l{i}") for i in range(3)]
        spent = await state.read_spend("spend:d")
        await state.close()
        return held, spent

    held, spent = run(main())
    assert [v.allowed for v in held] == [True, True, False]  # concurrency 2 still holds
    assert spent == {"g": 1.0}


def test_redis_down_raises_state_unavailable():
    async def main():
        state = create_state(
            StateConfig(backend="redis", url="redis://127.0.0.1:9/0", timeout_s=0.2)
        )
        try:
            await state.acquire([Limit("rate", "k", 1, 60)], "a")
        finally:
            await state.close()

    with pytest.raises(StateUnavailable):
        run(main())


def test_concurrent_checks_are_batched_and_each_all_or_nothing(make_state):
    async def main():
        state = make_state()
        await state.start()
        rpm = Limit("rate", "rpm:batch", 10, 60)
        verdicts = await asyncio.gather(*(state.acquire([rpm], f"l{i}") for i in range(25)))
        await state.close()
        return verdicts

    verdicts = run(main())
    assert sum(v.allowed for v in verdicts) == 10
    assert sorted(v.remaining[0] for v in verdicts if v.allowed) == list(range(10))


def test_after_call_work_survives_a_redis_outage(tmp_path):
    async def main():
        server = RedisServer(tmp_path).start()
        state = create_state(StateConfig(backend="redis", url=server.url, timeout_s=0.2))
        await state.start()
        await state.acquire([Limit("rate", "r", 100, 3600)], "a")
        server.stop()
        state.add_spend([("spend:d", "key:k", 1.5)], 86400)
        state.add_spend_to((("spend:d", "key:k"),), 0.5, 86400)
        with pytest.raises(StateUnavailable):
            await state.acquire([Limit("rate", "r", 100, 3600)], "b")
        server.start()  # same port, empty
        state.add_spend([("spend:d", "key:k", 1.0)], 86400)
        spent = await state.read_spend("spend:d")
        await state.close()
        server.stop()
        return spent

    assert run(main()) == {"key:k": 3.0}


@pytest.mark.parametrize("rpm", [3, 7, 10, 50, 60, 100, 1000, 7000])
def test_remaining_after_the_first_call_is_the_limit_less_one(make_state, rpm):
    async def main():
        state = make_state()
        verdict = await state.acquire([Limit("rate", f"r{rpm}", rpm, 60.0, 1.0)], "a")
        await state.close()
        return verdict

    assert run(main()).remaining == (rpm - 1,)


def test_a_hung_redis_costs_one_timeout_then_calls_fail_at_once(clock, hung_url):
    """A server that accepts and never answers: the call gives up after its one
    timeout_s (no retry, no reconnect), and every state call after it fails at once,
    without a connection, until the hold is over; then one call tries again, and
    the next hold is longer."""
    url, accepted = hung_url
    calls = {
        "acquire": lambda state: state.acquire([Limit("concurrency", "c", 1)], "a"),
        "read_spend": lambda state: state.read_spend("spend:d"),
        "breaker_failure": lambda state: state.breaker_failure("d", 3, 60, 30),
        "breakers_open": lambda state: state.breakers_open(["d"]),
        "breaker_close": lambda state: state.breaker_close("d"),
    }

    async def main():
        state = create_state(StateConfig(backend="redis", url=url, timeout_s=0.3))
        held = [functools.partial(call, state) for call in calls.values()]
        await held_after_a_hang(clock, "no answer in time", held[0], held,
                                functools.partial(calls["read_spend"], state))  # fmt: skip
        clock.now += outage.FIRST_HOLD_S  # not over: the hold doubled
        with pytest.raises(StateUnavailable, match="not answering"):
            await calls["acquire"](state)
        await asyncio.sleep(0.5)  # room for a retry to connect, were there one
        state.redis.connection_pool.reset()
        return len(accepted)

    assert run(main()) == 2  # one per call that tried, no reconnects


def test_a_redis_that_answers_again_ends_the_hold_and_keeps_the_work_it_missed(clock, tmp_path):
    """Redis paused past timeout_s: a hold starts; Redis answering again is not
    asked during it (calls still fail at once), and is once it is over: the
    outage ends, and the spend added meanwhile reaches Redis."""
    import redis as sync_redis

    server = RedisServer(tmp_path).start()
    admin = sync_redis.Redis.from_url(server.url)

    async def main():
        state = create_state(StateConfig(backend="redis", url=server.url, timeout_s=0.2))
        await state.acquire([Limit("rate", "r", 100, 3600)], "a")
        admin.execute_command("CLIENT", "PAUSE", "700", "ALL")
        with pytest.raises(StateUnavailable, match="no answer in time"):
            await state.acquire([Limit("rate", "r", 100, 3600)], "b")
        assert sync_redis.Redis.from_url(server.url, socket_timeout=5).ping()  # the pause ended
        state.add_spend([("spend:d", "key:k", 1.5)], 86400)
        with pytest.raises(StateUnavailable, match="not answering"):
            await state.acquire([Limit("rate", "r", 100, 3600)], "c")
        clock.now += outage.FIRST_HOLD_S
        verdict = await state.acquire([Limit("rate", "r", 100, 3600)], "d")
        spent = await state.read_spend("spend:d")
        await state.close()
        return verdict, spent

    try:
        verdict, spent = run(main())
    finally:
        admin.close()
        server.stop()
    assert verdict.allowed and verdict.remaining == (98,)  # a and d: b and c never counted
    assert spent == {"key:k": 1.5}


@given(st.lists(st.tuples(st.sampled_from(["hang", "refused", "answered", "check"]),
                          st.floats(0, 12))))  # fmt: skip
def test_an_outage_holds_only_after_a_hang_and_never_longer_than_the_most(events):
    """Against a model: calls fail at once only during a hold; a hold starts or
    doubles on a hang (up to MOST_HOLD_S), never on a refusal; an answer ends it;
    past a hold one call goes through and the others are held behind it."""
    clock = Clock()
    held = outage.Outage("redis")
    hold = until = 0.0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(outage, "time", clock)
        for event, later in events:
            clock.now += later
            if event == "hang":
                held.failed(TimeoutError())
                hold = min(outage.MOST_HOLD_S, max(outage.FIRST_HOLD_S, 2 * hold))
                until = clock.now + hold
            elif event == "refused":
                held.failed(ConnectionRefusedError())
            elif event == "answered":
                held.answered()
                hold = until = 0.0
            elif hold and clock.now < until:
                with pytest.raises(StateUnavailable, match="not answering"):
                    held.check()
            else:
                held.check()  # goes through: Redis answers, or this call tries it
                if hold:
                    until = clock.now + hold
            assert held.hold_s == hold <= outage.MOST_HOLD_S


@given(st.one_of(st.floats(), st.integers(), st.text(), st.none(), st.booleans()))
def test_only_finite_numbers_in_range_are_counted(value):
    import math

    number = isinstance(value, (int, float)) and not isinstance(value, str)
    expected = number and math.isfinite(value) and abs(value) < 1e15
    assert valid_amount(value) == expected
    limit = Limit("rate", "k", value, 60.0, 1.0)
    assert valid_limit(limit) == (expected and value > 0)


def test_a_lease_of_several_slots_holds_them_all_until_it_gives_them_back(make_state):
    async def main():
        state = make_state()
        key = "conc:blk"
        block = await state.acquire([Limit("concurrency", key, 5, cost=3)], "blk")
        too_many = await state.acquire([Limit("concurrency", key, 5, cost=3)], "blk2")
        singles = [await state.acquire([Limit("concurrency", key, 5)], f"s{i}") for i in range(3)]
        state.release([key], "blk", 3)
        await state.flush()
        again = await state.acquire([Limit("concurrency", key, 5, cost=3)], "blk3")
        await state.close()
        return block, too_many, singles, again

    block, too_many, singles, again = run(main())
    assert block.allowed and block.remaining == (2,)
    assert not too_many.allowed
    assert [v.allowed for v in singles] == [True, True, False]
    assert again.allowed  # the three came back at once; two singles still hold theirs


def test_a_budget_block_must_fit_under_the_budget_whole(make_state):
    async def main():
        state = make_state()
        state.add_spend([("spend:w", "team:t", 0.7)], 86400)
        await state.flush()

        def budget(cost: float, whole: bool) -> Limit:
            return Limit("budget", "spend:w", 1.0, cost=cost, field="team:t", whole=whole)

        too_big = await state.acquire([budget(0.4, True)], "a")
        fits = await state.acquire([budget(0.3, True)], "b")
        after = await state.acquire([budget(0.01, False)], "c")  # 1.0 reserved or spent
        await state.close()
        return too_big, fits, after

    too_big, fits, after = run(main())
    assert not too_big.allowed and fits.allowed and not after.allowed


@pytest.mark.parametrize("slots", [0, 1.5, -1, 1001, float("nan")])
def test_a_lease_of_slots_is_a_whole_number_within_bounds(slots):
    assert not valid_limit(Limit("concurrency", "c", 5000, cost=slots))
