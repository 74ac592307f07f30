"""The quotas plugin end to end, on a real redis-server shared by gateway processes."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import threading
import time

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import MESSAGES, ROOT, RedisServer, scrape, start_gateway

ADMIN = "admin-key-0123456789abcdef"
KEYS = ["rpm", "tpm", "conc", "budget", "stream", "shared", "free", "dime", "wide"]


def config(
    upstream_port: int, redis_url: str, *, prefix: str, on_state_error="allow", rpm_free=1000
):
    keys = "\n".join(
        f"        - {{name: {k}, key: sk-{k}-0123456789, team: {'money' if k in ('budget', 'stream') else 'plain'}}}"
        for k in KEYS
    )
    return f"""
server: {{host: 127.0.0.1, admin_key: {ADMIN}}}
state: {{backend: redis, url: "{redis_url}", prefix: "{prefix}"}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1"}}
models:
  - name: m
    deployments: [{{provider: up, model: m, price: {{input_usd_per_mtok: 1, output_usd_per_mtok: 2}}}}]
  - name: pricey
    deployments: [{{provider: up, model: pricey, price: {{input_usd_per_mtok: 1000000, output_usd_per_mtok: 1000000}}}}]
  - name: cent
    deployments: [{{provider: up, model: cent, price: {{input_usd_per_mtok: 100, output_usd_per_mtok: 100}}}}]
pipeline:
  - auth:
      keys:
{keys}
  - quotas:
      on_state_error: {on_state_error}
      limits:
        - {{per: key, keys: [rpm], rpm: 3}}
        - {{per: key, keys: [tpm], tpm: 1000}}
        - {{per: key, keys: [conc], concurrent: 2}}
        - {{per: team, teams: [money], budget_usd_day: 50}}
        - {{per: key, keys: [shared], rpm: 40}}
        - {{per: key, keys: [free], rpm: {rpm_free}}}
        - {{per: key, keys: [dime], budget_usd_day: 0.10}}
        - {{per: key, keys: [wide], concurrent: 40, rpm: 100000}}
"""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream, redis_server):
    server = start_gateway(
        tmp_path_factory.mktemp("quotas"), config(upstream.port, redis_server.url, prefix="q1:")
    )
    yield server
    server.stop()


@pytest.fixture
def sdk(gateway):
    opened = []

    def make(key: str, url: str | None = None) -> openai.OpenAI:
        c = openai.OpenAI(
            base_url=(url or gateway.url) + "/v1", api_key=f"sk-{key}-0123456789", max_retries=0
        )
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


def test_rpm_limit_headers_and_429(sdk):
    c = sdk("rpm")
    remaining = []
    started = time.monotonic()
    for _ in range(3):
        raw = c.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.code == "rate_limit_exceeded"
    retry_after = int(info.value.response.headers["retry-after"])
    # A slot comes back 20 s after the first call (rpm 3): not the 1 s floor of the header.
    assert 20 - (time.monotonic() - started) - 1 <= retry_after <= 20


def test_tpm_reserves_then_settles_with_real_usage(sdk):
    c = sdk("tpm")
    raw = c.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, max_tokens=600)
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
    reserved_left = int(raw.headers["x-ratelimit-remaining-tokens"])
    assert reserved_left < 400  # 600 for the answer plus the prompt estimate
    # The real usage (about 20 tokens) was settled, so another 600 fits.
    raw = c.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, max_tokens=600)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 300

    async def two_at_once():
        a = openai.AsyncOpenAI(base_url=c.base_url, api_key=c.api_key, max_retries=0)
        slow = {"fake": {"latency_ms": 300}}

        async def one():
            try:
                await a.chat.completions.create(
                    model="m", messages=MESSAGES, max_tokens=600, extra_body=slow
                )
                return "ok"
            except openai.RateLimitError:
                return "429"

        try:
            return sorted(await asyncio.gather(one(), one()))
        finally:
            await a.close()

    # Two reservations of 600 cannot both fit, however the calls interleave.
    assert asyncio.run(two_at_once()) == ["429", "ok"]


def test_concurrency_limit(sdk, gateway):
    results = []

    def call():
        c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-conc-0123456789", max_retries=0)
        try:
            c.chat.completions.create(
                model="m", messages=MESSAGES, extra_body={"fake": {"latency_ms": 500}}
            )
            results.append("ok")
        except openai.RateLimitError:
            results.append("429")
        finally:
            c.close()

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["429", "429", "ok", "ok"]
    # the slots came back
    assert sdk("conc").chat.completions.create(model="m", messages=MESSAGES)


def test_budget_fed_by_cost_then_insufficient_quota(sdk, gateway):
    c = sdk("budget")
    spent = 0
    for _ in range(3):  # each call costs about $20 at $1 a token
        c.chat.completions.create(model="pricey", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="pricey", messages=MESSAGES)
    assert info.value.code == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    # the same team's other key shares the budget
    with pytest.raises(openai.RateLimitError):
        sdk("stream").chat.completions.create(model="m", messages=MESSAGES)
    report = httpx.get(
        gateway.url + "/admin/spend", headers={"authorization": f"Bearer {ADMIN}"}
    ).json()
    spent = report["day"]["usd"]["teams"]["money"]
    assert spent >= 50
    assert report["day"]["usd"]["keys"]["budget"] == pytest.approx(spent)
    assert report["month"]["usd"]["models"]["pricey"] >= spent
    metrics = scrape(gateway.url, ADMIN)
    assert (
        'meshgate_cost_usd_total{deployment="up/pricey",key="budget",model="pricey",team="money"}'
        in metrics
    )


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=14), st.dates().map(str),
                 st.dates().map(lambda d: f"{d.year:04}-{d.month}-{d.day}")))  # fmt: skip
def test_a_spend_report_s_date_is_a_real_day_or_a_400(gateway, date):
    """Any `date` the admin sends is read as a UTC day (its spend) or refused."""
    r = httpx.get(gateway.url + "/admin/spend", params={"date": date},
                  headers={"authorization": f"Bearer {ADMIN}"})  # fmt: skip
    real = len(date) == 10 and date == _iso(date)
    if real:
        assert r.status_code == 200, r.text
        assert r.json()["day"]["period"] == date and r.json()["month"]["period"] == date[:7]
    else:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "date"


def _iso(date: str) -> str | None:
    import datetime

    try:
        return datetime.date.fromisoformat(date).isoformat()
    except ValueError:
        return None


def test_stream_usage_feeds_spend_and_tokens(sdk, gateway):
    c = sdk("free")
    before = httpx.get(
        gateway.url + "/admin/spend", headers={"authorization": f"Bearer {ADMIN}"}
    ).json()
    chunks = list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert all(ch.usage is None for ch in chunks)  # the client did not ask for usage
    after = httpx.get(
        gateway.url + "/admin/spend", headers={"authorization": f"Bearer {ADMIN}"}
    ).json()
    was = before["day"]["usd"]["keys"].get("free", 0)
    # 16 completion tokens at $2/M plus the prompt at $1/M
    assert after["day"]["usd"]["keys"]["free"] - was == pytest.approx(
        16 * 2e-6 + 1e-6 * 8, abs=1e-5
    )


def test_two_gateways_on_one_redis_admit_no_more_than_the_limit(
    tmp_path, upstream, redis_server, gateway
):
    """Each gateway admits from blocks of 2 (5% of 40, plugins/quota_leases.py) while
    the limit has room, then checks each call: never more than the limit, and short
    of it by at most the unused unit of each gateway's last block."""
    other = start_gateway(tmp_path, config(upstream.port, redis_server.url, prefix="q1:"))
    try:

        async def hammer():
            clients = [openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="sk-shared-0123456789", max_retries=0)
                       for g in (gateway, other)]  # fmt: skip

            async def one(i):
                try:
                    await clients[i % 2].chat.completions.create(model="m", messages=MESSAGES)
                    return 1
                except openai.RateLimitError:
                    return 0

            try:
                started = time.monotonic()
                admitted = sum(await asyncio.gather(*(one(i) for i in range(100))))
                return admitted, time.monotonic() - started
            finally:
                for c in clients:
                    await c.close()

        admitted, elapsed = asyncio.run(hammer())
        # 40 a minute is one slot every 1.5 s
        assert 40 - 2 <= admitted <= 40 + math.floor(elapsed / 1.5)
    finally:
        other.stop()


def test_two_gateways_with_blocks_of_slots_hold_a_concurrency_limit_and_give_them_back(
    tmp_path, upstream, redis_server, gateway
):
    """concurrent: 40 is wide enough for blocks of slots (2 each at first, then
    more): 70 slow calls at once through two gateways, and never more than 40 in
    flight; once they end, the blocks go back and Redis holds no slot."""
    other = start_gateway(tmp_path, config(upstream.port, redis_server.url, prefix="q1:"))
    try:

        async def main():
            body = {"model": "m", "messages": MESSAGES, "fake": {"latency_ms": 1500}}
            headers = {"authorization": "Bearer sk-wide-0123456789"}
            async with httpx.AsyncClient(timeout=30) as client:
                calls = [client.post(f"{g.url}/v1/chat/completions", json=body, headers=headers)
                         for g in (gateway, other) * 35]  # fmt: skip
                return [r.status_code for r in await asyncio.gather(*calls)]

        statuses = asyncio.run(main())
        assert statuses.count(200) <= 40 and set(statuses) == {200, 429}, statuses
        assert statuses.count(200) >= 30  # blocks hold a few slots unused, not many

        def cli(*args: str) -> str:
            command = ["redis-cli", "-p", str(redis_server.port), *args]
            return subprocess.run(command, capture_output=True, text=True).stdout

        slots = None
        for _ in range(100):  # blocks go back a second after their last use
            keys = cli("--scan", "--pattern", "q1:q:*:wide:c").split()
            slots = sum(int(cli("zcard", key)) for key in keys)
            if slots == 0:
                break
            time.sleep(0.1)
        assert slots == 0
    finally:
        other.stop()


def test_redis_outage_follows_on_state_error_and_recovers(tmp_path, upstream):
    redis = RedisServer(tmp_path).start()
    allow = start_gateway(tmp_path, config(upstream.port, redis.url, prefix="o:", rpm_free=2))
    deny = start_gateway(
        tmp_path, config(upstream.port, redis.url, prefix="o:", on_state_error="deny", rpm_free=2)
    )
    clients = {name: openai.OpenAI(base_url=g.url + "/v1", api_key="sk-free-0123456789", max_retries=0)
               for name, g in (("allow", allow), ("deny", deny))}  # fmt: skip
    try:
        assert clients["allow"].chat.completions.create(model="m", messages=MESSAGES)
        redis.stop()
        assert clients["allow"].chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.InternalServerError) as info:
            clients["deny"].chat.completions.create(model="m", messages=MESSAGES)
        assert info.value.status_code == 503 and info.value.code == "quota_state_unavailable"
        counted = 'meshgate_state_errors_total{decision="allow",plugin="quotas"} 1.0'
        assert counted in scrape(allow.url, ADMIN)
        assert "quota state unavailable" in allow.output()
        assert allow.proc.poll() is None and deny.proc.poll() is None  # nothing crashed

        redis = RedisServer(tmp_path, port=redis.port).start()  # back, empty
        assert clients["deny"].chat.completions.create(model="m", messages=MESSAGES)
        assert clients["deny"].chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):  # counting resumed: rpm 2
            clients["deny"].chat.completions.create(model="m", messages=MESSAGES)
    finally:
        for c in clients.values():
            c.close()
        allow.stop()
        deny.stop()
        redis.stop()


@pytest.mark.parametrize(
    ("counting", "who"),
    [
        ("pipeline:\n  - quotas: {limits: [{rpm: 10}]}\n", "quotas"),
        ("", "deployment caps (rpm/tpm)"),  # caps are the core's, counted like quotas
    ],
)
def test_memory_backend_refuses_several_workers(tmp_path, counting, who):
    import subprocess
    import sys

    path = tmp_path / "mem.yaml"
    capped = "rpm: 5" if not counting else "weight: 1"
    path.write_text(f"""
providers: {{sim: {{type: simulated}}}}
models: [{{name: m, deployments: [{{provider: sim, model: m, {capped}}}]}}]
{counting}""")
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--workers", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60, env=dict(os.environ))  # fmt: skip
    assert result.returncode == 1
    assert "cannot share the memory state backend" in result.stderr and "redis" in result.stderr
    assert who in result.stderr


def asleep(redis: RedisServer) -> None:
    """Wait until `redis` stops answering (a DEBUG SLEEP sent by another process):
    a PING of its own, on a raw socket (redis-py would retry it until it answers)."""
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as conn:
            conn.settimeout(0.1)
            conn.sendall(b"PING\r\n")
            try:
                conn.recv(64)
            except TimeoutError:
                return
        time.sleep(0.02)
    pytest.fail("redis never went to sleep")


def test_slow_redis_counts_as_unavailable(tmp_path, upstream):
    redis = RedisServer(tmp_path, None, "--enable-debug-command", "yes").start()
    gateway = start_gateway(
        tmp_path, config(upstream.port, redis.url, prefix="slow:", on_state_error="deny")
    )
    # rpm 3 is too small for a block (plugins/quota_leases.py): each call asks Redis
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-rpm-0123456789", max_retries=0)
    try:
        assert c.chat.completions.create(model="m", messages=MESSAGES)
        stall = subprocess.Popen(["redis-cli", "-p", str(redis.port), "DEBUG", "SLEEP", "3"])
        asleep(redis)
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model="m", messages=MESSAGES)
        assert info.value.code == "quota_state_unavailable"
        assert stall.poll() is None  # refused while Redis was still asleep, not after
        stall.wait(5)
        assert "redis is not answering" in gateway.output()  # calls failed at once meanwhile
        # back to normal once the hold is over (proxy/state/outage.py: 5 s at most)
        for _ in range(150):
            try:
                assert c.chat.completions.create(model="m", messages=MESSAGES)
                break
            except openai.InternalServerError as exc:
                assert exc.code == "quota_state_unavailable"
                time.sleep(0.2)
        else:
            pytest.fail("Redis answers, and the gateway never asks it again")
        assert "redis is answering again" in gateway.output()
    finally:
        c.close()
        gateway.stop()
        redis.stop()


def test_cost_header_metric_and_access_log(sdk, gateway):
    raw = sdk("free").chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    usage = raw.parse().usage
    expected = usage.prompt_tokens * 1e-6 + usage.completion_tokens * 2e-6
    assert float(raw.headers["x-meshgate-cost-usd"]) == pytest.approx(expected)
    line = gateway.access_line(raw.headers["x-request-id"])
    assert line["cost_usd"] == pytest.approx(expected)
    metrics = scrape(gateway.url, ADMIN)
    assert 'meshgate_cost_usd_total{deployment="up/m",key="free",model="m",team="plain"}' in metrics


def test_a_budget_holds_against_calls_in_flight(gateway):
    """30 slow calls at once against a $0.10 budget, each estimated at about $0.01
    (100 tokens at $100/M): the reservations admit about ten, not all 30."""

    async def main():
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            body = {"model": "cent", "messages": MESSAGES, "max_tokens": 100,
                    "fake": {"latency_ms": 1000}}  # fmt: skip
            headers = {"authorization": "Bearer sk-dime-0123456789"}
            calls = [client.post("/v1/chat/completions", json=body, headers=headers)
                     for _ in range(30)]  # fmt: skip
            return [r.status_code for r in await asyncio.gather(*calls)]

    statuses = asyncio.run(main())
    admitted = statuses.count(200)
    assert 5 <= admitted <= 10, statuses
    assert statuses.count(429) == 30 - admitted
