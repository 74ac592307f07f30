"""What a plugin is given when the chain is built: `Plugin(config, context)`.

A plugin reads the gateway through its context and acts on it only through the
context's methods; nothing writes into the gateway, and the core keeps no slot
for any particular plugin. See docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from starlette.requests import Request

    from proxy.catalog import Catalog
    from proxy.config import Config
    from proxy.health import Health
    from proxy.metrics import Metrics
    from proxy.pipeline import Call, Reply
    from proxy.state import State


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginContext:
    config: Config  # the whole config, read-only: providers, state settings, models
    catalog: Catalog  # the models and their deployments
    state: State  # counters shared by every worker (memory or Redis)
    health: Health  # which deployments may be tried now (breakers, health checks)
    metrics: Metrics  # the gateway's own metrics (e.g. state_errors, labelled by plugin)
    registry: CollectorRegistry  # where a plugin registers metrics of its own
    # `add_admin_route(path, methods, handler)`: serve `handler` at /admin/<path>,
    # behind the admin key (server.admin_key); it returns a JSON-able value.
    add_admin_route: Callable[[str, tuple[str, ...], Callable[[Request], Awaitable[Any]]], None]
    # `await call(Call(...))`: a model call through the whole chain, as a client's
    # would go (auth keeps an identity the caller set; quotas count it; it is
    # accounted in metrics and the access log). Buffered only; the Reply comes
    # back finished, its body still readable.
    call: Callable[[Call], Awaitable[Reply]]
    workers: int = 1  # worker processes serving this config on this host
