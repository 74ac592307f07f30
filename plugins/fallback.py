"""fallback: retries, fallback models and circuit breakers, invisible to the client.

    pipeline:
      - auth: {...}
      - quotas: {...}
      - fallback:
          attempts: 3              # tries per model, spread over its deployments
          backoff_s: 0.25          # first wait before retrying a deployment; doubles, with jitter
          deadline_s: 120          # the whole request, every attempt included
          models:
            gpt-4o:
              fallbacks: [gpt-4o-mini]        # when gpt-4o keeps failing
              context_window: [gpt-4o-long]   # when the prompt is too long for it
              content_policy: [claude]        # when its provider refuses the content
          breaker: {failures: 5, window_s: 60, cooldown_s: 30}

Only upstream failures are retried: 429s from the provider, 5xx, timeouts and
broken connections. The gateway's own refusals (auth, quotas) and the client's
mistakes are not, which is why fallback goes after auth and quotas. A stream
is retried only until its first event: the plugin waits for that event before
the answer is committed to the client, so a stream that fails at once, or
opens with an error event, falls over like any request. After the first byte
has reached the client it never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Literal

import httpx

from proxy.config import SettingError
from proxy.context import PluginContext
from proxy.errors import (
    GatewayError,
    ProviderNotConfigured,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.health import BreakerConfig
from proxy.pipeline import MODEL_CALLS, Call, Next, Reply, permitted
from proxy.state import StateUnavailable

log = logging.getLogger("meshgate.fallback")

Failure = Literal["rate_limit", "server_error", "timeout", "unavailable"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFallbacks:
    fallbacks: list[str] = field(default_factory=list)
    context_window: list[str] = field(default_factory=list)
    content_policy: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthChecksConfig:
    providers: list[str]  # openai-type servers are asked for /models, tgi for /health
    interval_s: float = 10.0
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if min(self.interval_s, self.timeout_s) <= 0:
            raise ValueError("interval_s and timeout_s must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackConfig:
    attempts: int = 3
    backoff_s: float = 0.25
    backoff_max_s: float = 8.0
    max_retry_after_s: float = 30.0  # a longer Retry-After moves on instead of waiting
    deadline_s: float = 120.0
    retry_on: list[Literal["rate_limit", "server_error", "timeout", "unavailable"]] = field(
        default_factory=lambda: ["rate_limit", "server_error", "timeout", "unavailable"]
    )
    models: dict[str, ModelFallbacks] = field(default_factory=dict)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    breaker_sync_s: float = 1.0  # with Redis: how often each replica reads the shared breakers
    health_checks: HealthChecksConfig | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if min(self.backoff_s, self.deadline_s) <= 0:
            raise ValueError("backoff_s and deadline_s must be positive")


class Fallback:
    Config = FallbackConfig

    def __init__(self, config: FallbackConfig, context: PluginContext) -> None:
        self.config = config
        self.catalog = context.catalog
        self.breaker = context.health  # routing reads it too: open breakers are skipped
        self.breaker.configure(config.breaker)
        self.state = context.state
        self.names = [d.name for m in self.catalog.models.values() for d in m.deployments]
        self._sync: asyncio.Task | None = None
        self._checks: asyncio.Task | None = None
        self.probes: dict[str, tuple[str, list[str]]] = {}  # provider -> (url, deployments)
        if config.health_checks is not None:
            for j, provider in enumerate(config.health_checks.providers):
                self.probes[provider] = (
                    health_url(context.config.providers.get(provider), provider, j),
                    [d.name for m in self.catalog.models.values() for d in m.deployments
                     if d.provider == provider],
                )  # fmt: skip
        self.retry_on = set(config.retry_on)
        for name, fallbacks in config.models.items():
            if self.catalog.find(name) is None:
                raise SettingError(("models", name), f"no model named '{name}' under models:")
            for kind in ("fallbacks", "context_window", "content_policy"):
                for j, target in enumerate(getattr(fallbacks, kind)):
                    if self.catalog.find(target) is None:
                        raise SettingError(
                            ("models", name, kind, j), f"no model named '{target}' under models:"
                        )

    async def start(self) -> None:
        if self.state.config.shared:
            self._sync = asyncio.create_task(self._sync_forever())
        if self.probes:
            self._checks = asyncio.create_task(self._check_forever())

    async def close(self) -> None:
        for task in (self._sync, self._checks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _check_forever(self) -> None:
        """Probe local backends; while a probe fails its deployments are skipped."""
        checks = self.config.health_checks
        async with httpx.AsyncClient(timeout=checks.timeout_s) as client:
            while True:
                await asyncio.gather(*(self._check(client, p) for p in self.probes))
                await asyncio.sleep(checks.interval_s)

    async def _check(self, client: httpx.AsyncClient, provider: str) -> None:
        url, deployments = self.probes[provider]
        try:
            healthy = (await client.get(url)).status_code < 400
        except httpx.HTTPError:
            healthy = False
        was_down = bool(deployments) and deployments[0] in self.breaker.down
        if healthy:
            self.breaker.down.difference_update(deployments)
            if was_down:
                log.info("provider %s passes its health check again", provider)
        else:
            self.breaker.down.update(deployments)
            if not was_down:
                log.warning("provider %s fails its health check (%s)", provider, url)

    async def _sync_forever(self) -> None:
        """Keep this replica's view of breakers opened by any replica fresh."""
        while True:
            try:
                remaining = await self.state.breakers_open(self.names)
            except StateUnavailable as exc:
                log.debug("breaker sync skipped: %s", exc)
            else:
                now = self.breaker.clock()
                self.breaker.remote_until = {n: now + s for n, s in (remaining or {}).items()}
            await asyncio.sleep(self.config.breaker_sync_s)

    async def _failed(self, name: str) -> None:
        self.breaker.failure(name)
        if not self.state.config.shared:
            return
        b = self.config.breaker
        try:
            if await self.state.breaker_failure(name, b.failures, b.window_s, b.cooldown_s):
                self.breaker.remote_until[name] = self.breaker.clock() + b.cooldown_s
                log.warning("circuit breaker for %s opened for every replica", name)
        except StateUnavailable as exc:
            log.warning("could not share a failure of %s: %s", name, exc)

    async def _succeeded(self, name: str) -> None:
        troubled = self.breaker.was_troubled(name)
        self.breaker.success(name)
        if troubled and self.state.config.shared:
            try:
                await self.state.breaker_close(name)
            except StateUnavailable as exc:
                log.warning("could not share the recovery of %s: %s", name, exc)

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        if call.endpoint not in MODEL_CALLS or call.model is None:
            return await call_next(call)
        requested = call.model.name
        deadline = time.monotonic() + self.config.deadline_s
        queue = [requested]
        tried: set[str] = set()
        while True:
            name = queue.pop(0)
            tried.add(name)
            try:
                return await self._model(call, call_next, name, deadline)
            except GatewayError as exc:
                more = self._fallbacks(requested, exc)
                queue = [
                    m for m in (more or [])
                    if m not in tried and permitted(call.identity, self.catalog.get(m))
                ]  # fmt: skip
                if more is None or not queue or time.monotonic() >= deadline:
                    raise
                log.info("request %s falls back from %s to %s: %s",
                         call.request_id, name, queue[0], exc.message)  # fmt: skip

    async def _model(self, call: Call, call_next: Next, name: str, deadline: float) -> Reply:
        """Try one model: up to `attempts` calls over its deployments, skipping open breakers."""
        model = self.catalog.get(name)
        call.model = model
        ranked = call.state.get("ranked")  # a routing plugin's order, best first
        if ranked and all(d in model.deployments for d in ranked):
            order = list(ranked)
        else:
            order = list(model.deployments)
            if call.deployment in order:
                i = order.index(call.deployment)
                order = order[i:] + order[:i]
        last: GatewayError | None = None
        previous = None
        for attempt in range(self.config.attempts):
            candidates = [d for d in order if not self.breaker.is_open(d.name)]
            if not candidates:
                raise last or UpstreamUnavailable(
                    f"every deployment of '{name}' is failing (circuit breaker open)"
                )
            deployment = candidates[0]
            if previous is not None:  # the next one after the deployment that failed
                after = order.index(previous) + 1
                deployment = next(d for d in order[after:] + order[:after] if d in candidates)
            if deployment is previous:
                await self._wait(attempt, last, deadline)
            if time.monotonic() >= deadline:
                break
            self.breaker.allows(deployment.name)  # marks the probe of a half-open breaker
            call.deployment = previous = deployment
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    reply = await self._attempt(call, call_next)
            except TimeoutError:
                await self._failed(deployment.name)
                raise UpstreamTimeout(
                    "the request's deadline passed before an upstream answered"
                ) from None
            except GatewayError as exc:
                kind = classify(exc)
                if kind is None:
                    raise
                await self._failed(deployment.name)
                if kind not in self.retry_on:
                    raise
                last = exc
                continue
            await self._succeeded(deployment.name)
            return reply
        raise last or UpstreamTimeout("the request's deadline passed before an upstream answered")

    async def _attempt(self, call: Call, call_next: Next) -> Reply:
        reply = await call_next(call)
        if not reply.streamed:
            return reply
        return await first_event_or_raise(reply)

    async def _wait(self, attempt: int, error: GatewayError | None, deadline: float) -> None:
        retry_after = _retry_after(error) if error is not None else None
        if retry_after is not None and retry_after <= self.config.max_retry_after_s:
            delay = retry_after
        else:
            ceiling = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (attempt - 1))
            delay = random.uniform(ceiling / 2, ceiling)  # jitter, never zero
        delay = min(delay, max(0.0, deadline - time.monotonic()))
        if delay:
            await asyncio.sleep(delay)

    def _fallbacks(self, model: str, error: GatewayError) -> list[str] | None:
        """Models to try next after `error`, or None when the error is final."""
        fallbacks = self.config.models.get(model)
        code = getattr(error, "code", None)
        if code == "context_length_exceeded":
            return fallbacks.context_window if fallbacks else None
        if code in ("content_policy_violation", "content_filter"):
            return fallbacks.content_policy if fallbacks else None
        if classify(error) is None:
            return None
        return fallbacks.fallbacks if fallbacks else []


def health_url(config, provider: str, j: int) -> str:
    at = ("health_checks", "providers", j)
    if config is None:
        raise SettingError(at, f"no provider named '{provider}' under providers:")
    if config.type == "openai":
        return config.base_url.rstrip("/") + "/models"
    if config.type == "tgi":
        return config.base_url.rstrip("/") + "/health"
    raise SettingError(at, f"health checks need an openai or tgi provider, not {config.type}")


def classify(error: GatewayError) -> Failure | None:
    """What kind of upstream failure `error` is, or None when it is not one."""
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


async def first_event_or_raise(reply: Reply) -> Reply:
    """Wait for a stream's first event; raise if it fails or opens with an error."""
    try:
        first = await reply.peek()
    except BaseException:
        await reply.events.aclose()
        raise
    if first is None:
        await reply.events.aclose()
        raise UpstreamUnavailable("the upstream ended the stream before any event")
    try:
        data = first.json()
    except GatewayError:
        await reply.events.aclose()
        raise
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        await reply.events.aclose()
        error = data["error"]
        raise UpstreamStatus(
            502, str(error.get("message") or "upstream stream error"), code=error.get("code")
        )
    return reply


def _retry_after(error: GatewayError) -> float | None:
    value = error.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
