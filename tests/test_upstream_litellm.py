"""The litellm adapter against Anthropic's wire format, mocked with respx."""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest
import respx

pytest.importorskip("litellm", reason="the litellm extra is not installed")
os.environ["DISABLE_AIOHTTP_TRANSPORT"] = "True"  # let respx see litellm's httpx calls

from starlette.datastructures import Headers

from proxy.errors import UpstreamStatus
from proxy.pipeline import Call
from proxy.upstream import litellm as adapter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

MESSAGES_URL = "https://api.anthropic.com/v1/messages"
MODEL = "anthropic/claude-3-5-haiku-20241022"


def setup():
    config = adapter.Config(type="litellm", api_key="sk-ant-secret")
    upstream = adapter.Upstream("claude", config)
    model = MODEL  # the provider's name for it
    return upstream, model


def call(**body):
    return Call(
        "chat",
        {"model": "haiku", "messages": [{"role": "user", "content": "Hi"}], **body},
        {},
        "rid",
    )


def run(upstream, fn):
    async def main():
        await upstream.start()
        upstream.litellm.disable_aiohttp_transport = True
        try:
            return await fn()
        finally:
            await upstream.close()

    return asyncio.run(main())


def test_import_is_offline_and_lazy():
    import sys

    upstream, _ = setup()
    assert upstream.litellm is None
    run(upstream, lambda: asyncio.sleep(0))
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert "litellm" in sys.modules


@respx.mock
def test_chat_translated_from_anthropic():
    route = respx.post(MESSAGES_URL).respond(json={
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
        "content": [{"type": "text", "text": "Hello from Claude"}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    })  # fmt: skip
    upstream, model = setup()
    reply = run(upstream, lambda: upstream.send(call(max_tokens=50), model))
    sent = route.calls.last.request
    assert sent.headers["x-api-key"] == "sk-ant-secret"
    assert orjson.loads(sent.content)["max_tokens"] == 50
    answer = reply.parsed()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "Hello from Claude"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["prompt_tokens"] == 10 and answer["usage"]["completion_tokens"] == 5


STREAM = b"".join(
    b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data))
    for name, data in [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"}),
    ]
)  # fmt: skip


@respx.mock
def test_stream_translated_to_openai_chunks():
    respx.post(MESSAGES_URL).respond(content=STREAM, headers={"content-type": "text/event-stream"})
    upstream, model = setup()

    async def collect():
        reply = await upstream.send(call(stream=True, max_tokens=50), model)
        return [e async for e in reply.events]

    events = run(upstream, collect)
    assert events[-1].is_done
    chunks = [e.json() for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )
    assert text == "Hello there"
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage[-1]["completion_tokens"] == 2


@respx.mock
def test_errors_mapped_by_status():
    respx.post(MESSAGES_URL).respond(
        429, json={"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    )
    upstream, model = setup()

    async def main():
        with pytest.raises(UpstreamStatus) as info:
            await upstream.send(call(max_tokens=10), model)
        return info.value

    error = run(upstream, main)
    assert error.status == 429
    assert "sk-ant-secret" not in error.message


def test_only_openai_parameters_pass_from_a_client_to_litellm():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    config = adapter.Config(
        type="litellm", api_key="sk-ant-secret", api_base="http://configured.invalid",
        api_version="2024-01-01", headers={"x-team": "a"}, extra={"vertex_project": "p"},
    )  # fmt: skip
    upstream = adapter.Upstream("claude", config)
    _, model = setup()
    controlled = {"model", "timeout", "drop_params", "extra_headers", "api_key", "api_base",
                  "api_version", "stream_options", "vertex_project", "max_retries"}  # fmt: skip
    names = st.sampled_from(
        sorted(
            adapter.OPENAI_PARAMS["chat"]
            | controlled
            | {"base_url", "client", "mock_response", "headers"}
        )
    )
    values = st.one_of(st.text(), st.integers(), st.dictionaries(st.text(), st.text()))

    # What a client might send to steer the gateway's own request, in any case.
    header_names = st.sampled_from(["authorization", "Authorization", "api-key", "X-Api-Key",
                                    "x-team", "X-TEAM", "OpenAI-Organization", "x-request-id",
                                    "anthropic-version", "Host"])  # fmt: skip
    header_values = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1)

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(st.one_of(names, st.text()), values),
        st.dictionaries(header_names, header_values),
    )
    def check(fields, client_headers):
        body = {**fields, "model": "haiku", "messages": [{"role": "user", "content": "x"}]}
        call = Call("chat", body, Headers(headers=client_headers), "rid")
        kwargs = upstream.request_kwargs(call, model)
        assert set(kwargs) <= adapter.OPENAI_PARAMS["chat"] | controlled
        assert kwargs["api_key"] == "sk-ant-secret"
        assert kwargs["api_base"] == "http://configured.invalid"
        assert kwargs["api_version"] == "2024-01-01"
        assert kwargs["vertex_project"] == "p"
        assert kwargs["model"] == MODEL
        assert kwargs["max_retries"] == 0
        assert kwargs["extra_headers"] == {"x-team": "a", "x-request-id": "rid"}

    check()


@pytest.mark.parametrize("name", sorted(adapter.RETRIES))
def test_retries_are_not_litellm_s_to_configure(name):
    with pytest.raises(ValueError, match="fallback"):
        adapter.Config(type="litellm", extra={name: 3})
