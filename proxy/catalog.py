"""The models the gateway serves and the deployments behind each."""

from __future__ import annotations

import time
from dataclasses import dataclass

from proxy import upstream
from proxy.config import Config, DeploymentConfig
from proxy.errors import ModelNotFound
from proxy.prices import Price, bundled_prices, price_of


@dataclass(slots=True, eq=False)
class Deployment:
    """One place a model can be served: a provider and the model name it knows."""

    name: str
    model: str  # the model name sent upstream
    provider: str
    upstream: upstream.Upstream
    config: DeploymentConfig
    price: Price | None = None


@dataclass(slots=True, eq=False)
class Model:
    """A model as clients see it, by the name they ask for."""

    name: str
    deployments: list[Deployment]
    owned_by: str
    created: int

    def card(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
        }


class Catalog:
    def __init__(self, config: Config) -> None:
        self.upstreams = {name: upstream.create(name, p) for name, p in config.providers.items()}
        created = int(time.time())
        table = {}
        if any(d.price is None for m in config.models for d in m.deployments):
            table = bundled_prices()
        self.models: dict[str, Model] = {}
        for m in config.models:
            deployments = [
                Deployment(
                    d.label,
                    d.model,
                    d.provider,
                    self.upstreams[d.provider],
                    d,
                    price_of(d.price, d.model, table),
                )
                for d in m.deployments
            ]
            self.models[m.name] = Model(m.name, deployments, m.owned_by, created)

    def find(self, name: str) -> Model | None:
        return self.models.get(name)

    def get(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    async def start(self) -> None:
        for u in self.upstreams.values():
            await u.start()

    async def close(self) -> None:
        for u in self.upstreams.values():
            await u.close()
