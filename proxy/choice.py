"""Which deployment serves an attempt: the one place it is decided.

The gateway asks `Chooser.choose` for every attempt, the first and each retry,
whatever model the attempt is for (the one asked for, or a fallback):

1. the model's deployments whose provider can take the call at all (serves its
   endpoint, has its credentials; TGI's native API has no tools or n > 1): when
   none can, the first one's refusal is the answer (a 400 naming the parameter);
   of those, the ones health allows now (closed breaker, passing health check; a
   half-open breaker lets one probe through);
2. of those, the ones this call has not failed on yet; when it has failed on
   all, every allowed one again, the longest-ago failure first;
3. in the order the call's `rank` gives (a routing plugin sets it, per model;
   without one, the config's order);
4. the first that is under its `rpm`/`tpm` caps, counted in the shared state.
   What was counted is settled with the answer's usage when it finishes, and the
   token estimate is given back when the attempt fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.errors import GatewayError, RateLimited, UpstreamUnavailable
from proxy.protocol import estimate_tokens
from proxy.state import Limit, StateUnavailable

if TYPE_CHECKING:
    from proxy.catalog import Deployment
    from proxy.health import Health
    from proxy.pipeline import Call, Reply
    from proxy.state import State


class NoDeployment(UpstreamUnavailable):
    """Every deployment of the model is out (breakers open, health checks failing)."""

    status = 503
    code = "no_healthy_deployment"


class CapsReached(RateLimited):
    """Every deployment of the model is at its rpm/tpm cap (on the wire, OpenAI's
    rate_limit_exceeded, which clients already handle)."""


def untried(call: Call, health: Health) -> list[Deployment]:
    """The model's deployments health allows that this call has not failed on."""
    model = call.model
    assert model is not None
    return [
        d for d in model.deployments if d.name not in call.failed and not health.is_open(d.name)
    ]


class Chooser:
    def __init__(
        self,
        health: Health,
        state: State,
        refusal: Callable[[Deployment, Call], GatewayError | None] = lambda d, call: None,
    ) -> None:
        self.health = health
        self.state = state
        self.refusal = refusal  # why a deployment's provider cannot take a call, if it cannot

    async def choose(self, call: Call) -> Deployment:
        """The deployment for this attempt at `call.model`, admitted under its caps;
        sets `call.deployment`."""
        model = call.model
        assert model is not None
        able = model.deployments
        refused = {d.name: r for d in able if (r := self.refusal(d, call)) is not None}
        if refused:
            able = [d for d in able if d.name not in refused]
            if not able:
                raise next(iter(refused.values()))
            for name in refused:  # as if failed on from the start: never waited for
                call.failed.setdefault(name, 0.0)
        allowed = [d for d in able if not self.health.is_open(d.name)]
        if not allowed:
            raise NoDeployment(
                f"Every deployment of '{model.name}' is failing (circuit breaker open or "
                "health check failing); try again shortly."
            )
        fresh = [d for d in allowed if d.name not in call.failed]
        if fresh:
            ranked = call.rank(call, fresh) if call.rank and len(fresh) > 1 else fresh
        else:
            ranked = sorted(allowed, key=lambda d: call.failed[d.name])
        deployment = await self._admit(call, ranked)
        self.health.allows(deployment.name)  # a half-open breaker: this attempt is its probe
        call.deployment = deployment
        return deployment

    async def _admit(self, call: Call, ranked: list[Deployment]) -> Deployment:
        tokens = 0
        for deployment in ranked:
            if not (deployment.config.rpm or deployment.config.tpm):
                return deployment
            if not tokens:
                tokens = estimate_tokens(call.endpoint, call.body)
            limits = caps(deployment, tokens)
            try:
                verdict = await self.state.acquire(limits, call.request_id)
            except StateUnavailable:
                return deployment  # caps are advisory while the state is down
            if verdict.allowed:
                call.reserved = (limits, tokens)
                return deployment
        assert call.model is not None
        raise CapsReached(
            f"Every deployment of '{call.model.name}' is at its rate cap.", retry_after_s=1.0
        )

    def settle(self, reserved, reply: Reply | None) -> None:
        """Count an attempt's real tokens against its deployment's tpm cap (what
        `choose` left in `call.reserved`): the answer's usage when it finished with
        one, nothing when the attempt failed."""
        if reserved is None:
            return
        limits, tokens = reserved
        usage = reply.get_usage() if reply is not None else None
        total = usage.get("total_tokens") if usage else None
        if reply is not None and not isinstance(total, int):
            return  # no usage reported: the estimate stands
        for limit in limits:
            if limit.key.endswith(":t"):
                self.state.adjust(limit, (total or 0) - tokens)


def caps(deployment: Deployment, tokens: int) -> list[Limit]:
    c = deployment.config
    limits = []
    if c.rpm:
        limits.append(Limit("rate", f"cap:{deployment.name}:r", c.rpm, 60.0, 1.0))
    if c.tpm:
        limits.append(Limit("rate", f"cap:{deployment.name}:t", c.tpm, 60.0, float(tokens)))
    return limits
