"""The one deployment choice: run on every attempt, it skips what failed and what is
unhealthy, follows the call's ranking, and keeps each deployment under its caps."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from proxy.catalog import Catalog
from proxy.choice import CapsReached, Chooser, NoDeployment, untried
from proxy.config import parse_config
from proxy.errors import InvalidRequest, UpstreamUnavailable
from proxy.health import BreakerConfig, Health, HealthConfig
from proxy.pipeline import Call, Reply
from proxy.state import StateConfig, create_state

CONFIG = """
providers: {sim: {type: simulated}}
models:
  - name: m
    deployments:
      - {provider: sim, model: a, name: a}
      - {provider: sim, model: b, name: b}
      - {provider: sim, model: c, name: c}
  - name: capped
    deployments:
      - {provider: sim, model: x, name: x, rpm: 1}
      - {provider: sim, model: y, name: y, tpm: 100}
"""
NAMES = ["a", "b", "c"]


def setup(now=None):
    catalog = Catalog(parse_config(CONFIG, "t.yaml", env={}))
    clock = (lambda: now[0]) if now else None
    health = Health(HealthConfig(breaker=BreakerConfig(failures=1, cooldown_s=10)),
                    **({"clock": clock} if clock else {}))  # fmt: skip
    return catalog, health, Chooser(health, create_state(StateConfig()))


def call_for(catalog, model="m", content="hi", **body) -> Call:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    call = Call("chat", body, Headers(), "r")
    call.model = catalog.get(model)
    return call


def test_each_attempt_goes_to_a_deployment_this_call_has_not_failed_on():
    async def main():
        catalog, _, chooser = setup()
        call = call_for(catalog)
        seen = []
        for t in range(3):
            deployment = await chooser.choose(call)
            seen.append(deployment.name)
            call.failed[deployment.name] = float(t)
        assert seen == NAMES  # the config's order without a ranking
        # All failed: the one that failed longest ago is tried again.
        assert (await chooser.choose(call)).name == "a"

    asyncio.run(main())


def test_the_calls_ranking_orders_only_what_is_left():
    async def main():
        catalog, _, chooser = setup()
        call = call_for(catalog)
        given_to_rank = []

        def backwards(c, candidates):
            given_to_rank.append([d.name for d in candidates])
            return list(reversed(candidates))

        call.rank = backwards
        call.failed["c"] = 0.0
        assert (await chooser.choose(call)).name == "b"
        assert given_to_rank == [["a", "b"]]

    asyncio.run(main())


def test_open_breakers_are_skipped_and_none_left_is_a_503():
    async def main():
        catalog, health, chooser = setup()
        call = call_for(catalog)
        await health.record("a", UpstreamUnavailable("refused"))  # its breaker opens
        assert (await chooser.choose(call)).name == "b"
        health.down.update({"b", "c"})  # failing their health checks
        with pytest.raises(NoDeployment) as info:
            await chooser.choose(call)
        assert info.value.status == 503 and "every deployment of 'm'" in info.value.message.lower()

    asyncio.run(main())


def test_caps_are_checked_on_every_attempt_and_tokens_given_back_on_failure():
    async def main():
        catalog, _, chooser = setup()
        first = call_for(catalog, "capped", max_tokens=50)
        assert (await chooser.choose(first)).name == "x"  # rpm 1: now full
        limits, tokens = first.reserved
        assert tokens > 50 and [limit.key for limit in limits] == ["cap:x:r"]
        second = call_for(catalog, "capped", max_tokens=50)
        assert (await chooser.choose(second)).name == "y"  # x is at its cap
        with pytest.raises(CapsReached) as info:  # y's 100 tokens are reserved
            await chooser.choose(call_for(catalog, "capped", max_tokens=50))
        assert info.value.status == 429 and info.value.headers["retry-after"] == "1"
        chooser.settle(second.reserved, None)  # that attempt failed: tokens back
        assert (await chooser.choose(call_for(catalog, "capped", max_tokens=50))).name == "y"

    asyncio.run(main())


def test_a_finished_answer_counts_its_real_tokens():
    async def main():
        catalog, _, chooser = setup()
        taken = call_for(catalog, "capped", max_tokens=50)
        taken.failed["x"] = 0.0
        await chooser.choose(taken)
        reply = Reply.json(
            {"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
        )
        chooser.settle(taken.reserved, reply)  # 5 of 100 used: room for another
        other = call_for(catalog, "capped", max_tokens=50)
        other.failed["x"] = 0.0
        assert (await chooser.choose(other)).name == "y"

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(
    failed=st.dictionaries(st.sampled_from(NAMES), st.floats(0, 100)),
    down=st.sets(st.sampled_from(NAMES)),
    reverse=st.booleans(),
)
def test_the_choice_is_never_unhealthy_and_never_a_repeat_while_others_are_left(
    failed, down, reverse
):
    async def main():
        catalog, health, chooser = setup()
        health.down.update(down)
        call = call_for(catalog)
        call.failed.update(failed)
        if reverse:
            call.rank = lambda c, candidates: list(reversed(candidates))
        healthy = [n for n in NAMES if n not in down]
        if not healthy:
            with pytest.raises(NoDeployment):
                await chooser.choose(call)
            return
        chosen = (await chooser.choose(call)).name
        assert chosen in healthy and call.deployment.name == chosen
        fresh = [n for n in healthy if n not in failed]
        if fresh:
            assert chosen == (fresh[-1] if reverse else fresh[0])
        else:
            assert failed[chosen] == min(failed[n] for n in healthy)

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(
    refused=st.sets(st.sampled_from(NAMES)),
    down=st.sets(st.sampled_from(NAMES)),
    failed=st.dictionaries(st.sampled_from(NAMES), st.floats(1, 100)),
)
def test_a_deployment_whose_provider_cannot_take_the_call_is_never_chosen(refused, down, failed):
    """Refused deployments are passed over before health is asked (a 400 of the
    first one's when all are refused), and count as failed on from the start, so
    fallback never waits for one of them to be untried."""

    async def main():
        catalog, health, _ = setup()
        refusals = {n: InvalidRequest(f"{n} cannot", param=f"p{n}") for n in refused}
        chooser = Chooser(health, create_state(StateConfig()), lambda d, c: refusals.get(d.name))
        health.down.update(down)
        call = call_for(catalog)
        call.failed.update(failed)
        able = [n for n in NAMES if n not in refused]
        if not able:
            with pytest.raises(InvalidRequest) as info:
                await chooser.choose(call)
            assert info.value is refusals[min(refused)]  # the config's first
            return
        if not [n for n in able if n not in down]:
            with pytest.raises(NoDeployment):
                await chooser.choose(call)
            return
        chosen = (await chooser.choose(call)).name
        assert chosen in able and chosen not in down
        assert {d.name for d in untried(call, health)} <= set(able) - set(failed)

    asyncio.run(main())
