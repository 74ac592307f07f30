"""Upstream adapters, one module per provider type.

Each module defines `Config` (its `providers:` entry) and `Upstream` (the
adapter). Modules import only light dependencies at import time; litellm is
imported when a litellm provider starts.
"""

from __future__ import annotations

import importlib

from proxy.upstream.base import ProviderConfig, Upstream

PROVIDER_TYPES = {
    "openai": "proxy.upstream.openai",
    "litellm": "proxy.upstream.litellm",
    "tgi": "proxy.upstream.tgi",
    "simulated": "proxy.upstream.simulated",
}


def config_class(kind: str) -> type[ProviderConfig]:
    return importlib.import_module(PROVIDER_TYPES[kind]).Config


def create(name: str, config: ProviderConfig) -> Upstream:
    module = importlib.import_module(PROVIDER_TYPES[config.type])
    return module.Upstream(name, config)


__all__ = ["PROVIDER_TYPES", "ProviderConfig", "Upstream", "config_class", "create"]
