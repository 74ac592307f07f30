"""Which plugins exist: the ones installed packages register, and `module:Class`.

A plugin is named in `pipeline:` either by a name registered as an entry point
in the group `meshgate.plugins` (the built-ins register theirs in this
project's pyproject.toml; a package of your own can do the same), or as
`module:Class` on the import path. The core never imports a plugin by module.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points

GROUP = "meshgate.plugins"


@cache
def registered() -> dict[str, str]:
    """Plugin name to `module:Class`, from every installed package's entry points."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def plugin_class(name: str) -> type:
    """The class of the plugin `name` (a registered name or `module:Class`)."""
    target = name
    if ":" not in name:
        known = registered()
        if name not in known:
            listed = ", ".join(sorted(known)) or "none: is meshgate installed (pip install -e .)?"
            raise ImportError(
                f"no plugin registered as '{name}' (registered: {listed}; "
                "a plugin of your own is named module:Class or registered as an entry point "
                f"in the group {GROUP})"
            )
        target = known[name]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import plugin module '{module_name}': {exc}") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ImportError(f"module '{module_name}' has no class '{attr}'")
    return cls
