"""routing: which deployment (or, by rules, which model) serves each call.

    pipeline:
      - auth: {...}
      - quotas: {...}
      - routing:
          strategy: least-busy               # for every model not listed below
          models:
            gpt-4o: {strategy: cost}
            local-llama: {strategy: prefix-affinity}
            auto:                            # a model that routes to other models
              strategy: complexity
              rules:
                - {model: gpt-4o, min_prompt_chars: 4000}
                - {model: gpt-4o, contains_code: true}
                - {model: gpt-4o, keywords: ["prove", "step by step"]}
                - {model: gpt-4o-mini}       # no condition: the default
      - fallback: {...}

The plugin gives each call a ranking (`call.rank`); the gateway's one
deployment choice (proxy/choice.py) applies it on every attempt, to the
deployments still worth trying (healthy, not failed by this call), and keeps
each under its `rpm`/`tpm` caps. A fallback model is ranked by its own strategy.
Where the plugin sits in the pipeline does not matter. Strategies:

- `weighted`: at random, by each deployment's `weight`;
- `least-busy`: the fewest calls in flight from this process;
- `latency`: the lowest moving average of time to first token (streams) or
  duration, trying each deployment first and exploring now and then so a
  recovered deployment gets traffic again;
- `cost`: the cheapest deployment whose context window fits the prompt (a
  prompt too long for a deployment never goes there);
- `prefix-affinity`: calls sharing a conversation prefix go to the same
  deployment (rendezvous hashing, so adding or removing a replica moves only
  its share), so a local vLLM or TGI reuses its KV cache; when that deployment
  has `max_in_flight` calls under way, the call spills to the least busy;
- `complexity`: rules pick another model for the call, whose own strategy then
  picks the deployment.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Literal

import orjson

from proxy.catalog import Deployment, Model
from proxy.config import SettingError
from proxy.context import PluginContext
from proxy.errors import InvalidRequest
from proxy.pipeline import MODEL_CALLS, Call, Next, Reply, permitted, refuse
from proxy.protocol import estimate_prompt_tokens, prompt_text

Strategy = Literal["weighted", "least-busy", "latency", "cost", "prefix-affinity", "complexity"]
CODE = re.compile(r"```|\bdef |\bclass |\bfunction\b|#include|\bimport |;\s*$|=>", re.MULTILINE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    model: str
    min_prompt_chars: int | None = None
    contains_code: bool | None = None
    keywords: list[str] = field(default_factory=list)

    def matches(self, text: str) -> bool:
        if self.min_prompt_chars is not None and len(text) < self.min_prompt_chars:
            return False
        if self.contains_code is not None and bool(CODE.search(text)) != self.contains_code:
            return False
        lowered = text.lower()
        return not self.keywords or any(k.lower() in lowered for k in self.keywords)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRouting:
    strategy: Strategy = "least-busy"
    rules: list[Rule] = field(default_factory=list)  # complexity only
    prefix_chars: int = 2048  # prefix-affinity: how much of the conversation keys it

    def __post_init__(self) -> None:
        if (self.strategy == "complexity") != bool(self.rules):
            raise ValueError("rules go with strategy complexity, and it needs them")


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingConfig:
    strategy: Strategy = "least-busy"
    models: dict[str, ModelRouting] = field(default_factory=dict)
    explore: float = 0.05  # latency: share of calls sent to a random deployment

    def __post_init__(self) -> None:
        if self.strategy == "complexity":
            raise ValueError("complexity is set per model, with its rules")
        if not 0 <= self.explore <= 1:
            raise ValueError("explore must be between 0 and 1")


class Routing:
    Config = RoutingConfig

    def __init__(self, config: RoutingConfig, context: PluginContext) -> None:
        self.config = config
        self.catalog = context.catalog
        self.default = ModelRouting(strategy=config.strategy)
        for name, routing in config.models.items():
            if self.catalog.find(name) is None:
                raise SettingError(("models", name), f"no model named '{name}' under models:")
            for j, rule in enumerate(routing.rules):
                if self.catalog.find(rule.model) is None:
                    raise SettingError(
                        ("models", name, "rules", j, "model"),
                        f"no model named '{rule.model}' under models:",
                    )

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        if call.endpoint not in MODEL_CALLS or call.model is None:
            return await call_next(call)
        routing = self.config.models.get(call.model.name, self.default)
        if routing.strategy == "complexity":
            call.model = self.by_rules(call, routing)
        call.rank = self.rank
        return await call_next(call)

    def by_rules(self, call: Call, routing: ModelRouting) -> Model:
        """The first rule's model that matches the prompt and the caller may use; the
        last rule is the default."""
        text = prompt_text(call.body)
        catalog = self.catalog
        matching = [r.model for r in routing.rules if r.matches(text)] + [routing.rules[-1].model]
        for name in matching:
            model = catalog.get(name)
            if permitted(call.identity, model):
                return model
        raise refuse(call.identity, catalog.get(matching[0]))

    def rank(self, call: Call, candidates: list[Deployment]) -> list[Deployment]:
        """`candidates` (deployments of `call.model`), best first, by the model's strategy."""
        assert call.model is not None
        routing = self.config.models.get(call.model.name, self.default)
        strategy = routing.strategy
        if strategy == "weighted":
            return weighted_order(candidates)
        if strategy == "latency":
            if random.random() < self.config.explore:
                return random.sample(candidates, len(candidates))
            unknown = [d for d in candidates if d.samples == 0]
            known = sorted((d for d in candidates if d.samples), key=lambda d: d.latency_s or 0.0)
            return unknown + known
        if strategy == "cost":
            return self.by_cost(call, candidates)
        if strategy == "prefix-affinity":
            key = conversation_prefix(call.body, routing.prefix_chars)
            order = sorted(candidates, key=lambda d: _score(key, d.name), reverse=True)
            first = order[0]
            cap = first.config.max_in_flight
            if cap is not None and first.in_flight >= cap:
                return sorted(order, key=lambda d: d.in_flight)
            return order
        return sorted(candidates, key=lambda d: (d.in_flight, random.random()))

    def by_cost(self, call: Call, candidates: list[Deployment]) -> list[Deployment]:
        assert call.model is not None
        needed = estimate_prompt_tokens(call.endpoint, call.body)
        fitting = [d for d in candidates if d.context_window is None or needed <= d.context_window]
        if not fitting:
            largest = max(d.context_window or 0 for d in candidates)
            raise InvalidRequest(
                f"The prompt (about {needed} tokens) is longer than any deployment of "
                f"'{call.model.name}' accepts ({largest} tokens).",
                code="context_length_exceeded",
            )

        def price(d: Deployment) -> float:
            p = d.price
            return p.input_per_token + p.output_per_token if p else float("inf")

        return sorted(fitting, key=price)


def weighted_order(candidates: list[Deployment]) -> list[Deployment]:
    """A random order in which each deployment comes first in proportion to its weight."""
    remaining = list(candidates)
    order = []
    while remaining:
        weights = [d.config.weight for d in remaining]
        if not any(weights):
            order.extend(remaining)
            break
        pick = random.choices(remaining, weights)[0]
        order.append(pick)
        remaining.remove(pick)
    return order


def conversation_prefix(body: dict, chars: int) -> bytes:
    """What a conversation's calls share: every message but the newest, or the start
    of a single prompt."""
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > 1:
        return orjson.dumps(messages[:-1])[:chars]
    return prompt_text(body).encode()[:chars]


def _score(key: bytes, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + name.encode(), digest_size=8).digest(), "big")
