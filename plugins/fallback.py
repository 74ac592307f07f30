"""fallback: retries and fallback models, invisible to the client.

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

Only upstream failures are retried: 429s from the provider, 5xx, timeouts and
broken connections. The gateway's own refusals (auth, quotas) and the client's
mistakes are not, which is why fallback goes after auth and quotas. A stream
is retried only until its first event: the plugin waits for that event before
the answer is committed to the client, so a stream that fails at once, or
opens with an error event, falls over like any request. After the first byte
has reached the client it never is.

Each attempt goes back through the rest of the chain, so the gateway chooses
its deployment afresh (proxy/choice.py): one this call has not failed on, with
an open breaker skipped and caps checked, ranked by the model's own routing
strategy. Breakers and health checks are the core's (`health:` in the config);
every attempt's outcome is recorded there whether or not this plugin is on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from proxy.choice import CapsReached, NoDeployment, untried
from proxy.config import SettingError
from proxy.context import PluginContext
from proxy.deadlines import Deadlines
from proxy.errors import GatewayError, UpstreamTimeout, retry_after_s
from proxy.health import classify
from proxy.pipeline import MODEL_CALLS, Call, Next, Reply, permitted

log = logging.getLogger("meshgate.fallback")
UNDER_WAY = "fallback.attempt_under_way"  # in call.state: an attempt has not returned yet


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFallbacks:
    fallbacks: list[str] = field(default_factory=list)
    context_window: list[str] = field(default_factory=list)
    content_policy: list[str] = field(default_factory=list)


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

    MOVED: ClassVar[dict[str, str]] = {
        "breaker": "health.breaker (a top-level section)",
        "breaker_sync_s": "health.sync_s (a top-level section)",
        "health_checks": "health.checks (a top-level section)",
    }

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
        self.health = context.health
        self.retry_on = set(config.retry_on)
        self.deadlines = Deadlines()
        for name, fallbacks in config.models.items():
            if self.catalog.find(name) is None:
                raise SettingError(("models", name), f"no model named '{name}' under models:")
            for kind in ("fallbacks", "context_window", "content_policy"):
                for j, target in enumerate(getattr(fallbacks, kind)):
                    if self.catalog.find(target) is None:
                        raise SettingError(
                            ("models", name, kind, j), f"no model named '{target}' under models:"
                        )

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        if call.endpoint not in MODEL_CALLS or call.model is None:
            return await call_next(call)
        deadline = time.monotonic() + self.config.deadline_s
        try:
            with self.deadlines.within(self.config.deadline_s):  # one for every attempt
                try:
                    return await self._model(call, call_next, call.model.name, deadline)
                except GatewayError as exc:
                    return await self._fall_back(call, call_next, exc, deadline)
        except TimeoutError:
            if call.state.get(UNDER_WAY) and call.deployment is not None:
                await self.health.failed(call.deployment.name)  # cut short by the deadline
            raise UpstreamTimeout(
                "the request's deadline passed before an upstream answered"
            ) from None

    async def _fall_back(self, call: Call, call_next: Next, error: GatewayError,
                         deadline: float) -> Reply:  # fmt: skip
        """After the model asked for failed with `error`: its fallbacks, in turn, while
        the errors allow them."""
        assert call.model is not None
        requested = name = call.model.name
        tried = {name}
        while True:
            more = self._fallbacks(requested, error)
            queue = [
                m for m in (more or [])
                if m not in tried and permitted(call.identity, self.catalog.get(m))
            ]  # fmt: skip
            if more is None or not queue or time.monotonic() >= deadline:
                raise error
            log.info("request %s falls back from %s to %s: %s",
                     call.request_id, name, queue[0], error.message)  # fmt: skip
            name = queue[0]
            tried.add(name)
            try:
                return await self._model(call, call_next, name, deadline)
            except GatewayError as exc:
                error = exc

    async def _model(self, call: Call, call_next: Next, name: str, deadline: float) -> Reply:
        """Up to `attempts` attempts at one model. Each goes to a deployment the call
        has not failed on while there is one; then the wait before reusing one
        backs off (or honours the upstream's Retry-After)."""
        call.model = self.catalog.get(name)
        last: GatewayError | None = None
        for attempt in range(self.config.attempts):
            if attempt and not untried(call, self.health):
                await self._wait(attempt, last, deadline)
            if time.monotonic() >= deadline:
                break
            call.deployment = None
            call.state[UNDER_WAY] = True
            try:
                return await call_next(call)
            except GatewayError as exc:
                call.state[UNDER_WAY] = False  # it ended: what a timeout cuts next is a wait
                if not self._retryable(exc):
                    raise
                last = exc
        raise last or UpstreamTimeout("the request's deadline passed before an upstream answered")

    def _retryable(self, error: GatewayError) -> bool:
        """Whether another attempt at the same model may answer after `error`."""
        if isinstance(error, (NoDeployment, CapsReached)):
            return False  # nothing of this model can take it now: its fallbacks may
        kind = classify(error)
        return kind is not None and kind in self.retry_on

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
        if isinstance(error, (NoDeployment, CapsReached)):
            return fallbacks.fallbacks if fallbacks else None
        if code == "context_length_exceeded":
            return fallbacks.context_window if fallbacks else None
        if code in ("content_policy_violation", "content_filter"):
            return fallbacks.content_policy if fallbacks else None
        if classify(error) is None:
            return None
        return fallbacks.fallbacks if fallbacks else []


def _retry_after(error: GatewayError) -> float | None:
    return retry_after_s(error.headers.get("retry-after"))
