"""Turn parsed YAML into frozen dataclasses, with errors that name file, line and key.

YAML is composed into nodes first so every value keeps the line it came from;
`${VAR}` and `${VAR:-default}` are expanded in scalars; the result stays text
until a field asks for a number or a boolean, so `port: "${PORT:-8080}"` is an
int while an all-digit `api_key` stays a string. A `${VAR}` left unset becomes a
`Missing` value: sections that accept it (provider secrets) record it, the rest
reject it with its line.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

import yaml

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Loader


class ConfigError(ValueError):
    """A config file that cannot be served; the message names where and why."""


class SettingError(ValueError):
    """A bad setting, raised by a config class's checks or a plugin's constructor with
    the key it is about (a path below that section), so the error names its line."""

    def __init__(self, key: tuple | str, message: str) -> None:
        super().__init__(message)
        self.key = key if isinstance(key, tuple) else (key,)


@dataclasses.dataclass(frozen=True, slots=True)
class Missing:
    """An environment variable the config names but the environment lacks."""

    var: str


class Interpolated(str):
    """Text that came from `${VAR}` expansion, converted when a field wants a number."""


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Source:
    """Parsed YAML plus where each key path came from."""

    def __init__(self, text: str, filename: str, env: Mapping[str, str] | None = None) -> None:
        self.filename = filename
        self.env = os.environ if env is None else env
        self.lines: dict[tuple, int] = {}
        self._loader = _Loader("")
        try:
            node = yaml.compose(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{filename}:{mark.line + 1}" if mark else filename
            problem = f"{getattr(exc, 'problem', exc)}{_flow_hint(text, mark)}"
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        self.data = {} if node is None else self._value(node, ())

    def where(self, path: tuple) -> str:
        line = None
        probe = path
        while line is None and probe:
            line = self.lines.get(probe)
            probe = probe[:-1]
        dotted = format_path(path)
        return f"{self.filename}:{line}: {dotted}" if line else f"{self.filename}: {dotted}"

    def error(self, path: tuple, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {message}")

    def _value(self, node: yaml.Node, path: tuple) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = key_node.value
                if not isinstance(key_node, yaml.ScalarNode):
                    raise self.error(path, "mapping keys must be plain strings")
                if key in out:
                    raise self.error(path + (key,), "duplicate key")
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = self._value(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._value(item, path + (i,)) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _scalar(self, node: yaml.ScalarNode, path: tuple) -> Any:
        text = node.value
        if "${" not in text:
            return self._loader.construct_object(node)
        missing: list[str] = []

        def expand(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            value = self.env.get(name)
            if value:
                return value
            if default is not None:
                return default
            missing.append(name)
            return ""

        expanded = _VAR.sub(expand, text)
        if missing:
            return Missing(missing[0])
        return Interpolated(expanded)


def _flow_hint(text: str, mark) -> str:
    """The advice for the one YAML mistake the docs warn about: `${VAR}` unquoted in
    a `{...}` mapping, where YAML reads its braces as structure."""
    if mark is None:
        return ""
    nearby = text.splitlines()[max(0, mark.line - 1) : mark.line + 1]
    if any("${" in line and "{" in line.replace("${", "", 1) for line in nearby):
        return ' (a ${VAR} inside a {...} mapping must be quoted: key: "${VAR}")'
    return ""


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def build(cls: type, value: Any, path: tuple, src: Source, *, missing: list | None = None) -> Any:
    """Build dataclass `cls` from `value`, rejecting unknown keys and wrong types.

    With `missing` given, unset `${VAR}` values are recorded there and read as "".
    """
    return _build(cls, value, path, src, missing)


def _build(tp: Any, value: Any, path: tuple, src: Source, missing: list | None) -> Any:
    if isinstance(value, Missing):
        if missing is None:
            raise src.error(path, f"environment variable {value.var} is not set")
        missing.append(value.var)
        value = ""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, src, missing)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _build(option, value, path, src, missing)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(c) for c in get_args(tp))
            raise src.error(path, f"must be one of {choices}, not {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise src.error(path, f"must be a list, not {_kind(value)}")
        (item,) = get_args(tp)[:1]
        items = [_build(item, v, path + (i,), src, missing) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise src.error(path, f"must be a mapping, not {_kind(value)}")
        _, item = get_args(tp)
        return {k: _build(item, v, path + (k,), src, missing) for k, v in value.items()}
    if tp is Any:
        return value
    if tp in (int, float, bool) and isinstance(value, Interpolated):
        value = _convert(tp, value, path, src)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, Interpolated):
        return str(value)
    if tp is str and isinstance(value, datetime.date):  # YAML reads 2027-01-01 as a date
        return value.isoformat()
    if tp in (str, int, float, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise src.error(path, f"must be {tp.__name__}, not {_kind(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in a Config class


def _build_dataclass(cls: type, value: Any, path: tuple, src: Source, missing) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise src.error(path, f"must be a mapping, not {_kind(value)}")
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")
    }
    moved = getattr(cls, "MOVED", {})  # keys that now live elsewhere: where
    for key in value:
        if key in moved and key not in fields:
            raise src.error(path + (key,), f"this setting moved to {moved[key]}")
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise src.error(path + (key,), f"unknown key (expected one of: {known})")
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = _build(hints[name], value[name], path + (name,), src, missing)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise src.error(path, f"missing required key '{name}'")
    try:
        return cls(**kwargs)
    except SettingError as exc:
        raise src.error(path + exc.key, str(exc)) from None
    except ValueError as exc:  # __post_init__ checks, which name their key first
        return _raise_at_key(exc, path, value, src)


def _raise_at_key(exc: ValueError, path: tuple, value: dict, src: Source) -> Any:
    """Point a check's message at the key it starts with ("port must be ..."), else
    at the section."""
    first = str(exc).split(" ", 1)[0].strip("`'\",:")
    raise src.error(path + (first,) if first in value else path, str(exc)) from None


def _convert(tp: type, text: str, path: tuple, src: Source) -> Any:
    try:
        if tp is bool:
            return {"true": True, "false": False}[text.strip().lower()]
        return tp(text.strip())
    except (KeyError, ValueError):
        raise src.error(path, f"must be {tp.__name__}, not {text!r}") from None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
