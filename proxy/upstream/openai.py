"""Any OpenAI-compatible HTTP server: OpenAI, Azure OpenAI, vLLM, TGI's /v1,
Groq, Together, Ollama, LM Studio.

Bodies pass through: the request goes up as the client sent it with `model`
set to the deployment's model, and the answer comes back byte for byte. The
client is aiohttp: measured in load/bench.py, httpx's connection pool caps a
passthrough at a fraction of the throughput (see README, "Performance").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import aiohttp
import orjson

from proxy import __version__, tracing
from proxy.errors import (
    UpstreamTimeout,
    UpstreamUnavailable,
    from_upstream_body,
)
from proxy.pipeline import Reply, replay
from proxy.protocol import clean_usage
from proxy.redact import transport_reason
from proxy.sse import Event, EventSplitter, UpstreamMalformed, as_stream
from proxy.upstream import base

if TYPE_CHECKING:
    from proxy.pipeline import Call


# Where each endpoint's answer keeps its results: an answer without them is no answer.
RESULTS = {"chat": "choices", "completions": "choices", "embeddings": "data"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Config(base.ProviderConfig):
    type: Literal["openai"]
    base_url: str
    api_key: str | None = None
    azure: bool = False  # Azure OpenAI: `api-key` header instead of a bearer token
    api_version: str | None = None  # sent as ?api-version= (Azure)
    # Ask for the final usage chunk of every stream (and drop it again when the
    # client did not ask), so tokens are counted for streams too.
    stream_usage: bool = True

    def __post_init__(self) -> None:
        base.ProviderConfig.__post_init__(self)
        base.check_base_url(self.base_url)


class Upstream(base.Upstream):
    config: Config

    def __init__(self, name: str, config: Config) -> None:
        super().__init__(name, config)
        self.session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], str] = {}
        headers = {"content-type": "application/json", "user-agent": f"meshgate/{__version__}"}
        self.headers = headers | base.provider_headers(config)

    async def start(self) -> None:
        timeouts = self.config.timeouts
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                # 0: unbounded here; the gateway's pool (proxy/upstream/pool.py) bounds
                # the calls, so aiohttp never queues one out of sight
                limit=0,
                limit_per_host=0,
                keepalive_timeout=30,
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect_s, sock_read=timeouts.read_s
            ),
            skip_auto_headers=("User-Agent", "Content-Type"),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def url(self, endpoint: str, model: str) -> str:
        key = (endpoint, model)
        url = self._urls.get(key)
        if url is None:
            root = self.config.base_url.rstrip("/").replace("{model}", model)
            url = root + base.ENDPOINT_PATHS[endpoint]
            if self.config.api_version:
                url += f"?api-version={self.config.api_version}"
            self._urls[key] = url
        return url

    def request_body(self, call: Call, model: str) -> bytes:
        body = call.body
        ask_usage = (
            call.stream
            and call.endpoint != "embeddings"
            and self.config.stream_usage
            and not call.wants_usage
        )
        if ask_usage or body.get("model") != model:
            body = dict(body)
            body["model"] = model
            if ask_usage:
                options = body.get("stream_options")
                options = dict(options) if isinstance(options, dict) else {}
                options["include_usage"] = True
                body["stream_options"] = options
        return orjson.dumps(body)

    async def send(self, call: Call, model: str) -> Reply:
        self.check_ready(call.endpoint)
        assert self.session is not None, "upstream used before start()"
        data = self.request_body(call, model)
        headers = dict(self.headers)
        headers["x-request-id"] = call.request_id
        tracing.inject(headers)  # traceparent, when tracing is on
        started = time.perf_counter()
        deadline = started + self.config.timeouts.total_s
        try:
            async with asyncio.timeout(self.config.timeouts.total_s):
                response = await self.session.post(
                    self.url(call.endpoint, model),
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                )
                if response.status >= 300:
                    raw = await _read(response, base.ERROR_BODY_BYTES)
                    raise self.status_error(response.status, raw or b"", response.headers)
                raw = None
                if not (call.stream and response.content_type == "text/event-stream"):
                    raw = await _read(response, self.config.max_response_bytes)
                    if raw is None:
                        raise self.too_large("an answer")
        except TimeoutError:
            raise UpstreamTimeout(f"provider '{self.name}' did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"provider '{self.name}' is unreachable: {_reason(exc)}"
            ) from exc
        if raw is not None:
            return self._answer(raw, response.status, call)
        reply = Reply(events=self._events(response, call, deadline), status=response.status)
        return reply.owns(response.close)  # if the stream is never iterated

    def _answer(self, raw: bytes, status: int, call: Call) -> Reply:
        """A buffered answer, which must be a JSON object with its endpoint's results
        (`choices`, `data`); its usage is read here, once (the gateway needs it before
        answering anyway). To a stream request (the upstream ignored `stream`, or
        sent its events under another content type) it is the stream it would have
        been."""
        if call.stream and not raw.lstrip().startswith(b"{"):
            return self._replayed(raw, status)
        if self.redact.secrets:  # an upstream echoing the gateway's key
            raw = self.redact.answer(raw)
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamMalformed(
                f"provider '{self.name}' answered with a body that is not a JSON object"
            )
        results = RESULTS[call.endpoint]
        if not isinstance(answer.get(results), list):
            if "error" in answer:  # a failure sent with a success status: a 502
                error = from_upstream_body(502, self.redact.bytes(raw), {})
                error.type = "upstream_error"
                raise error
            raise UpstreamMalformed(f"provider '{self.name}' answered without `{results}`")
        if call.stream:
            return Reply(events=replay(as_stream(call.endpoint, answer)), status=status)
        return Reply(body=raw, status=status, usage=clean_usage(answer.get("usage")))

    def _replayed(self, raw: bytes, status: int) -> Reply:
        """Events that came whole under a content type other than text/event-stream."""
        splitter = EventSplitter()
        events = splitter.feed(raw)
        if not events or splitter.pending.strip():
            raise UpstreamMalformed(
                f"provider '{self.name}' answered a stream request with neither events "
                "nor a JSON answer"
            )
        if self.redact.secrets:
            for event in events:
                event.raw = self.redact.stream_bytes(event.raw)
        return Reply(events=replay(events), status=status)

    async def _events(
        self,
        response: aiohttp.ClientResponse,
        call: Call,
        deadline: float,
    ) -> AsyncIterator[Event]:
        splitter = EventSplitter()
        redact = self.redact.stream_bytes if self.redact.secrets else None
        clean = False
        try:
            most = self.config.max_response_bytes
            async for chunk in response.content.iter_any():
                if time.perf_counter() > deadline:
                    raise UpstreamTimeout(f"provider '{self.name}' exceeded its total timeout")
                for event in splitter.feed(chunk):
                    if redact:
                        event.raw = redact(event.raw)
                    yield event
                if splitter.pending_bytes > most:
                    raise self.too_large("a stream event")
            if splitter.pending.strip():
                raise UpstreamUnavailable(f"provider '{self.name}' ended the stream mid-event")
            clean = True
        except TimeoutError:
            raise UpstreamTimeout(f"provider '{self.name}' stalled mid-stream") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"provider '{self.name}' broke off the stream: {_reason(exc)}"
            ) from exc
        finally:
            # Closing (not releasing) drops the connection, which stops the upstream.
            response.release() if clean else response.close()


async def _read(response: aiohttp.ClientResponse, most: int) -> bytes | None:
    """The whole body, released; None, the connection closed, once it passes `most`
    bytes (counted as decompressed: a small compressed body can inflate past it)."""
    length = response.content_length
    if length is not None and not response.headers.get("Content-Encoding"):
        if length > most:  # said at the start: nothing of it is read
            response.close()
            return None
        raw = await response.read()  # a declared length: aiohttp reads exactly that
        response.release()
        return raw
    gathered = await base.gather(response.content.iter_any(), most)
    if gathered is None:
        response.close()  # the rest is never read: the connection cannot be reused
    else:
        response.release()
    return gathered


def _reason(exc: BaseException) -> str:
    """What went wrong, in plain words rather than aiohttp's internals."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error.strerror or str(exc.os_error) or "connection failed"
        return f"cannot connect to {exc.host}:{exc.port}: {cause}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection closed before the answer was complete"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientOSError):
        return exc.strerror or "connection error"
    if isinstance(exc, aiohttp.ClientResponseError):  # raised by aiohttp's parser here
        return f"its answer is not valid HTTP ({transport_reason(exc.message)})"
    return transport_reason((str(exc) or type(exc).__name__).split(" [", 1)[0])
