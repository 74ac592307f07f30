"""What a call costs: usage times the deployment's price.

A deployment's price comes from its config (`price:`), else from the price list
litellm bundles with its package, read as a JSON file (no litellm import, no
download). Deployments with neither cost nothing, and `meshgate check` says so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("meshgate.prices")

BUNDLED = "model_prices_and_context_window_backup.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceConfig:
    input_usd_per_mtok: float
    output_usd_per_mtok: float

    def __post_init__(self) -> None:
        if self.input_usd_per_mtok < 0 or self.output_usd_per_mtok < 0:
            raise ValueError("prices cannot be negative")


@dataclass(frozen=True, slots=True)
class Price:
    input_per_token: float
    output_per_token: float
    context_window: int | None = None

    def cost(self, usage: dict | None) -> float:
        if not usage:
            return 0.0
        prompt = usage.get("prompt_tokens") or 0
        completion = usage.get("completion_tokens") or 0
        return prompt * self.input_per_token + completion * self.output_per_token


def bundled_prices() -> dict[str, dict]:
    """litellm's bundled price list, if the litellm extra is installed."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(spec.submodule_search_locations[0]) / BUNDLED
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("cannot read litellm's bundled price list at %s", path)
        return {}


def lookup(model: str, table: dict[str, dict]) -> Price | None:
    """The bundled price of `model`, trying it with and without a provider prefix."""
    for name in (model, model.split("/", 1)[-1]):
        entry = table.get(name)
        if entry and "input_cost_per_token" in entry:
            return Price(
                float(entry["input_cost_per_token"]),
                float(entry.get("output_cost_per_token") or 0.0),
                entry.get("max_input_tokens"),
            )
    return None


def price_of(config: PriceConfig | None, model: str, table: dict[str, dict]) -> Price | None:
    if config is not None:
        return Price(config.input_usd_per_mtok / 1e6, config.output_usd_per_mtok / 1e6)
    return lookup(model, table)
