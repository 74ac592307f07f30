"""The models the gateway serves and the deployments behind each.

A deployment names its provider; the adapter that talks to it belongs to the
gateway (`Gateway.upstreams`), so the catalog is plain data about models."""

from __future__ import annotations

import time
from dataclasses import dataclass

from proxy.config import Config, DeploymentConfig
from proxy.errors import ModelNotFound
from proxy.prices import Price, bundled_prices, lookup, price_of


@dataclass(slots=True, eq=False)
class Deployment:
    """One place a model can be served: a provider and the model name it knows."""

    name: str
    model: str  # the model name sent upstream
    provider: str  # a key of `providers:`
    config: DeploymentConfig
    price: Price | None = None
    context_window: int | None = None
    in_flight: int = 0  # upstream calls under way from this process
    latency_s: float | None = None  # moving average: time to first event, or whole call
    samples: int = 0

    def leave(self) -> None:
        """One call under way here has ended."""
        self.in_flight -= 1

    def observe(self, seconds: float, alpha: float = 0.2) -> None:
        self.samples += 1
        previous = self.latency_s
        self.latency_s = seconds if previous is None else previous + alpha * (seconds - previous)


@dataclass(slots=True, eq=False)
class Model:
    """A model as clients see it, by the name they ask for."""

    name: str
    deployments: list[Deployment]
    owned_by: str
    created: int
    aliases: tuple[str, ...] = ()

    def card(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
        }


class Catalog:
    def __init__(self, config: Config) -> None:
        created = int(time.time())
        table = {}
        if any(
            d.price is None or d.context_window is None
            for m in config.models
            for d in m.deployments
        ):
            table = bundled_prices()
        self.models: dict[str, Model] = {}
        self.aliases: dict[str, str] = {}
        for m in config.models:
            deployments = [
                Deployment(
                    d.label,
                    d.model,
                    d.provider,
                    d,
                    price_of(d.price, d.model, table),
                    _window(d, table),
                )
                for d in m.deployments
            ]
            self.models[m.name] = Model(m.name, deployments, m.owned_by, created, tuple(m.aliases))
            self.aliases.update(dict.fromkeys(m.aliases, m.name))

    def find(self, name: str) -> Model | None:
        model = self.models.get(name)
        if model is None and name in self.aliases:
            model = self.models[self.aliases[name]]
        return model

    def get(self, name: str) -> Model:
        model = self.find(name)
        if model is None:
            raise ModelNotFound(name)
        return model


def _window(config: DeploymentConfig, table: dict) -> int | None:
    if config.context_window is not None:
        return config.context_window
    bundled = lookup(config.model, table)
    return bundled.context_window if bundled else None
