"""TGI's native API, translated to OpenAI chat and completions: respx for the
translation, and the fake upstream's TGI dialect over a real socket."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
import respx
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest, UpstreamUnavailable
from proxy.pipeline import Call
from proxy.protocol import parse_request
from proxy.sse import UpstreamMalformed
from proxy.upstream import tgi
from tests.conftest import JSON_VALUES, PARAM_VALUES, start_fake_upstream, start_gateway

# Parameters the gateway checks itself, with values it takes: beside them, the ones the
# adapter alone reads get any value.
CHECKED = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(1, 4096), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
    "seed": st.integers(0, 2**31), "stop": st.text(max_size=5) | st.lists(st.text(max_size=5)),
    "frequency_penalty": st.floats(-2, 2), "user": st.text(max_size=10),
})  # fmt: skip
# response_format as the adapter reads it: a type, maybe a json_schema, maybe a schema
# in it, each of any shape
RESPONSE_FORMATS = PARAM_VALUES | st.fixed_dictionaries(
    {"type": PARAM_VALUES},
    optional={"json_schema": PARAM_VALUES | st.fixed_dictionaries({}, optional={
        "schema": PARAM_VALUES, "name": PARAM_VALUES})},
)  # fmt: skip
# one of them at a time mostly, as a refusal of one hides what the others would do
UNCHECKED = st.fixed_dictionaries({"response_format": RESPONSE_FORMATS}) | st.dictionaries(
    st.sampled_from(["response_format", *tgi.UNSUPPORTED]), PARAM_VALUES, max_size=3
)


def setup(prompt_format="chatml"):
    config = tgi.Config(
        type="tgi", base_url="http://tgi:8080", api_key="hf-key", prompt_format=prompt_format
    )
    upstream = tgi.Upstream("tgi", config)
    model = "llama"  # the provider's name for it
    return upstream, model


def chat_call(**body):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    return Call("chat", {"model": "llama", "messages": messages, **body}, {}, "rid")


def run(upstream, coro_fn):
    async def main():
        await upstream.start()
        try:
            return await coro_fn()
        finally:
            await upstream.close()

    return asyncio.run(main())


def test_request_building():
    upstream, _ = setup("llama3")
    body = upstream.request_body(chat_call(max_tokens=20, temperature=0.7, stop="END", seed=3))
    assert body["inputs"] == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert body["parameters"] == {
        "details": True, "decoder_input_details": True, "max_new_tokens": 20,
        "temperature": 0.7, "do_sample": True, "seed": 3, "stop": ["END"],
    }  # fmt: skip
    greedy = upstream.request_body(chat_call(temperature=0))["parameters"]
    assert "temperature" not in greedy and "do_sample" not in greedy
    with pytest.raises(InvalidRequest):
        upstream.request_body(chat_call(n=2))


ASKING = {  # a value of each parameter the native API cannot honour that asks for it
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "functions": [{"name": "f"}], "tool_choice": "required", "function_call": {"name": "f"},
    "logprobs": True, "top_logprobs": 3, "logit_bias": {"50256": -100},
    "presence_penalty": 0.5, "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ASKING))
def test_what_the_native_api_cannot_honour_is_refused_not_dropped(name):
    upstream, _ = setup()
    with pytest.raises(InvalidRequest) as refused:
        upstream.request_body(chat_call(**{name: ASKING[name]}))
    assert refused.value.param == name and refused.value.status == 400
    for inert in tgi.UNSUPPORTED[name]:  # values that ask for nothing pass
        assert "parameters" in upstream.request_body(chat_call(**{name: inert}))


@given(st.dictionaries(st.sampled_from(sorted(tgi.UNSUPPORTED)),
                       st.one_of(st.none(), st.booleans(), st.integers(-2, 5),
                                 st.sampled_from(["none", "auto", "required"]),
                                 st.just([]), st.just({}), st.just([{"name": "f"}]))))  # fmt: skip
def test_a_request_is_sent_only_when_every_parameter_is_honoured(extra):
    upstream, _ = setup()
    asking = [k for k, v in extra.items() if v not in tgi.UNSUPPORTED[k]]
    if asking:
        with pytest.raises(InvalidRequest) as refused:
            upstream.request_body(chat_call(**extra))
        assert refused.value.param in asking
    else:
        assert upstream.request_body(chat_call(**extra))["parameters"]["details"] is True


def test_a_json_response_format_becomes_tgi_grammar():
    upstream, _ = setup()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    def grammar(response_format):
        parameters = upstream.request_body(chat_call(response_format=response_format))
        return parameters["parameters"].get("grammar")

    assert grammar({"type": "text"}) is None and grammar(None) is None
    assert grammar({"type": "json_object"}) == {"type": "json", "value": {"type": "object"}}
    spec = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    assert grammar(spec) == {"type": "json", "value": schema}
    for bad, param in (({"type": "json_schema", "json_schema": {"name": "a"}},
                        "response_format.json_schema.schema"),
                       ({"type": "xml"}, "response_format"), ("json", "response_format"),
                       ("json_schema", "response_format"), ("text", "response_format"),
                       ({"type": "json_schema", "json_schema": "s"},
                        "response_format.json_schema.schema")):  # fmt: skip
        with pytest.raises(InvalidRequest) as refused:
            grammar(bad)
        assert refused.value.param == param


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.sampled_from(
    ["text", "json_object", "json_schema", "type", "schema"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "json_schema", "schema", "name"]), inner, max_size=3),
    max_leaves=8))  # fmt: skip
def test_any_response_format_becomes_a_grammar_or_a_400(response_format):
    upstream, _ = setup()
    try:
        parameters = upstream.request_body(chat_call(response_format=response_format))
    except InvalidRequest as exc:
        assert exc.param.startswith("response_format")
    else:
        grammar = parameters["parameters"].get("grammar")
        assert grammar is None or (grammar["type"] == "json" and isinstance(grammar["value"], dict))


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(["chat", "completions"]), st.booleans(), CHECKED, UNCHECKED)
def test_any_request_the_gateway_accepts_is_translated_or_refused(endpoint, stream, checked, extra):
    """What passes the gateway's own checks (proxy/protocol.py) becomes a TGI request,
    or a 400 naming a parameter: never another exception (a 500)."""
    first = {"messages": [{"role": "user", "content": "Hi"}]} if endpoint == "chat" else {
        "prompt": "Hi"}  # fmt: skip
    raw = orjson.dumps({"model": "llama", **first, **checked, **extra, "stream": stream})
    try:
        body = parse_request(endpoint, raw)
    except InvalidRequest:
        return  # refused before any adapter sees it
    upstream, _ = setup()
    try:
        request = upstream.request_body(Call(endpoint, body, {}, "rid"))
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.param
    else:
        orjson.dumps(request)  # what is sent is JSON
        assert isinstance(request["inputs"], str)


@respx.mock
def test_generate_translated_to_chat_completion():
    route = respx.post("http://tgi:8080/generate").respond(json={
        "generated_text": "Hello!",
        "details": {"finish_reason": "eos_token", "generated_tokens": 3, "prefill": [{}, {}, {}, {}]},
    })  # fmt: skip
    upstream, model = setup()
    reply = run(upstream, lambda: upstream.send(chat_call(), model))
    request = route.calls.last.request
    assert request.headers["authorization"] == "Bearer hf-key"
    assert request.headers["x-request-id"] == "rid"
    assert orjson.loads(request.content)["inputs"].endswith("<|im_start|>assistant\n")
    answer = reply.parsed()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


STREAM = (
    b'data:{"token":{"id":1,"text":"Hel","logprob":-0.1,"special":false},"generated_text":null,"details":null}\n\n'
    b'data:{"token":{"id":2,"text":"lo","logprob":-0.1,"special":false},"generated_text":null,"details":null}\n\n'
    b'data:{"token":{"id":3,"text":"</s>","logprob":-0.1,"special":true},"generated_text":"Hello",'
    b'"details":{"finish_reason":"length","generated_tokens":3,"seed":null}}\n\n'
)


@respx.mock
def test_generate_stream_translated_to_chunks():
    respx.post("http://tgi:8080/generate_stream").respond(
        content=STREAM, headers={"content-type": "text/event-stream"}
    )
    upstream, model = setup()

    async def collect():
        reply = await upstream.send(chat_call(stream=True), model)
        return [e async for e in reply.events]

    events = run(upstream, collect)
    payloads = [e.json() for e in events]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(
        p["choices"][0]["delta"].get("content", "") for p in payloads[:-2] if p and p["choices"]
    )
    assert text == "Hello"
    assert payloads[-3]["choices"][0]["finish_reason"] == "length"
    assert payloads[-2]["usage"]["completion_tokens"] == 3
    assert events[-1].is_done


@respx.mock
def test_completions_and_errors():
    respx.post("http://tgi:8080/generate").mock(side_effect=[
        httpx.Response(200, json=[{"generated_text": " world", "details": {"finish_reason": "length", "generated_tokens": 1}}]),
        httpx.Response(422, json={"error": "Input validation error: too long", "error_type": "validation"}),
        httpx.ConnectError("refused"),
    ])  # fmt: skip
    upstream, model = setup()
    call = Call("completions", {"model": "llama", "prompt": "Hello"}, {}, "rid")

    async def main():
        ok = await upstream.send(call, model)
        with pytest.raises(Exception) as bad:
            await upstream.send(call, model)
        with pytest.raises(UpstreamUnavailable):
            await upstream.send(call, model)
        return ok, bad.value

    ok, bad = run(upstream, main)
    assert ok.parsed()["choices"][0]["text"] == " world"
    assert bad.status == 400 and "too long" in bad.message


def test_embeddings_are_not_served_by_tgi():
    upstream, _ = setup()
    with pytest.raises(InvalidRequest) as info:
        upstream.check_ready("embeddings")
    assert "does not serve /v1/embeddings" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_the_fake_upstream_speaks_tgi_over_a_socket(tmp_path, stream):
    """The fake upstream's /generate and /generate_stream, as the TGI adapter reads them.
    TGI's body has no room for the fake's knobs, so they go as headers."""
    fake = start_fake_upstream(tmp_path, "--tokens", "5")

    async def text_of(**knobs):
        config = tgi.Config(type="tgi", base_url=fake.url, headers=knobs)
        upstream = tgi.Upstream("tgi", config)
        await upstream.start()
        try:
            call = Call("completions", {"model": "m", "prompt": "Hi", "stream": stream}, {}, "r")
            reply = await upstream.send(call, "m")
            if not stream:
                answer = reply.parsed()
                return answer["choices"][0]["text"], answer["usage"]["completion_tokens"]
            events = [e async for e in reply.events]
            if "error" in (events[-1].json() or {}):
                return events[-1].json()["error"]["message"], 0
            assert events[-1].is_done
            pieces = [e.json()["choices"][0]["text"] for e in events[:-2]]
            return "".join(pieces), events[-2].json()["usage"]["completion_tokens"]
        finally:
            await upstream.close()

    async def main():
        answers = [await text_of(), await text_of(**{"x-fake-reply": "Hello there, world"})]
        if stream:
            with pytest.raises(UpstreamUnavailable):
                await text_of(**{"x-fake-abort-after": "2"})
            failed = await text_of(**{"x-fake-error-event": "1"})
            assert "injected stream error" in failed[0]
        return answers

    try:
        assert asyncio.run(main()) == [("tok tok tok tok tok", 5), ("Hello there, world", 5)]
    finally:
        fake.stop()


def test_what_a_tgi_deployment_cannot_take_goes_to_one_that_can(tmp_path):
    """A model served by TGI's native API and an OpenAI-compatible server: a request
    TGI cannot honour (tools, n > 1, embeddings) goes to the other deployment, not
    to a 400; with TGI alone it is the client's 400, naming the parameter."""
    fake = start_fake_upstream(tmp_path)
    base = f"http://127.0.0.1:{fake.port}"
    gateway = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1}}
providers:
  native: {{type: tgi, base_url: "{base}"}}
  compatible: {{type: openai, base_url: "{base}/v1"}}
models:
  - {{name: mixed, deployments: [{{provider: native, model: m, name: t}},
                                 {{provider: compatible, model: m, name: o}}]}}
  - {{name: tgi-only, deployments: [{{provider: native, model: m, name: t2}}]}}
pipeline: [{{fallback: {{attempts: 2, backoff_s: 0.01}}}}]
""")  # fmt: skip
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "hi"}]
    try:
        for path, extra in [("chat/completions", {"messages": messages, "tools": [tool]}),
                            ("chat/completions", {"messages": messages, "n": 2}),
                            ("completions", {"prompt": "hi", "logprobs": 2}),
                            ("embeddings", {"input": "hi"})]:  # fmt: skip
            for _ in range(3):  # whatever the config's order, every time
                r = httpx.post(f"{gateway.url}/v1/{path}", json={"model": "mixed", **extra})
                assert r.status_code == 200, (path, extra, r.text)
                assert r.headers["x-meshgate-deployment"] == "o"
        plain = httpx.post(f"{gateway.url}/v1/chat/completions",
                           json={"model": "mixed", "messages": messages})  # fmt: skip
        assert plain.headers["x-meshgate-deployment"] == "t"  # the config's first takes it
        r = httpx.post(f"{gateway.url}/v1/chat/completions",
                       json={"model": "tgi-only", "messages": messages, "tools": [tool]})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    finally:
        gateway.stop()
        fake.stop()


# Answers shaped like TGI's, with any value in any place, and anything else.
tgi_like = st.fixed_dictionaries(
    {},
    optional={
        "generated_text": JSON_VALUES,
        "details": JSON_VALUES | st.fixed_dictionaries({}, optional={
            "finish_reason": JSON_VALUES, "generated_tokens": JSON_VALUES, "prefill": JSON_VALUES,
        }),
        "token": JSON_VALUES | st.fixed_dictionaries({}, optional={
            "text": JSON_VALUES, "special": JSON_VALUES,
        }),
    },
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.one_of(tgi_like, st.lists(tgi_like, max_size=2), JSON_VALUES))
def test_any_answer_translates_or_is_refused(answer):
    """A /generate answer becomes an OpenAI answer with sane usage, or ValueError
    (the adapter's 502 upstream_malformed_response): never another exception."""
    try:
        out = tgi.to_openai(answer, chat_call(), "llama")
    except ValueError:
        return
    assert isinstance(out["choices"][0]["message"]["content"], str)
    usage = out["usage"]
    assert all(isinstance(v, int) and v >= 0 for v in usage.values())
    orjson.dumps(out)


@settings(max_examples=100, deadline=None)
@given(st.lists(tgi_like, min_size=1, max_size=4))
def test_any_stream_translates_or_ends_with_an_upstream_error(events):
    """Stream events of any shape become OpenAI chunks, or the stream ends with an
    upstream error: never another exception."""
    upstream, model = setup()
    raw = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)

    async def collect():
        with respx.mock:
            respx.post("http://tgi:8080/generate_stream").respond(
                content=raw, headers={"content-type": "text/event-stream"}
            )
            reply = await upstream.send(chat_call(stream=True), model)
            return [e.json() async for e in reply.events]

    try:
        chunks = run(upstream, collect)
    except UpstreamUnavailable:  # UpstreamMalformed among them
        return
    for chunk in chunks:
        if chunk is not None and "error" not in chunk:
            orjson.dumps(chunk)


@respx.mock
@pytest.mark.parametrize("content", [b"not json", b"[]", b"[1]", b'{"generated_text": 5}'])
def test_a_malformed_answer_is_a_502(content):
    respx.post("http://tgi:8080/generate").respond(content=content)
    upstream, model = setup()
    with pytest.raises(UpstreamMalformed) as refused:
        run(upstream, lambda: upstream.send(chat_call(), model))
    assert refused.value.status == 502 and "TGI's /generate format" in refused.value.message
