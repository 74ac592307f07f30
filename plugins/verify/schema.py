"""The json_schema check: an answer that must be JSON, and tool-call arguments,
validated against the schema the request gave.

Schemas come from clients, so they are untrusted: `pattern` and
`patternProperties` run on RE2 (linear time, no catastrophic backtracking; a
pattern RE2 cannot express, with backreferences or lookaround, is refused with
a 400), `$ref` resolves only inside the schema (nothing is fetched), and a
schema is capped in size. Validators are compiled once per schema.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson
import re2
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from referencing.exceptions import Unresolvable

from proxy.errors import InvalidRequest

MAX_SCHEMA_BYTES = 64 * 1024
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def _compile(pattern: str):
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error:
        why = f"pattern {pattern!r} is not supported (no backreferences or lookaround)"
        raise SchemaError(why) from None


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not _compile(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator, pattern_properties, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        compiled = _compile(pattern)
        for name, value in instance.items():
            if compiled.search(name):
                yield from validator.descend(value, subschema, path=name, schema_path=pattern)


SafeValidator = validators.extend(
    Draft202012Validator, {"pattern": _pattern, "patternProperties": _pattern_properties}
)


class Schemas:
    """Compiled validators by schema, the most recent `size` kept."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._compiled: OrderedDict[bytes, Any] = OrderedDict()

    def validator(self, schema: Any, param: str):
        try:
            key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # not JSON after all (an integer past 64 bits)
            raise InvalidRequest("The schema is not a JSON value.", param=param) from None
        found = self._compiled.get(key)
        if found is not None:
            self._compiled.move_to_end(key)
            return found
        if len(key) > MAX_SCHEMA_BYTES:
            raise InvalidRequest(
                f"The schema is larger than {MAX_SCHEMA_BYTES} bytes.", param=param
            )
        if not isinstance(schema, dict):
            raise InvalidRequest("The schema must be a JSON object.", param=param)
        try:
            SafeValidator.check_schema(schema)
            for keyword in _patterns(schema):
                _compile(keyword)
        except SchemaError as exc:
            raise InvalidRequest(f"Invalid schema: {exc.message}", param=param) from None
        compiled = SafeValidator(schema)
        self._compiled[key] = compiled
        if len(self._compiled) > self.size:
            self._compiled.popitem(last=False)
        return compiled

    def errors(self, schema: Any, instance: Any, param: str) -> str | None:
        """Why `instance` does not validate against `schema` (None when it does)."""
        validator = self.validator(schema, param)
        try:
            error = best_match(validator.iter_errors(instance))
        except SchemaError as exc:  # a pattern found only while validating
            raise InvalidRequest(f"Invalid schema: {exc.message}", param=param) from None
        except (Unresolvable, RecursionError) as exc:  # a $ref outside it, or a $ref loop
            raise InvalidRequest(f"Invalid schema: {type(exc).__name__}", param=param) from None
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        return f"{error.message}" + (f" (at /{where})" if where else "")


def _patterns(schema: Any):
    """Every regular expression a schema holds, so a bad one is refused up front."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                yield node["pattern"]
            if isinstance(node.get("patternProperties"), dict):
                yield from (k for k in node["patternProperties"] if isinstance(k, str))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def requested_format(body: dict) -> tuple[str, Any] | None:
    """("json_schema", schema) or ("json_object", None) when the request asks for JSON."""
    spec = body.get("response_format")
    if not isinstance(spec, dict):
        return None
    kind = spec.get("type")
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        inner = spec.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else None
        return "json_schema", schema if schema is not None else {}
    return None


def check_answer(schemas: Schemas, body: dict, text: str) -> str | None:
    """Why the answer's text fails the requested JSON format (None when it passes)."""
    wanted = requested_format(body)
    if wanted is None:
        return None
    try:
        value = orjson.loads(unfenced(text))
    except orjson.JSONDecodeError as exc:
        return f"the answer is not valid JSON: {exc}"
    kind, schema = wanted
    if kind == "json_object":
        return None if isinstance(value, dict) else "the answer is JSON but not an object"
    return schemas.errors(schema, value, "response_format")


def check_tool_calls(schemas: Schemas, body: dict, tool_calls: list[dict]) -> str | None:
    """Why some tool call's arguments fail its tool's parameter schema (None if none do)."""
    tools = {}
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            tools[function["name"]] = function.get("parameters") or {"type": "object"}
    for call in tool_calls:
        function = call.get("function") or {}
        name = function.get("name")
        if name not in tools:
            return f"the answer calls a tool the request did not offer: {name!r}"
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError as exc:
            return f"the arguments of {name} are not valid JSON: {exc}"
        problem = schemas.errors(tools[name], arguments, "tools")
        if problem is not None:
            return f"the arguments of {name} do not match its parameters: {problem}"
    return None


def unfenced(text: str) -> str:
    """JSON mode answers sometimes come in a ```json fence: look inside it."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```"):
        body = stripped[3:-3]
        return body.split("\n", 1)[1] if "\n" in body else body
    return stripped
