"""Upstream adapters, one module per provider type, found by name.

Each module defines `Config` (its `providers:` entry) and `Upstream` (the
adapter, a `proxy.upstream.base.Upstream`). This registry imports a module only
when its type is used, so litellm and the rest stay unimported until configured,
and the config loader can read `providers:` without the adapters' code.
"""

from __future__ import annotations

import importlib

PROVIDER_TYPES = {
    "openai": "proxy.upstream.openai",
    "litellm": "proxy.upstream.litellm",
    "tgi": "proxy.upstream.tgi",
    "simulated": "proxy.upstream.simulated",
}


def config_class(kind: str) -> type:
    """The settings class of provider type `kind`."""
    return importlib.import_module(PROVIDER_TYPES[kind]).Config


def adapter_class(kind: str) -> type:
    """The adapter class of provider type `kind`."""
    return importlib.import_module(PROVIDER_TYPES[kind]).Upstream


__all__ = ["PROVIDER_TYPES", "adapter_class", "config_class"]
