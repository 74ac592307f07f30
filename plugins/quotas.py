"""quotas: requests, tokens, concurrency and spend limits, shared by all replicas.

    state: {backend: redis, url: "${REDIS_URL}"}
    pipeline:
      - auth: {...}
      - quotas:
          on_state_error: allow            # or deny, when Redis is down or slow
          limits:
            - {per: key, rpm: 60, tpm: 100000, concurrent: 8}
            - {per: team, teams: [research], budget_usd_day: 50, budget_usd_month: 1000}
            - {per: model, models: ["gpt-4o"], tpm: 2000000}

Each limit applies to the calls it matches (`keys`, `teams`, `users`, `models`
globs) and counts them per `per` (each key, team, user, model, or all calls).
Before a call, one atomic step checks every matching limit and counts the
request, reserves its estimated tokens (prompt estimate plus `max_tokens`) and
its estimated cost against each budget, and takes a concurrency slot; after it,
both reservations are settled with the upstream's usage, the slot is given back
and the cost is added to the spend of the key, team, user and model. Cost is
usage times the deployment's price; the estimate prices the estimated tokens at
the dearest per-token rate of the model's deployments, so a budget overshoots
by at most one call's estimation error, however many calls run at once.

On Redis, a caller far from its limits is admitted from a block of units its
worker reserved at once (`lease`, plugins/quota_leases.py), not one check per call.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from prometheus_client import Counter, Gauge

from plugins.quota_leases import Block, Held, LeaseConfig, Leases
from proxy.catalog import Model
from proxy.context import PluginContext
from proxy.errors import GatewayError, InvalidRequest, QuotaExceeded, RateLimited
from proxy.metrics import Labelled
from proxy.pipeline import MODEL_CALLS, Call, Next, Reply
from proxy.protocol import DEFAULT_COMPLETION_TOKENS, estimate_tokens
from proxy.state import Limit, StateUnavailable, Verdict
from proxy.state.base import SPEND_TTL_S
from proxy.tracing import span

log = logging.getLogger("meshgate.quotas")

DAY_S = 86400.0


class QuotaStateUnavailable(GatewayError):
    status = 503
    type = "api_error"
    code = "quota_state_unavailable"


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitConfig:
    per: Literal["key", "team", "user", "model", "global"] = "key"
    keys: list[str] = field(default_factory=lambda: ["*"])
    teams: list[str] = field(default_factory=lambda: ["*"])
    users: list[str] = field(default_factory=lambda: ["*"])
    models: list[str] = field(default_factory=lambda: ["*"])
    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None
    budget_usd_day: float | None = None
    budget_usd_month: float | None = None

    def __post_init__(self) -> None:
        values = (self.rpm, self.tpm, self.concurrent, self.budget_usd_day, self.budget_usd_month)
        if all(v is None for v in values):
            raise ValueError(
                "a limit needs rpm, tpm, concurrent, budget_usd_day or budget_usd_month"
            )
        if any(v is not None and v <= 0 for v in values):
            raise ValueError("limits must be positive")

    def matches(self, subjects: dict[str, str]) -> bool:
        """`subjects` are names: an API key's, or a token subject as `jwt:<sub>`."""
        return all(
            patterns == ["*"] or any(fnmatchcase(subjects[kind], p) for p in patterns)
            for kind, patterns in (
                ("key", self.keys), ("team", self.teams), ("user", self.users),
                ("model", self.models),
            )
        )  # fmt: skip

    @property
    def id(self) -> str:
        """A stable name for this limit's counters, so reordering the list keeps them."""
        return hashlib.sha1(repr(self).encode()).hexdigest()[:10]


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotasConfig:
    limits: list[LimitConfig] = field(default_factory=list)
    on_state_error: Literal["allow", "deny"] = "allow"
    # With a shared state: blocks of units held per caller (plugins/quota_leases.py).
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    # Tokens reserved for the answer when a request sets no max_tokens.
    default_completion_tokens: int = DEFAULT_COMPLETION_TOKENS

    def __post_init__(self) -> None:
        if self.default_completion_tokens < 1:
            raise ValueError("default_completion_tokens must be at least 1")


class _Template:
    """The limits a caller's calls to one model count against on one day, built once."""

    __slots__ = ("budget", "concurrency", "key", "kinds", "limit_text", "limits", "rates",
                 "requests", "spend", "tokens")  # fmt: skip

    def __init__(self, key: tuple, kinds: list[str], limits: list[Limit],
                 spend: tuple[tuple[str, str], ...]) -> None:  # fmt: skip
        self.key = key
        self.kinds = tuple(kinds)  # per limit: requests, tokens, concurrency or budget
        self.limits = tuple(limits)
        self.spend = spend  # where the cost is added up
        self.requests = [i for i, k in enumerate(kinds) if k == "requests"]
        self.tokens = [i for i, k in enumerate(kinds) if k == "tokens"]
        self.concurrency = [i for i, k in enumerate(kinds) if k == "concurrency"]
        self.budget = [i for i, k in enumerate(kinds) if k == "budget"]
        # the x-ratelimit-* header names of each kind of rate limit it has, and their limits
        self.rates = [(_RATE_HEADERS[kind], indexes)
                      for kind, indexes in (("requests", self.requests), ("tokens", self.tokens))
                      if indexes]  # fmt: skip
        self.limit_text = [_count(limit.limit) for limit in limits]


class _Plan:
    """The limits one call is checked against, with what each one counts."""

    __slots__ = (
        "budget", "concurrency", "lease", "limits", "requests", "reserved", "spend", "tokens"
    )  # fmt: skip

    def __init__(self, lease: str) -> None:
        self.limits: list[Limit] | tuple[Limit, ...] = ()
        self.requests: list[int] = []  # indexes of rpm limits
        self.tokens: list[int] = []  # indexes of tpm limits
        self.concurrency: list[int] = []
        self.budget: list[int] = []
        self.spend: tuple[tuple[str, str], ...] = ()  # where the cost is added up
        self.lease = lease  # names this call's concurrency slots
        self.reserved: dict[tuple[str, str], float] = {}  # budget reservations, USD

    def note_reservations(self) -> None:
        """The state admitted the call: its budgets hold its estimated cost."""
        for i in self.budget:
            limit = self.limits[i]
            where = (limit.key, limit.field)
            self.reserved[where] = self.reserved.get(where, 0.0) + limit.cost


class Quotas:
    Config = QuotasConfig

    @staticmethod
    def uses_state(config: QuotasConfig, gateway_config) -> bool:
        return bool(config.limits)

    def __init__(self, config: QuotasConfig, context: PluginContext) -> None:
        self.config = config
        self.catalog = context.catalog
        self.state = context.state
        self.metrics = context.metrics
        self._templates: dict[tuple, _Template] = {}
        self._rates: dict[str, float] = {}  # per model, for estimated costs
        self._lease_prefix = os.urandom(6).hex() + ":"  # unique to this process
        r = context.registry
        self.refusals = Labelled(Counter(
            "meshgate_quota_refusals",
            "Calls refused by a limit, by kind (requests, tokens, concurrent, budget).",
            ["kind"], registry=r,
        ))  # fmt: skip
        self.budget_used = Labelled(Gauge(
            "meshgate_budget_used_ratio",
            "Share of a budget spent, reservations of calls in flight included, as last seen.",
            ["subject", "period"], registry=r, multiprocess_mode="livemax",
        ))  # fmt: skip
        self._leases = itertools.count()
        self.blocks: Leases | None = None
        if context.state.config.shared and config.lease.share:
            self.blocks = Leases(context.state, config.lease, self.granted)
        context.add_admin_route("spend", ("GET",), self.spend_report)

    async def start(self) -> None:
        if self.blocks is not None:
            await self.blocks.start()

    async def close(self) -> None:
        if self.blocks is not None:
            await self.blocks.close()

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        if call.endpoint not in MODEL_CALLS:
            return await call_next(call)
        estimate = estimate_tokens(call.endpoint, call.body, self.config.default_completion_tokens)
        template = self.template(call)
        usd = self.estimated_cost(call, estimate) if template.budget else 0.0
        if template.limits and self.blocks is not None:
            held = self.blocks.take_now(template.key, estimate, usd)
            if held is None:
                with span("meshgate.quota.check", {"meshgate.quota.limits": len(template.limits)}):
                    held = await self.blocks.take(
                        template.key, template.kinds, template.limits, estimate, usd
                    )
            if held is not None:  # _from_block, its await inline: a frame fewer per call
                try:
                    reply = await call_next(call)
                except BaseException:
                    self.blocks.done(held, 0, 0.0)
                    raise
                return self._from_block(reply, template, held)
        plan = self.plan(template, estimate, usd)
        headers: dict[str, str] = {}
        counted = False
        if plan.limits:
            try:
                with span("meshgate.quota.check", {"meshgate.quota.limits": len(plan.limits)}):
                    verdict = await self.acquire(call, plan, estimate)
            except StateUnavailable as exc:
                self.state_error("acquire", exc)
            else:
                if not verdict.allowed:
                    raise self.refusal(plan, verdict)
                counted = True
                plan.note_reservations()
                self.granted(plan.limits, verdict)
                headers = _rate_headers(
                    template, verdict.remaining.__getitem__, verdict.reset_s.__getitem__
                )
        try:
            reply = await call_next(call)
        except BaseException:
            if counted:
                self.give_back(plan, estimate)
            raise
        reply.headers.update(headers)

        def complete(reply: Reply) -> None:
            usage = reply.get_usage()
            if counted:
                self.settle(plan, estimate, usage)
            self.record_spend(template.spend, reply, usage, estimate)
            self.unreserve(plan)  # the cost is counted now, not its estimate

        return reply.on_complete(complete)

    async def acquire(self, call: Call, plan: _Plan, estimate: int) -> Verdict:
        """The state's verdict on one call. On Redis the check is its own task: a call
        that goes away (its client hung up) while Redis counts it gives back what it
        was granted, rather than holding a slot until the lease expires."""
        if not self.state.config.shared:
            return await self.state.acquire(plan.limits, plan.lease)
        checking = asyncio.ensure_future(self.state.acquire(plan.limits, plan.lease))
        try:
            return await asyncio.shield(checking)
        except asyncio.CancelledError:
            checking.add_done_callback(lambda done: self._abandoned(plan, estimate, done))
            raise

    def _abandoned(self, plan: _Plan, estimate: int, done: asyncio.Future) -> None:
        if done.cancelled() or done.exception() is not None or not done.result().allowed:
            return
        plan.note_reservations()
        self.give_back(plan, estimate)

    def _from_block(self, reply: Reply, template: _Template, held: Held) -> Reply:
        """The reply to a call admitted from its caller's block (plugins/quota_leases.py)."""
        _block_headers(template, held.block, reply.headers)
        blocks = self.blocks
        assert blocks is not None

        def complete(reply: Reply) -> None:
            usage = reply.get_usage()
            cost = self.record_spend(template.spend, reply, usage, held.estimate)
            total = usage.get("total_tokens") if usage else None
            blocks.done(held, total if isinstance(total, int) else None, cost or 0.0)

        return reply.on_complete(complete)

    def granted(self, limits: tuple[Limit, ...] | list[Limit], verdict: Verdict) -> None:
        """Budgets' share used, as the state said when a call or a block was admitted."""
        for i, limit in enumerate(limits):
            if limit.kind == "budget" and i < len(verdict.remaining):
                used = 1.0 - max(0.0, verdict.remaining[i]) / limit.limit
                period = "day" if limit.key.startswith("spend:d:") else "month"
                self.budget_used(limit.field, period).set(used)

    def estimated_cost(self, call: Call, tokens: int) -> float:
        """USD a call may cost before it is made: its estimated tokens at the dearest
        per-token rate of the model's deployments."""
        model = call.model
        if model is None:
            return 0.0
        rate = self._rates.get(model.name)
        if rate is None:
            rate = self._rates[model.name] = _dearest_rate(model)
        return tokens * rate

    def template(self, call: Call) -> _Template:
        identity = call.identity
        who = (
            _counted_as(identity),
            (identity.team if identity else None) or "none",
            (identity.user if identity else None) or "none",
            call.body["model"],
        )
        day, month = _periods()
        template = self._templates.get((who, day))
        if template is None:
            template = self._template(who, day, month)
        return template

    def plan(self, template: _Template, estimate: int, usd: float) -> _Plan:
        """The limits of one call checked on its own: the template's, with its tokens
        and estimated cost."""
        plan = _Plan(f"{self._lease_prefix}{next(self._leases)}")
        plan.requests, plan.tokens = template.requests, template.tokens
        plan.concurrency, plan.budget = template.concurrency, template.budget
        plan.spend = template.spend
        limits: tuple[Limit, ...] | list[Limit] = template.limits
        if plan.tokens or usd:
            limits = list(limits)
            for i in plan.tokens:
                limit = limits[i]
                limits[i] = Limit("rate", limit.key, limit.limit, 60.0, float(estimate))
            for i in plan.budget if usd else ():
                limit = limits[i]
                limits[i] = Limit("budget", limit.key, limit.limit, cost=usd, field=limit.field)
        plan.limits = limits
        return plan

    def _template(self, who: tuple[str, str, str, str], day: str, month: str) -> _Template:
        """Which limits a caller's calls count against, and their keys: built once per
        caller, model and day."""
        subjects = dict(zip(("key", "team", "user", "model"), who, strict=True))
        subjects["global"] = "all"
        kinds: list[str] = []
        limits: list[Limit] = []
        for lc in self.config.limits:
            if not lc.matches(subjects):
                continue
            subject = subjects[lc.per]
            prefix = f"q:{lc.id}:{subject}"
            if lc.rpm:
                kinds.append("requests")
                limits.append(Limit("rate", prefix + ":r", lc.rpm, 60.0, 1.0))
            if lc.tpm:
                kinds.append("tokens")
                limits.append(Limit("rate", prefix + ":t", lc.tpm, 60.0, 0.0))
            if lc.concurrent:
                kinds.append("concurrency")
                limits.append(Limit("concurrency", prefix + ":c", lc.concurrent))
            for amount, period in ((lc.budget_usd_day, day), (lc.budget_usd_month, month)):
                if amount:
                    kinds.append("budget")
                    limits.append(
                        Limit("budget", period, amount, cost=0.0, field=f"{lc.per}:{subject}")
                    )
        if len(self._templates) > 100_000:  # a new day, or very many callers
            self._templates.clear()
        key, team, user, model = who
        fields = (f"key:{key}", f"team:{team}", f"user:{user}", f"model:{model}", "global:all")
        spend = tuple((period, f) for period in (day, month) for f in fields)
        template = _Template((who, day), kinds, limits, spend)
        self._templates[who, day] = template
        return template

    def refusal(self, plan: _Plan, verdict) -> GatewayError:
        i = verdict.denied
        limit = plan.limits[i]
        kinds = (("budget", plan.budget), ("concurrent", plan.concurrency), ("tokens", plan.tokens))
        kind = next((k for k, indexes in kinds if i in indexes), "requests")
        self.refusals(kind).inc()
        if kind == "budget":
            period = "day" if limit.key.startswith("spend:d:") else "month"
            self.budget_used(limit.field, period).set(1.0)
        if i in plan.budget:
            period = "daily" if limit.key.startswith("spend:d:") else "monthly"
            return QuotaExceeded(
                f"You exceeded your {period} budget of ${limit.limit:g} ({limit.field}). "
                "It resets at the start of the next period."
            )
        retry = max(verdict.retry_after_s, 0.001)
        if i in plan.concurrency:
            message = f"Too many concurrent requests: the limit is {limit.limit:g}."
        elif i in plan.tokens:
            message = (
                f"Rate limit reached for tokens per minute: limit {limit.limit:g}, "
                f"this request reserves {limit.cost:g}. Please try again in {retry:.3g}s."
            )
        else:
            message = (
                f"Rate limit reached for requests per minute: limit {limit.limit:g}. "
                f"Please try again in {retry:.3g}s."
            )
        headers = {}
        if i in plan.requests:
            headers = {"x-ratelimit-limit-requests": _count(limit.limit),
                       "x-ratelimit-remaining-requests": "0",
                       "x-ratelimit-reset-requests": _duration(retry)}  # fmt: skip
        return RateLimited(message, retry_after_s=retry, headers=headers)

    def settle(self, plan: _Plan, estimate: int, usage: dict | None) -> None:
        """Settle token reservations with the real usage and give back concurrency slots.

        Without usage (an answer cut short) the reservation stands.
        """
        total = usage.get("total_tokens") if usage else None
        if isinstance(total, int):
            for i in plan.tokens:
                self.state.adjust(plan.limits[i], total - estimate)
        if plan.concurrency:
            self.state.release([plan.limits[i].key for i in plan.concurrency], plan.lease)

    def record_spend(
        self, spend: tuple[tuple[str, str], ...], reply: Reply, usage: dict | None, estimate: int
    ) -> float | None:
        """Add the call's cost to its spend places; the cost, None when unpriced."""
        deployment = reply.deployment
        if deployment is None or deployment.price is None:
            return None
        cost = reply.compute_cost()
        if cost is None and not reply.completed:
            # Cut short with no usage: charge the reservation, not nothing.
            cost = deployment.price.cost({"prompt_tokens": 0, "completion_tokens": estimate})
        cost = cost or 0.0
        if cost:
            self.state.add_spend_to(spend, cost, ttl_s=SPEND_TTL_S)
        return cost

    def give_back(self, plan: _Plan, estimate: int) -> None:
        """Everything a counted call took, for a call that never answered: its token
        estimate, its slots and its budget reservations."""
        self.settle(plan, estimate, usage={"total_tokens": 0})
        self.unreserve(plan)

    def unreserve(self, plan: _Plan) -> None:
        """Give back a call's budget reservations: what it cost is counted apart."""
        if plan.reserved:
            entries = [(key, f, -usd) for (key, f), usd in plan.reserved.items()]
            self.state.add_spend(entries, ttl_s=SPEND_TTL_S)

    def state_error(self, what: str, exc: StateUnavailable) -> None:
        decision = self.config.on_state_error
        self.metrics.state_errors.labels("quotas", decision).inc()
        log.warning("quota state unavailable during %s; on_state_error=%s: %s", what, decision, exc)
        if decision == "deny":
            raise QuotaStateUnavailable(
                "Rate limits cannot be checked right now; the request was refused. "
                "Please try again shortly."
            )

    async def spend_report(self, request) -> dict:
        date = request.query_params.get("date")
        if date is not None and not _is_day(date):
            raise InvalidRequest("date must be a UTC day, as YYYY-MM-DD.", param="date")
        day, month = _periods(date)
        try:
            report = {}
            for name, key in (("day", day), ("month", month)):
                raw = await self.state.read_spend(key)
                grouped: dict[str, dict[str, float]] = {
                    "keys": {}, "teams": {}, "users": {}, "models": {}, "total": {}
                }  # fmt: skip
                for field_name, usd in raw.items():
                    kind, _, who = field_name.partition(":")
                    group = {"key": "keys", "team": "teams", "user": "users",
                             "model": "models", "global": "total"}.get(kind)  # fmt: skip
                    if group:
                        grouped[group][who] = round(usd, 8)
                report[name] = {"period": key.split(":", 2)[2], "usd": grouped}
        except StateUnavailable as exc:
            raise QuotaStateUnavailable(f"Spend cannot be read right now: {exc}") from None
        return report


_today: tuple[int, tuple[str, str]] = (-1, ("", ""))


def _periods(date: str | None = None) -> tuple[str, str]:
    """The spend hashes of a UTC day (`YYYY-MM-DD`, default today) and its month."""
    global _today
    if date is None:
        day_number = int(time.time() // DAY_S)
        if day_number != _today[0]:
            date = time.strftime("%Y-%m-%d", time.gmtime(day_number * DAY_S))
            _today = (day_number, (f"spend:d:{date}", f"spend:m:{date[:7]}"))
        return _today[1]
    return f"spend:d:{date}", f"spend:m:{date[:7]}"


def _is_day(date: str) -> bool:
    """Whether `date` names a real day as YYYY-MM-DD (a spend hash's name)."""
    if len(date) != 10 or not date.isascii():
        return False
    try:
        return datetime.date.fromisoformat(date).isoformat() == date
    except ValueError:
        return False


def _counted_as(identity) -> str:
    """The caller's name in counters and spend: an API key's name, `jwt:<sub>` for a
    token, so a token subject never shares a key's counters by name."""
    if identity is None:
        return "anonymous"
    return identity.name if identity.kind == "key" else identity.subject


def _dearest_rate(model: Model) -> float:
    """The dearest per-token rate of a model's deployments, USD (0 when none is priced)."""
    rates = [
        max(d.price.input_per_token, d.price.output_per_token)
        for d in model.deployments
        if d.price is not None
    ]
    return max(rates) if rates else 0.0


def _rate_headers(template: _Template, remaining, reset) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers of the tightest requests and tokens limits, from
    what each limit (by index) has `remaining` and the seconds until it is `reset`."""
    headers = {}
    for (limit_name, remaining_name, reset_name), indexes in template.rates:
        i = indexes[0] if len(indexes) == 1 else min(indexes, key=remaining)
        headers[limit_name] = template.limit_text[i]
        headers[remaining_name] = _count(max(0, math.floor(remaining(i))))
        headers[reset_name] = _duration(reset(i))
    return headers


def _block_headers(template: _Template, block: Block, headers: dict[str, str]) -> None:
    """For a call admitted from a block, into `headers`: what the state had left when
    it granted the block, plus what the block has left now. Written out rather than
    through _rate_headers' callbacks, from what `_block_rates` worked out once: it
    runs for almost every call."""
    rates = block.headers
    if rates is None:
        rates = block.headers = _block_rates(template, block)
    out = block.out
    for limit_name, limit_text, remaining_name, reset_name, kind, top, limit, scale in rates:
        left = top - out[kind]
        left = left if left > 0.0 else 0.0  # max(0.0, left) parses its arguments: slower
        used = limit - left
        headers[limit_name] = limit_text
        headers[remaining_name] = str(int(left))  # int() floors: left is not negative
        reset = used * scale if used > 0.0 else 0.0
        # _duration's first case written here: almost every reset is under a second
        headers[reset_name] = f"{math.ceil(reset * 1000)}ms" if reset < 1 else _duration(reset)


def _block_rates(template: _Template, block: Block) -> list[tuple]:
    """Per kind of rate limit a block holds: its header names, and of the tightest
    limit of that kind its text, what it has left with nothing out of the block,
    its limit and seconds per unit. Each limit of a kind gives the same units to
    every call, so the tightest stays the tightest while the block lasts."""
    rates = []
    for (limit_name, remaining_name, reset_name), indexes in template.rates:
        i = indexes[0] if len(indexes) == 1 else min(indexes, key=block.remaining)
        kind, limit = block.kinds[i], block.limits[i]
        top = block.remaining(i) + block.out[kind]
        rates.append((limit_name, template.limit_text[i], remaining_name, reset_name, kind, top,
                      limit.limit, limit.period_s / limit.limit))  # fmt: skip
    return rates


_RATE_HEADERS = {
    kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}",
           f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens")
}  # fmt: skip


def _count(value: float) -> str:
    """A limit or what is left of it as OpenAI writes it: 100000000, never 1e+08."""
    return str(int(value)) if value == int(value) else f"{value:.15g}"


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 2):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{int(rest)}s"
