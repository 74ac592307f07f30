"""Providers that do not speak OpenAI's protocol (Anthropic, Gemini, Cohere,
Bedrock, ...), through litellm's `acompletion`, `atext_completion` and `aembedding`.

litellm is imported when the first litellm provider starts, never at import
time, and always with its bundled price list (no download at run time).
Deployment models use litellm's names, e.g. `anthropic/claude-3-5-haiku-latest`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx
import orjson

from proxy import tracing
from proxy.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnavailable,
    retry_after_header,
)
from proxy.pipeline import Reply
from proxy.redact import scrub, transport_reason
from proxy.sse import DONE, Event, UpstreamMalformed
from proxy.upstream import base
from proxy.upstream.capped import (
    AnswerTooLarge,
    AnswerTooSlow,
    CappedTransport,
    EventTooLarge,
    Outgoing,
    answers_capped,
    cause,
)

if TYPE_CHECKING:
    from proxy.pipeline import Call

# The OpenAI request parameters a client may pass on to litellm. Everything else
# litellm accepts as a keyword (api_base, base_url, api_key, extra_headers,
# aws_*, vertex_*, client, metadata, mock_response, ...) chooses where the call
# goes, with which credentials, or what litellm does, and comes from the config.
OPENAI_PARAMS = {
    "chat": frozenset({
        "messages", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
        "max_tokens", "max_completion_tokens", "n", "presence_penalty", "response_format",
        "seed", "stop", "stream", "temperature", "top_p", "tools", "tool_choice",
        "parallel_tool_calls", "user", "functions", "function_call", "modalities", "audio",
        "prediction", "reasoning_effort", "service_tier", "web_search_options",
    }),
    "completions": frozenset({
        "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
        "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "suffix",
        "temperature", "top_p", "user",
    }),
    "embeddings": frozenset({"input", "dimensions", "encoding_format", "user"}),
}  # fmt: skip

# litellm's keywords for retrying a call itself. The OpenAI SDK it uses for
# `openai/` and `azure/` models retries a 429, a 5xx or a lost connection twice by
# default, with backoff: one attempt of the gateway's would reach the provider
# three times, out of sight of fallback's attempts, its deadline and the breaker.
RETRIES = frozenset({"max_retries", "num_retries"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Config(base.ProviderConfig):
    type: Literal["litellm"]
    api_key: str | None = None
    api_base: str | None = None
    api_version: str | None = None
    drop_params: bool = True  # drop OpenAI parameters the provider does not take
    extra: dict[str, Any] = field(default_factory=dict)  # passed to litellm as keyword args

    def __post_init__(self) -> None:
        base.ProviderConfig.__post_init__(self)
        base.check_base_url(self.api_base, "api_base")
        retries = sorted(RETRIES & set(self.extra))
        if retries:
            raise ValueError(
                f"extra: {', '.join(retries)}: retries are the fallback plugin's "
                "(pipeline: fallback: attempts), not litellm's"
            )
        if importlib.util.find_spec("litellm") is None:
            raise ValueError(
                "type litellm needs the litellm extra: pip install 'meshgate[litellm]'"
            )


def import_litellm():
    """litellm, imported offline: its bundled price list, no telemetry, and HTTP
    clients that never follow a redirect."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    # its embeddings read `max_retries or DEFAULT_MAX_RETRIES`, turning a 0 back into 2
    litellm.DEFAULT_MAX_RETRIES = 0  # type: ignore[misc]  # declared Final
    _no_redirects(litellm)
    return litellm


def _no_redirects(litellm) -> None:
    """litellm's own clients (Anthropic, Gemini, ...) and the OpenAI SDK's it uses for
    `openai/` models follow redirects, which would re-send the body and the
    provider's key to a host the config never named."""
    from litellm.llms.custom_httpx import http_handler

    handler = http_handler.AsyncHTTPHandler
    if getattr(handler, "_meshgate_no_redirects", False):
        return
    create = handler.create_client

    def create_client(self, *args, **kwargs):
        client = create(self, *args, **kwargs)
        client.follow_redirects = False
        # httpx has no public way to wrap a built client's transport
        client._transport = CappedTransport(client._transport)
        return client

    handler.create_client = create_client  # type: ignore[method-assign]
    handler._meshgate_no_redirects = True  # type: ignore[attr-defined]


class Upstream(base.Upstream):
    config: Config

    def __init__(self, name: str, config: Config) -> None:
        super().__init__(name, config)
        self.litellm: Any = None
        self._owns_session = False

    async def start(self) -> None:
        self.litellm = import_litellm()
        if self.litellm.aclient_session is None:
            # Used by litellm for OpenAI-compatible providers in place of the SDK's
            # own client, which follows redirects.
            self.litellm.aclient_session = httpx.AsyncClient(
                follow_redirects=False,
                timeout=self.config.timeouts.total_s,
                transport=CappedTransport(httpx.AsyncHTTPTransport()),
            )
            self._owns_session = True

    async def close(self) -> None:
        session = self.litellm.aclient_session if self.litellm is not None else None
        if session is not None and self._owns_session:
            self.litellm.aclient_session = None
            await session.aclose()

    def request_kwargs(self, call: Call, model: str) -> dict[str, Any]:
        allowed = OPENAI_PARAMS[call.endpoint]
        kwargs = {k: v for k, v in call.body.items() if k in allowed}
        if call.stream:
            kwargs["stream_options"] = {"include_usage": True}
        kwargs.update(self.config.extra)
        kwargs["model"] = model
        kwargs["timeout"] = self.config.timeouts.total_s
        kwargs["drop_params"] = self.config.drop_params
        kwargs["max_retries"] = 0  # one call, one request to the provider: see RETRIES
        headers = dict(self.config.headers)
        headers["x-request-id"] = call.request_id
        tracing.inject(headers)  # traceparent, when tracing is on
        kwargs["extra_headers"] = headers
        for key in ("api_key", "api_base", "api_version"):
            value = getattr(self.config, key)
            if value:
                kwargs[key] = value
        return kwargs

    async def send(self, call: Call, model: str) -> Reply:
        self.check_ready(call.endpoint)
        kwargs = self.request_kwargs(call, model)
        function = {
            "chat": self.litellm.acompletion,
            "completions": self.litellm.atext_completion,
            "embeddings": self.litellm.aembedding,
        }[call.endpoint]
        total_s = self.config.timeouts.total_s
        deadline = time.perf_counter() + total_s
        # as the answer is read, its size and deadline; until its head, asyncio's timer
        with answers_capped(self.config.max_response_bytes, deadline, call.stream) as outgoing:
            try:
                async with asyncio.timeout(total_s) as timer:
                    result = await function(**kwargs)
            except Exception as exc:
                if not timer.expired():
                    raise self.translate(exc, outgoing) from exc
                raise UpstreamTimeout(f"provider '{self.name}' did not answer in time") from exc
        if call.stream:
            reply = Reply(events=self._events(result, call))
            close = getattr(result, "aclose", None)
            return reply.owns(close) if close is not None else reply
        body = orjson.dumps(result.model_dump(exclude_none=True))
        return Reply(body=self.redact.stream_bytes(body))  # a hostile upstream echoing the key

    async def _events(self, stream: Any, call: Call) -> AsyncIterator[Event]:
        try:
            async for chunk in stream:
                event = Event.of(chunk.model_dump(exclude_none=True))
                event.raw = self.redact.stream_bytes(event.raw)
                yield event
            yield Event(DONE)
        except GatewayError:
            raise
        except Exception as exc:
            raise self.translate(exc) from exc
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def translate(self, exc: Exception, outgoing: Outgoing | None = None) -> GatewayError:
        """One of litellm's exceptions as the gateway's error, by its status. A failure
        with nothing sent (by the `outgoing` call) that is not about credentials is
        litellm unable to translate the request (a client's malformed parameter;
        litellm calls it a connection error, status 500): a 400, and nothing against
        the deployment. Its own failure (status 500) after a success is litellm
        unable to read the answer: the provider's malformed answer, a 502."""
        sent = outgoing is None or outgoing.sent
        if isinstance(exc, GatewayError):
            return exc
        capped = cause(exc)
        if isinstance(capped, EventTooLarge):
            return UpstreamTooLarge(f"provider '{self.name}' sent {capped}; it was cut off")
        if isinstance(capped, AnswerTooLarge):
            return self.too_large("an answer")
        if isinstance(capped, AnswerTooSlow):
            return UpstreamTimeout(f"provider '{self.name}' exceeded its total timeout")
        if capped is not None:
            return UpstreamUnavailable(f"provider '{self.name}': {capped}")
        status = getattr(exc, "status_code", None)
        message = self.redact.text(scrub(str(getattr(exc, "message", None) or exc)))
        name = type(exc).__name__
        if not sent and status not in (401, 403):
            return InvalidRequest(
                f"The request cannot be made to provider '{self.name}' as sent: {message}"
            )
        transport = cause(exc, (httpx.TransportError,))  # litellm: a refused connection is a 500
        if (
            name == "Timeout"
            or isinstance(exc, TimeoutError)
            or isinstance(transport, httpx.TimeoutException)
        ):
            return UpstreamTimeout(f"provider '{self.name}' did not answer in time")
        if transport is not None:
            reason = self.redact.text(transport_reason(str(transport) or type(transport).__name__))
            return UpstreamUnavailable(f"provider '{self.name}' is unreachable: {reason}")
        answered = outgoing.status if outgoing is not None else None
        if answered is not None and 200 <= answered < 300 and (status or 500) >= 500:
            return UpstreamMalformed(
                f"provider '{self.name}' sent an answer litellm cannot read: {message}"
            )
        if name == "APIConnectionError" or not isinstance(status, int):
            return UpstreamUnavailable(f"provider '{self.name}' is unreachable: {message}")
        if status in (401, 403) or 300 <= status < 400:
            return self.status_error(status, b"", {})
        if status == 400:
            code = "context_length_exceeded" if name == "ContextWindowExceededError" else None
            if name == "ContentPolicyViolationError":
                code = "content_policy_violation"
            return InvalidRequest(message, code=code)
        # the provider's headers: litellm keeps them apart (its `response` is its own)
        found = getattr(exc, "litellm_response_headers", None) or getattr(
            getattr(exc, "response", None), "headers", None
        )
        headers = retry_after_header(found.get("retry-after") if found else None)
        return UpstreamStatus(status, message, code=None, headers=headers)
