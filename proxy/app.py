"""The Starlette app: routes, lifespan, and OpenAI-format errors for everything."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import logs, server, tracing
from proxy.admin import check_admin, check_metrics
from proxy.background import stop
from proxy.config import Config, load_config
from proxy.errors import (
    GatewayError,
    InternalError,
    MethodNotAllowed,
    RouteNotFound,
    StateError,
)
from proxy.gateway import Gateway, request_id_of
from proxy.metrics import FLUSH_S
from proxy.reload import Live, Reloader
from proxy.state import StateUnavailable

log = logging.getLogger("meshgate.app")

CONFIG_ENV = "MESHGATE_CONFIG"


class Endpoint:
    """A raw ASGI endpoint for one OpenAI route: no Request object on the hot path.
    The request is served by the gateway live when it arrives, to its end."""

    def __init__(self, live: Live, endpoint: str) -> None:
        self.live = live
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send) -> None:
        body = None
        if self.endpoint == "model":
            body = {"model": scope["path_params"]["model"]}
        elif self.endpoint == "models":
            body = {}
        gateway = self.live.gateway
        if not tracing.enabled():
            return await gateway.serve(self.endpoint, scope, receive, send, body)
        await tracing.serve_traced(
            scope, send, lambda out: gateway.serve(self.endpoint, scope, receive, out, body)
        )


class App(Starlette):
    """Starlette, with the model calls served straight from the ASGI call: their
    endpoints read the raw scope and render every error themselves (Gateway.serve),
    so the router and the two error middlewares would only add a frame to every
    request and every streamed event."""

    def __init__(self, *args, fast: dict[tuple[str, str], Endpoint], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fast = fast

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            endpoint = self.fast.get((scope["method"], scope["path"]))
            if endpoint is not None and not scope.get("root_path"):
                scope["app"] = self
                return await endpoint(scope, receive, send)
        await super().__call__(scope, receive, send)


def create_app(config: Config | None = None) -> Starlette:
    """Build the app; with no config, load the file named by $MESHGATE_CONFIG (or proxy.yaml)."""
    if config is None:
        config = load_config(os.environ.get(CONFIG_ENV, "proxy.yaml"))
    logs.configure(config.server.log_level, config.server.access_log)
    provider = tracing.setup(config.tracing)  # None when off: then nothing is installed
    gateway = Gateway(config)
    live = Live(gateway)
    reloader: Reloader | None = None
    m = gateway.metrics
    server.install(
        config.server.max_connections,
        {"accepted": m.connections_accepted.inc, "refused": m.connections_refused.inc,
         "reset": m.connections_reset.inc,
         "rejected": lambda code: m.http_rejected.labels(code).inc()},
        config.server.header_timeout_s,
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(server.loop_errors(gateway.metrics.accept_errors.inc))
        try:
            await gateway.start()
        except BaseException as exc:
            gateway.start_error = exc
            log.error("cannot start: %s", exc)
            await gateway.close()
            raise
        log.info("serving %d models from %s", len(gateway.catalog.models), config.source)
        nonlocal reloader
        if os.path.isfile(config.source):
            reloader = Reloader(live, config.source, config.server.reload_check_s)
            reloader.start()
        server.tune_gc()
        flusher = asyncio.create_task(m.flush_every(FLUSH_S))
        try:
            yield
        finally:
            if reloader is not None:
                await reloader.close()
            await live.gateway.close()
            await stop(flusher)
            m.flush()  # what the last calls counted, before the worker's files are left
            if provider is not None:
                tracing.shutdown(provider)  # sends the spans still queued

    async def health(request: Request) -> Response:
        return _identified(request, JSONResponse({"status": "ok"}))

    async def ready(request: Request) -> Response:
        if live.gateway.ready():
            return _identified(request, JSONResponse({"status": "ready"}))
        return _identified(request, JSONResponse({"status": "starting"}, status_code=503))

    async def metrics(request: Request) -> Response:
        gateway = live.gateway
        settings = gateway.config.server
        try:
            check_metrics(request.headers, settings.metrics_key, settings.admin_key,
                          settings.metrics_public)  # fmt: skip
        except GatewayError as exc:
            return _identified(request, _render(exc))
        body, content_type = gateway.metrics.render()
        return _identified(request, Response(body, media_type=content_type))

    fast: dict[tuple[str, str], Endpoint] = {}
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    for prefix in ("/v1", ""):  # some clients leave /v1 out of their base URL
        for name, path in (("chat", "chat/completions"), ("completions", "completions"),
                           ("embeddings", "embeddings")):  # fmt: skip
            fast["POST", f"{prefix}/{path}"] = Endpoint(live, name)
        routes += [
            Route(f"{prefix}/chat/completions", Endpoint(live, "chat"), methods=["POST"]),
            Route(f"{prefix}/completions", Endpoint(live, "completions"), methods=["POST"]),
            Route(f"{prefix}/embeddings", Endpoint(live, "embeddings"), methods=["POST"]),
            Route(f"{prefix}/models", Endpoint(live, "models"), methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", Endpoint(live, "model"), methods=["GET"]),
        ]
    methods = ["GET", "POST", "PUT", "DELETE"]
    routes.append(Route("/admin/{path:path}", _admin(live), methods=methods))
    app = App(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        fast=fast,
    )
    # Starlette would redirect /v1/models/ to /v1/models, with a Location built from
    # the client's own Host header: an open redirect. Unknown paths are 404s instead.
    app.router.redirect_slashes = False
    app.state.live = live
    return app


def _admin(live: Live):
    """/admin/<path>: the routes the live gateway's plugins registered, behind the
    admin key (looked up per request: a reload can bring other plugins)."""

    async def endpoint(request: Request) -> Response:
        gateway = live.gateway
        path = request.path_params["path"]
        try:
            check_admin(request.headers, gateway.admin_key)
            found = [r for r in gateway.admin_routes if r.path == path]
            if not found:
                raise RouteNotFound(f"Unknown request URL: {request.method} {request.url.path}.")
            allowed = [r for r in found if request.method in r.methods]
            if not allowed:
                raise MethodNotAllowed(
                    f"Method {request.method} is not allowed on {request.url.path}."
                )
            handler = allowed[0].handler
            response = Response(orjson.dumps(await handler(request)), media_type="application/json")
        except GatewayError as exc:
            response = _render(exc)
        except StateUnavailable as exc:  # Redis down or slow: the admin can retry
            response = _render(StateError(f"State is unavailable right now: {exc}"))
        return _identified(request, response)

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 404:
        error = RouteNotFound(f"Unknown request URL: {request.method} {request.url.path}.")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
    else:
        error = GatewayError(str(exc.detail))
        error.status = exc.status_code
    return _identified(request, _render(error, exc.headers))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _identified(
        request, _render(InternalError("The gateway failed to process this request."))
    )


def _identified(request: Request, response: Response) -> Response:
    """Every answer carries an `x-request-id`, as the model routes' do."""
    response.headers["x-request-id"] = request_id_of(request.headers)
    return response


def _render(error: GatewayError, headers=None) -> Response:
    merged = dict(headers or {})
    merged.update(error.headers)
    return Response(
        orjson.dumps(error.payload()),
        status_code=error.status,
        media_type="application/json",
        headers=merged,
    )
