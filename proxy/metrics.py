"""Prometheus metrics of the gateway's own traffic.

Each app gets its own registry. With several workers, hypercorn's processes
share nothing, so the CLI sets PROMETHEUS_MULTIPROC_DIR and `/metrics`
aggregates every worker's files. Counters counted on every call are tallied in
the process and written out every FLUSH_S (Tally).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FLUSH_S = 1.0  # how late another worker's /metrics may show a worker's tallies
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class PluginRegistry(CollectorRegistry):
    """The registry plugins register their metrics on: the gateway's, remembering what
    went through it, so a config reload that rebuilds the plugins can take their
    metrics out first (prometheus_client refuses a second metric of one name)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry
        self.collectors: list[Any] = []

    def register(self, collector) -> None:
        self.registry.register(collector)
        self.collectors.append(collector)

    def unregister(self, collector) -> None:
        self.registry.unregister(collector)
        self.collectors.remove(collector)

    def release(self) -> None:
        for collector in self.collectors:
            self.registry.unregister(collector)
        self.collectors.clear()


class Labelled:
    """A labelled metric whose children are looked up once per label values:
    prometheus_client's `labels()` checks its arguments and takes a lock on every
    call, a few microseconds each on the hot path. With `wrap`, each child is
    handed out wrapped (in a Tally, say)."""

    __slots__ = ("children", "metric", "wrap")

    def __init__(self, metric, wrap: Callable[[Any], Any] | None = None) -> None:
        self.metric = metric
        self.wrap = wrap
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str):
        child = self.children.get(values)
        if child is None:
            child = self.metric.labels(*values)
            if self.wrap is not None:
                child = self.wrap(child)
            self.children[values] = child
        return child


class Tally:
    """A counter (or a labelled counter's child) whose increments are added up here
    and handed to prometheus_client in one `inc` when flushed (Metrics.flush).

    In a worker, prometheus_client's `inc` takes a lock, asks the kernel for the
    process id and writes a memory-mapped file shared with the other workers; a
    counter counted on every call pays that every call. Tallying the counters of
    every call took the bare gateway to 99.2% of its instructions per request and
    the full pipeline to 98.7% (`python -m load.instructions --baseline e9f4a31`,
    one worker). Used from the event loop's thread only, like everything on the
    request path."""

    __slots__ = ("__weakref__", "child", "pending")

    def __init__(self, child) -> None:
        self.child = child
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:  # refused now, as prometheus_client would, not at the flush
            raise ValueError("a counter can only go up")
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self.child.inc(amount)

    def __del__(self) -> None:
        self.flush()  # a plugin's tally dropped with counts not yet handed on


class _Flush:
    """A collector that collects nothing: it flushes the tallies, and is registered
    first, so every collection of the registry reads what they counted."""

    def __init__(self, tallies: weakref.WeakSet[Tally]) -> None:
        self.tallies = tallies

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        for tally in list(self.tallies):
            tally.flush()
        return []


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tallies: weakref.WeakSet[Tally] = weakref.WeakSet()
        self._flush = _Flush(self.tallies)
        r.register(self._flush)
        self.requests = Counter(
            "meshgate_requests",
            "Requests answered, by model, deployment and status.",
            ["model", "deployment", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "meshgate_request_duration_seconds",
            "Time from request to the last byte sent.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "meshgate_time_to_first_token_seconds",
            "Streams: time from request to the first event sent.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "meshgate_upstream_duration_seconds",
            "Time spent waiting on the upstream, by deployment.",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "meshgate_overhead_seconds",
            "The gateway's own time: total minus time waiting on upstreams.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "meshgate_tokens",
            "Tokens reported by upstreams, by kind (prompt, completion).",
            ["model", "deployment", "kind"],
            registry=r,
        )
        self.state_errors = Counter(
            "meshgate_state_errors",
            "Decisions taken because the state backend was unavailable, by plugin.",
            ["plugin", "decision"],
            registry=r,
        )
        self.state_dropped = Counter(
            "meshgate_state_dropped_operations",
            "State operations refused for values that cannot be counted, dropped not retried.",
            registry=r,
        )
        self.connections_refused = Counter(
            "meshgate_connections_refused",
            "Client connections refused with a 503 at server.max_connections.",
            registry=r,
        )
        self.connections_accepted = Counter(
            "meshgate_connections_accepted",
            "Client connections accepted (and served, up to server.max_connections).",
            registry=r,
        )
        self.connections_reset = Counter(
            "meshgate_connections_reset",
            "Client connections broken off by the client (reset, read error).",
            registry=r,
        )
        self.http_rejected = Counter(
            "meshgate_http_rejected",
            "Requests the HTTP layer refused before the gateway read them, by error code "
            "(bad_request, request_header_fields_too_large, request_timeout, "
            "ambiguous_framing, not_implemented).",
            ["code"],
            registry=r,
        )
        self.accept_errors = Counter(
            "meshgate_accept_errors",
            "Times accepting connections failed (out of file descriptors).",
            registry=r,
        )
        self.cost = Counter(
            "meshgate_cost_usd",
            "Cost of answered calls in USD (usage times the deployment's price).",
            ["key", "team", "model", "deployment"],
            registry=r,
        )
        self.in_flight = Gauge(
            "meshgate_in_flight_requests",
            "Requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_wait = Histogram(
            "meshgate_upstream_pool_wait_seconds",
            "Waits for a free upstream connection (calls that found one free are not here).",
            ["provider"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.pool_waiters = Gauge(
            "meshgate_upstream_pool_waiters",
            "Calls waiting for a free upstream connection now.",
            ["provider"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_timeouts = Counter(
            "meshgate_upstream_pool_timeouts",
            "Calls refused with 503 upstream_pool_exhausted after pool_timeout_s.",
            ["provider"],
            registry=r,
        )
        self.config_info = Gauge(
            "meshgate_config_info",
            "1 for the config being served, labelled with its hash (sha256, 12 hex digits).",
            ["hash"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.config_reloads = Counter(
            "meshgate_config_reloads",
            "Config reloads (SIGHUP or a changed file), by result: applied or rejected.",
            ["result"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "meshgate_breaker_open",
            "1 while a deployment's circuit breaker is open (or half-open), else 0.",
            ["deployment"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.breaker_opened = Counter(
            "meshgate_breaker_opened",
            "Times a deployment's circuit breaker opened.",
            ["deployment"],
            registry=r,
        )
        # The per-request metrics' children, for the hot path.
        self.requests_of = Labelled(self.requests, self.tally)
        self.duration_of = Labelled(self.duration)
        self.ttft_of = Labelled(self.ttft)
        self.upstream_of = Labelled(self.upstream)
        self.tokens_of = Labelled(self.tokens, self.tally)
        self.cost_of = Labelled(self.cost, self.tally)

    def tally(self, child) -> Tally:
        """`child` (a counter) counted through a Tally this registry flushes."""
        tally = Tally(child)
        self.tallies.add(tally)
        return tally

    def flush(self) -> None:
        """Hand what the tallies counted to their counters (and so to the files the
        other workers render from)."""
        self._flush.collect()

    async def flush_every(self, seconds: float) -> None:
        """Flush every `seconds`, so another worker's /metrics is at most that late."""
        while True:
            await asyncio.sleep(seconds)
            self.flush()

    def render(self) -> tuple[bytes, str]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.flush()  # this worker's counts; the others flush on their own
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
