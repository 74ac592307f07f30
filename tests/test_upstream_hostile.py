"""The upstream boundary under attack, over real sockets: clients that try to steer
the gateway to other hosts or credentials, and upstreams that redirect, leak the
gateway's key or send garbage."""

from __future__ import annotations

import concurrent.futures
import contextlib
import email.utils
import inspect
import math
import re
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.protocol import PARAMETERS
from tests.conftest import (
    HOSTILE_WAYS,
    JSON_VALUES,
    MESSAGES,
    Server,
    free_port,
    serve_each,
    start_fake_upstream,
    start_gateway,
)

pytestmark = pytest.mark.litellm

KEYS = {
    "fake": "sk-UPSTREAM-0123456789abcdef-caaa",
    "azure": "azure-key-9f8e7d6c5b4a39281706",
    "lite": "sk-LITELLM-fedcba9876543210-beef",
    "claude": "sk-ant-CLAUDE-00112233445566778899",
}


def config(upstream_port: int, pipeline: str = "[]") -> str:
    base = f"http://127.0.0.1:{upstream_port}"
    return f"""
server: {{host: 127.0.0.1}}
providers:
  fake: {{type: openai, base_url: "{base}/v1", api_key: "{KEYS["fake"]}"}}
  azure: {{type: openai, azure: true, api_version: "2024-06-01", base_url: "{base}/openai/deployments/{{model}}", api_key: "{KEYS["azure"]}"}}
  lite: {{type: litellm, api_base: "{base}/v1", api_key: "{KEYS["lite"]}"}}
  claude: {{type: litellm, api_base: "{base}", api_key: "{KEYS["claude"]}"}}
models:
  - {{name: plain, deployments: [{{provider: fake, model: upstream-model}}]}}
  - {{name: azure-model, deployments: [{{provider: azure, model: upstream-model}}]}}
  - {{name: lite-model, deployments: [{{provider: lite, model: openai/upstream-model}}]}}
  - {{name: claude-model, deployments: [{{provider: claude, model: anthropic/claude-3-5-haiku-latest}}]}}
pipeline: {pipeline}
health: {{breaker: {{failures: 100000}}}}  # every hostile answer is checked, none skipped
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[tuple[Server, Server, Server]]:
    tmp = tmp_path_factory.mktemp("hostile")
    upstream = start_fake_upstream(tmp)
    plain = start_gateway(tmp, config(upstream.port))
    guarded = start_gateway(
        tmp,
        config(
            upstream.port,
            "[{fallback: {attempts: 2, backoff_s: 0.01}}]",
        ),
    )
    yield upstream, plain, guarded
    for server in (plain, guarded, upstream):
        server.stop()


def chat(gateway: Server, model: str, **fields) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)


def steering_fields() -> list[str]:
    """Every keyword litellm's completion takes that is not an OpenAI request
    parameter, and the ones it reads from **kwargs: where to send, with which
    credentials and headers, and what litellm itself does."""
    import litellm

    from proxy.upstream.litellm import OPENAI_PARAMS

    named = set(inspect.signature(litellm.completion).parameters) - {"kwargs", "args"}
    extra = {
        "api_base", "base_url", "api_key", "api_version", "extra_headers", "headers",
        "custom_llm_provider", "organization", "azure_ad_token", "azure_ad_token_provider",
        "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_region_name",
        "aws_bedrock_runtime_endpoint", "aws_role_name", "vertex_project", "vertex_location",
        "vertex_credentials", "mock_response", "client", "litellm_params", "metadata",
        "proxy_server_request", "api_type", "deployment_id", "model_list", "fallbacks",
        "context_window_fallback_dict", "timeout", "max_retries", "num_retries",
        "input_cost_per_token", "output_cost_per_token", "litellm_call_id", "extra_body",
        "stream_options", "user_api_key", "http_client", "shared_session", "ssl_verify",
    }  # fmt: skip
    return sorted((named | extra) - OPENAI_PARAMS["chat"] - {"model", "messages"})


def hostile_value(field: str, trap_url: str):
    if "header" in field:
        return {"Authorization": "Bearer stolen", "Host": "evil.example", "x-trap": trap_url}
    if field in ("model_list", "fallbacks"):
        return [{"model_name": "x", "litellm_params": {"model": "openai/x", "api_base": trap_url}}]
    if field in ("litellm_params", "metadata", "extra_body", "proxy_server_request"):
        return {"api_base": trap_url, "base_url": trap_url}
    return trap_url


@pytest.mark.parametrize("model", ["lite-model", "claude-model"])
def test_a_client_cannot_send_the_gateway_to_a_host_or_credential_of_its_choice(
    servers, trap, model
):
    _, gateway, _ = servers
    fields = steering_fields()
    assert {"api_base", "base_url", "api_key", "extra_headers"} <= set(fields)
    answers = [chat(gateway, model, **{f: hostile_value(f, trap.url)}) for f in fields]
    # type-checked at the door (proxy/protocol.py): a URL there is a 400 naming the field
    checked = {"stream_options", *PARAMETERS}
    everything = {f: hostile_value(f, trap.url) for f in fields if f not in checked}
    answers.append(chat(gateway, model, **everything))
    assert trap.received == []
    for response in answers:
        if response.status_code == 400 and response.json()["error"]["param"] in checked:
            continue
        text = response.text
        assert "Traceback" not in text and 'File "' not in text
        assert not any(key[4:16] in text for key in KEYS.values())
        assert response.headers["content-type"].startswith("application/json")
        if model == "lite-model":  # served by the configured upstream, mock_response ignored
            assert response.status_code == 200, text
            assert response.json()["choices"][0]["message"]["content"].startswith("tok")
        else:  # the fake does not speak Anthropic's protocol: an upstream error
            assert response.status_code >= 400 and "error" in response.json()


@pytest.mark.parametrize("model", ["plain", "azure-model"])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_redirects_are_never_followed(servers, trap, model, stream):
    _, gateway, _ = servers
    response = chat(gateway, model, stream=stream, fake={"redirect_to": trap.url + "/v1/steal"})
    assert trap.received == []
    assert response.status_code == 502
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_redirect")


@pytest.fixture
def scripted(tmp_path) -> Iterator:
    """A fake upstream scripted from its command line (litellm passes no `fake`
    field on), and a gateway in front of it."""
    started: list[Server] = []

    def start(*knobs: str) -> Server:
        upstream = start_fake_upstream(tmp_path, *knobs)
        started.append(upstream)
        started.append(start_gateway(tmp_path, config(upstream.port)))
        return started[-1]

    yield start
    for server in reversed(started):
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_litellm_never_follows_redirects(scripted, trap, stream):
    gateway = scripted("--redirect-to", trap.url + "/v1/steal")
    response = chat(gateway, "lite-model", stream=stream)
    assert trap.received == []
    assert response.status_code == 502, response.text
    assert response.json()["error"]["type"] == "upstream_error"


def fragments(key: str) -> list[str]:
    return [key[i : i + 8] for i in range(len(key) - 7)]


def assert_no_secret(text: str) -> None:
    for key in KEYS.values():
        leaked = [f for f in fragments(key) if f in text]
        assert not leaked, f"{leaked[:3]} of a provider key in {text[:300]!r}"
    assert "****" not in text


LEAKS = ["full", "masked", "prefix"]


@pytest.mark.parametrize("leak", LEAKS)
@pytest.mark.parametrize("status", [400, 404, 429, 500])
@pytest.mark.parametrize("model", ["plain", "azure-model"])
def test_error_bodies_never_carry_the_providers_key(servers, leak, status, model):
    _, gateway, guarded = servers
    for server in (gateway, guarded):
        fake = {"fail_times": 3, "fail_key": f"{leak}{status}{model}{server.port}",
                "error_status": status, "leak": leak}  # fmt: skip
        response = chat(server, model, fake=fake)
        assert response.status_code in (status, 502), response.text
        assert response.json()["error"]["message"]
        assert_no_secret(response.text)


@pytest.mark.parametrize("leak", LEAKS)
@pytest.mark.parametrize("where", ["first", "middle"])
def test_stream_error_events_never_carry_the_providers_key(servers, leak, where):
    _, gateway, guarded = servers
    fake = {"leak": leak, "fail_times": 0}
    fake["error_event" if where == "first" else "error_event_after"] = 1 if where == "first" else 3
    for server in (gateway, guarded):
        response = chat(server, "plain", stream=True, fake=fake)
        assert_no_secret(response.text)
        if where == "first":  # before any byte went out: an ordinary error
            assert response.status_code == 502
            assert response.json()["error"]["type"] == "upstream_error"
        else:
            assert 'data: {"error"' in response.text


LITELLM_CALLS = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    "stream": ("/v1/chat/completions",
               {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    "completions": ("/v1/completions", {"prompt": "hi"}),
    "embeddings": ("/v1/embeddings", {"input": ["hi"]}),
}  # fmt: skip


FAILURES = {
    "429": ("--error-status", "429"),
    "500": ("--error-status", "500"),
    "503": ("--error-status", "503"),
    "reset": ("--fail-mode", "abort"),
}


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_litellm_never_retries_on_its_own(tmp_path, failure):
    """One attempt of the gateway's is one request to the provider: the OpenAI SDK
    beneath litellm would retry a 429, a 5xx or a lost connection twice, out of
    sight of fallback, the deadline and the breaker."""
    upstream = start_fake_upstream(tmp_path, "--error-rate", "1", *failure)
    gateway = start_gateway(tmp_path, config(upstream.port))
    try:
        for name, (path, body) in LITELLM_CALLS.items():
            before = httpx.get(upstream.url + "/_stats").json()["requests"]
            response = httpx.post(
                gateway.url + path, json={"model": "lite-model", **body}, timeout=30
            )
            after = httpx.get(upstream.url + "/_stats").json()["requests"]
            assert response.status_code >= 400, (name, response.text)
            assert after - before == 1, f"{name}: {after - before} requests for one attempt"
    finally:
        gateway.stop()
        upstream.stop()


@pytest.mark.parametrize("leak", LEAKS)
@pytest.mark.parametrize("status", [400, 500])
def test_litellm_errors_never_carry_the_key_or_a_traceback(scripted, leak, status):
    gateway = scripted("--error-rate", "1", "--error-status", str(status), "--leak", leak)
    for stream in (False, True):
        response = chat(gateway, "lite-model", stream=stream)
        assert response.status_code >= 400, response.text
        assert "Traceback" not in response.text
        assert_no_secret(response.text)


def test_a_malformed_first_event_is_an_upstream_error(servers):
    _, gateway, guarded = servers
    for server in (gateway, guarded):
        response = chat(server, "plain", stream=True, fake={"malformed_event": 1})
        if response.headers["content-type"].startswith("text/event-stream"):
            assert 'data: {"error"' in response.text
            assert '"upstream_error"' in response.text
        else:
            assert response.status_code == 502, response.text
            assert response.json()["error"]["type"] == "upstream_error"
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_refused_connection_is_said_in_plain_words(tmp_path):
    dead = free_port()
    gateway = start_gateway(
        tmp_path,
        f"""
server: {{host: 127.0.0.1}}
providers: {{dead: {{type: openai, base_url: "http://127.0.0.1:{dead}/v1"}}}}
models: [{{name: m, deployments: [{{provider: dead, model: m}}]}}]
""",
    )
    try:
        response = chat(gateway, "m")
    finally:
        gateway.stop()
    message = response.json()["error"]["message"]
    assert response.status_code == 502
    assert f"cannot connect to 127.0.0.1:{dead}" in message
    assert "ssl" not in message.lower()


def test_what_litellm_cannot_translate_is_the_client_s_400_not_the_provider_s_failure(
    tmp_path, servers
):
    """A parameter of the right JSON type that litellm still refuses (a tool_choice
    naming no tool type) fails before anything is sent: each such request is a 400,
    and however many come, the deployment's breaker stays closed for everyone else.
    A provider that cannot be reached still counts, and opens it."""
    upstream, _, _ = servers
    base = f"http://127.0.0.1:{upstream.port}/v1"
    gateway = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1}}
providers:
  lite: {{type: litellm, api_base: "{base}", api_key: sk-lite-0123456789}}
  dead: {{type: litellm, api_base: "http://127.0.0.1:{free_port()}/v1", api_key: sk-dead-0123456}}
models:
  - {{name: lite-model, deployments: [{{provider: lite, model: openai/upstream-model}}]}}
  - {{name: dead-model, deployments: [{{provider: dead, model: openai/upstream-model}}]}}
health: {{breaker: {{failures: 2, window_s: 60, cooldown_s: 60}}}}
""")  # fmt: skip
    try:
        for untranslatable in ({"tool_choice": {"type": 5}}, {"tool_choice": {"type": "x"}},
                               {"tool_choice": {"type": 5}}):  # fmt: skip
            refused = chat(gateway, "lite-model", **untranslatable)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["type"] == "invalid_request_error" and "lite" in error["message"]
            assert "sk-lite" not in refused.text and "Traceback" not in refused.text
        assert chat(gateway, "lite-model").status_code == 200  # the breaker stayed closed
        outcomes = [chat(gateway, "dead-model").status_code for _ in range(3)]
        assert outcomes[:2] == [502, 502] and outcomes[2] == 503  # the breaker opened
    finally:
        gateway.stop()


@pytest.mark.parametrize("after", [1, 3, 8])
def test_a_stream_broken_by_the_upstream_is_said_in_plain_words(servers, after):
    _, gateway, _ = servers
    response = chat(gateway, "plain", stream=True, fake={"abort_after": after, "tokens": 20})
    assert response.status_code == 200
    *_, last = [e for e in response.text.split("\n\n") if e]
    error = orjson.loads(last.removeprefix("data: "))["error"]
    assert error["code"] == "upstream_unavailable"
    assert error["message"].endswith(
        "broke off the stream: the connection closed before the answer was complete"
    )
    assert "<" not in error["message"] and "Error" not in error["message"]


MOST = 65536  # max_response_bytes of the bounded gateway's providers
FLOODS = ["body", "chunked", "gzip", "event", "error"]


@pytest.fixture(scope="module")
def bounded(tmp_path_factory) -> Iterator[Server]:
    """A gateway whose providers hold at most MOST bytes of an answer, over a fake
    upstream that floods them: model `plain` (OpenAI-compatible) as each request's
    `fake` field says, `tgi-<flood>` (TGI's native API) always so."""
    tmp = tmp_path_factory.mktemp("bounded")
    upstream = start_fake_upstream(tmp)
    base = f"http://127.0.0.1:{upstream.port}"
    tgis = "".join(
        f'  tgi-{flood}: {{type: tgi, base_url: "{base}", max_response_bytes: {MOST}, '
        f'headers: {{x-fake-flood: {flood}, x-fake-flood-bytes: "{64 * MOST}"}}}}\n'
        for flood in FLOODS
    )
    lites = "".join(
        f'  lite-{flood}: {{type: litellm, api_base: "{base}/v1", api_key: sk-lite, max_response_bytes: {MOST}, '
        f'headers: {{x-fake-flood: {flood}, x-fake-flood-bytes: "{64 * MOST}"}}}}\n'
        for flood in FLOODS
    )
    models = "".join(
        f"  - {{name: {api}-{flood}, deployments: [{{provider: {api}-{flood}, model: {model}}}]}}\n"
        for flood in FLOODS
        for api, model in (("tgi", "native"), ("lite", "openai/upstream-model"))
    )
    gateway = start_gateway(tmp, f"""
server: {{host: 127.0.0.1}}
providers:
  fake: {{type: openai, base_url: "{base}/v1", max_response_bytes: {MOST}}}
  tgi: {{type: tgi, base_url: "{base}", max_response_bytes: {MOST}}}
  lite: {{type: litellm, api_base: "{base}/v1", api_key: sk-lite, max_response_bytes: {MOST}}}
{tgis}{lites}
models:
  - {{name: plain, deployments: [{{provider: fake, model: upstream-model}}]}}
  - {{name: tgi, deployments: [{{provider: tgi, model: native}}]}}
  - {{name: lite, deployments: [{{provider: lite, model: openai/upstream-model}}]}}
{models}
health: {{breaker: {{failures: 100000}}}}
""")  # fmt: skip
    yield gateway
    gateway.stop()
    upstream.stop()


def flooded(gateway: Server, api: str, flood: str, **fields) -> httpx.Response:
    if api in ("tgi", "lite"):
        return chat(gateway, f"{api}-{flood}", **fields)
    return chat(gateway, "plain", fake={"flood": flood, "flood_bytes": 64 * MOST}, **fields)


def assert_still_serves(gateway: Server, api: str) -> None:
    """The worker is healthy and its connections to the upstream still answer."""
    for stream in (False, True):
        response = chat(gateway, "plain" if api == "openai" else api, stream=stream)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("api", ["openai", "tgi", "lite"])
@pytest.mark.parametrize("flood", ["body", "chunked", "gzip"])
def test_an_answer_past_max_response_bytes_is_cut_off(bounded, api, flood):
    """Declared, undeclared or inflating from a small gzip body: past the bound, the
    client gets a 502 naming it, not a worker grown by the whole answer. litellm's
    clients ask for no compression, and refuse a compressed answer."""
    response = flooded(bounded, api, flood)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    if api == "lite" and flood == "gzip":
        assert error["code"] == "upstream_unavailable"
        assert "gzip-compressed though none was asked for" in error["message"]
    else:
        assert error["code"] == "upstream_response_too_large"
        assert f"max_response_bytes ({MOST})" in error["message"]
    assert_still_serves(bounded, api)


@pytest.mark.parametrize("api", ["openai", "tgi", "lite"])
def test_a_stream_event_that_never_ends_is_cut_off(bounded, api):
    response = flooded(bounded, api, "event", stream=True)
    if response.headers["content-type"].startswith("text/event-stream"):
        *_, last = [e for e in response.text.split("\n\n") if e]
        error = orjson.loads(last.removeprefix("data: "))["error"]
    else:
        assert response.status_code == 502, response.text
        error = response.json()["error"]
    assert error["code"] == "upstream_response_too_large"
    assert len(response.content) < MOST
    assert_still_serves(bounded, api)


@pytest.mark.parametrize("api", ["openai", "tgi", "lite"])
def test_a_huge_error_answer_is_read_only_in_part(bounded, api):
    """Its first 64 KiB give the message (openai, tgi: the status passes); litellm
    reads error bodies itself, so its cap applies to them too."""
    response = flooded(bounded, api, "error")
    assert response.status_code == (502 if api == "lite" else 500), response.text
    assert response.json()["error"]["type"] == "upstream_error"
    assert len(response.content) < MOST
    assert_still_serves(bounded, api)


def test_an_answer_within_max_response_bytes_passes(bounded):
    response = chat(bounded, "plain", fake={"tokens": MOST // 16})  # about MOST / 4 bytes
    assert response.status_code == 200, response.text
    assert len(response.content) > MOST // 8


@pytest.mark.parametrize("raw", ["not json", "<html>Bad gateway</html>", "[1]", "5", '"text"'])
def test_an_answer_that_is_not_a_json_object_is_an_upstream_error(bounded, raw):
    """Not passed on as a 200: the client's SDK could not read it, and it would be
    cached and billed as an answer."""
    response = chat(bounded, "plain", fake={"raw_body": raw})
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_malformed_response"
    assert_still_serves(bounded, "openai")


def completion(**message) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "upstream-model",
            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "finish_reason": "tool_calls" if "tool_calls" in message else "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}  # fmt: skip


def test_a_stream_request_answered_whole_is_streamed_to_the_client(servers):
    """An upstream that ignores `stream` (a whole answer, JSON), or sends its events
    under another content type: the client that asked for a stream gets one, with
    the answer in it, never a JSON body its SDK reads as an empty stream."""
    import openai

    call = {"type": "function", "id": "call_1", "function": {"name": "f", "arguments": "{}"}}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": "stop"}]}  # fmt: skip
    bodies = {
        "whole": orjson.dumps(completion(content="hello")).decode(),
        "tools": orjson.dumps(completion(content=None, tool_calls=[call])).decode(),
        "events": f"data: {orjson.dumps(chunk).decode()}\n\ndata: [DONE]\n\n",
    }
    for server in servers[1:]:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for name, raw in bodies.items():
            chunks = list(client.chat.completions.create(
                model="plain", messages=[{"role": "user", "content": name}], stream=True,
                extra_body={"fake": {"raw_body": raw}}))  # fmt: skip
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            if name == "tools":
                (tool,) = deltas[0].tool_calls
                assert (tool.index, tool.id, tool.function.name) == (0, "call_1", "f")
            else:
                assert "".join(d.content or "" for d in deltas) == "hello"
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in (
                "stop",
                "tool_calls",
            )
        text = orjson.dumps({"id": "c", "object": "text_completion", "created": 1, "model": "m",
                             "choices": [{"index": 0, "text": "hi there", "finish_reason": "stop"}]})  # fmt: skip
        streamed = list(client.completions.create(
            model="plain", prompt="p", stream=True, extra_body={"fake": {"raw_body": text.decode()}}))  # fmt: skip
        assert "".join(c.choices[0].text for c in streamed if c.choices) == "hi there"
        client.close()


ERROR_FIELDS = st.fixed_dictionaries(
    {"message": JSON_VALUES | st.just("boom\nTraceback (most recent call last):\n  File x")},
    optional={"type": JSON_VALUES, "code": JSON_VALUES, "param": JSON_VALUES,
              "stack": st.just("Traceback (most recent call last): ..."), "host": JSON_VALUES},
)  # fmt: skip
ERROR_BODIES = st.one_of(
    st.builds(lambda e, extra: {"error": e, **extra}, ERROR_FIELDS,
              st.dictionaries(st.sampled_from(["internal", "trace", "choices"]), JSON_VALUES)),
    st.builds(lambda v: {"error": v}, JSON_VALUES),
    JSON_VALUES,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(status=st.sampled_from([200, 400, 404, 422, 429, 500, 503]), body=ERROR_BODIES,
       stream=st.booleans())  # fmt: skip
@example(status=500, stream=False,  # a traceback across the 500th character
         body={"error": {"message": None, "pad": "x" * 437,
                         "stack": "Traceback (most recent call last): ..."}})  # fmt: skip
def test_what_an_upstream_says_in_an_error_reaches_the_client_as_openai_fields_only(
    servers, status, body, stream
):
    """An upstream's error body, however it is shaped and whatever else it holds, is
    the client's OpenAI error: message, type, param, code and nothing more, no
    traceback; a 200 carrying an error (or no `choices`) is a 502, never a success."""
    _, gateway, _ = servers
    answer = status == 200 and isinstance(body, dict) and isinstance(body.get("choices"), list)
    response = chat(gateway, "plain", stream=stream, fake={"raw_body": orjson.dumps(body).decode(),
                                                           "raw_status": status})  # fmt: skip
    if answer:
        return  # an answer after all (choices present): served
    assert response.status_code == (502 if status == 200 else status), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code"))
    assert "Traceback" not in response.text


@settings(max_examples=60, deadline=None)
@given(body=ERROR_BODIES.filter(lambda b: isinstance(b, dict) and b.get("error") is not None
                                and not b.get("choices")))  # fmt: skip
def test_an_error_event_mid_stream_ends_it_as_openai_fields_only(servers, body):
    """An upstream's error event after the stream began: the client's last event is
    the error with message, type, param and code only; nothing after it is sent."""
    _, gateway, _ = servers
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "part"}, "finish_reason": None}]}  # fmt: skip
    raw = (f"data: {orjson.dumps(chunk).decode()}\n\ndata: {orjson.dumps(body).decode()}\n\n"
           f"data: {orjson.dumps(chunk).decode()}\n\ndata: [DONE]\n\n")  # fmt: skip
    response = chat(gateway, "plain", stream=True, fake={"raw_body": raw})
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e.strip()]
    assert len(events) == 2 and '"part"' in events[0]
    error = orjson.loads(events[1].removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error" and isinstance(error["message"], str)
    assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code"))
    assert "Traceback" not in response.text


@pytest.mark.parametrize("stream", [False, True])
def test_answers_never_carry_the_providers_key_whole(servers, tmp_path, stream):
    """An upstream that echoes the request it got (the gateway's key in its headers)
    or quotes the key in its answer: the client never sees the key, buffered or
    streamed, OpenAI-compatible or TGI's native API. (A key split across stream
    events is not caught: see README.)"""
    _, gateway, _ = servers
    for model in ("plain", "azure-model"):
        response = chat(gateway, model, stream=stream, fake={"echo": 1})
        assert response.status_code == 200 and "[redacted]" in response.text
        assert KEYS["fake"] not in response.text and KEYS["azure"] not in response.text
    quoted = orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                           "content": f"the key is {KEYS['fake']}"}}]}).decode()  # fmt: skip
    response = chat(gateway, "plain", stream=stream, fake={"raw_body": quoted})
    assert response.status_code == 200 and KEYS["fake"] not in response.text

    if stream:
        return  # the fake's TGI streams 4 characters an event: a key spans several
    key = "tgi-key-0123456789abcdef"
    upstream = start_fake_upstream(tmp_path, "--reply", f"the key {key} ok.")
    native = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1}}
providers:
  native: {{type: tgi, base_url: "http://127.0.0.1:{upstream.port}", api_key: "{key}"}}
models: [{{name: m, deployments: [{{provider: native, model: m}}]}}]
""")  # fmt: skip
    try:
        response = chat(native, "m", stream=stream)
        assert response.status_code == 200 and "[redacted]" in response.text
        assert key not in response.text
    finally:
        native.stop()
        upstream.stop()


MARK = b"HOSTILE-MARKER-7f3a"
_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
# Answers no HTTP client should take, each quoting MARK where a parser would stop.
GARBLED = {
    "huge-header": _HEAD + b"x-big: " + MARK * 60000 + b"\r\ncontent-length: 2\r\n\r\n{}",
    "many-headers": _HEAD
    + b"".join(b"x-h%d: %s\r\n" % (i, MARK) for i in range(60000))
    + b"content-length: 2\r\n\r\n{}",
    "control-in-header": _HEAD + b"x-bad: a\x00" + MARK + b"\r\ncontent-length: 2\r\n\r\n{}",
    "bad-status": b"HTTP/1.1 2OO " + MARK + b"\r\ncontent-length: 2\r\n\r\n{}",
    "not-http": MARK + b" garbage\r\n\r\n",
    "bad-chunk": _HEAD + b"transfer-encoding: chunked\r\n\r\nzz" + MARK + b"\r\n",
    "bad-length": _HEAD + b"content-length: " + MARK + b"\r\n\r\n{}",
    "two-lengths": _HEAD + b"content-length: 2\r\ncontent-length: 30\r\n\r\n{}",
    "short-body": _HEAD + b'content-length: 100\r\n\r\n{"' + MARK + b'"',
    "bad-gzip": _HEAD + b"content-encoding: gzip\r\ncontent-length: 25\r\n\r\n" + MARK + b"xxxxxx",
    "bad-sse-chunk": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\n\r\n6\r\ndata: \r\nzz" + MARK + b"\r\n",
    "no-answer": b"",
}
# Valid HTTP, but no answer of any adapter's protocol.
UNREADABLE = {
    name: _HEAD + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    for name, body in (("empty-object", b"{}"), ("a-list", b"[1]"), ("not-json", MARK))
}


@pytest.fixture(scope="module")
def garbling(tmp_path_factory) -> Iterator[Server]:
    """A gateway over a server that answers each request with GARBLED's or
    UNREADABLE's answer named by its path's first segment, then hangs up: one
    provider per answer and adapter."""
    answers = GARBLED | UNREADABLE
    listener = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536) or b"\r\n\r\n"
            head, _, body = head.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            while length and len(body) < int(length[1]):  # read whole: no reset
                body += conn.recv(65536) or b"x" * int(length[1])
            with contextlib.suppress(OSError):  # a client that stops reading hangs up
                conn.sendall(answers[head.split(b" ")[1].split(b"/")[1].decode()])
                conn.shutdown(socket.SHUT_WR)

    serve_each(listener, answer, threaded=True)
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    providers = "".join(
        f'  openai-{name}: {{type: openai, base_url: "{base}/{name}/v1", api_key: sk-g}}\n'
        f'  tgi-{name}: {{type: tgi, base_url: "{base}/{name}"}}\n'
        f'  lite-{name}: {{type: litellm, api_base: "{base}/{name}/v1", api_key: sk-g}}\n'
        for name in answers
    )
    models = "".join(
        f"  - {{name: {api}-{name}, deployments: [{{provider: {api}-{name}, model: {model}}}]}}\n"
        for name in answers
        for api, model in (("openai", "m"), ("tgi", "m"), ("lite", "openai/m"))
    )
    gateway = start_gateway(tmp_path_factory.mktemp("garbling"), f"""
server: {{host: 127.0.0.1}}
providers:
{providers}models:
{models}health: {{breaker: {{failures: 100000}}}}
""")  # fmt: skip
    yield gateway
    gateway.stop()
    listener.close()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["openai", "tgi", "lite"])
@pytest.mark.parametrize("garbled", GARBLED)
def test_an_answer_that_is_not_http_is_an_upstream_error_that_quotes_none_of_it(
    garbling, garbled, api, stream
):
    """Whatever an upstream sends that is not a valid HTTP answer, the client gets a
    502 in OpenAI's format, in the gateway's words: no byte of the answer (a hostile
    upstream would speak in the gateway's voice) and not the upstream's URL."""
    response = chat(garbling, f"{api}-{garbled}", stream=stream)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["type"] == "upstream_error" and error["code"].startswith("upstream_")
    assert MARK.decode() not in response.text
    assert "http://" not in response.text


@pytest.mark.parametrize("api", ["openai", "tgi", "lite"])
@pytest.mark.parametrize("unreadable", UNREADABLE)
def test_a_success_whose_answer_no_adapter_can_read_is_a_malformed_upstream_answer(
    garbling, unreadable, api
):
    """Read by the gateway (OpenAI's and TGI's formats) or by litellm, which calls its
    own failure to read a success a 500: the provider's bad answer, a 502."""
    response = chat(garbling, f"{api}-{unreadable}")
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_malformed_response"
    assert MARK.decode() not in response.text


@pytest.mark.parametrize(
    ("sent", "passed"),
    [("7", "7"), ("0.2", "1"), ("0", "0"), ("Wed, 21 Oct 2015 07:28:00 GMT", "0"),
     ("nan", None), ("-5", None), ("inf", None), ("1e400", None), ("86401", None),
     ("soon", None), ("<script>", None), ("Wed, 99 Oct 2015 07:28:00 GMT", None)],
)  # fmt: skip
def test_an_upstreams_retry_after_reaches_the_client_only_as_whole_seconds(servers, sent, passed):
    """A header the upstream wrote reaches the client only as what it means: whole
    seconds, from a number or a date, and nothing for what has no meaning."""
    _, gateway, _ = servers
    fault = {"error_rate": 1, "error_status": 429, "retry_after": sent}
    response = chat(gateway, "plain", fake=fault)
    assert response.status_code == 429, response.text
    assert response.headers.get("retry-after") == passed


@pytest.mark.parametrize(("sent", "passed"), [("7", "7"), ("nan", None), ("<script>", None)])
def test_through_litellm_too(scripted, sent, passed):
    gateway = scripted("--error-rate", "1", "--error-status", "429", "--retry-after", sent)
    response = chat(gateway, "lite-model")
    assert response.status_code == 429, response.text
    assert response.headers.get("retry-after") == passed


def test_an_upstreams_retry_after_date_reaches_the_client_as_the_seconds_to_it(servers):
    _, gateway, _ = servers
    target = int(time.time()) + 60  # a date has whole seconds
    before = time.time()
    fault = {"error_rate": 1, "error_status": 429,
             "retry_after": email.utils.formatdate(target, usegmt=True)}  # fmt: skip
    response = chat(gateway, "plain", fake=fault)
    after = time.time()
    assert math.floor(target - after) <= int(response.headers["retry-after"])
    assert int(response.headers["retry-after"]) <= math.ceil(target - before)


@pytest.mark.parametrize("status", [600, 700, 999])
@pytest.mark.parametrize("stream", [False, True])
def test_an_error_status_http_does_not_define_is_a_502(servers, status, stream):
    """The upstream's 4xx and 5xx reach the client as they are; a status no client
    knows (an SDK picks its exception by it) is the upstream's failure, a 502."""
    _, gateway, _ = servers
    body = '{"error": {"message": "odd", "type": "server_error"}}'
    response = chat(gateway, "plain", stream=stream,
                    fake={"raw_status": status, "raw_body": body})  # fmt: skip
    assert response.status_code == 502, response.text
    assert response.json()["error"]["message"] == "odd"
    response = chat(gateway, "plain", fake={"raw_status": 418, "raw_body": body})
    assert response.status_code == 418


def test_an_upstream_that_answers_slowly_or_without_end_ends_by_total_s_or_the_cap(
    tmp_path, hostile_http
):
    """`timeouts.total_s` is the whole call for every adapter, though each client's own
    timeouts are per read; an answer without end stops at `max_response_bytes`."""
    urls = {way: hostile_http(way) for way in HOSTILE_WAYS}
    settings = "timeouts: {read_s: 10, total_s: 1}, max_response_bytes: 1048576"
    providers, models = [], []
    for way, url in urls.items():
        for kind, where in (("openai", f'base_url: "{url}/v1"'), ("tgi", f'base_url: "{url}"'),
                            ("litellm", f'api_base: "{url}/v1", api_key: sk-x')):  # fmt: skip
            name = f"{kind}-{way}"
            providers.append(f"  {name}: {{type: {kind}, {where}, {settings}}}")
            model = "openai/m" if kind == "litellm" else "m"
            models.append(
                f"  - {{name: {name}, deployments: [{{provider: {name}, model: {model}}}]}}"
            )
    gateway = start_gateway(tmp_path, "server: {host: 127.0.0.1}\nproviders:\n"
                            + "\n".join(providers) + "\nmodels:\n" + "\n".join(models) + "\n")  # fmt: skip
    cases = [(m.split("name: ")[1].split(",")[0], stream) for m in models for stream in (0, 1)]

    def ask(case):
        model, stream = case
        body = {"model": model, "stream": bool(stream), "messages": MESSAGES}
        return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60)

    try:
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            answers = dict(zip(cases, pool.map(ask, cases), strict=True))
    finally:
        gateway.stop()
    for (model, stream), r in answers.items():
        expected = (502, "upstream_response_too_large") if model.endswith("endless") else (
            504, "upstream_timeout")  # fmt: skip
        assert (r.status_code, r.json()["error"]["code"]) == expected, (model, stream, r.text)
