"""A request's life: read and check it, run it through the plugin chain to an
upstream, send the answer (buffered or streamed), and account for it."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import re
import time
from typing import Any

from proxy import logs, tracing
from proxy.admin import AdminRoute
from proxy.asgi import (
    ClientDisconnected,
    RequestHeaders,
    ResponseFields,
    accepts_gzip,
    gzipped,
    read_body,
    send_bytes,
    send_error,
    watch_disconnect,
)
from proxy.catalog import Catalog
from proxy.choice import Chooser
from proxy.config import Config, PluginSpec, SettingError
from proxy.context import PluginContext
from proxy.errors import (
    GatewayError,
    InternalError,
    ModelNotFound,
    ShuttingDown,
    UpstreamPoolExhausted,
    UpstreamUnavailable,
    from_upstream_body,
)
from proxy.health import Health, check_url
from proxy.metrics import Metrics, PluginRegistry
from proxy.pipeline import (
    Call,
    Plugin,
    Reply,
    build_chain,
    finish_call,
    keep,
    permitted,
    refuse,
)
from proxy.protocol import clean_usage, parse_request
from proxy.registry import plugin_class
from proxy.server import default_max_connections
from proxy.sse import Event
from proxy.state import State, create_state
from proxy.upstream import adapter_class
from proxy.upstream.base import Upstream, provider_headers
from proxy.upstream.pool import Pool

log = logging.getLogger("meshgate.gateway")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
CLIENT_CLOSED = 499  # nginx's convention for "the client went away"


class Gateway:
    """Everything one worker needs to serve: models, upstreams, the plugin chain, metrics."""

    metrics: Metrics
    state: State
    health: Health
    plugins: list[Plugin]
    specs: list[tuple[str, Any]]

    def __init__(self, config: Config, previous: Gateway | None = None) -> None:
        """With `previous` (a config reload), what its config did not change is taken
        over rather than made again: upstream clients and their connection pools,
        the state backend, deployment health (breakers), the plugins, the metrics."""
        self.config = config
        self.catalog = Catalog(config)
        old = previous.config if previous is not None else None
        self.upstreams: dict[str, Upstream] = {}
        self.pools: dict[str, Pool] = {}
        self.metrics = previous.metrics if previous is not None else Metrics()
        for name, p in config.providers.items():
            if previous is not None and old is not None and old.providers.get(name) == p:
                self.upstreams[name] = previous.upstreams[name]
                if old.server.max_connections == config.server.max_connections:
                    self.pools[name] = previous.pools[name]
            if name not in self.upstreams:
                self.upstreams[name] = adapter_class(p.type)(name, p)
            if name not in self.pools:
                self.pools[name] = self._pool(name, p)
        same_world = old is not None and (old.state, old.health, old.providers, old.models) == (
            config.state,
            config.health,
            config.providers,
            config.models,
        )
        if previous is not None and old is not None and old.state == config.state:
            self.state = previous.state
        else:
            self.state = create_state(config.state)
            self.state.on_dropped = self.metrics.state_dropped.inc
        if previous is not None and same_world:
            self.health = previous.health
        else:
            names = [d.name for m in self.catalog.models.values() for d in m.deployments]
            self.health = Health(config.health, state=self.state, probes=_probes(config),
                                 names=names)  # fmt: skip
            self.health.on_breaker = self._breaker_changed
        self.chooser = Chooser(
            self.health, self.state, lambda d, call: self.upstreams[d.provider].refusal(call)
        )
        self.admin_key = config.server.admin_key
        self.admin_routes: list[AdminRoute] = []  # plugins add theirs through the context
        self.registry = PluginRegistry(self.metrics.registry)
        self.context = PluginContext(
            config=config,
            catalog=self.catalog,
            state=self.state,
            health=self.health,
            metrics=self.metrics,
            registry=self.registry,
            add_admin_route=lambda path, methods, handler: self.admin_routes.append(
                AdminRoute(path, tuple(methods), handler)
            ),
            call=self.run,
            # `meshgate serve` says how many workers it started (proxy/cli.py)
            workers=int(os.environ.get("MESHGATE_WORKERS") or 1),
        )
        specs = [(s.name, s.config) for s in config.pipeline]
        if previous is not None and same_world and specs == previous.specs:
            self.plugins, self.admin_routes = previous.plugins, previous.admin_routes
        else:
            if previous is not None:  # its plugins' metrics make way for the new ones'
                previous.registry.release()
            self.plugins = [self._plugin(i, spec) for i, spec in enumerate(config.pipeline)]
        self.specs = specs
        self.active = 0  # requests being served by this gateway (a reload waits on them)
        self.handler = build_chain(self.plugins, self.dispatch)
        self.max_body_bytes = config.server.max_body_bytes
        self.body_timeout_s = config.server.body_timeout_s
        self.gzip_min_bytes = config.server.gzip_min_bytes
        self.started = False
        self.start_error: BaseException | None = None  # why start() failed, for the CLI

    def _breaker_changed(self, name: str, is_open: bool) -> None:
        self.metrics.breaker_open.labels(name).set(1 if is_open else 0)
        if is_open:
            self.metrics.breaker_opened.labels(name).inc()

    def _pool(self, name: str, provider) -> Pool:
        """The bound on calls in flight to one provider (proxy/upstream/pool.py)."""
        at = ("providers", name)
        if provider.max_connections is not None and provider.max_connections < 1:
            raise self.config.error((*at, "max_connections"), "must be at least 1")
        if not provider.pool_timeout_s > 0:
            raise self.config.error((*at, "pool_timeout_s"), "must be positive")
        limit = provider.max_connections or self.config.server.max_connections
        waiters = self.metrics.pool_waiters.labels(name)
        return Pool(name, limit or default_max_connections(), provider.pool_timeout_s,
                    on_change=waiters.set)  # fmt: skip

    def _plugin(self, i: int, spec: PluginSpec) -> Plugin:
        """Build one pipeline entry; a setting it refuses is a ConfigError at its key."""
        at = ("pipeline", i, spec.name)
        try:
            return plugin_class(spec.name)(spec.config, self.context)
        except SettingError as exc:
            raise self.config.error(at + exc.key, str(exc)) from None
        except ValueError as exc:
            raise self.config.error(at, str(exc)) from None

    def parts(self) -> list:
        """What this gateway runs: each is started once and closed once."""
        return [self.state, self.health, *self.upstreams.values(), *self.plugins]

    async def start(self, previous: Gateway | None = None) -> None:
        """Start what is new; what was taken over from `previous` is running already."""
        running = {id(p) for p in previous.parts()} if previous is not None else set()
        for part in self.parts():
            if id(part) not in running and hasattr(part, "start"):
                await part.start()
        for name, missing in self.config.missing_secrets().items():
            log.warning(
                "provider '%s' is not usable: environment variable %s is not set",
                name,
                ", ".join(missing),
            )
        self.started = True

    async def close(self, successor: Gateway | None = None) -> None:
        """Close what this gateway runs, but what `successor` took over from it."""
        kept = {id(p) for p in successor.parts()} if successor is not None else set()
        for part in reversed(self.parts()):
            if id(part) not in kept and hasattr(part, "close"):
                await part.close()

    def ready(self) -> bool:
        return self.started and all(p.ready() for p in self.plugins if hasattr(p, "ready"))

    async def dispatch(self, call: Call) -> Reply:
        """The chain's innermost step, run once per attempt: answer from the catalog,
        or choose a deployment (proxy/choice.py) and call its upstream. The outcome
        is recorded in deployment health; a stream has answered once its first
        event arrives, so one that fails before that is an error fallback can retry."""
        if call.endpoint == "models":
            return Reply.json(self.list_models(call))
        if call.endpoint == "model":
            model = self.catalog.get(call.body["model"])
            if not permitted(call.identity, model):
                raise ModelNotFound(call.body["model"])
            return Reply.json(model.card())
        if call.model is None:
            call.model = self.catalog.get(call.body["model"])
        if not permitted(call.identity, call.model):
            raise refuse(call.identity, call.model)
        if len(call.model.deployments) == 1:  # nothing to decide: no span for it
            deployment = await self.chooser.choose(call)
        else:
            with tracing.span("meshgate.route", {"meshgate.model": call.model.name}) as decided:
                deployment = await self.chooser.choose(call)
                if decided is not None:
                    decided.set_attribute("meshgate.deployment", deployment.name)
        call.attempts += 1
        deployment.in_flight += 1
        pool = self.pools[deployment.provider]
        upstream = self.upstreams[deployment.provider]
        held = False
        started = 0.0
        reply: Reply | None = None
        traced = tracing.attempt(call, deployment, upstream.config.type)
        traced_by_reply = False
        try:
            if waited := await pool.acquire():
                call.pool_wait_s += waited
                self.metrics.pool_wait.labels(pool.provider).observe(waited)
            held = True
            started = time.perf_counter()
            reply = await upstream.send(call, deployment.model)
            reply.deployment = deployment
            keep(call, reply)
            if reply.events is not None:
                reply.owns(deployment.leave).owns(pool.release)  # held while it streams
                first = await _opening(reply)
                if traced is not None:
                    traced.first_event(first, time.perf_counter() - started)
                    reply.owns(functools.partial(traced.ended, reply))  # at the stream's end
                    traced_by_reply = True
            elif traced is not None:
                traced.ended(reply)
            if traced is not None:
                traced.sent()
        except BaseException as exc:
            if traced is not None and not traced_by_reply:
                traced.ended(error=exc)
            if held:
                call.upstream_s += time.perf_counter() - started
            if reply is not None and reply.events is not None:
                await reply.aclose()  # gives the in-flight count and the slot back
            else:
                deployment.in_flight -= 1
                if held:
                    pool.release()
            call.failed[deployment.name] = time.monotonic()
            self.chooser.settle(call.reserved, None)
            call.reserved = None
            if isinstance(exc, UpstreamPoolExhausted):
                self.metrics.pool_timeouts.labels(pool.provider).inc()
            elif isinstance(exc, GatewayError):
                await self.health.record(deployment.name, exc)
            raise
        waited = time.perf_counter() - started
        call.upstream_s += waited
        deployment.observe(waited)  # the whole call, or a stream's first event
        if reply.events is None:
            deployment.in_flight -= 1
            pool.release()
        else:
            reply.wrap_events(lambda events: _timed(events, call))
        if call.reserved is not None:
            reserved, call.reserved = call.reserved, None
            reply.on_complete(lambda r: self.chooser.settle(reserved, r))
        await self.health.record(deployment.name, None)
        return reply

    async def run(self, call: Call) -> Reply:
        """A model call made inside the gateway (by a plugin, a batch runner): through
        the whole chain and accounted like a client's. Buffered; the Reply comes back
        finished, with its body."""
        if call.stream:
            raise ValueError("calls made inside the gateway are buffered: no stream")
        started = time.perf_counter()
        outcome = _Outcome()
        reply: Reply | None = None
        try:
            if call.model is None and "model" in call.body:
                call.model = self.catalog.find(call.body["model"])
            reply = await self.handler(call)
            outcome.status, outcome.completed = reply.status, True
            return reply
        except GatewayError as exc:
            outcome.status, outcome.error = exc.status, exc.code or exc.type
            raise
        finally:
            self._account(call.endpoint, call, reply, call.request_id, started, outcome)
            await finish_call(call, reply, outcome.completed)

    def list_models(self, call: Call) -> dict:
        cards = [m.card() for m in self.catalog.models.values() if permitted(call.identity, m)]
        return {"object": "list", "data": cards}

    async def serve(self, endpoint: str, scope, receive, send, body: dict | None = None) -> None:
        """Serve one request to `endpoint`; `body` is given for GET routes."""
        started = time.perf_counter()
        headers = RequestHeaders(scope=scope)
        request_id = request_id_of(headers)
        self.metrics.in_flight.inc()
        self.active += 1
        call: Call | None = None
        reply: Reply | None = None
        outcome = _Outcome()
        task = asyncio.current_task()
        assert task is not None  # a request is served in a task
        gone: list = []
        watcher = None
        try:
            if body is None:
                raw = await read_body(
                    receive, headers.get("content-length"), self.max_body_bytes, self.body_timeout_s
                )
                body = parse_request(endpoint, raw)
            watcher = asyncio.ensure_future(watch_disconnect(receive, task, gone))
            call = Call(endpoint, body, headers, request_id)
            if "model" in body:
                call.model = self.catalog.find(body["model"])
            wants_usage = call.wants_usage
            reply = await self.handler(call)
            if reply.streamed:
                await self._send_stream(send, call, reply, wants_usage, started, outcome)
            else:
                assert reply.body is not None  # a reply has a body or events
                answer, out = reply.body, self._headers(call, reply, started)
                if self.gzip_min_bytes is not None and len(answer) >= self.gzip_min_bytes:
                    if accepts_gzip(call.headers.get("accept-encoding")):
                        answer = gzipped(answer, out)
                await send_bytes(send, reply.status, answer, out)
                outcome.status = reply.status
                outcome.completed = True
        except GatewayError as exc:
            await self._fail(send, exc, call, request_id, started, outcome)
        except ClientDisconnected:
            outcome.status = CLIENT_CLOSED
        except asyncio.CancelledError:
            if not gone:  # the server is stopping and graceful_timeout_s is over
                cut = ShuttingDown("The gateway is shutting down; this answer was cut short.")
                await self._fail(send, cut, call, request_id, started, outcome)
                raise
            task.uncancel()
            outcome.status = CLIENT_CLOSED
        except Exception:
            log.exception("request %s failed", request_id)
            error = InternalError("The gateway failed to process this request.")
            await self._fail(send, error, call, request_id, started, outcome)
        finally:
            if watcher is not None:
                watcher.cancel()
            if reply is not None:
                await reply.aclose()
            self.metrics.in_flight.dec()
            self.active -= 1
            self._account(endpoint, call, reply, request_id, started, outcome)
            if call is not None:
                await finish_call(call, reply, outcome.completed)

    async def _send_stream(self, send, call, reply, wants_usage, started, outcome) -> None:
        event = await reply.next_event()  # an error before the first event is an ordinary error
        if event is not None:
            event.json()  # a malformed first event is a 502, not a 200 stream of garbage
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": ResponseFields(self._headers(call, reply, started, stream=True)),
            }
        )
        outcome.status = reply.status
        outcome.headers_sent = True
        outcome.ttft_s = time.perf_counter() - started
        while event is not None:
            if event.raw.startswith(ERROR_EVENT):  # the upstream failed mid-stream: its
                _raise_error_event(event)  # error, in OpenAI's format, ends the stream
            if event.has_usage():
                data = event.json()
                usage = clean_usage(data.get("usage")) if isinstance(data, dict) else None
                if usage is not None:
                    reply.usage = usage
                if not wants_usage and isinstance(data, dict) and not data.get("choices"):
                    event = await reply.next_event()
                    continue
            await send({"type": "http.response.body", "body": event.raw, "more_body": True})
            event = await reply.next_event()
        await send({"type": "http.response.body", "body": b""})
        outcome.completed = True

    async def _fail(self, send, error: GatewayError, call, request_id, started, outcome) -> None:
        outcome.status = error.status
        outcome.error = error.code or error.type
        if outcome.headers_sent:
            # Headers are gone: the client gets one error event and a clean close.
            # Metrics and the access log keep the error's status, not the wire's 200.
            body = Event.of(error.payload()).raw
            await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = {"x-request-id": request_id}
        headers["x-meshgate-overhead-ms"] = _ms(_overhead(call, started))
        await send_error(send, error, headers)

    def _headers(
        self, call: Call, reply: Reply, started: float, stream: bool = False
    ) -> dict[str, str]:
        headers = {
            "content-type": "text/event-stream" if stream else "application/json",
            "x-request-id": call.request_id,
            "x-meshgate-overhead-ms": _ms(_overhead(call, started)),
        }
        if stream:
            headers["cache-control"] = "no-cache"
            headers["x-accel-buffering"] = "no"  # tell nginx in front not to buffer
        if reply.deployment is not None:
            headers["x-meshgate-deployment"] = reply.deployment.name
            cost = call.cost() if not stream else None
            if cost is not None:
                headers["x-meshgate-cost-usd"] = f"{cost:.8f}"
        if reply.headers:
            headers.update(reply.headers)
        return headers

    def _account(self, endpoint, call, reply, request_id, started, outcome) -> None:
        total = time.perf_counter() - started
        m = self.metrics
        model = call.model.name if call is not None and call.model is not None else ""
        deployment = call.deployment.name if call is not None and call.deployment else ""
        m.requests_of(model, deployment, str(outcome.status)).inc()
        identity = call.identity if call is not None else None
        if endpoint in ("models", "model"):
            return
        m.duration_of(model).observe(total)
        waits = (call.upstream_s + call.pool_wait_s) if call is not None else 0.0
        overhead = max(0.0, total - waits)
        m.overhead.observe(overhead)
        if outcome.ttft_s is not None:
            m.ttft_of(model).observe(outcome.ttft_s)
        if deployment:
            m.upstream_of(deployment).observe(call.upstream_s)
        prompt = completion = cost = None
        for answer in _answers(call, reply):
            # The answer sent, and any other the chain produced for this call (a
            # verify plugin's repairs and candidates): each is paid for.
            name = answer.deployment.name if answer.deployment else deployment
            usage = answer.get_usage()
            if usage:
                p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
                if isinstance(p, int):
                    m.tokens_of(model, name, "prompt").inc(p)
                    prompt = (prompt or 0) + p
                if isinstance(c, int):
                    m.tokens_of(model, name, "completion").inc(c)
                    completion = (completion or 0) + c
            spent = answer.compute_cost()
            if spent is not None:
                cost = (cost or 0.0) + spent
                if spent:
                    m.cost_of(
                        identity.name if identity else "",
                        (identity.team or "") if identity else "", model, name,
                    ).inc(spent)  # fmt: skip
        fields: dict[str, Any] = {
            "request_id": request_id,
            "endpoint": endpoint,
            "key": identity.name if identity else None,
            "team": identity.team if identity else None,
            "model": model or (call.body.get("model") if call is not None else None),
            "deployment": deployment or None,
            "stream": call.stream if call is not None else None,
            "status": outcome.status,
            "latency_ms": round(total * 1000, 2),
            "overhead_ms": round(overhead * 1000, 3),
            "pool_wait_ms": round(call.pool_wait_s * 1000, 2) if call is not None else None,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cost_usd": round(cost, 8) if cost is not None else None,
        }
        if outcome.ttft_s is not None:
            fields["ttft_ms"] = round(outcome.ttft_s * 1000, 2)
        if (trace_id := tracing.trace_id()) is not None:
            fields["trace_id"] = trace_id
        if reply is not None and "x-meshgate-cache" in reply.headers:
            fields["cache"] = reply.headers["x-meshgate-cache"]
        if outcome.error:
            fields["error"] = outcome.error
        if call is not None and call.attempts > 1:
            fields["attempts"] = call.attempts
        logs.access_line(fields)


def _answers(call: Call | None, reply: Reply | None) -> list[Reply]:
    """The reply sent and every other reply the chain produced for the call, once each."""
    answers = [reply] if reply is not None else []
    if call is not None:
        answers += [r for r in call.replies if r is not reply and r.deployment is not None]
    return answers


def request_id_of(headers) -> str:
    """The client's `x-request-id` when it is a sane one, else a new unique id."""
    given = headers.get("x-request-id")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return f"{random.getrandbits(96):024x}"  # unique, not secret: no syscall


async def _timed(events, call: Call):
    """Count the wait for each event of a stream as upstream time, whatever the
    adapter: the one place streams are timed (the first event, awaited in
    dispatch, is counted there)."""
    try:
        waited = time.perf_counter()
        async for event in events:
            call.upstream_s += time.perf_counter() - waited
            yield event
            waited = time.perf_counter()
    finally:
        await events.aclose()


ERROR_EVENT = (b'data: {"error"', b'data:{"error"')  # how upstreams start one


def _raise_error_event(event: Event) -> None:
    """Raise the error an upstream's error event says, if it is one (a 502 with its
    message, type, param and code, nothing else of it)."""
    data = event.json()
    if isinstance(data, dict) and data.get("error") is not None and not data.get("choices"):
        error = from_upstream_body(502, event.data, {})
        error.type = "upstream_error"  # a 502: the upstream failed, whatever it called it
        raise error


async def _opening(reply: Reply) -> Event:
    """Wait for a stream's first event; raise if the stream fails, ends, or opens with
    an error or something that is not JSON, before anything reached the client.
    Comments before it (an upstream's keep-alives) are dropped: the answer has not
    begun, so they neither commit it (fallback could no longer retry) nor time it."""
    first = await reply.peek()
    while first is not None and not first.raw.startswith(b"data") and not first.data:
        await reply.next_event()
        first = await reply.peek()
    if first is None:
        raise UpstreamUnavailable("the upstream ended the stream before any event")
    data = first.json()  # a GatewayError when it is not JSON
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        _raise_error_event(first)
    return first


def _probes(config: Config) -> dict[str, tuple[str, dict[str, str], list[str]]]:
    """Each health-checked provider: its check URL, the headers its calls carry (a
    server behind a key answers a check without it with 401) and its deployments'
    names."""
    checks = config.health.checks
    return {
        provider: (
            check_url(config.providers[provider], provider),
            provider_headers(config.providers[provider]),
            [d.label for m in config.models for d in m.deployments if d.provider == provider],
        )
        for provider in (checks.providers if checks else [])
    }


class _Outcome:
    __slots__ = ("completed", "error", "headers_sent", "status", "ttft_s")

    def __init__(self) -> None:
        self.status = 500
        self.completed = False
        self.headers_sent = False
        self.ttft_s: float | None = None
        self.error: str | None = None


def _overhead(call: Call | None, started: float) -> float:
    spent = time.perf_counter() - started
    return max(0.0, spent - ((call.upstream_s + call.pool_wait_s) if call is not None else 0.0))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"
