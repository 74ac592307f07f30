"""The JSON Schema of proxy.yaml, generated from the config dataclasses.

`meshgate schema` prints it, so editors complete and check the file (for
example with the YAML language server: `# yaml-language-server:
$schema=meshgate.schema.json` on the first line). It is made from the same
classes the loader builds (proxy/_schema.py), the providers' and the installed
plugins' included, so it cannot drift from what the gateway accepts; checks
that need more than one key (a deployment's provider must exist) stay the
loader's. A number or a boolean may also be written as `${VAR}`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from proxy import upstream
from proxy.config import HealthConfig, ModelConfig, ServerConfig, StateConfig
from proxy.registry import plugin_class, registered

DIALECT = "https://json-schema.org/draft/2020-12/schema"
_INTERPOLATED = {"type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}"}


def config_schema() -> dict[str, Any]:
    providers = [of(upstream.config_class(kind)) for kind in sorted(upstream.PROVIDER_TYPES)]
    return {
        "$schema": DIALECT,
        "title": "Meshgate gateway config (proxy.yaml)",
        "type": "object",
        "additionalProperties": False,
        "required": ["models"],
        "properties": {
            "server": of(ServerConfig),
            "state": of(StateConfig),
            "health": of(HealthConfig),
            "providers": {"type": "object", "additionalProperties": {"anyOf": providers}},
            "models": {"type": "array", "minItems": 1, "items": of(ModelConfig)},
            "pipeline": {"type": "array", "items": {"anyOf": _plugins()}},
        },
    }


def _plugins() -> list[dict[str, Any]]:
    """Each registered plugin as `name` or `{name: settings}`; `module:Class` plugins
    of one's own with any settings."""
    entries: list[dict[str, Any]] = []
    for name in sorted(registered()):
        settings: dict[str, Any]
        try:
            config = getattr(plugin_class(name), "Config", None)
        except ImportError:  # its extra is not installed here: any settings
            settings = {}
        else:
            settings = {"anyOf": [of(config), {"type": "null"}]} if config else {"type": "null"}
        entries.append({"const": name})
        entries.append({"type": "object", "properties": {name: settings}, "required": [name],
                        "additionalProperties": False})  # fmt: skip
    custom = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
    entries.append({"type": "string", "pattern": custom})
    entries.append({"type": "object", "minProperties": 1, "maxProperties": 1,
                    "patternProperties": {custom: {}}, "additionalProperties": False})  # fmt: skip
    return entries


def of(tp: Any) -> dict[str, Any]:
    """The schema of one config type, as the loader reads it."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp)
    if origin in (Union, types.UnionType):
        options = [of(t) if t is not type(None) else {"type": "null"} for t in get_args(tp)]
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (list, tuple):
        return {"type": "array", "items": of(get_args(tp)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": of(get_args(tp)[1])}
    if tp is Any:
        return {}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if tp in simple:
        if tp is str:
            return {"type": "string"}
        return {"anyOf": [{"type": simple[tp]}, _INTERPOLATED]}
    raise TypeError(f"no JSON Schema for config type {tp!r}")


def _dataclass(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("internal"):
            continue
        schema = dict(of(hints[f.name]))
        if f.default is not dataclasses.MISSING:
            if isinstance(f.default, (str, int, float, bool)) or f.default is None:
                schema["default"] = f.default
        elif f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        properties[f.name] = schema
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        schema["description"] = " ".join(cls.__doc__.split())
    return schema
