"""Fuzzing the wire: hypothesis sends hostile and careless requests to a real
gateway with every built-in plugin on, and every answer must be a success or an
OpenAI-format client error, never a 500, a hang or a non-JSON error."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    JSON_SCALARS,
    PARAM_VALUES,
    Server,
    start_fake_upstream,
    start_gateway,
)

KEY = "sk-fuzz-client-key-0123456789"


def config(upstream_port: int) -> str:
    fake = f"http://127.0.0.1:{upstream_port}/v1"
    return f"""
server: {{host: 127.0.0.1, max_body_bytes: 262144}}
providers:
  fake: {{type: openai, base_url: "{fake}", api_key: sk-upstream-fuzz-123456}}
  other: {{type: openai, base_url: "{fake}"}}
  tgi: {{type: tgi, base_url: "http://127.0.0.1:{upstream_port}"}}
models:
  - {{name: plain, deployments: [{{provider: fake, model: m}}]}}
  - name: capped
    deployments:
      - {{provider: fake, model: m, rpm: 100000, tpm: 100000000}}
      - {{provider: other, model: m, rpm: 100000, tpm: 100000000}}
  - name: cheap
    deployments:
      - {{provider: fake, model: m, context_window: 100000, price: {{input_usd_per_mtok: 1, output_usd_per_mtok: 2}}}}
      - {{provider: other, model: m, context_window: 200000, price: {{input_usd_per_mtok: 2, output_usd_per_mtok: 4}}}}
  - {{name: auto, deployments: [{{provider: fake, model: m}}]}}
  - {{name: native, deployments: [{{provider: tgi, model: m}}]}}
pipeline:
  - auth: {{keys: [{{name: fuzzer, key: "{KEY}"}}]}}
  - quotas: {{limits: [{{per: key, rpm: 1000000, tpm: 1000000000, concurrent: 64}}]}}
  - cache: {{}}
  - routing:
      models:
        cheap: {{strategy: cost}}
        auto:
          strategy: complexity
          rules: [{{model: capped, contains_code: true}}, {{model: cheap, min_prompt_chars: 50}}, {{model: plain}}]
  - fallback: {{attempts: 2, backoff_s: 0.01}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    upstream = start_fake_upstream(tmp)
    server = start_gateway(tmp, config(upstream.port))
    yield server
    server.stop()
    upstream.stop()


@pytest.fixture(scope="module")
def client(gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        yield c


class Raw:
    """JSON text spliced into a body as it is: nesting no serializer would write."""

    def __init__(self, text: bytes) -> None:
        self.text = text


@st.composite
def deep(draw):
    """Arrays or objects nested 60 to 1,100 levels deep."""
    depth = draw(st.integers(min_value=60, max_value=1100))
    kinds = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    opening = b"".join(b"[" if k else b'{"k":' for k in kinds)
    closing = b"".join(b"]" if k else b"}" for k in reversed(kinds))
    return Raw(opening + orjson.dumps(draw(JSON_SCALARS)) + closing)


def encode(value) -> bytes:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (orjson.dumps(str(k)) + b":" + encode(v) for k, v in value.items())
        return b"{" + b",".join(items) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(encode(v) for v in value) + b"]"
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value).encode()
    return orjson.dumps(value)


hostile = st.one_of(PARAM_VALUES, deep())
FIELDS = [
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "user",
    "seed",
    "logit_bias",
    "logprobs",
    "metadata",
]
MODELS = ["plain", "capped", "cheap", "auto", "native", "unknown-model"]
content_parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": hostile}),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant"]),
            "content": st.one_of(st.text(max_size=60), content_parts, hostile),
        }
    ),
    min_size=1,
    max_size=3,
)


@st.composite
def requests(draw):
    endpoint = draw(st.sampled_from(["chat/completions", "completions", "embeddings"]))
    body: dict = {"model": draw(st.sampled_from(MODELS))}
    if endpoint == "chat/completions":
        body["messages"] = draw(messages)
    elif endpoint == "completions":
        body["prompt"] = draw(st.one_of(st.text(max_size=60), hostile))
    else:
        body["input"] = draw(st.one_of(st.text(max_size=60), hostile))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        body[name] = draw(hostile)
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(
        str.strip
    )
    headers = {"authorization": f"Bearer {KEY}"}
    for name in draw(
        st.lists(
            st.sampled_from(["x-meshgate-cache-ttl", "cache-control", "x-request-id"]), unique=True
        )
    ):
        headers[name] = draw(header_text)
    return endpoint, body, headers


def assert_openai_error(response: httpx.Response) -> None:
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(requests())
def test_every_answer_is_a_success_or_an_openai_client_error(client, request_data):
    endpoint, body, headers = request_data
    headers["content-type"] = "application/json"
    response = client.post(f"/v1/{endpoint}", content=encode(body), headers=headers)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response)
        message = response.json()["error"]["message"]
        parsed = "not valid JSON" not in message and "levels deep" not in message
        if response.status_code == 400 and parsed:
            assert response.json()["error"]["param"] is not None, response.text


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400))
def test_raw_bytes_never_break_the_gateway(client, raw):
    response = client.post(
        "/v1/chat/completions", content=raw, headers={"authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400
    assert_openai_error(response)


PATH_TEXT = st.characters(min_codepoint=33, blacklist_categories=("Cs",))  # URL-quotable


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.text(PATH_TEXT, min_size=1, max_size=40),
                 st.text(PATH_TEXT, min_size=300, max_size=3000)))  # fmt: skip
@example(".")
@example("..")
@example("plain")
@example("./plain")
def test_any_model_id_in_a_path_is_a_card_or_a_bounded_404(client, model):
    """GET /v1/models/<id>: the model's card, or a 404 whose message echoes at most
    the start of what was asked."""
    from urllib.parse import quote

    # dots encoded too: a client removes a path's "." and ".." segments (RFC 3986)
    path = "/v1/models/" + quote(model, safe="").replace(".", "%2E")
    response = client.get(path, headers={"authorization": f"Bearer {KEY}"})
    if response.status_code == 200:
        assert response.json()["id"] == model
        return
    assert response.status_code == 404, response.text
    assert_openai_error(response)
    assert len(response.json()["error"]["message"]) < 400


def test_the_gateway_is_healthy_after_the_fuzzing(client, gateway):
    assert client.get("/health").status_code == 200
    ok = client.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={"model": "plain", "messages": [{"role": "user", "content": "x"}]},
    )
    assert ok.status_code == 200
    assert "Traceback" not in gateway.output()


def nested(depth: int) -> Raw:
    return Raw(b"[" * depth + b"1" + b"]" * depth)


CHAT = [{"role": "user", "content": "hello"}]
REPORTED = [  # what the outside probe found giving 500s, each with the param to name
    ({"model": "plain", "messages": CHAT, "tools": nested(300)}, "tools"),
    ({"model": "plain", "messages": CHAT, "metadata": {"a": nested(1000)}}, "metadata"),
    ({"model": "plain", "messages": nested(255)}, "messages"),
    (
        {"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "messages[0].content[0].text",
    ),
    (
        {
            "model": "cheap",
            "messages": [{"role": "user", "content": [{"type": "text", "text": ["x"]}]}],
        },
        "messages[0].content[0].text",
    ),
    ({"model": "capped", "messages": CHAT, "max_tokens": "100"}, "max_tokens"),
    ({"model": "capped", "messages": CHAT, "max_tokens": [1]}, "max_tokens"),
    ({"model": "capped", "messages": CHAT, "max_tokens": {"a": 1}}, "max_tokens"),
    ({"model": "capped", "messages": CHAT, "max_tokens": -9223372036854775808}, "max_tokens"),
    ({"model": "capped", "messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "capped", "messages": CHAT, "max_tokens": True}, "max_tokens"),
    ({"model": "capped", "messages": CHAT, "n": 100000}, "n"),
    ({"model": "plain", "messages": CHAT, "temperature": 1e308}, "temperature"),
    ({"model": "native", "messages": CHAT, "stop": 5}, "stop"),
    ({"model": "plain", "messages": CHAT, "stream_options": "yes"}, "stream_options"),
]


@pytest.mark.parametrize(("body", "param"), REPORTED)
def test_reported_inputs_are_400s_naming_the_field(client, body, param):
    response = client.post(
        "/v1/chat/completions",
        content=encode(body),
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert_openai_error(response)
    assert response.json()["error"]["param"] == param
