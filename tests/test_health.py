"""Deployment health: breakers, the outcome of attempts, and what counts as a failure."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import (
    GatewayError,
    InvalidRequest,
    PermissionDenied,
    ProviderNotConfigured,
    QuotaExceeded,
    RateLimited,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.health import BreakerConfig, ChecksConfig, Health, HealthConfig, classify
from proxy.state import StateConfig, create_state
from tests.conftest import HOSTILE_WAYS, free_port


def health(clock, **breaker) -> Health:
    return Health(HealthConfig(breaker=BreakerConfig(**breaker)), clock=clock)


def test_a_breaker_opens_lets_one_probe_through_and_closes():
    now = [0.0]
    h = health(lambda: now[0], failures=2, window_s=10, cooldown_s=5)
    h.failure("d")
    now[0] = 11  # the first failure left the window
    h.failure("d")
    assert h.allows("d")
    h.failure("d")
    assert h.is_open("d") and not h.allows("d")
    now[0] = 17
    assert h.allows("d") and not h.allows("d")  # one probe only
    h.failure("d")  # the probe failed
    assert h.is_open("d")
    now[0] = 23
    assert h.allows("d")
    h.success("d")
    assert not h.is_open("d")


@given(down=st.booleans(), remote=st.none() | st.floats(0, 20), until=st.none() | st.floats(0, 20),
       probing=st.booleans(), now=st.floats(0, 20))  # fmt: skip
def test_a_deployment_takes_an_attempt_exactly_when_it_is_not_open(down, remote, until, probing,
                                                                    now):  # fmt: skip
    """In any state of the health check, another replica's breaker and its own: an
    attempt is allowed just when the deployment is not open, and an attempt past an
    open breaker's cooldown becomes its one probe."""
    h = health(lambda: now)
    if down:
        h.down.add("d")
    if remote is not None:
        h.remote_until["d"] = remote
    if until is not None:
        h.open_until["d"] = until
    if probing:
        h.probing.add("d")
    was_open = h.is_open("d")
    assert h.allows("d") is not was_open
    if not was_open and until is not None:
        assert h.is_open("d")  # the probe is out: nobody else gets through


def test_only_upstream_failures_count_against_a_deployment():
    async def main():
        h = health(lambda: 0.0, failures=1)
        for error in (InvalidRequest("bad"), PermissionDenied("no"), UpstreamStatus(404, "x"),
                      QuotaExceeded("spent"), RateLimited("slow", retry_after_s=1)):  # fmt: skip
            await h.record("d", error)
        assert not h.is_open("d")
        await h.record("d", UpstreamStatus(503, "down"))
        assert h.is_open("d")

    asyncio.run(main())


@given(st.integers(100, 999))
def test_upstream_statuses_are_failures_exactly_when_retrying_could_help(status):
    """An error status that is no client's error (not 4xx, nor 5xx) is a 502."""
    kind = classify(UpstreamStatus(status, "x"))
    failed = status >= 500 or status < 400
    assert kind == ("rate_limit" if status == 429 else "server_error" if failed else None)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (UpstreamTimeout("t"), "timeout"),
        (UpstreamUnavailable("u"), "unavailable"),
        (ProviderNotConfigured("p"), "unavailable"),
        (GatewayError("internal"), None),
    ],
)
def test_kinds_of_failure(error, kind):
    assert classify(error) == kind


def test_breaker_settings_are_range_checked():
    with pytest.raises(ValueError, match="failures"):
        BreakerConfig(failures=0)
    with pytest.raises(ValueError, match="positive"):
        BreakerConfig(cooldown_s=0)
    with pytest.raises(ValueError, match="sync_s"):
        HealthConfig(sync_s=0)


def test_without_shared_state_nothing_is_sent_to_the_state():
    class Refusing:
        config = StateConfig()

        def __getattr__(self, name):
            raise AssertionError(f"the memory state was asked {name}")

    async def main():
        h = Health(HealthConfig(breaker=BreakerConfig(failures=1)), state=Refusing())
        await h.record("d", UpstreamTimeout("t"))
        await h.record("d", None)
        assert not h.is_open("d")

    asyncio.run(main())
    assert create_state(StateConfig()).config.shared is False


@pytest.mark.parametrize("way", HOSTILE_WAYS)
def test_a_check_reads_a_status_in_its_time_never_a_body(hostile_http, way):
    """A 200 at once passes however its body comes; a head that never ends fails at
    `timeout_s`, as a whole and not per read."""
    probes = {"p": (hostile_http(way) + "/v1/models", {}, ["p/m"])}
    checks = ChecksConfig(providers=["p"], timeout_s=0.5)
    h = Health(HealthConfig(checks=checks), probes=probes)

    async def main():
        async with httpx.AsyncClient(timeout=0.5) as client:
            await asyncio.wait_for(h._check(client, "p"), 30)  # a hang fails here

    asyncio.run(main())
    assert ("p/m" in h.down) == (way == "slow-head")


def test_a_backend_that_never_answers_holds_up_no_other_s_checks(hostile_http):
    refused = f"http://127.0.0.1:{free_port()}/v1/models"  # nothing listens there
    probes = {"hung": (hostile_http("slow-head") + "/v1/models", {}, ["hung/m"]),
              "refused": (refused, {}, ["refused/m"])}  # fmt: skip
    checks = ChecksConfig(providers=list(probes), interval_s=0.01, timeout_s=0.3)
    h = Health(HealthConfig(checks=checks), probes=probes)
    rounds = []
    check = h._check

    async def counted(client, provider):
        await check(client, provider)
        rounds.append(provider)

    h._check = counted  # type: ignore[method-assign]

    async def main():
        await h.start()
        deadline = time.monotonic() + 30
        while rounds.count("refused") < 3:  # the hung one's check ends every round too
            assert time.monotonic() < deadline, f"the checks stalled after {rounds}"
            await asyncio.sleep(0.05)
        await h.close()

    asyncio.run(main())
    assert {"hung/m", "refused/m"} <= h.down
