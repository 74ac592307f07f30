"""The official openai SDK, sync and async, against the gateway over real sockets."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import MESSAGES


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0) as c:
        yield c


@pytest.fixture
def aclient(gateway):
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0)


def test_chat_completion(client):
    completion = client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == " ".join(["tok"] * 16)
    assert completion.model == "upstream-model"  # the upstream's answer, untouched
    assert completion.usage.completion_tokens == 16
    assert completion.system_fingerprint == "fp_fake"


def test_chat_stream_collects_every_token(client):
    stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(["tok"] * 16)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # the gateway asked for usage on the client's behalf and dropped it again
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage(client):
    stream = client.chat.completions.create(
        model="gpt-test", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 16


def test_completions_and_stream(client):
    done = client.completions.create(model="gpt-test", prompt="Once upon a time")
    assert done.choices[0].text.startswith("tok")
    streamed = client.completions.create(model="gpt-test", prompt="Once", stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices).count("tok") == 16


def test_embeddings(client):
    result = client.embeddings.create(model="gpt-test", input=["a", "b"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["gpt-test", "same-name", "slow-model", "dead-model", "nokey-model", "sim"]
    assert client.models.retrieve("gpt-test").owned_by == "meshgate"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_unknown_fields_reach_upstream_and_come_back(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    completion = client.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        tools=tools,
        response_format={"type": "json_object"},
        logprobs=True,
        extra_body={"vendor_extension": {"nested": [1, 2.5, None]}, "fake": {"echo": 1}},
        extra_headers={"x-request-id": "req-abc-123"},
    )
    echo = completion.model_extra["echo"]
    sent = echo["body"]
    assert sent["model"] == "upstream-model"
    assert sent["tools"] == tools
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["logprobs"] is True
    assert sent["vendor_extension"] == {"nested": [1, 2.5, None]}
    assert echo["headers"]["x-request-id"] == "req-abc-123"
    # the configured key went up whole; an answer quoting it shows it redacted
    assert echo["headers"]["authorization"] == "Bearer [redacted]"
    assert "sk-upstream-secret" not in completion.model_dump_json()


def test_request_id_generated_and_returned(client):
    raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
    assert len(raw.headers["x-request-id"]) == 24
    assert float(raw.headers["x-meshgate-overhead-ms"]) >= 0
    assert raw.headers["x-meshgate-deployment"] == "fake/upstream-model"


def test_errors_raise_the_sdk_exception_classes(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-test", messages=[])
    assert info.value.param == "messages"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-test", messages=MESSAGES,
            extra_body={"fake": {"error_rate": 1, "error_status": 429, "retry_after": 2}},
        )  # fmt: skip
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="dead-model", messages=MESSAGES)
    assert info.value.status_code == 502


def test_async_client_concurrent_streams(aclient):
    async def one(i: int) -> str:
        stream = await aclient.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": f"n{i}"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(20)))
        finally:
            await aclient.close()

    texts = asyncio.run(main())
    assert all(t == " ".join(["tok"] * 16) for t in texts)


def test_async_client_chat_and_errors(aclient):
    async def main():
        try:
            ok = await aclient.chat.completions.create(model="sim", messages=MESSAGES)
            with pytest.raises(openai.NotFoundError):
                await aclient.chat.completions.create(model="nope", messages=MESSAGES)
            return ok
        finally:
            await aclient.close()

    ok = asyncio.run(main())
    assert "simulated" in ok.choices[0].message.content
