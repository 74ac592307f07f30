"""Text Generation Inference's native API (`/generate`, `/generate_stream`),
translated to OpenAI chat and completions.

A TGI new enough to serve `/v1/chat/completions` is better reached as an
`openai` provider; this adapter is for servers and models reached natively.
Chat messages are rendered to a prompt with `prompt_format`, since the native
API takes plain text. TGI's stream does not report the prompt's token count,
so streamed usage has `prompt_tokens: 0`. A JSON `response_format` becomes
TGI's JSON grammar; what the native API cannot honour (tools, logprobs,
logit_bias, presence_penalty) is refused with a 400 rather than dropped, so a
client never takes an answer made without it for one made with it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx
import orjson

from proxy import tracing
from proxy.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.pipeline import Reply
from proxy.redact import transport_reason
from proxy.sse import DONE, Event, EventSplitter, UpstreamMalformed
from proxy.upstream import base

if TYPE_CHECKING:
    from proxy.pipeline import Call

FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
# OpenAI parameters /generate has nothing for, each with the values that ask for nothing
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "logprobs": (None, False), "top_logprobs": (None, 0),
    "logit_bias": (None, {}), "presence_penalty": (None, 0),
    "audio": (None,), "prediction": (None,),
}  # fmt: skip

TEMPLATES = {
    # (per message, with {role} and {content}; then what opens the assistant's turn)
    "chatml": ("<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"),
    "llama3": (
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "plain": ("{role}: {content}\n", "assistant: "),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Config(base.ProviderConfig):
    type: Literal["tgi"]
    base_url: str
    api_key: str | None = None
    prompt_format: Literal["chatml", "llama3", "plain"] = "chatml"
    max_connections: int = 100

    def __post_init__(self) -> None:
        base.ProviderConfig.__post_init__(self)
        base.check_base_url(self.base_url)


class Upstream(base.Upstream):
    config: Config
    endpoints = frozenset({"chat", "completions"})

    def __init__(self, name: str, config: Config) -> None:
        super().__init__(name, config)
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        t = self.config.timeouts
        self.client = httpx.AsyncClient(
            base_url=self.config.base_url.rstrip("/"),
            headers=base.provider_headers(self.config),
            timeout=httpx.Timeout(t.read_s, connect=t.connect_s),
            # unbounded here: the gateway's pool bounds the calls
            limits=httpx.Limits(max_connections=None),
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def refusal(self, call: Call) -> GatewayError | None:
        """Also what /generate has no way to do (tools, n > 1, ...): `request_body`'s
        refusal, found without sending anything."""
        refused = super().refusal(call)
        if refused is not None:
            return refused
        try:
            self.request_body(call)
        except InvalidRequest as exc:
            return exc
        return None

    def request_body(self, call: Call) -> dict:
        """The native TGI request for an OpenAI chat or completions body."""
        body = call.body
        if call.endpoint == "chat":
            inputs = render_chat(body["messages"], self.config.prompt_format)
        else:
            prompt = body["prompt"]
            if isinstance(prompt, list):
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise InvalidRequest("TGI providers take one text prompt", param="prompt")
                prompt = prompt[0]
            inputs = prompt
        if body.get("n", 1) != 1:
            raise InvalidRequest("TGI providers return one choice (n=1)", param="n")
        for name, inert in UNSUPPORTED.items():
            if name in body and body[name] not in inert:
                raise InvalidRequest(
                    f"`{name}` is not supported by this model's TGI provider (its native "
                    "API); a TGI serving /v1/chat/completions takes it as an openai provider",
                    param=name,
                )
        params: dict[str, Any] = {"details": True}
        grammar = _grammar(body.get("response_format"))
        if grammar is not None:
            params["grammar"] = grammar
        if not call.stream:
            params["decoder_input_details"] = True
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None:
            params["max_new_tokens"] = max_tokens
        temperature = body.get("temperature")
        if temperature:  # TGI rejects 0: greedy decoding is do_sample=false
            params["temperature"] = temperature
            params["do_sample"] = True
        for ours, theirs in (
            ("top_p", "top_p"),
            ("seed", "seed"),
            ("frequency_penalty", "frequency_penalty"),
        ):
            if body.get(ours) is not None:
                params[theirs] = body[ours]
        stop = body.get("stop")
        if stop:
            params["stop"] = [stop] if isinstance(stop, str) else list(stop)
        return {"inputs": inputs, "parameters": params}

    async def send(self, call: Call, model: str) -> Reply:
        self.check_ready(call.endpoint)
        assert self.client is not None, "upstream used before start()"
        payload = orjson.dumps(self.request_body(call))
        path = "/generate_stream" if call.stream else "/generate"
        headers = {"content-type": "application/json", "x-request-id": call.request_id}
        tracing.inject(headers)  # traceparent, when tracing is on
        request = self.client.build_request("POST", path, content=payload, headers=headers)
        total_s = self.config.timeouts.total_s
        deadline = time.perf_counter() + total_s
        try:
            async with asyncio.timeout(total_s):  # httpx's timeouts are per read
                response = await self.client.send(request, stream=True)
                if response.status_code >= 300 or not call.stream:
                    failed = response.status_code >= 300
                    most = base.ERROR_BODY_BYTES if failed else self.config.max_response_bytes
                    try:
                        raw = await base.gather(response.aiter_bytes(), most)  # decompressed
                    finally:
                        await response.aclose()
        except (httpx.TimeoutException, TimeoutError):
            raise UpstreamTimeout(f"provider '{self.name}' did not answer in time") from None
        except httpx.RequestError as exc:  # a transport failure, or a body that cannot be decoded
            raise UpstreamUnavailable(
                f"provider '{self.name}' is unreachable: {transport_reason(str(exc))}"
            ) from exc
        if response.status_code >= 300:
            error = self.status_error(response.status_code, raw or b"", response.headers)
            if response.status_code == 422 and isinstance(error, UpstreamStatus):
                # TGI's validation errors are OpenAI's 400s
                error.status, error.type = 400, "invalid_request_error"
            raise error
        if not call.stream:
            if raw is None:
                raise self.too_large("an answer")
            try:
                answer = orjson.loads(self.redact.answer(raw))  # one echoing the key
                return Reply.json(to_openai(answer, call, model))
            except ValueError:  # orjson's JSONDecodeError among them
                raise UpstreamMalformed(
                    f"provider '{self.name}' sent an answer that is not TGI's /generate format"
                ) from None
        reply = Reply(events=self._events(response, call, model, deadline))
        return reply.owns(response.aclose)  # if the stream is never iterated

    async def _events(
        self, response: httpx.Response, call: Call, model: str, deadline: float
    ) -> AsyncIterator[Event]:
        chat = call.endpoint == "chat"
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        splitter = EventSplitter()
        first = True
        try:
            async for chunk in response.aiter_raw():
                if time.perf_counter() > deadline:
                    raise UpstreamTimeout(f"provider '{self.name}' exceeded its total timeout")
                events = splitter.feed(chunk)
                if splitter.pending_bytes > self.config.max_response_bytes:
                    raise self.too_large("a stream event")
                for event in events:
                    data = event.json()
                    if not isinstance(data, dict):
                        continue
                    if "error" in data:
                        yield Event.of(
                            {
                                "error": {
                                    "message": self.redact.text(str(data["error"])),
                                    "type": "upstream_error",
                                    "param": None,
                                    "code": None,
                                }
                            }
                        )
                        return
                    token = data.get("token") or {}
                    details = data.get("details")
                    shaped = isinstance(token, dict) and isinstance(details, dict | None)
                    text = token.get("text", "") if shaped and not token.get("special") else ""
                    if not shaped or not isinstance(text, str):
                        raise UpstreamMalformed(
                            f"provider '{self.name}' sent a stream event that is not TGI's format"
                        )
                    if first and chat:
                        yield Event.of(
                            {
                                **head,
                                "choices": [
                                    {
                                        "index": 0,
                                        "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                    first = False
                    if text:
                        piece = Event.of({**head, "choices": [_chunk_choice(chat, text, None)]})
                        if self.redact.secrets:  # a token that is the gateway's key
                            piece.raw = self.redact.answer(piece.raw)
                        yield piece
                    if details:
                        finish = FINISH.get(str(details.get("finish_reason")), "stop")
                        yield Event.of({**head, "choices": [_chunk_choice(chat, "", finish)]})
                        n = _count(details.get("generated_tokens", 0))
                        usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
                        yield Event.of({**head, "choices": [], "usage": usage})
                        yield Event(DONE)
                        return
            raise UpstreamUnavailable(
                f"provider '{self.name}' ended the stream before its last token"
            )
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"provider '{self.name}' stalled mid-stream") from None
        except httpx.RequestError as exc:
            raise UpstreamUnavailable(
                f"provider '{self.name}' broke off the stream: {transport_reason(str(exc))}"
            ) from exc
        finally:
            await response.aclose()


def _grammar(response_format: Any) -> dict | None:
    """TGI's grammar for an OpenAI `response_format`: JSON, to a schema when one is
    given; None for plain text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json", "value": {"type": "object"}}
    if kind == "json_schema":
        assert isinstance(response_format, dict)
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return {"type": "json", "value": schema}
        raise InvalidRequest(
            "response_format.json_schema.schema must be a JSON Schema object",
            param="response_format.json_schema.schema",
        )
    raise InvalidRequest(
        "response_format must be an object with type text, json_object or json_schema",
        param="response_format",
    )


def render_chat(messages: list[dict], prompt_format: str) -> str:
    turn, opening = TEMPLATES[prompt_format]
    parts = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(turn.format(role=message.get("role", "user"), content=content))
    return "".join(parts) + opening


def to_openai(data: Any, call: Call, model: str) -> dict:
    """A TGI /generate answer as an OpenAI chat.completion or text_completion;
    ValueError for one that is not in TGI's format."""
    if isinstance(data, list) and data:  # some TGI versions wrap the answer in a list
        data = data[0]
    if not isinstance(data, dict):
        raise ValueError("not an object")
    details = data.get("details") or {}
    text = data.get("generated_text")
    if not isinstance(details, dict) or not isinstance(text, str):
        raise ValueError("generated_text or details of the wrong type")
    finish = FINISH.get(str(details.get("finish_reason")), "stop")
    completion = _count(details.get("generated_tokens", 0))
    prefill = details.get("prefill") or ()
    prompt = len(prefill) if isinstance(prefill, list | tuple) else 0
    chat = call.endpoint == "chat"
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _count(value: Any) -> int:
    """A token count from the upstream, 0 when it is not a sane one."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31
    return value if ok else 0


def _chunk_choice(chat: bool, text: str, finish: str | None) -> dict:
    if chat:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
    return {"index": 0, "text": text, "finish_reason": finish}
