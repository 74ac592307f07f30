"""The fallback plugin end to end: fake upstream processes with injected faults."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import openai
import orjson
import pytest

from tests.conftest import MESSAGES, free_port, start_fake_upstream, start_gateway, upstream_stats


@pytest.fixture(scope="module")
def dead_port():
    return free_port()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream, dead_port):
    server = start_gateway(tmp_path_factory.mktemp("fallback"), f"""
server: {{host: 127.0.0.1}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}
  dead: {{type: openai, base_url: "http://127.0.0.1:{dead_port}/v1", timeouts: {{connect_s: 1}}}}
models:
  - {{name: primary, deployments: [{{provider: up, model: primary-v1}}]}}
  - {{name: backup, deployments: [{{provider: up, model: backup-v1}}]}}
  - {{name: long, deployments: [{{provider: up, model: long-context-v1}}]}}
  - {{name: gone, deployments: [{{provider: dead, model: gone-v1}}]}}
  - name: pair
    deployments: [{{provider: dead, model: pair-dead, name: pair-a}}, {{provider: up, model: pair-up, name: pair-b}}]
pipeline:
  - fallback:
      attempts: 3
      backoff_s: 0.05
      deadline_s: 10
      models:
        primary: {{fallbacks: [backup], context_window: [long]}}
        gone: {{fallbacks: [backup]}}
health:
  breaker: {{failures: 3, window_s: 30, cooldown_s: 1}}
""")  # fmt: skip
    yield server
    server.stop()


@pytest.fixture
def sdk(gateway):
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    yield c
    c.close()


def script(**knobs):
    return {"fake": {"fail_key": uuid.uuid4().hex, **knobs}}


def test_retries_a_500_invisibly(sdk, gateway, upstream):
    before = upstream_stats(upstream)["requests"]
    raw = sdk.chat.completions.with_raw_response.create(
        model="primary", messages=MESSAGES, extra_body=script(fail_times=2, error_status=500)
    )
    assert raw.parse().model == "primary-v1"
    assert upstream_stats(upstream)["requests"] - before == 3
    assert gateway.access_line(raw.headers["x-request-id"])["attempts"] == 3


def test_honours_retry_after(sdk, gateway):
    started = time.monotonic()
    raw = sdk.chat.completions.with_raw_response.create(
        model="primary", messages=MESSAGES,
        extra_body=script(fail_times=1, error_status=429, retry_after=1),
    )  # fmt: skip
    waited = time.monotonic() - started
    assert raw.parse().model == "primary-v1"
    assert waited >= 1.0  # it waited as the upstream asked, not its own 50 ms backoff


def test_falls_back_to_the_next_model_in_order(sdk, gateway):
    raw = sdk.chat.completions.with_raw_response.create(model="gone", messages=MESSAGES)
    assert raw.parse().model == "backup-v1"
    line = gateway.access_line(raw.headers["x-request-id"])
    assert line["model"] == "backup" and line["attempts"] == 4  # 3 on gone, then backup


def test_context_window_error_goes_to_the_larger_model(sdk):
    answer = sdk.chat.completions.create(
        model="primary", messages=MESSAGES,
        extra_body=script(fail_times=1, error_status=400, error_code="context_length_exceeded"),
    )  # fmt: skip
    assert answer.model == "long-context-v1"


def test_client_errors_are_not_retried(sdk, upstream):
    before = upstream_stats(upstream)["requests"]
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(
            model="primary", messages=MESSAGES, extra_body=script(fail_times=5, error_status=400)
        )
    assert upstream_stats(upstream)["requests"] - before == 1


@pytest.mark.parametrize("keepalives", [0, 3])
def test_stream_failing_before_its_first_event_is_retried(sdk, keepalives):
    """Comments an upstream sends first (keep-alives) are not the answer's start:
    an error event after them still falls over."""
    for mode in ("error_event", "abort"):
        stream = sdk.chat.completions.create(
            model="primary", messages=MESSAGES, stream=True,
            extra_body=script(fail_times=1, fail_mode=mode, keepalives=keepalives),
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == " ".join(["tok"] * 16), mode


def test_no_retry_once_a_stream_has_started(gateway, upstream):
    before = upstream_stats(upstream)["requests"]
    body = {"model": "primary", "messages": MESSAGES, "stream": True, "fake": {"abort_after": 3}}
    r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)
    events = r.content.split(b"\n\n")
    assert r.status_code == 200
    assert orjson.loads(events[-2][6:])["error"]["type"] == "upstream_error"
    assert upstream_stats(upstream)["requests"] - before == 1


def test_breaker_opens_skips_and_recovers(tmp_path, sdk, gateway, dead_port):
    def deployment():
        raw = sdk.chat.completions.with_raw_response.create(model="pair", messages=MESSAGES)
        line = gateway.access_line(raw.headers["x-request-id"])
        return raw.headers["x-meshgate-deployment"], line.get("attempts", 1)

    for _ in range(3):  # pair-a refuses the connection; the third failure opens its breaker
        assert deployment() == ("pair-b", 2)
    assert deployment() == ("pair-b", 1)  # pair-a is skipped while open
    revived = start_fake_upstream(tmp_path, port=dead_port)
    try:
        time.sleep(1.2)  # the cooldown passes; the next call probes pair-a
        assert deployment() == ("pair-a", 1)
        assert deployment() == ("pair-a", 1)  # closed again
    finally:
        revived.stop()


def test_deadline_bounds_the_whole_request(tmp_path, upstream):
    gateway = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}
models:
  - {{name: m, deployments: [{{provider: up, model: m}}]}}
pipeline:
  - fallback: {{attempts: 5, backoff_s: 0.05, deadline_s: 0.5}}
""")  # fmt: skip
    try:
        r = httpx.post(gateway.url + "/v1/chat/completions", timeout=10,
                       json={"model": "m", "messages": MESSAGES, "fake": {"latency_ms": 2000}})  # fmt: skip
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
    finally:
        gateway.stop()


def test_async_concurrent_fallbacks(gateway):
    async def main():
        c = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
        try:
            answers = await asyncio.gather(*(
                c.chat.completions.create(model="primary", messages=MESSAGES,
                                          extra_body=script(fail_times=1, error_status=503))
                for _ in range(10)
            ))  # fmt: skip
        finally:
            await c.close()
        return answers

    # Ten failures at once open primary's breaker, so some go to backup: none fail.
    assert {a.model for a in asyncio.run(main())} <= {"primary-v1", "backup-v1"}


def test_breaker_state_is_shared_through_redis(tmp_path, upstream):
    from tests.conftest import RedisServer

    redis = RedisServer(tmp_path).start()
    dead = free_port()
    config = f"""
server: {{host: 127.0.0.1}}
state: {{backend: redis, url: "{redis.url}"}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}
  dead: {{type: openai, base_url: "http://127.0.0.1:{dead}/v1", timeouts: {{connect_s: 1}}}}
models:
  - name: pair
    deployments: [{{provider: dead, model: x, name: shared-a}}, {{provider: up, model: y, name: shared-b}}]
pipeline:
  - fallback:
      attempts: 2
health:
  sync_s: 0.1
  breaker: {{failures: 3, window_s: 30, cooldown_s: 30}}
"""  # fmt: skip
    first, second = start_gateway(tmp_path, config), start_gateway(tmp_path, config)
    try:

        def attempts(gateway):
            r = httpx.post(gateway.url + "/v1/chat/completions", timeout=10,
                           json={"model": "pair", "messages": MESSAGES})  # fmt: skip
            assert r.headers["x-meshgate-deployment"] == "shared-b"
            return gateway.access_line(r.headers["x-request-id"]).get("attempts", 1)

        assert [attempts(first) for _ in range(3)] == [2, 2, 2]  # the third failure opens it
        assert "opened for every replica" in first.output()
        deadline = time.monotonic() + 30  # the other replica reads it within a sync or two
        while attempts(second) != 1:  # until then it may still try shared-a
            assert time.monotonic() < deadline, "the other replica never skipped shared-a"
            time.sleep(0.05)
        assert [attempts(second) for _ in range(3)] == [1, 1, 1]
    finally:
        first.stop()
        second.stop()
        redis.stop()


def test_health_checks_take_a_backend_out_and_back(tmp_path):
    a, b = start_fake_upstream(tmp_path), start_fake_upstream(tmp_path)
    gateway = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1}}
providers:
  a: {{type: openai, base_url: "http://127.0.0.1:{a.port}/v1"}}
  b: {{type: openai, base_url: "http://127.0.0.1:{b.port}/v1"}}
models:
  - name: local
    deployments: [{{provider: a, model: m, name: replica-a}}, {{provider: b, model: m, name: replica-b}}]
pipeline:
  - routing: {{strategy: least-busy}}
  - fallback: {{}}
health:
  checks: {{providers: [a, b], interval_s: 0.1, timeout_s: 0.5}}
""")  # fmt: skip

    def answered_by():
        r = httpx.post(gateway.url + "/v1/chat/completions", timeout=10,
                       json={"model": "local", "messages": MESSAGES})  # fmt: skip
        line = gateway.access_line(r.headers["x-request-id"])
        return r.headers["x-meshgate-deployment"], line.get("attempts", 1)

    try:
        assert {answered_by()[0] for _ in range(12)} == {"replica-a", "replica-b"}
        a.stop()
        logged(gateway, "provider a fails its health check")
        assert {answered_by() for _ in range(6)} == {("replica-b", 1)}  # a is never tried
        a = start_fake_upstream(tmp_path, port=a.port)
        logged(gateway, "provider a passes its health check again")
        assert "replica-a" in {answered_by()[0] for _ in range(12)}
    finally:
        gateway.stop()
        a.stop()
        b.stop()


def logged(server, line: str, within_s: float = 30) -> None:
    """Wait until the server has logged `line` (a probe's outcome, on its own clock)."""
    deadline = time.monotonic() + within_s
    while line not in server.output():
        assert time.monotonic() < deadline, f"never logged: {line}"
        time.sleep(0.05)


def test_health_checks_carry_the_providers_key(tmp_path):
    """A local server behind a key (vLLM's --api-key) answers an unkeyed check with
    401: checked with the key its calls carry, it stays in; with a wrong one, out."""
    key = "sk-local-0123456789abcdef"
    up = start_fake_upstream(tmp_path, "--require-key", key)
    gateway = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1}}
providers:
  keyed: {{type: openai, base_url: "http://127.0.0.1:{up.port}/v1", api_key: "{key}"}}
  azure: {{type: openai, azure: true, base_url: "http://127.0.0.1:{up.port}/v1", api_key: "{key}"}}
  tgi: {{type: tgi, base_url: "http://127.0.0.1:{up.port}", api_key: "{key}"}}
  wrong: {{type: openai, base_url: "http://127.0.0.1:{up.port}/v1", api_key: sk-wrong-0000000000}}
models:
  - {{name: keyed, deployments: [{{provider: keyed, model: m}}]}}
  - {{name: azure, deployments: [{{provider: azure, model: m}}]}}
  - {{name: tgi, deployments: [{{provider: tgi, model: m}}]}}
health:
  checks: {{providers: [keyed, azure, tgi, wrong], interval_s: 0.1, timeout_s: 2}}
""")  # fmt: skip
    try:
        logged(gateway, "provider wrong fails its health check")
        for model in ("keyed", "azure", "tgi"):
            r = httpx.post(gateway.url + "/v1/chat/completions", timeout=10,
                           json={"model": model, "messages": MESSAGES})  # fmt: skip
            assert r.status_code == 200, r.text
        output = gateway.output()
        assert all(f"provider {p} fails" not in output for p in ("keyed", "azure", "tgi"))
        assert key not in output
    finally:
        gateway.stop()
        up.stop()


def test_timeouts_fall_over_and_fallbacks_go_in_order(tmp_path, upstream):
    dead = free_port()
    gateway = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1}}
providers:
  slow: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1", timeouts: {{read_s: 0.3}}}}
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}
  dead: {{type: openai, base_url: "http://127.0.0.1:{dead}/v1", timeouts: {{connect_s: 1}}}}
models:
  - name: timed
    deployments: [{{provider: slow, model: t, name: timed-slow}}, {{provider: up, model: t, name: timed-ok}}]
  - {{name: first, deployments: [{{provider: dead, model: f}}]}}
  - {{name: second, deployments: [{{provider: dead, model: s}}]}}
  - {{name: third, deployments: [{{provider: up, model: third-v1}}]}}
pipeline:
  - fallback:
      attempts: 2
      backoff_s: 0.05
      models:
        first: {{fallbacks: [second, third]}}
""")  # fmt: skip
    try:
        # timed-slow gives up after its 0.3 s read timeout; timed-ok (default timeouts)
        # waits out the scripted second and answers
        r = httpx.post(gateway.url + "/v1/chat/completions", timeout=10, json={
            "model": "timed", "messages": MESSAGES, "fake": {"latency_ms": 1000}})  # fmt: skip
        assert r.status_code == 200
        assert r.headers["x-meshgate-deployment"] == "timed-ok"
        assert gateway.access_line(r.headers["x-request-id"])["attempts"] == 2
        r = httpx.post(gateway.url + "/v1/chat/completions", timeout=10,
                       json={"model": "first", "messages": MESSAGES})  # fmt: skip
        assert r.json()["model"] == "third-v1"
        line = gateway.access_line(r.headers["x-request-id"])
        assert line["model"] == "third" and line["attempts"] == 5  # 2 + 2 + 1
    finally:
        gateway.stop()
