"""Whatever a plugin does with the replies it gets (raises after call_next, keeps one
of two, never iterates a stream), everything taken for the call is given back:
the key's concurrency slot, the deployment's in-flight count, the upstream's
connection. A real gateway with a buggy plugin, over sockets."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import one_model, start_gateway, upstream_stats

KEY = "sk-one-at-a-time-0123456789"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    server = start_gateway(
        tmp_path_factory.mktemp("lifetime"),
        one_model(
            upstream.port,
            f"""\
  - auth: {{keys: [{{name: solo, key: {KEY}}}]}}
  - "tests.misbehaving_plugins:Misbehave": {{}}
  - quotas: {{limits: [{{per: key, keys: [solo], concurrent: 2}}]}}
""",
        ),
    )
    yield server
    server.stop()


def ask(gateway, misbehave: str | None = None, stream: bool = False) -> httpx.Response:
    headers = {"authorization": f"Bearer {KEY}"}
    if misbehave:
        headers["x-test-misbehave"] = misbehave
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    body["fake"] = {"tokens": 400, "token_delay_ms": 5}  # a stream outlives the request
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def until_quiet(upstream) -> dict:
    """The fake upstream's stats once no stream is open there (or as they are at 20 s)."""
    deadline = time.monotonic() + 20
    stats = upstream_stats(upstream)
    while stats["open_streams"] and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = upstream_stats(upstream)
    return stats


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("misbehave", ["raise-after", "keep-second"])
def test_everything_taken_for_a_call_is_given_back(gateway, upstream, misbehave, stream):
    for _ in range(
        3
    ):  # concurrent: 2, and keep-second holds both: a slot kept refuses a later call
        reply = ask(gateway, misbehave, stream)
        if misbehave == "raise-after":
            assert reply.status_code == 500
            assert reply.json()["error"]["type"] == "api_error"
        else:
            assert reply.status_code == 200
    assert until_quiet(upstream)["open_streams"] == 0
    after = ask(gateway)
    assert after.status_code == 200, after.text
    assert after.headers["x-test-in-flight"] == "0"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_leaves_nothing_taken(gateway, upstream, stream):
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            "fake": {"tokens": 400, "token_delay_ms": 5, "latency_ms": 2000}}  # fmt: skip
    for _ in range(3):  # concurrent: 2, so a slot left behind would refuse the third
        with httpx.Client(timeout=30) as client:
            if stream:
                with client.stream("POST", gateway.url + "/v1/chat/completions",
                                   json=body, headers=headers) as r:  # fmt: skip
                    assert r.status_code == 200
                    next(r.iter_raw())  # the stream has started; then the client hangs up
            else:
                with pytest.raises(httpx.ReadTimeout):  # gone before the answer came
                    client.post(gateway.url + "/v1/chat/completions", json=body,
                                headers=headers, timeout=0.3)  # fmt: skip
    assert until_quiet(upstream)["open_streams"] == 0
    deadline = time.monotonic() + 20
    while True:  # the gateway notices each hang-up on its own time
        after = ask(gateway)
        if after.status_code == 200 and after.headers["x-test-in-flight"] == "0":
            break
        assert time.monotonic() < deadline, after.text
        time.sleep(0.1)
