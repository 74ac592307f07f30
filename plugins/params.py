"""params: set, default, cap or remove request parameters per model.

pipeline:
  - params:
      rules:
        - models: ["gpt-4o*"]
          defaults: {temperature: 0.2}     # when the client sent none
          overrides: {user: gateway}       # always
          max_tokens: 2048                 # cap max_tokens / max_completion_tokens
          remove: [logit_bias]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from proxy.context import PluginContext
from proxy.pipeline import MODEL_CALLS, Call, Next, Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamsRule:
    models: list[str] = field(default_factory=lambda: ["*"])
    defaults: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    remove: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if "model" in self.overrides or "model" in self.defaults:
            raise ValueError("params cannot change `model`: use models: and deployments:")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")

    def apply(self, body: dict) -> None:
        for key in self.remove:
            body.pop(key, None)
        for key, value in self.defaults.items():
            body.setdefault(key, value)
        body.update(self.overrides)
        if self.max_tokens is not None:
            for key in ("max_tokens", "max_completion_tokens"):
                value = body.get(key)
                if not isinstance(value, int) or value > self.max_tokens:
                    if key in body or key == "max_tokens":
                        body[key] = self.max_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamsConfig:
    rules: list[ParamsRule] = field(default_factory=list)


class Params:
    Config = ParamsConfig

    def __init__(self, config: ParamsConfig, context: PluginContext) -> None:
        self.rules = config.rules

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        if call.endpoint in MODEL_CALLS:
            model = call.body["model"]
            for rule in self.rules:
                if any(fnmatchcase(model, pattern) for pattern in rule.models):
                    rule.apply(call.body)
        return await call_next(call)
