"""proxy/upstream/pool.py: a bounded wait for an upstream connection, first come
first served, never a slot lost; and the pool through a real gateway: the 503,
the wait in the access log, the counters."""

from __future__ import annotations

import asyncio
import concurrent.futures
import resource
import time

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import UpstreamPoolExhausted
from proxy.upstream.pool import Pool
from tests.conftest import one_model, scrape, upstream_stats


def test_a_free_slot_costs_no_wait_and_a_busy_pool_serves_waiters_in_order():
    async def go():
        pool = Pool("p", 1, 5.0)
        assert await pool.acquire() == 0.0
        order = []

        async def wait(i):
            await pool.acquire()
            order.append(i)

        waiters = [asyncio.ensure_future(wait(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert pool.waiting == 3
        for _ in range(3):
            pool.release()
            await asyncio.sleep(0.01)
        await asyncio.gather(*waiters)
        return order, pool.in_use

    order, in_use = asyncio.run(go())
    assert order == [0, 1, 2] and in_use == 1


def test_a_wait_past_the_timeout_is_a_503_that_names_the_provider_and_limit():
    async def go():
        pool = Pool("openai-east", 2, 0.05)
        await pool.acquire()
        await pool.acquire()
        with pytest.raises(UpstreamPoolExhausted) as caught:
            await pool.acquire()
        return caught.value, pool

    error, pool = asyncio.run(go())
    assert error.status == 503 and error.code == "upstream_pool_exhausted"
    assert "openai-east" in error.message and "All 2 connections" in error.message
    assert error.headers["retry-after"] == "1"
    assert pool.waiting == 0 and pool.in_use == 2


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.lists(st.sampled_from(["take", "give", "leave"]), max_size=30))
def test_no_slot_is_ever_lost_or_doubled(limit, steps):
    """Callers take slots, give them back, or leave while waiting (cancelled), in any
    order: the slots in use never pass the limit, and all come back at the end."""

    async def go():
        pool = Pool("p", limit, 10.0)
        holding: list[asyncio.Task] = []
        for step in steps:
            if step == "take":
                holding.append(asyncio.ensure_future(pool.acquire()))
            elif step == "give":
                got = [t for t in holding if t.done() and not t.cancelled()]
                if got:
                    holding.remove(got[0])
                    pool.release()
            else:
                waiting = [t for t in holding if not t.done()]
                if waiting:
                    waiting[0].cancel()
                    holding.remove(waiting[0])
            await asyncio.sleep(0)
            assert pool.in_use <= limit
        for task in holding:
            task.cancel()
        await asyncio.gather(*holding, return_exceptions=True)
        held = sum(1 for t in holding if not t.cancelled() and t.exception() is None)
        for _ in range(held):
            pool.release()
        return pool

    pool = asyncio.run(go())
    assert pool.in_use == 0 and pool.waiting == 0


@pytest.fixture(scope="module")
def small_pool(gateways, upstream):
    config = one_model(upstream.port, "  []\n").replace(
        '/v1"}', '/v1", max_connections: 2, pool_timeout_s: 0.5}'
    )
    return gateways(config)


@pytest.fixture(scope="module")
def patient_pool(gateways, upstream):
    config = one_model(upstream.port, "  []\n").replace(
        '/v1"}', '/v1", max_connections: 2, pool_timeout_s: 30}'
    )
    return gateways(config)


def upstream_holds(upstream, streams: int) -> None:
    """Wait until the upstream has `streams` open: their calls hold pool slots."""
    deadline = time.monotonic() + 30
    while upstream_stats(upstream)["open_streams"] < streams:
        assert time.monotonic() < deadline, "the slow streams never reached the upstream"
        time.sleep(0.02)


def stream(gateway, ttft_ms: int) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "fake": {"ttft_ms": ttft_ms}}  # fmt: skip
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)


def test_past_max_connections_calls_wait_then_get_a_503_and_are_counted(small_pool, upstream):
    base = upstream_stats(upstream)["open_streams"]
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        slow = [threads.submit(stream, small_pool, 3000) for _ in range(2)]
        upstream_holds(upstream, base + 2)
        refused = stream(small_pool, 0)
        # refused at pool_timeout_s, while the streams still held the pool
        assert not all(f.done() for f in slow)
        assert [f.result().status_code for f in slow] == [200, 200]
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "upstream_pool_exhausted" and "'up'" in error["message"]
    metrics = scrape(small_pool.url)
    assert 'meshgate_upstream_pool_timeouts_total{provider="up"} 1.0' in metrics
    assert 'meshgate_upstream_pool_waiters{provider="up"} 0.0' in metrics


def test_a_call_that_waited_for_a_slot_shows_the_wait_apart_from_the_upstream(
    patient_pool, upstream
):
    base = upstream_stats(upstream)["open_streams"]
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        slow = [threads.submit(stream, patient_pool, 1500) for _ in range(2)]
        upstream_holds(upstream, base + 2)
        patient = threads.submit(stream, patient_pool, 0)
        assert [f.result().status_code for f in [*slow, patient]] == [200, 200, 200]
    lines = patient_pool.access_lines()
    waited = [line for line in lines if line.get("status") == 200 and line["pool_wait_ms"]]
    assert waited  # the patient call waited for one of the slow streams to end
    assert {"overhead_ms", "latency_ms"} <= waited[-1].keys()
    metrics = scrape(patient_pool.url)
    count = [m for m in metrics.splitlines()
             if m.startswith('meshgate_upstream_pool_wait_seconds_count{provider="up"}')]  # fmt: skip
    assert count and float(count[0].split()[-1]) >= 1


def test_the_open_file_limit_is_raised_to_the_hard_limit_and_reported(gateways, upstream):
    server = gateways(one_model(upstream.port, "  []\n"))
    line = next(orjson.loads(x) for x in server.output().splitlines() if "open file limit" in x)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert line["message"] == f"open file limit: {hard}"
    with open(f"/proc/{server.proc.pid}/limits") as f:
        limits = next(x for x in f if x.startswith("Max open files")).split()
    assert int(limits[3]) == hard  # the gateway's soft limit is the hard one


def test_the_pool_wait_is_not_counted_as_gateway_overhead(monkeypatch):
    """Overhead is the latency less upstream time and pool wait: checked on fixed
    clock readings, not measured ones."""
    import proxy.gateway as gateway_module
    from proxy.pipeline import Call

    call = Call("chat", {}, None, "r1")
    call.upstream_s, call.pool_wait_s = 0.25, 0.5
    monkeypatch.setattr(gateway_module.time, "perf_counter", lambda: 11.0)
    assert gateway_module._overhead(call, started=10.0) == pytest.approx(0.25)
    call.pool_wait_s = 2.0  # never below zero
    assert gateway_module._overhead(call, started=10.0) == 0.0
    assert gateway_module._overhead(None, started=10.0) == pytest.approx(1.0)
