"""The verify plugin end to end: a gateway under hypercorn, the fake upstream
scripted to answer well or badly, the official SDK and raw HTTP as clients."""

from __future__ import annotations

import base64
import itertools
import os
import uuid
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from tests.conftest import (
    METRICS_KEY,
    Server,
    processes_of_uids,
    scrape,
    start_fake_upstream,
    start_gateway,
    upstream_stats,
)

PRICE = "price: {input_usd_per_mtok: 1000, output_usd_per_mtok: 1000}"
SECRET = "sk-verify-secret-" + uuid.uuid4().hex
keys = itertools.count()


def config(upstream_port: int, judge_port: int) -> str:
    models = "".join(
        f"  - name: {name}\n    deployments: [{{provider: {'judging' if name == 'judge' else 'up'}, "
        f"model: {name}, name: {name}, {PRICE}}}]\n"
        for name in ("m", "marked", "vote", "split", "a", "b", "c", "judge", "observed")
    )
    return f"""
server: {{host: 127.0.0.1, metrics_key: {METRICS_KEY}}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1", api_key: "{SECRET}"}}
  judging: {{type: openai, base_url: "http://127.0.0.1:{judge_port}/v1"}}
models:
{models}
pipeline:
  - verify:
      sandbox: {{wall_s: 3, cpu_s: 2, memory_bytes: 268435456, file_bytes: 8388608}}
      rules:
        - models: [vote]
          checks: [consensus]
          consensus: {{models: [a, b, c], quorum: 2}}
        - models: [split]
          checks: [consensus]
          consensus: {{models: [a, b, c], quorum: 2, tie_break: judge, judge: {{model: judge}}}}
        - models: [marked]
          checks: [json_schema]
          on_failure: mark
        - models: [observed]
          checks: [json_schema]
          stream: observe
        - models: ["*"]
          checks: [json_schema]
          allow: [json_schema, code]
          max_repairs: 2
  - cache: {{}}
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Iterator[Server]:
    server = start_fake_upstream(tmp_path_factory.mktemp("verify-up"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("verify")
    judge = start_fake_upstream(tmp, "--reply", "Answer 2 is the most correct.")
    env = {**os.environ, "MESHGATE_VERIFY_TEST_SECRET": SECRET}
    server = start_gateway(tmp, config(upstream.port, judge.port), env=env)
    yield server
    server.stop()
    judge.stop()


def post(gateway: Server, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=30
    )


def chat(model: str, fake: dict, **extra) -> dict:
    fake = {"fail_key": f"k{next(keys)}-{uuid.uuid4().hex}", **fake}
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "fake": fake, **extra}


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]+$"}},
    "required": ["city"],
}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}


def content(response: httpx.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def test_a_valid_answer_passes_with_one_call(gateway, upstream):
    before = upstream_stats(upstream)["requests"]
    r = post(gateway, chat("m", {"reply": '{"city": "Paris"}'}, response_format=JSON_FORMAT))
    assert r.status_code == 200
    assert r.headers["x-meshgate-verification"].startswith("passed; checks=json_schema")
    assert upstream_stats(upstream)["requests"] - before == 1
    assert "meshgate_verification" not in r.json()


def test_an_invalid_answer_is_repaired_with_exactly_one_more_call_per_repair(gateway, upstream):
    replies = ["not json at all", '{"city": "paris"}', '{"city": "Paris"}']
    before = upstream_stats(upstream)["requests"]
    body = chat("m", {"replies": replies}, response_format=JSON_FORMAT, verify={"report": True})
    r = post(gateway, body)
    assert r.status_code == 200, r.text
    assert content(r) == '{"city": "Paris"}'
    assert upstream_stats(upstream)["requests"] - before == 3
    assert "repaired" in r.headers["x-meshgate-verification"]
    assert "repairs=2" in r.headers["x-meshgate-verification"]
    report = r.json()["meshgate_verification"]
    assert report["result"] == "repaired" and report["repairs"] == 2
    # every call was paid for: three answers at the deployment's price
    assert float(r.headers["x-meshgate-cost-usd"]) > 0
    single = post(gateway, chat("m", {"reply": '{"city": "Rome"}'}, response_format=JSON_FORMAT))
    assert float(r.headers["x-meshgate-cost-usd"]) > 2 * float(
        single.headers["x-meshgate-cost-usd"]
    )


def test_an_answer_that_stays_invalid_is_refused_with_422(gateway, upstream):
    before = upstream_stats(upstream)["requests"]
    r = post(gateway, chat("m", {"reply": "[1, 2"}, response_format=JSON_FORMAT))
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "verification_failed"
    assert "not valid JSON" in error["message"]
    assert upstream_stats(upstream)["requests"] - before == 3  # the answer, then 2 repairs


def test_a_marked_failure_is_returned_but_never_cached(gateway, upstream):
    body = chat("marked", {"reply": "nope"}, response_format={"type": "json_object"})
    first = post(gateway, body)
    assert first.status_code == 200
    assert first.headers["x-meshgate-verification"].startswith("failed")
    assert first.headers["cache-control"] == "no-store"
    again = post(gateway, body)
    assert again.headers["x-meshgate-cache"] == "miss"


def test_only_verified_answers_are_cached_and_hits_are_checked_again(gateway):
    body = chat("m", {"replies": ["bad", '{"city": "Oslo"}']}, response_format=JSON_FORMAT)
    repaired = post(gateway, body)
    assert repaired.status_code == 200 and repaired.headers["x-meshgate-cache"] == "miss"
    # The answer to this request failed: it was not stored (the repair's answer was,
    # under the repair's own request).
    again = post(gateway, body)
    assert again.headers["x-meshgate-cache"] == "miss"
    assert again.headers["x-meshgate-verification"].startswith("passed")
    hit = post(gateway, body)
    assert hit.headers["x-meshgate-cache"] == "hit-exact"
    assert content(hit) == '{"city": "Oslo"}'
    assert hit.headers["x-meshgate-verification"].startswith("passed")


def test_tool_call_arguments_are_validated_against_the_tools_parameters(gateway):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": SCHEMA}}]

    def calls(arguments: str) -> list:
        return [{"id": "c1", "type": "function",
                 "function": {"name": "weather", "arguments": arguments}}]  # fmt: skip

    good = post(gateway, chat("m", {"tool_calls": orjson.dumps(calls('{"city": "Lima"}')).decode()},
                               tools=tools))  # fmt: skip
    assert good.status_code == 200
    assert "json_schema=passed" in good.headers["x-meshgate-verification"]
    bad = post(gateway, chat("m", {"tool_calls": orjson.dumps(calls('{"town": 1}')).decode()},
                              tools=tools))  # fmt: skip
    assert bad.status_code == 422
    assert "weather" in bad.json()["error"]["message"]


CODE = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"


def test_code_runs_with_the_callers_tests_in_the_body_or_a_header(gateway):
    passing = {"checks": ["code"], "tests": "assert add(2, 3) == 5", "report": True}
    r = post(gateway, chat("m", {"reply": CODE}, verify=passing))
    assert r.status_code == 200, r.text
    check = r.json()["meshgate_verification"]["checks"][0]
    assert check["check"] == "code" and check["outcome"] == "passed"
    assert check["run"]["duration_ms"] > 0
    tests = base64.b64encode(b"assert add(2, 2) == 5, 'two and two'").decode()
    headers = {"x-meshgate-verify": "code", "x-meshgate-verify-tests": tests}
    failing = post(gateway, chat("m", {"reply": CODE}), headers)
    assert failing.status_code == 422
    assert "AssertionError: two and two" in failing.json()["error"]["message"]


def test_checks_the_config_does_not_allow_and_malformed_selections_are_400(gateway):
    refused = post(gateway, chat("m", {}, verify={"checks": ["consensus"]}))
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "verify.checks"
    many = post(gateway, chat("m", {}, verify={"checks": ["Q" * 50_000] * 20}))
    assert many.status_code == 400 and len(many.json()["error"]["message"]) < 1000
    for bad in ([1], "code", {"checks": "code"}, {"tests": 5}, {"report": "yes"}):
        body = chat("m", {}, verify=bad)
        r = post(gateway, body)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = post(gateway, chat("m", {}), {"x-meshgate-verify-tests": "not base64!"})
    assert r.status_code == 400


def test_a_hostile_schema_is_refused_or_checked_in_linear_time(gateway):
    redos = {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a+)+$"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": redos}}
    r = post(gateway, chat("m", {"reply": orjson.dumps({"x": "a" * 5000 + "!"}).decode()},
                           response_format=fmt))  # fmt: skip
    assert r.status_code == 422  # answered: the pattern ran on RE2, not a backtracking engine
    backref = {"type": "string", "pattern": "(a)\\1"}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": backref}}
    r = post(gateway, chat("m", {"reply": '"aa"'}, response_format=fmt))
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    remote = {"$ref": "http://169.254.169.254/schema.json"}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": remote}}
    r = post(gateway, chat("m", {"reply": "{}"}, response_format=fmt))
    assert r.status_code == 400


def test_a_stream_is_buffered_verified_and_replayed_as_sse(gateway, upstream):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    body = chat("m", {"replies": ['{"city": 1}', '{"city": "Kyiv"}']})
    stream = client.chat.completions.create(
        model="m", messages=body["messages"], stream=True, response_format=JSON_FORMAT,
        extra_body={"fake": body["fake"]},
    )  # fmt: skip
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == '{"city": "Kyiv"}'  # only the repaired answer reached the client


def test_observe_mode_streams_through_and_is_recorded_afterwards(gateway):
    body = chat("observed", {"reply": "not json"}, stream=True,
                response_format={"type": "json_object"})  # fmt: skip
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["x-meshgate-verification"] == "observe"
        assert r.headers["cache-control"] == "no-store"
        raw = b"".join(r.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n")
    metrics = scrape(gateway.url)
    assert 'meshgate_verify_checks_total{check="json_schema",outcome="failed"}' in metrics


def test_consensus_answers_with_the_majority_and_says_who_agreed(gateway, upstream):
    before = upstream_stats(upstream)["requests"]
    votes = {"a": "Paris", "b": "paris.", "c": "Lyon"}
    r = post(gateway, chat("vote", {"reply_by_model": votes}, verify={"report": True}))
    assert r.status_code == 200, r.text
    assert content(r) == "Paris"
    header = r.headers["x-meshgate-verification"]
    assert "consensus=passed" in header and "agreement=2/3" in header and "agreed=a,b" in header
    # once two agree the third cannot change the answer: it may be cancelled
    assert 2 <= upstream_stats(upstream)["requests"] - before <= 3
    assert r.json()["meshgate_verification"]["checks"][0]["how"] == "agreed"


def test_consensus_without_a_majority_asks_the_judge(gateway):
    votes = {"a": "Red", "b": "Green", "c": "Blue"}
    r = post(gateway, chat("split", {"reply_by_model": votes}, verify={"report": True}))
    assert r.status_code == 200, r.text
    assert content(r) == "Green"
    assert r.json()["meshgate_verification"]["checks"][0]["how"] == "judged"


def test_consensus_cost_is_the_sum_of_every_call(gateway):
    fake = {"reply_by_model": {"a": "same", "b": "same", "c": "same"}, "fail_key": "cost"}
    r = post(gateway, chat("vote", fake, verify={"report": True}))
    single = post(gateway, chat("a", fake), {"cache-control": "no-store"})  # same body, price
    answers = r.json()["meshgate_verification"]["checks"][0]["answers"]
    assert answers in (2, 3)  # a third that could not change the answer may be cancelled
    total, one = (float(x.headers["x-meshgate-cost-usd"]) for x in (r, single))
    assert total == pytest.approx(answers * one, rel=1e-6)


# Each: the program, then what the caller is told (422 with this in the message, or
# 200 when the program passes: its own assertions prove the attack came to nothing).
HOSTILE = {
    "fork bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "the code timeout",
    ),
    "daemon outliving the run": (
        "import os, time\nif os.fork() == 0:\n    os.fork()\n    time.sleep(600)\n",
        200,
    ),
    "4 GB allocation": ("x = bytearray(4 * 1024 ** 3)", "the code memory"),
    "infinite loop": ("while True:\n    pass", "the code timeout"),
    "sleep past the deadline": ("import time\ntime.sleep(600)", "the code timeout"),
    "socket to the gateway": (
        "import socket\nsocket.create_connection(('127.0.0.1', GATEWAY_PORT))",
        "Operation not permitted",
    ),
    "/etc/shadow": ("print(open('/etc/shadow').read())", "No such file"),
    "the environment": ("import os\nassert 'MESHGATE' not in str(os.environ)", 200),
    "other processes": (
        "import os\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n"
        "        data = open(f'/proc/{p}/environ', 'rb').read()\n"
        "        assert b'MESHGATE' not in data and b'sk-verify' not in data\n"
        "        assert b'pytest' not in open(f'/proc/{p}/cmdline', 'rb').read()",
        200,
    ),
    "1 GB file": (
        "with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'a' * 1048576)",
        "the code output_limit",
    ),
    "writing outside": ("open('/usr/evil', 'w').write('x')", "Read-only file system"),
    "nested namespaces": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.unshare(0x10000000) != 0, 'unshare allowed'\n"
        "assert libc.unshare(0x00020000) != 0, 'unshare allowed'\n"
        "raise SystemExit('namespaces refused')",
        "namespaces refused",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_code_is_contained_and_reported(gateway, name):
    source, told = HOSTILE[name]
    reply = f"```python\n{source.replace('GATEWAY_PORT', str(gateway.port))}\n```"
    r = post(gateway, chat("m", {"reply": reply}, verify={"checks": ["code"], "report": True}))
    if told == 200:
        assert r.status_code == 200, r.text
        assert r.json()["meshgate_verification"]["checks"][0]["outcome"] == "passed"
    else:
        assert r.status_code == 422, r.text
        assert told in r.json()["error"]["message"]
    assert SECRET not in r.text
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
    after = post(gateway, chat("m", {"reply": '{"city": "Bern"}'}, response_format=JSON_FORMAT))
    assert after.status_code == 200
    assert sandbox_processes(within_s=10) == []
    assert zombies_under(gateway.proc.pid) == []


def zombies_under(root: int) -> list[int]:
    """Zombie processes among `root`'s descendants (a sandbox reaps its own)."""
    parents: dict[int, int] = {}
    states: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            states[int(entry)], parents[int(entry)] = fields[0], int(fields[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid:
                frontier.append(child)
                if states[child] == "Z":
                    found.append(child)
    return found


def sandbox_processes(within_s: float) -> list[str]:
    return processes_of_uids(range(200_000, 2**31 - 1), within_s)


def test_a_streamed_consensus_replays_the_winners_events(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    fake = {"reply_by_model": {"a": "Lyon", "b": "Nice", "c": "Nice"}, "fail_key": "stream-vote"}
    stream = client.chat.completions.create(
        model="vote", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"fake": fake},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Nice"
    assert chunks[-1].usage is not None  # the client asked for usage: it came
