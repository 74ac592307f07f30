"""The OpenAI-compatible adapter: request building, Azure details, error mapping."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from proxy.errors import UpstreamStatus, UpstreamUnavailable
from proxy.pipeline import Call
from proxy.upstream import openai as adapter
from proxy.upstream.base import TimeoutsConfig


def make(**settings):
    config = adapter.Config(type="openai", base_url="http://up/v1", **settings)
    upstream = adapter.Upstream("up", config)
    model = "real-model"  # the provider's name for it
    return upstream, model


def call(**body):
    return Call(
        "chat",
        {"model": "alias", "messages": [{"role": "user", "content": "hi"}], **body},
        {},
        "rid-1",
    )


def test_model_is_rewritten_and_everything_else_kept():
    upstream, model = make()
    body = orjson.loads(upstream.request_body(call(tools=[{"x": 1}], seed=7), model))
    assert body == {"model": "real-model", "messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"x": 1}], "seed": 7}  # fmt: skip


def test_streams_ask_for_usage_keeping_other_stream_options():
    upstream, model = make()
    body = orjson.loads(upstream.request_body(call(stream=True, stream_options={"x": 1}), model))
    assert body["stream_options"] == {"x": 1, "include_usage": True}
    upstream, model = make(stream_usage=False)
    assert "stream_options" not in orjson.loads(upstream.request_body(call(stream=True), model))


def test_azure_url_and_header():
    config = adapter.Config(
        type="openai", base_url="https://res.openai.azure.com/openai/deployments/{model}",
        api_key="azure-key", azure=True, api_version="2024-10-21", headers={"X-Team": "a"},
    )  # fmt: skip
    upstream = adapter.Upstream("az", config)
    assert upstream.url("chat", "gpt4o-dep") == (
        "https://res.openai.azure.com/openai/deployments/gpt4o-dep/chat/completions"
        "?api-version=2024-10-21"
    )
    assert upstream.headers["api-key"] == "azure-key"
    assert "authorization" not in upstream.headers
    assert upstream.headers["x-team"] == "a"


def test_upstream_auth_failure_is_not_blamed_on_the_client_and_key_is_redacted():
    upstream, _ = make(api_key="sk-secret-key")
    error = upstream.status_error(401, b'{"error":{"message":"bad key sk-secret-key"}}', {})
    assert error.status == 502 and "sk-secret" not in error.body().decode()
    error = upstream.status_error(400, b'{"error":{"message":"echo sk-secret-key","type":"x"}}', {})
    assert isinstance(error, UpstreamStatus) and error.status == 400
    assert b"sk-secret-key" not in error.body()


def test_connection_refused_is_unavailable():
    config = adapter.Config(
        type="openai", base_url="http://127.0.0.1:9/v1", timeouts=TimeoutsConfig(connect_s=1)
    )
    upstream = adapter.Upstream("gone", config)
    model = "m"  # the provider's name for it

    async def main():
        await upstream.start()
        try:
            await upstream.send(call(), model)
        finally:
            await upstream.close()

    with pytest.raises(UpstreamUnavailable):
        asyncio.run(main())
