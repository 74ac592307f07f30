"""Deployment health: the core's one view of which deployments may be tried now.

    health:
      breaker: {failures: 5, window_s: 60, cooldown_s: 30}
      sync_s: 1                 # with Redis: how often each replica reads the shared breakers
      checks:                   # active checks of local backends (vLLM, TGI, Ollama)
        providers: [local-vllm]
        interval_s: 10
        timeout_s: 2

The gateway records the outcome of every attempt here (`record`), whichever
plugins are configured; the deployment choice (proxy/choice.py) skips what is
not healthy; routing and fallback read it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import httpx

from proxy.background import stop
from proxy.errors import (
    GatewayError,
    ProviderNotConfigured,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.state import StateUnavailable

if TYPE_CHECKING:
    from proxy.state import State

log = logging.getLogger("meshgate.health")

Failure = Literal["rate_limit", "server_error", "timeout", "unavailable"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    failures: int = 5  # failures within window_s that open the breaker
    window_s: float = 60.0
    cooldown_s: float = 30.0  # open this long, then one probe decides

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError("failures must be at least 1")
        if min(self.window_s, self.cooldown_s) <= 0:
            raise ValueError("window_s and cooldown_s must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChecksConfig:
    providers: list[str]  # openai-type servers are asked for /models, tgi for /health
    interval_s: float = 10.0
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if min(self.interval_s, self.timeout_s) <= 0:
            raise ValueError("interval_s and timeout_s must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    sync_s: float = 1.0  # with Redis: how often each replica reads the shared breakers
    checks: ChecksConfig | None = None

    def __post_init__(self) -> None:
        if self.sync_s <= 0:
            raise ValueError("sync_s must be positive")


def classify(error: GatewayError) -> Failure | None:
    """What kind of upstream failure `error` is, or None when it is not one (the
    client's mistake, the gateway's own refusal): the one place that decides
    what counts against a deployment and what fallback may retry."""
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, (UpstreamUnavailable, ProviderNotConfigured)):
        return "unavailable"
    if isinstance(error, UpstreamStatus):
        if error.status == 429:
            return "rate_limit"
        if error.status >= 500:
            return "server_error"
    return None


def check_url(provider_config, name: str) -> str:
    """Where a provider's active health check asks; ValueError for a type without one."""
    if provider_config.type == "openai":
        return str(provider_config.base_url).rstrip("/") + "/models"
    if provider_config.type == "tgi":
        return str(provider_config.base_url).rstrip("/") + "/health"
    raise ValueError(f"health checks need an openai or tgi provider, not {provider_config.type}")


class Health:
    """Which deployments may be tried now. Per deployment, a circuit breaker
    (closed; open for a cooldown; then half-open for one probe whose outcome closes
    or reopens it), breakers opened by other replicas, and failed health checks.

    `probes` maps a provider to its check URL, headers and its deployments' names;
    `state`, when shared (Redis), carries breakers to every replica."""

    def __init__(
        self,
        config: HealthConfig | None = None,
        *,
        state: State | None = None,
        probes: dict[str, tuple[str, dict[str, str], list[str]]] | None = None,
        names: list[str] | None = None,
        clock=time.monotonic,
    ) -> None:
        self.config = config or HealthConfig()
        self.state = state
        self.probes = probes or {}
        self.names = names or []  # every deployment, for the breaker sync
        self.clock = clock
        self.failures: dict[str, deque[float]] = {}
        self.open_until: dict[str, float] = {}
        self.probing: set[str] = set()
        self.remote_until: dict[str, float] = {}  # opened by any replica, as last synced
        self.down: set[str] = set()  # failing their active health check
        self._tasks: list[asyncio.Task] = []
        # on_breaker(name, is_open): a breaker opened (here or, seen through the
        # state, by another replica) or closed; for the metrics
        self.on_breaker: Callable[[str, bool], None] | None = None

    @property
    def shared(self) -> State | None:
        """The state that carries breakers to every replica; None with one process."""
        state = self.state
        return state if state is not None and state.config.shared else None

    async def start(self) -> None:
        if self.shared:
            self._tasks.append(asyncio.create_task(self._sync_forever()))
        if self.probes:
            self._tasks.append(asyncio.create_task(self._check_forever()))

    async def close(self) -> None:
        for task in self._tasks:
            await stop(task)
        self._tasks.clear()

    def allows(self, name: str) -> bool:
        """Whether `name` may take an attempt now; a half-open breaker lets one through."""
        if self.is_open(name):
            return False
        if name in self.open_until:
            self.probing.add(name)  # half-open: this caller is the probe
        return True

    def is_open(self, name: str) -> bool:
        remote = self.remote_until.get(name)  # the clock read only when there is one
        if name in self.down or (remote is not None and self.clock() < remote):
            return True
        until = self.open_until.get(name)
        return until is not None and (self.clock() < until or name in self.probing)

    async def record(self, name: str, error: GatewayError | None) -> None:
        """The outcome of one attempt on `name`: a success, or an error that counts
        against it when it is an upstream failure."""
        if error is None:
            await self.succeeded(name)
        elif classify(error) is not None:
            await self.failed(name)

    async def failed(self, name: str) -> None:
        self.failure(name)
        state = self.shared
        if state is None:
            return
        b = self.config.breaker
        try:
            if await state.breaker_failure(name, b.failures, b.window_s, b.cooldown_s):
                self.remote_until[name] = self.clock() + b.cooldown_s
                self._changed(name, True)
                log.warning("circuit breaker for %s opened for every replica", name)
        except StateUnavailable as exc:  # the local breaker stands
            log.warning("could not share a failure of %s: %s", name, exc)

    async def succeeded(self, name: str) -> None:
        troubled = name in self.open_until or name in self.remote_until
        self.success(name)
        state = self.shared
        if troubled and state is not None:
            try:
                await state.breaker_close(name)
            except StateUnavailable as exc:
                log.warning("could not share the recovery of %s: %s", name, exc)

    def success(self, name: str) -> None:
        if name in self.open_until or name in self.remote_until:
            log.info("circuit breaker for %s closed", name)
            self._changed(name, False)
        self.open_until.pop(name, None)
        self.remote_until.pop(name, None)
        self.probing.discard(name)
        self.failures.pop(name, None)

    def failure(self, name: str) -> None:
        now = self.clock()
        config = self.config.breaker
        if name in self.probing:  # the probe failed: open again
            self.probing.discard(name)
            self.open_until[name] = now + config.cooldown_s
            self._changed(name, True)
            return
        recent = self.failures.setdefault(name, deque())
        recent.append(now)
        while recent and recent[0] < now - config.window_s:
            recent.popleft()
        if len(recent) >= config.failures and name not in self.open_until:
            self.open_until[name] = now + config.cooldown_s
            recent.clear()
            log.warning("circuit breaker for %s opened for %gs", name, config.cooldown_s)
            self._changed(name, True)

    def _changed(self, name: str, is_open: bool) -> None:
        if self.on_breaker is not None:
            self.on_breaker(name, is_open)

    async def _sync_forever(self) -> None:
        """Keep this replica's view of breakers opened by any replica fresh."""
        state = self.shared
        assert state is not None
        while True:
            try:
                remaining = await state.breakers_open(self.names)
            except StateUnavailable as exc:
                log.debug("breaker sync skipped: %s", exc)
            else:
                now = self.clock()
                self.remote_until = {n: now + s for n, s in (remaining or {}).items()}
            await asyncio.sleep(self.config.sync_s)

    async def _check_forever(self) -> None:
        """Probe local backends; while a probe fails its deployments are skipped."""
        checks = self.config.checks
        assert checks is not None
        async with httpx.AsyncClient(timeout=checks.timeout_s) as client:
            while True:
                await asyncio.gather(*(self._check(client, p) for p in self.probes))
                await asyncio.sleep(checks.interval_s)

    async def _check(self, client: httpx.AsyncClient, provider: str) -> None:
        """One probe, `timeout_s` at most as a whole; its status is read, never its body:
        a backend that answers a byte at a time, or without end, only fails its check."""
        url, headers, deployments = self.probes[provider]
        assert self.config.checks is not None
        try:
            async with asyncio.timeout(self.config.checks.timeout_s):
                async with client.stream("GET", url, headers=headers) as response:
                    healthy = response.status_code < 400
        except (httpx.HTTPError, TimeoutError):
            healthy = False
        was_down = bool(deployments) and deployments[0] in self.down
        if healthy:
            self.down.difference_update(deployments)
            if was_down:
                log.info("provider %s passes its health check again", provider)
        else:
            self.down.update(deployments)
            if not was_down:
                log.warning("provider %s fails its health check (%s)", provider, url)
