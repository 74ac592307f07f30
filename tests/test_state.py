"""Both state backends, the same assertions: memory, and a real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from proxy.state import Limit, StateConfig, StateUnavailable, create_state
from tests.redis_server import RedisServer


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
        verdicts = [await state.acquire([rpm], f"l{i}") for i in range(7)]
        await state.close()
        return verdicts

    verdicts = run(main())
    assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 2
    assert [v.remaining[0] for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    assert 11 < verdicts[5].retry_after_s <= 12  # one slot comes back every 12 s


def test_all_or_nothing_and_token_refund(make_state):
    async def main():
        state = make_state()
        rpm = Limit("rate", "rpm:a", 100, 60)
        tpm = Limit("rate", "tpm:a", 1000, 60, cost=800)
        first = await state.acquire([rpm, Limit("rate", "tpm:a", 1000, 60, cost=800)], "x")
        second = await state.acquire([rpm, tpm], "y")  # 800 more tokens do not fit
        await state.adjust(tpm, -700)  # the first call used 100 of its 800
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
        await state.release(["conc:k"], "a")
        await state.flush()
        d = await state.acquire([slots], "d")
        await state.close()
        return a, b, c, d

    assert [v.allowed for v in run(main())] == [True, True, False, True]


def test_budget_and_spend(make_state):
    async def main():
        state = make_state()
        budget = Limit("budget", "spend:d", 1.0, field="key:k")
        ok = await state.acquire([budget], "a")
        await state.add_spend([("spend:d", "key:k", 0.6), ("spend:d", "team:t", 0.6)], 86400)
        await state.flush()
        still = await state.acquire([budget], "b")
        await state.add_spend([("spend:d", "key:k", 0.5)], 86400)
        await state.flush()
        over = await state.acquire([budget], "c")
        spent = await state.read_spend("spend:d")
        await state.close()
        return ok, still, over, spent

    ok, still, over, spent = run(main())
    assert ok.allowed and still.allowed and not over.allowed
    assert spent == pytest.approx({"key:k": 1.1, "team:t": 0.6})


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
        await state.acquire([Limit("rate", "r", 100, 60)], "a")
        server.stop()
        await state.add_spend([("spend:d", "key:k", 1.5)], 86400)
        with pytest.raises(StateUnavailable):
            await state.acquire([Limit("rate", "r", 100, 60)], "b")
        server.start()  # same port, empty
        await state.add_spend([("spend:d", "key:k", 1.0)], 86400)
        spent = await state.read_spend("spend:d")
        await state.close()
        server.stop()
        return spent

    assert run(main()) == {"key:k": 2.5}
