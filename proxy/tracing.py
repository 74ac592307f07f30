"""OpenTelemetry traces: off by default, and then free.

With `tracing.enabled`, each worker sets up the SDK with an OTLP/HTTP exporter
(endpoint, headers and sampling from `tracing:` or the standard OTEL_*
variables). Each model request gets one server span (`serve_traced`, following
an incoming `traceparent`), and the gateway and plugins add child spans: each
upstream attempt with the GenAI semantic conventions' attributes, the cache
lookup, the quota check, the routing decision, each verification step.
`traceparent` goes to the upstreams, the trace id into the access log.

Cost decided the shape. OpenTelemetry's ASGI middleware (what the Starlette
instrumentation installs) spends about 135 us per request even when the
sampler says no, in a gateway that spends about 450 us in all. So the server
span is made here, directly on the SDK, and a request that is not sampled
makes no child span at all: `span()` asks whether the current span records
before it builds anything. Off, nothing is installed: `span()` hands back one
shared do-nothing context manager, and the OpenTelemetry packages are not even
imported (they are the `tracing` extra). Measured: `python -m load.bench
--tracing` (figures in the README).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from proxy.protocol import clean_usage

log = logging.getLogger("meshgate.tracing")

_NOOP = contextlib.nullcontext()
_tracer: Any = None  # an opentelemetry Tracer once configured
_api: Any = None  # the opentelemetry.trace module
_context: Any = None  # the opentelemetry.context module
_bound = 0  # a trace is sampled here when the low 64 bits of its id are below this
_follow = True  # a caller's traceparent decides its sampling (tracing.follow_caller)


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingConfig:
    enabled: bool = False
    # OTLP/HTTP traces endpoint; default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then
    # OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces, then http://localhost:4318/v1/traces
    endpoint: str | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # to the collector
    # share of traces kept; default: OTEL_TRACES_SAMPLER_ARG, else 1
    sample_ratio: float | None = None
    # a caller's traceparent decides whether its request is sampled (its flag);
    # false: sample_ratio decides for every request, the caller's trace still joined
    follow_caller: bool = True
    service_name: str | None = None  # default: OTEL_SERVICE_NAME, else meshgate
    encoding: Literal["json", "protobuf"] = "json"  # of OTLP/HTTP bodies (trace_export.py)

    def __post_init__(self) -> None:
        if self.sample_ratio is not None and not 0 <= self.sample_ratio <= 1:
            raise ValueError("sample_ratio is a share, from 0 to 1")


SHUTDOWN_S = 5.0  # at shutdown, how long the spans still queued have to reach the collector


def shutdown(provider: Any) -> None:
    """Send the spans still queued, for `SHUTDOWN_S` at most: the SDK would wait 30 s
    for each batch processor, and a collector that hangs must not hold the exit."""
    sending = threading.Thread(target=provider.shutdown, name="meshgate-trace-shutdown",
                               daemon=True)  # fmt: skip
    sending.start()
    sending.join(SHUTDOWN_S)
    if sending.is_alive():
        log.warning("the last spans did not reach the collector within %g s", SHUTDOWN_S)


def enabled() -> bool:
    return _tracer is not None


def setup(config: TracingConfig, exporter: Any = None) -> Any:
    """Configure this process's tracer; the provider (for tests and shutdown), or None
    when tracing is off. `exporter` replaces OTLP (tests: an in-memory one)."""
    global _tracer, _api, _context, _bound, _follow
    if not config.enabled:
        _tracer = None
        return None
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    ratio = config.sample_ratio
    if ratio is None:
        ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1") or 1)
    name = config.service_name or os.environ.get("OTEL_SERVICE_NAME") or "meshgate"
    # Roots are sampled here, before the SDK is asked for anything (serve_traced); a
    # caller's trace keeps the caller's decision.
    provider = TracerProvider(
        resource=Resource.create({"service.name": name}), sampler=ParentBased(ALWAYS_ON)
    )
    _bound = round(ratio * (1 << 64))
    _follow = config.follow_caller
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.encoding == "protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        otlp = OTLPSpanExporter(endpoint=config.endpoint, headers=config.headers or None)
        provider.add_span_processor(BatchSpanProcessor(otlp, max_queue_size=8192))
    else:
        from proxy.trace_export import JsonSpanExporter

        exporting = JsonSpanExporter(_endpoint(config), {**_env_headers(), **config.headers})
        provider.add_span_processor(
            BatchSpanProcessor(exporting, max_queue_size=16384, max_export_batch_size=2048)
        )
    _tracer = provider.get_tracer("meshgate")
    _api, _context = trace, context
    log.info("tracing on: %s of traces kept, service %s", f"{ratio:.0%}", name)
    return provider


# The request being served: (trace id, span id, trace flags, recording). Set for
# every request, sampled or not, in a context variable of its own: a request that
# is not sampled never touches OpenTelemetry's context (microseconds per request).
_active: ContextVar[tuple[int, int, int, bool] | None] = ContextVar("meshgate_trace", default=None)


async def serve_traced(scope, send, serve) -> None:
    """Run `serve(send)` as one request's server span (the caller's trace joined when
    a `traceparent` came with it); the response status recorded when sampled."""
    parent = caller = None
    for name, _ in scope["headers"]:
        if name == b"traceparent":  # a caller's trace: join it
            parent, caller = _caller(scope["headers"])
            break
    if caller is None or not _follow:  # the ratio decides, whatever the caller's flag
        trace_id = caller.trace_id if caller is not None else random.getrandbits(128)
        if trace_id & _LOW64 >= _bound:
            # not sampled: the ids travel on (traceparent, the access log), nothing records
            token = _active.set((trace_id, random.getrandbits(64), 0, False))
            try:
                return await serve(send)
            finally:
                _active.reset(token)
        if caller is not None:
            parent = _sampled(caller)  # the SDK follows the parent's flag: set it
    route = scope["path"]
    attributes = {"http.request.method": scope["method"], "url.path": route, "http.route": route,
                  "network.protocol.version": scope.get("http_version", "1.1")}  # fmt: skip
    span = _tracer.start_span(f"{scope['method']} {route}", context=parent,
                              kind=_api.SpanKind.SERVER, attributes=attributes)  # fmt: skip
    ids = span.get_span_context()
    recording = span.is_recording()
    token = _active.set((ids.trace_id, ids.span_id, int(ids.trace_flags), recording))
    attached = _context.attach(_api.set_span_in_context(span))
    try:
        if recording:
            send = recorded_status(span, send)
        await serve(send)
    finally:
        _context.detach(attached)
        _active.reset(token)
        span.end()


def _caller(headers) -> tuple[Any, Any]:
    """The context of a caller's `traceparent` and its span context; (None, None)
    when it is not a valid one (then the request is a root, sampled by the ratio)."""
    from opentelemetry import propagate

    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
               if k in (b"traceparent", b"tracestate")}  # fmt: skip
    parent = propagate.extract(carrier)
    caller = _api.get_current_span(parent).get_span_context()
    return (parent, caller) if caller.is_valid else (None, None)


def _sampled(caller) -> Any:
    """A context whose parent is the caller's span, marked sampled."""
    sampled = _api.SpanContext(caller.trace_id, caller.span_id, is_remote=True,
                               trace_flags=_api.TraceFlags(_api.TraceFlags.SAMPLED),
                               trace_state=caller.trace_state)  # fmt: skip
    return _api.set_span_in_context(_api.NonRecordingSpan(sampled))


def _endpoint(config: TracingConfig) -> str:
    if config.endpoint:
        return config.endpoint
    if traces := os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return traces
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    return base.rstrip("/") + "/v1/traces"


def _env_headers() -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_(TRACES_)HEADERS: `key=value,key=value`."""
    raw = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or os.environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    pairs = (item.partition("=") for item in raw.split(",") if "=" in item)
    return {k.strip(): v.strip() for k, _, v in pairs}


def recorded_status(span, send):
    """`send` that records the response's status code on `span`."""

    async def sending(message) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(_api.Status(_api.StatusCode.ERROR))
        await send(message)

    return sending


def _recording() -> bool:
    active = _active.get()
    return active is not None and active[3]


def span(name: str, attributes: dict[str, Any] | None = None, client: bool = False):
    """A child span of the current one; a shared do-nothing context when tracing is off
    or the request is not sampled."""
    if _tracer is None or not _recording():
        return _NOOP
    kind = _api.SpanKind.CLIENT if client else _api.SpanKind.INTERNAL
    return _tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def inject(headers: dict[str, str]) -> None:
    """Add `traceparent` (W3C trace context) of the current span to upstream headers:
    written here rather than by the propagators, which cost several microseconds."""
    active = _active.get() if _tracer is not None else None
    if active is None:
        return
    if not active[3]:  # not sampled: the request's own ids, flags 00
        headers["traceparent"] = f"00-{active[0]:032x}-{active[1]:016x}-00"
        return
    context = _api.get_current_span().get_span_context()  # the attempt's span
    headers["traceparent"] = (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    )
    # No tracestate: it would be the caller's, as it came, in a header to a provider
    # that is no party to the caller's tracing.


def trace_id() -> str | None:
    """The current trace's id (32 hex digits), for the access log; None when off."""
    active = _active.get() if _tracer is not None else None
    return f"{active[0]:032x}" if active is not None else None


_LOW64 = (1 << 64) - 1
_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}


class Attempt:
    """The span of one upstream attempt, current while the request is sent (so the
    adapter's headers carry its `traceparent`), ended when the answer has ended."""

    __slots__ = ("span", "token")

    def __init__(self, call, deployment, provider_type: str) -> None:
        operation = _OPERATIONS.get(call.endpoint, call.endpoint)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.system": provider_type,
            "gen_ai.provider.name": provider_type,
            "gen_ai.request.model": deployment.model,
            "meshgate.model": call.body.get("model", ""),
            "meshgate.deployment": deployment.name,
            "meshgate.attempt": call.attempts,
        }
        for key, name in (("max_tokens", "gen_ai.request.max_tokens"),
                          ("temperature", "gen_ai.request.temperature")):  # fmt: skip
            value = call.body.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attributes[name] = value
        self.span = _tracer.start_span(
            f"{operation} {deployment.model}", kind=_api.SpanKind.CLIENT, attributes=attributes
        )
        self.token: Any = _context.attach(_api.set_span_in_context(self.span))

    def sent(self) -> None:
        """The request is out: the span stops being the current one."""
        if self.token is not None:
            _context.detach(self.token)
            self.token = None

    def first_event(self, event, ttft_s: float) -> None:
        found: dict[str, Any] = {"gen_ai.response.time_to_first_chunk": ttft_s}
        data = event.json() if event is not None else None
        if isinstance(data, dict):
            _describe(data, found)
        self.span.set_attributes(found)

    def ended(self, reply=None, error: BaseException | None = None) -> None:
        self.sent()
        found: dict[str, Any] = {}
        if reply is not None:
            if reply.body is not None:
                try:
                    data = orjson.loads(reply.body)
                except ValueError:
                    data = None
                if isinstance(data, dict):
                    _describe(data, found)
                    if reply.usage is None:  # parsed once, here, for the gateway too
                        reply.usage = clean_usage(data.get("usage"))
            usage = reply.usage if reply.body is not None else reply.get_usage()
            if usage:
                for key, name in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                                  ("completion_tokens", "gen_ai.usage.output_tokens")):  # fmt: skip
                    if isinstance(usage.get(key), int):
                        found[name] = usage[key]
        if error is not None:
            found["error.type"] = getattr(error, "code", None) or type(error).__name__
            self.span.set_status(_api.Status(_api.StatusCode.ERROR))
        if found:
            self.span.set_attributes(found)
        self.span.end()


def _describe(data: dict, found: dict[str, Any]) -> None:
    """The response's id, model and finish reasons, from a body or a stream's event."""
    if isinstance(data.get("id"), str):
        found["gen_ai.response.id"] = data["id"]
    if isinstance(data.get("model"), str):
        found["gen_ai.response.model"] = data["model"]
    choices = data.get("choices")
    if isinstance(choices, list):
        reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
        reasons = [r for r in reasons if isinstance(r, str)]
        if reasons:
            found["gen_ai.response.finish_reasons"] = reasons


def attempt(call, deployment, provider_type: str) -> Attempt | None:
    """The span of an upstream attempt, in a sampled request."""
    if _tracer is None or not _recording():
        return None
    return Attempt(call, deployment, provider_type)
