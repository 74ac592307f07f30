"""OpenAI's request bodies: parse and check just what the gateway relies on.

Everything else in a body passes through unread, so fields the gateway does
not know (new OpenAI parameters, vendor extensions) reach the upstream as sent.
Messages follow api.openai.com's wording where it has one.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import InvalidRequest

INPUT_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}

_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def parse_request(endpoint: str, raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The API expects a JSON "
            "payload, but what was sent was not valid JSON."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {_kind(body)}.")
    _require(body, "model", str)
    if not body["model"]:
        raise InvalidRequest("you must provide a model parameter", param="model")
    field = INPUT_FIELD[endpoint]
    if endpoint == "chat":
        messages = _require(body, field, list)
        if not messages:
            raise InvalidRequest(
                "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                param="messages",
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(
                    f"Invalid 'messages[{i}]': expected an object with a string 'role'.",
                    param=f"messages[{i}]",
                )
    else:
        value = _require(body, field, (str, list))
        if isinstance(value, list) and not value:
            raise InvalidRequest(f"Invalid '{field}': empty array.", param=field)
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest(
            f"Invalid type for 'stream': expected a boolean, "
            f"but got {_kind(body['stream'])} instead.",
            param="stream",
        )
    if endpoint == "embeddings" and body.get("stream"):
        raise InvalidRequest("Embeddings cannot be streamed.", param="stream")
    return body


def _require(body: dict, name: str, types) -> Any:
    if name not in body or body[name] is None:
        raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)
    value = body[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        expected = " or ".join(_JSON_TYPES[t] for t in _tuple(types))
        raise InvalidRequest(
            f"Invalid type for '{name}': expected {expected}, but got {_kind(value)} instead.",
            param=name,
        )
    return value


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)
