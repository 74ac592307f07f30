"""Each built-in plugin alone: built by the config loader with a real context,
awaited with a stub `call_next` that records what reached it and answers as told.
The end-to-end tests (test_auth, test_quotas, test_cache, test_routing,
test_fallback) drive the same plugins through a real gateway."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from plugins.cache.store import MemoryStore, pack, unpack
from proxy.choice import NoDeployment
from proxy.config import parse_config
from proxy.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.gateway import Gateway
from proxy.pipeline import Call, Reply, finish_call
from proxy.sse import Event

MODELS = """
providers: {sim: {type: simulated}}
models:
  - name: big
    deployments:
      - {provider: sim, model: b1, name: big-dear, price: {input_usd_per_mtok: 9, output_usd_per_mtok: 9}}
      - {provider: sim, model: b2, name: big-cheap, price: {input_usd_per_mtok: 1, output_usd_per_mtok: 1}}
  - {name: small, deployments: [{provider: sim, model: s, name: small-1}]}
  - {name: auto, deployments: [{provider: sim, model: unused}]}
pipeline:
"""
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def plugin_of(settings: str) -> tuple[Gateway, Any]:
    gateway = Gateway(parse_config(MODELS + settings, "t.yaml", env={"KEY": "sk-unit-test-key"}))
    return gateway, gateway.plugins[0]


def call_of(gateway: Gateway, model: str = "big", headers: dict | None = None, **body) -> Call:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    call = Call("chat", body, Headers(headers=headers or {}), "req-1")
    call.model = gateway.catalog.find(model)
    return call


class Stub:
    """`call_next`: records each call as it arrived, answers from `answers` in turn
    (a Reply, an exception to raise, or a function of the call)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers) or [None]
        self.seen: list[dict] = []

    async def __call__(self, call: Call) -> Reply:
        self.seen.append({"model": call.model.name if call.model else None,
                          "identity": call.identity, "body": dict(call.body),
                          "rank": call.rank})  # fmt: skip
        answer = self.answers[min(len(self.seen), len(self.answers)) - 1]
        if isinstance(answer, Callable) and not isinstance(answer, type):  # type: ignore[arg-type]
            answer = answer(call)
        if isinstance(answer, BaseException):
            raise answer
        return answer or Reply.json({"choices": [], "usage": USAGE})


def run(coro):
    return asyncio.run(coro)


# --- params ---------------------------------------------------------------------


def test_params_rewrites_the_body_before_it_goes_on():
    gateway, plugin = plugin_of(
        "  - params: {rules: [{models: [big], max_tokens: 10, remove: [logit_bias]}]}\n"
    )
    stub = Stub()
    run(plugin(call_of(gateway, max_tokens=500, logit_bias={"1": 2}), stub))
    run(plugin(call_of(gateway, "small", max_tokens=500), stub))
    assert stub.seen[0]["body"]["max_tokens"] == 10 and "logit_bias" not in stub.seen[0]["body"]
    assert stub.seen[1]["body"]["max_tokens"] == 500  # the rule is for big only


# --- auth -----------------------------------------------------------------------


AUTH = "  - auth: {keys: [{name: unit, key: '${KEY}', team: t, models: [small]}]}\n"


@pytest.mark.parametrize("header", ["authorization", "Authorization", "AUTHORIZATION"])
def test_auth_finds_the_key_whatever_the_headers_case_and_sets_the_identity(header):
    gateway, plugin = plugin_of(AUTH)
    stub = Stub()
    run(plugin(call_of(gateway, "small", {header: "Bearer sk-unit-test-key"}), stub))
    identity = stub.seen[0]["identity"]
    assert (identity.name, identity.team, identity.subject) == ("unit", "t", "key:unit")


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, AuthenticationFailed),
        ({"Authorization": "Bearer sk-wrong-key-000"}, AuthenticationFailed),
        ({"Authorization": "Basic c2stdW5pdC10ZXN0LWtleQ=="}, AuthenticationFailed),
    ],
)
def test_auth_refuses_before_anything_goes_on(headers, error):
    gateway, plugin = plugin_of(AUTH)
    stub = Stub()
    with pytest.raises(error):
        run(plugin(call_of(gateway, "small", headers), stub))
    assert stub.seen == []


TWO_KEYS = f"""  - auth:
      keys:
        - {{name: raw, key: sk-first-key-0001}}
        - {{name: hashed, sha256: {hashlib.sha256(b"sk-second-key-002").hexdigest()}}}
        - {{name: old, key: sk-expired-key-01, expires: "2020-01-01"}}
"""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["sk-first-key-0001", "sk-second-key-002", "sk-expired-key-01"])
                | st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), min_size=1,
                          max_size=40), max_size=12))  # fmt: skip
def test_auth_answers_a_key_the_same_however_often_it_comes(tokens):
    """Keys already seen are found by another digest: any sequence of tokens, known,
    expired or not, gets what the SHA-256 lookup alone gives, and only keys that
    matched are remembered."""
    _, plugin = plugin_of(TWO_KEYS)
    expected = {"sk-first-key-0001": "raw", "sk-second-key-002": "hashed"}
    for token in tokens:
        headers = Headers(headers={"authorization": f"Bearer {token}"})
        want = expected.get(token)
        if want is None:
            with pytest.raises(AuthenticationFailed):
                run(plugin.authenticate(headers))
        else:
            assert run(plugin.authenticate(headers)).name == want
    assert len(plugin.seen) <= 3  # one entry per configured key, at most
    assert {k.identity.name for k in plugin.seen.values()} <= {"raw", "hashed", "old"}


def test_auth_refuses_a_key_it_has_seen_once_it_expires(monkeypatch):
    _, plugin = plugin_of(TWO_KEYS.replace('"2020-01-01"', '"2999-01-01"'))
    headers = Headers(headers={"authorization": "Bearer sk-expired-key-01"})
    assert run(plugin.authenticate(headers)).name == "old"
    assert len(plugin.seen) == 1
    monkeypatch.setattr("plugins.auth.time.time", lambda: 1e12)  # past 2999
    with pytest.raises(AuthenticationFailed, match="expired"):
        run(plugin.authenticate(headers))


def test_auth_refuses_a_model_the_key_may_not_use():
    gateway, plugin = plugin_of(AUTH)
    stub = Stub()
    with pytest.raises(PermissionDenied):
        run(plugin(call_of(gateway, "big", {"authorization": "Bearer sk-unit-test-key"}), stub))
    assert stub.seen == []


# --- quotas ---------------------------------------------------------------------


def test_quotas_count_each_call_and_refuse_past_the_limit():
    gateway, plugin = plugin_of("  - quotas: {limits: [{per: global, rpm: 2}]}\n")

    async def main():
        stub = Stub()
        for _ in range(2):
            call = call_of(gateway)
            reply = await plugin(call, stub)
            await finish_call(call, reply, True)
        with pytest.raises(RateLimited) as info:
            await plugin(call_of(gateway), stub)
        return stub, info.value

    stub, refused = run(main())
    assert len(stub.seen) == 2
    assert refused.status == 429 and int(refused.headers["retry-after"]) >= 1


def test_a_concurrency_slot_is_given_back_even_when_the_rest_of_the_chain_fails():
    gateway, plugin = plugin_of("  - quotas: {limits: [{per: global, concurrent: 1}]}\n")

    async def main():
        for _ in range(3):  # each failure must free the one slot for the next call
            call = call_of(gateway)
            with pytest.raises(UpstreamStatus):
                await plugin(call, Stub(UpstreamStatus(500, "boom")))
            await finish_call(call, None, False)
        call = call_of(gateway)
        reply = await plugin(call, Stub())
        await finish_call(call, reply, True)

    run(main())


def shared_quotas(redis_server, limits: str) -> tuple[Gateway, Any]:
    state = (
        f'state: {{backend: redis, url: "{redis_server.url}", prefix: "u{os.urandom(3).hex()}:"}}\n'
    )
    gateway = Gateway(parse_config(state + MODELS + f"  - quotas: {{limits: [{limits}]}}\n",
                                   "t.yaml", env={}))  # fmt: skip
    return gateway, gateway.plugins[0]


def test_quotas_admit_from_a_block_and_say_what_is_left_in_whole_numbers(redis_server):
    gateway, plugin = shared_quotas(redis_server, "{per: global, rpm: 100000000, tpm: 1000000000}")

    async def main():
        await gateway.state.start()
        await plugin.start()
        seen = []
        for _ in range(3):
            call = call_of(gateway)
            reply = await plugin(call, Stub())
            await finish_call(call, reply, True)
            seen.append((reply.headers["x-ratelimit-limit-requests"],
                         reply.headers["x-ratelimit-remaining-requests"],
                         reply.headers["x-ratelimit-limit-tokens"]))  # fmt: skip
        blocks = dict(plugin.blocks.blocks)
        await plugin.close()
        await gateway.state.close()
        return seen, blocks

    seen, blocks = run(main())
    assert seen == [("100000000", str(100000000 - n), "1000000000") for n in (1, 2, 3)]
    assert len(blocks) == 1  # the three came from one block


def test_a_blocks_headers_are_the_tightest_limits_as_a_check_of_each_call_says(redis_server):
    """Two requests-per-minute limits: the headers are the tighter one's, its units
    left, and the time until the units used come back (60 s / 6000 each)."""
    limits = "{per: global, rpm: 100000000}, {per: key, rpm: 6000}"
    gateway, plugin = shared_quotas(redis_server, limits)

    async def main():
        await gateway.state.start()
        seen = []
        for _ in range(3):
            call = call_of(gateway)
            reply = await plugin(call, Stub())
            await finish_call(call, reply, True)
            seen.append(tuple(reply.headers[f"x-ratelimit-{name}-requests"]
                              for name in ("limit", "remaining", "reset")))  # fmt: skip
        await plugin.close()
        await gateway.state.close()
        return seen

    assert run(main()) == [("6000", str(6000 - n), f"{10 * n}ms") for n in (1, 2, 3)]


def test_a_block_gets_its_slot_back_when_the_rest_of_the_chain_fails(redis_server):
    gateway, plugin = shared_quotas(redis_server, "{per: global, concurrent: 40}")

    async def main():
        await gateway.state.start()
        for _ in range(5):
            call = call_of(gateway)
            with pytest.raises(UpstreamStatus):
                await plugin(call, Stub(UpstreamStatus(500, "boom")))
            await finish_call(call, None, False)
        (block,) = plugin.blocks.blocks.values()
        held = (block.in_flight, block.left)
        await plugin.close()
        await gateway.state.close()
        return held

    assert run(main()) == (0, [2.0])  # one block of two slots, both free again


def test_a_call_that_goes_away_while_redis_counts_it_gives_its_slot_back(redis_server):
    """Checked one by one (concurrent: 1 is too small for blocks): the client hangs
    up while Redis admits the call, and the slot it was granted comes back."""
    gateway, plugin = shared_quotas(redis_server, "{per: global, concurrent: 1}")
    state = gateway.state
    real_acquire = state.acquire
    answer = asyncio.Event()

    async def slow_acquire(limits, lease):
        counted = asyncio.ensure_future(real_acquire(limits, lease))  # Redis counts it now
        await answer.wait()  # the answer comes after the client went
        return await counted

    state.acquire = slow_acquire

    async def main():
        await state.start()
        caller = asyncio.ensure_future(plugin(call_of(gateway), Stub()))
        await asyncio.sleep(0.01)
        caller.cancel()
        answer.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        for _ in range(500):  # the give-back runs once Redis has answered
            await asyncio.sleep(0.01)
            await state.flush()
            try:
                call = call_of(gateway)
                reply = await plugin(call, Stub())  # the one slot is free again
                break
            except RateLimited:
                continue
        else:
            pytest.fail("the slot the call was granted never came back")
        await finish_call(call, reply, True)
        await state.close()

    run(main())


# --- cache ----------------------------------------------------------------------


def test_cache_answers_a_repeat_without_calling_on():
    gateway, plugin = plugin_of("  - cache: {}\n")

    async def ask(headers=None):
        call = call_of(gateway, headers=headers)
        reply = await plugin(call, stub)
        await finish_call(call, reply, True)  # stores it: the hooks run on finish
        return reply.headers.get("x-meshgate-cache")

    stub = Stub()

    async def main():
        return [await ask(), await ask(), await ask({"Cache-Control": "no-store"})]

    assert run(main()) == ["miss", "hit-exact", "bypass"]
    assert len(stub.seen) == 2  # the hit never went on


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 400), st.booleans())
def test_cache_stores_an_answer_only_within_max_entry_bytes(size, streamed):
    """A larger answer is served whole and not kept, in memory nor in the store."""
    gateway, plugin = plugin_of("  - cache: {max_entry_bytes: 200}\n")
    events = [b'data: {"choices": [], "x": "%s"}\n\n' % (b"y" * size), b"data: [DONE]\n\n"]
    body = b"".join(events)

    async def upstream_events():
        for raw in events:
            yield Event(raw)

    def answer(call):
        return Reply(events=upstream_events()) if streamed else Reply(body=body)

    async def ask():
        call = call_of(gateway, stream=streamed)
        reply = await plugin(call, Stub(answer))
        served = b"".join([e.raw async for e in reply.events]) if streamed else reply.body
        await finish_call(call, reply, True)
        return served, reply.headers["x-meshgate-cache"]

    async def main():
        return await ask(), await ask()

    (first, how), (second, again) = run(main())
    assert first == second == body and how == "miss"
    assert again == ("hit-exact" if len(body) <= 200 else "miss")


def test_cache_refuses_a_bad_ttl_header_before_calling_on():
    gateway, plugin = plugin_of("  - cache: {}\n")
    stub = Stub()
    with pytest.raises(InvalidRequest) as info:
        run(plugin(call_of(gateway, headers={"X-Meshgate-Cache-TTL": "nan"}), stub))
    assert info.value.param == "x-meshgate-cache-ttl" and stub.seen == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=20_000), st.integers(0, 30_000))
def test_cache_entries_read_back_exactly_compressed_or_not(value, threshold):
    packed = pack(value, threshold)
    assert unpack(packed) == value
    assert packed[:1] == (b"l" if len(value) >= threshold else b"r")


def test_cache_entries_of_earlier_versions_still_read_and_corrupt_ones_are_refused():
    answer = b'{"choices": []}' * 300
    assert unpack(b"z" + zlib.compress(answer, 1)) == answer  # zlib, as stored before LZ4
    packed = pack(answer, 1)
    for corrupt in (packed[:10], b"l" + (2**31).to_bytes(4, "little") + packed[5:],
                    b"z" + b"not zlib", b"?" + answer, b""):  # fmt: skip
        with pytest.raises(ValueError):
            unpack(corrupt)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 6), st.integers(0, 50)), max_size=60),
    st.integers(1, 4),
    st.integers(20, 120),
)
def test_the_memory_store_keeps_the_most_recently_used_within_its_bounds(ops, entries, size):
    """Against a plain LRU: writes and reads in any order leave the same entries, in
    the same order, within both bounds, with the bytes counted right."""
    store, model = MemoryStore(entries, size), OrderedDict[str, bytes]()
    for write, k, length in ops:
        key = f"k{k}"
        if write:
            value = bytes([k]) * length
            store.write(key, value, 60.0)
            if length <= size:  # larger than the whole store: not kept
                model.pop(key, None)
                model[key] = value
                while len(model) > entries or sum(map(len, model.values())) > size:
                    model.popitem(last=False)
        else:
            assert store.read(key) == model.get(key)
            if key in model:
                model.move_to_end(key)
    assert [(k, v) for k, (_, v) in store.entries.items()] == list(model.items())
    assert store.bytes == sum(map(len, model.values())) <= size


def test_cache_serves_a_miss_for_an_entry_it_cannot_read():
    gateway, plugin = plugin_of("  - cache: {}\n")
    stub = Stub()

    async def ask():
        call = call_of(gateway)
        reply = await plugin(call, stub)
        await finish_call(call, reply, True)
        return reply.headers.get("x-meshgate-cache")

    async def main():
        first = await ask()
        for key, (expires, value) in list(plugin.store.entries.items()):
            plugin.store.entries[key] = (expires, b"l" + value[1:9])  # truncated
        return [first, await ask(), await ask()]

    assert run(main()) == ["miss", "miss", "hit-exact"]  # the bad entry was replaced
    assert len(stub.seen) == 2


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_cache_times_the_lookups_that_go_to_redis(backend, request):
    state = ""  # entries of their own on Redis: a prefix no other test shares
    if backend == "redis":
        url = request.getfixturevalue("redis_server").url
        state = f'state: {{backend: redis, url: "{url}", prefix: "u{os.urandom(3).hex()}:"}}\n'
    config = state + MODELS + f"  - cache: {{backend: {backend}}}\n"
    gateway = Gateway(parse_config(config, "t.yaml", env={}))
    plugin, stub = gateway.plugins[0], Stub()

    async def main():
        for _ in range(3):
            call = call_of(gateway)
            await finish_call(call, await plugin(call, stub), True)
        await plugin.close()

    run(main())
    registry = gateway.metrics.registry
    labels = {"kind": "exact"}
    timed = registry.get_sample_value("meshgate_cache_lookup_seconds_count", labels)
    hits = registry.get_sample_value("meshgate_cache_lookups_total", {**labels, "result": "hit"})
    assert (hits, timed) == (2.0, 3.0 if backend == "redis" else 0.0)


# --- routing --------------------------------------------------------------------


ROUTING = """  - routing:
      strategy: least-busy
      models:
        big: {strategy: cost}
        auto:
          strategy: complexity
          rules: [{model: big, keywords: [prove]}, {model: small}]
"""


def test_routing_gives_the_call_a_ranking_by_its_models_strategy():
    gateway, plugin = plugin_of(ROUTING)
    stub = Stub()
    call = call_of(gateway)
    run(plugin(call, stub))
    rank = stub.seen[0]["rank"]
    deployments = gateway.catalog.get("big").deployments
    assert [d.name for d in rank(call, deployments)] == ["big-cheap", "big-dear"]
    assert call.deployment is None  # choosing is the gateway's, per attempt


def test_routing_rules_pick_the_model():
    gateway, plugin = plugin_of(ROUTING)
    stub = Stub()
    for text in ("please prove it", "hello"):
        call = call_of(gateway, "auto", messages=[{"role": "user", "content": text}])
        run(plugin(call, stub))
    assert [seen["model"] for seen in stub.seen] == ["big", "small"]


# --- fallback -------------------------------------------------------------------


FALLBACK = """  - fallback:
      attempts: 2
      backoff_s: 0.001
      models: {big: {fallbacks: [small]}}
"""


def test_fallback_retries_upstream_failures_then_moves_to_the_fallback_model():
    gateway, plugin = plugin_of(FALLBACK)
    stub = Stub(UpstreamStatus(503, "down"), UpstreamUnavailable("refused"), None)
    reply = run(plugin(call_of(gateway), stub))
    assert [seen["model"] for seen in stub.seen] == ["big", "big", "small"]
    assert reply.status == 200


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("bad"),
        PermissionDenied("no"),
        UpstreamStatus(400, "bad"),
        GatewayError("ours"),
    ],
)
def test_fallback_never_retries_what_is_not_an_upstream_failure(error):
    gateway, plugin = plugin_of(FALLBACK)
    stub = Stub(error, None)
    with pytest.raises(type(error)):
        run(plugin(call_of(gateway), stub))
    assert len(stub.seen) == 1


def test_fallback_gives_up_with_the_last_error_when_nothing_is_left():
    gateway, plugin = plugin_of(FALLBACK)
    stub = Stub(UpstreamStatus(502, "still down"))
    with pytest.raises(UpstreamStatus) as info:
        run(plugin(call_of(gateway), stub))
    assert info.value.message == "still down"
    assert [seen["model"] for seen in stub.seen] == ["big", "big", "small", "small"]


OUTCOMES = {
    "answers": lambda: None,
    "fails": lambda: UpstreamStatus(503, "down"),  # an upstream failure: retried
    "no deployment": lambda: NoDeployment("every breaker open"),  # on to the fallbacks
    "refused": lambda: InvalidRequest("bad"),  # the client's: never retried
}


@settings(max_examples=150, deadline=None)
@given(attempts=st.integers(1, 3), outcomes=st.lists(st.sampled_from(sorted(OUTCOMES)), max_size=7))
def test_fallback_tries_each_model_as_its_rules_say(attempts, outcomes):
    """Any run of attempt outcomes, any number of attempts per model: the models
    tried, and the answer or error the client gets, as the docstring's rules say."""
    gateway, plugin = plugin_of(FALLBACK.replace("attempts: 2", f"attempts: {attempts}"))
    stub = Stub(*(OUTCOMES[o]() for o in outcomes), None)
    expected: list[str] = []
    result = "answers"
    pending = iter([*outcomes, "answers"])
    for model in ("big", "small"):
        for _ in range(attempts):
            expected.append(model)
            result = next(pending)
            if result != "fails":
                break
        if result != "fails" and result != "no deployment":
            break
    try:
        run(plugin(call_of(gateway), stub))
        got = "answers"
    except NoDeployment:
        got = "no deployment"
    except UpstreamStatus:
        got = "fails"
    except InvalidRequest:
        got = "refused"
    assert ([seen["model"] for seen in stub.seen], got) == (expected, result)


def test_fallbacks_deadline_cuts_an_attempt_and_counts_it_against_its_deployment():
    gateway, plugin = plugin_of("  - fallback: {deadline_s: 0.05, attempts: 3}\n")
    deployment = gateway.catalog.get("big").deployments[0]

    async def hangs(call: Call) -> Reply:
        call.deployment = deployment
        await asyncio.sleep(30)
        raise AssertionError("the deadline should have cut this")

    with pytest.raises(UpstreamTimeout):
        run(plugin(call_of(gateway), hangs))
    assert len(gateway.health.failures[deployment.name]) == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_a_finished_call_leaves_nothing_for_the_garbage_collector(redis_server, shared, stream):
    """Every built-in plugin on, answers given out: what a call built is freed by
    reference counting as it ends. A reference cycle (a completion hook holding the
    call, which holds its replies) leaves each request's objects to the collector,
    whose passes then cost time on every request."""
    state = f'state: {{backend: redis, url: "{redis_server.url}", prefix: "gc{os.urandom(3).hex()}:"}}\n'
    pipeline = """\
  - auth: {keys: [{name: k, key: "${KEY}", team: t}]}
  - quotas: {limits: [{per: key, rpm: 1000000, tpm: 100000000, concurrent: 100},
                      {per: team, budget_usd_day: 1000}]}
  - cache: {}
  - routing: {strategy: least-busy}
  - fallback: {attempts: 2}
"""
    gateway = Gateway(parse_config((state if shared else "") + MODELS + pipeline, "t.yaml",
                                   env={"KEY": "sk-unit-test-key"}))  # fmt: skip
    headers = {"authorization": "Bearer sk-unit-test-key"}

    async def one(i: int) -> None:
        call = call_of(gateway, headers=headers, stream=stream)
        call.body["messages"] = [{"role": "user", "content": f"question {i}"}]
        reply = await gateway.handler(call)
        if reply.streamed:
            while await reply.next_event() is not None:
                pass
        await finish_call(call, reply, True)

    async def main() -> int:
        await gateway.state.start()
        for plugin in gateway.plugins:
            if hasattr(plugin, "start"):
                await plugin.start()
        await asyncio.gather(*(one(i) for i in range(20)))  # blocks reserved, pools warm
        gc.collect()
        gc.disable()
        try:
            await asyncio.gather(*(one(i) for i in range(20, 120)))
            return gc.collect()
        finally:
            gc.enable()
            for plugin in gateway.plugins:
                if hasattr(plugin, "close"):
                    await plugin.close()
            await gateway.state.close()

    # A Redis connection opened meanwhile leaves a few (redis-py keeps the errors of
    # the handshake commands an older server refuses); a cycle per call leaves 20+.
    assert run(main()) < 100
