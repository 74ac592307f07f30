"""OpenAI's request bodies: parse and check what the gateway and its adapters rely on.

What the gateway itself reads (the model, the input's shape, `stream`,
`stream_options`, `max_tokens`, `max_completion_tokens`, `n`, `temperature`,
`stop`) is type- and range-checked here, so no later step meets a value it
cannot use. OpenAI's other established parameters (`tools`, `tool_choice`,
`response_format`, `logit_bias`, `seed`, ...) are checked for their JSON type
and range, as api.openai.com checks them, since the TGI and litellm adapters
translate them: a malformed one is the client's 400 whichever provider serves
the model, never a failure of the provider's. Fields the gateway does not know
(new parameters, vendor extensions) pass through unread and reach the upstream
as sent. Messages follow api.openai.com's wording where it has one.

`prompt_text` and `estimate_tokens` are the one reading of a request's text and
size that every plugin shares.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from proxy.errors import InvalidRequest

INPUT_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}

MAX_DEPTH = 64  # nesting of arrays and objects; orjson writes at most 254 levels
MAX_MODEL_CHARS = 256
MAX_OUTPUT_TOKENS = 1 << 24  # far above any model's; what matters is that it is bounded
MAX_CHOICES = 128  # OpenAI's own limit for `n`
DEFAULT_COMPLETION_TOKENS = 1024  # what an answer is assumed to cost when no max_tokens is set

# OpenAI's established parameters, by JSON type and range, checked when present
# (low and high bound numbers; for arrays, the type of their items).
PARAMETERS: dict[str, tuple[Any, ...]] = {
    "tools": (list, dict), "functions": (list, dict), "modalities": (list, str),
    "tool_choice": ((str, dict),), "function_call": ((str, dict),),
    "response_format": (dict,), "logit_bias": (dict,), "audio": (dict,),
    "prediction": (dict,), "web_search_options": (dict,), "metadata": (dict,),
    "logprobs": (bool,), "parallel_tool_calls": (bool,), "store": (bool,), "echo": (bool,),
    "user": (str,), "reasoning_effort": (str,), "service_tier": (str,), "suffix": (str,),
    "encoding_format": (str,),
    "seed": (int, -(2**63), 2**64 - 1), "top_logprobs": (int, 0, 20),
    "best_of": (int, 1, MAX_CHOICES), "dimensions": (int, 1, 1 << 16),
    "top_p": ((int, float), 0, 1), "presence_penalty": ((int, float), -2, 2),
    "frequency_penalty": ((int, float), -2, 2),
}  # fmt: skip
# legacy completions count their logprobs: how many alternatives to list per token
COMPLETION_PARAMETERS = {**PARAMETERS, "logprobs": (int, 0, 5)}

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
    except orjson.JSONDecodeError as exc:
        if "recursion" in str(exc):
            raise InvalidRequest(
                f"The request nests arrays and objects more than {MAX_DEPTH} levels deep."
            ) from None
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The API expects a JSON "
            "payload, but what was sent was not valid JSON."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {_kind(body)}.")
    # Cheap first: a body with fewer brackets than the limit cannot nest deeper.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        for name, value in body.items():
            if _deeper_than(value, MAX_DEPTH - 1):
                raise InvalidRequest(
                    f"Invalid '{name}': arrays and objects nested more than {MAX_DEPTH} "
                    "levels deep.",
                    param=name,
                )
    model = _require(body, "model", str)
    if not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(
            f"Invalid 'model': longer than {MAX_MODEL_CHARS} characters.", param="model"
        )
    if endpoint == "chat":
        _check_messages(_require(body, "messages", list))
    else:
        _check_input(body, INPUT_FIELD[endpoint])
    _optional(body, "stream", bool)
    if endpoint == "embeddings" and body.get("stream"):
        raise InvalidRequest("Embeddings cannot be streamed.", param="stream")
    options = _optional(body, "stream_options", dict)
    if options is not None and options.get("include_usage") is not None:
        if not isinstance(options["include_usage"], bool):
            raise InvalidRequest(
                "Invalid type for 'stream_options.include_usage': expected a boolean.",
                param="stream_options.include_usage",
            )
    for name in ("max_tokens", "max_completion_tokens"):
        _bounded(body, name, int, 1, MAX_OUTPUT_TOKENS)
    _bounded(body, "n", int, 1, MAX_CHOICES)
    _bounded(body, "temperature", (int, float), 0, 2)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest(
                "Invalid 'stop': expected a string or an array of strings.", param="stop"
            )
    checked = COMPLETION_PARAMETERS if endpoint == "completions" else PARAMETERS
    for name in body:
        if name in checked and body[name] is not None:
            _check_parameter(body, name, checked[name])
    return body


def _check_parameter(body: dict, name: str, spec: tuple[Any, ...]) -> None:
    """One of PARAMETERS: its type, then its items' type or its range."""
    types = spec[0]
    if len(spec) == 3:
        _bounded(body, name, types, spec[1], spec[2])
        return
    value = _require(body, name, types)
    if name == "response_format" and not isinstance(value.get("type"), str):
        raise InvalidRequest(
            "Invalid 'response_format': expected an object with a string 'type'.",
            param="response_format",
        )
    if name == "logit_bias" and not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100
        for v in value.values()
    ):
        raise InvalidRequest(
            "Invalid 'logit_bias': expected an object of numbers from -100 to 100.",
            param="logit_bias",
        )
    if len(spec) == 2 and not all(
        isinstance(item, spec[1]) and not isinstance(item, bool) for item in value
    ):
        raise InvalidRequest(
            f"Invalid '{name}': expected an array of {_JSON_TYPES[spec[1]].split(' ', 1)[1]}s.",
            param=name,
        )


def _check_messages(messages: list) -> None:
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
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise InvalidRequest(
                f"Invalid type for 'messages[{i}].content': expected a string or an array "
                f"of content parts, but got {_kind(content)} instead.",
                param=f"messages[{i}].content",
            )
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(
                    f"Invalid '{where}': expected an object with a string 'type'.", param=where
                )
            if "text" in part and not isinstance(part["text"], str):
                raise InvalidRequest(
                    f"Invalid type for '{where}.text': expected a string, "
                    f"but got {_kind(part['text'])} instead.",
                    param=f"{where}.text",
                )


def _check_input(body: dict, field: str) -> None:
    """A prompt or embeddings input: text, an array of texts, of token ids, or of arrays
    of token ids."""
    value = _require(body, field, (str, list))
    if isinstance(value, str):
        return
    if not value:
        raise InvalidRequest(f"Invalid '{field}': empty array.", param=field)
    kinds = {_input_item(item) for item in value}
    if None in kinds or len(kinds) > 1:
        raise InvalidRequest(
            f"Invalid '{field}': expected a string, an array of strings, an array of "
            "integers, or an array of arrays of integers.",
            param=field,
        )


def _input_item(item: Any) -> str | None:
    if isinstance(item, str):
        return "text"
    if isinstance(item, int) and not isinstance(item, bool):
        return "token"
    if (
        isinstance(item, list)
        and item
        and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
    ):
        return "tokens"
    return None


def _optional(body: dict, name: str, types) -> Any:
    value = body.get(name)
    if value is not None:
        _require(body, name, types)
    return value


def _bounded(body: dict, name: str, types, low: float, high: float) -> None:
    value = _optional(body, name, types)
    if value is not None and not low <= value <= high:
        raise InvalidRequest(
            f"Invalid '{name}': {value!r} is out of range; expected a value from {low:g} "
            f"to {high:g}.",
            param=name,
        )


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def prompt_text(body: dict) -> str:
    """The request's text as the model reads it: every message's text content, or the
    prompt or input (token ids as their JSON)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(
                    p["text"]
                    for p in content
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
        return "\n".join(parts)
    prompt = body.get("prompt") or body.get("input") or ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return orjson.dumps(prompt).decode()


def estimate_tokens(endpoint: str, body: dict, default_completion: int | None = None) -> int:
    """Tokens a call may use, before it is made: about four characters a prompt token
    (every string of the input counts: tool calls and arguments are tokens too), plus
    the answer's limit (`max_completion_tokens`, `max_tokens`, else
    `default_completion`) times `n`."""
    prompt = estimate_prompt_tokens(endpoint, body)
    if endpoint == "embeddings":
        return prompt
    answer = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(answer, int) or answer <= 0:
        answer = DEFAULT_COMPLETION_TOKENS if default_completion is None else default_completion
    n = body.get("n")
    return prompt + answer * (n if isinstance(n, int) and n > 0 else 1)


def estimate_prompt_tokens(endpoint: str, body: dict) -> int:
    """The prompt's tokens, before it is sent: about four characters a token."""
    return _characters(body.get(INPUT_FIELD[endpoint])) // 4 + 1


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


MAX_USAGE_TOKENS = 10**9


def clean_usage(usage: Any) -> dict | None:
    """An upstream's `usage` as counts the gateway can add up: whole numbers from 0 to
    a billion, anything else left out (a hostile or broken upstream must not make
    spend negative or a hook fail)."""
    if not isinstance(usage, dict):
        return None
    clean = {
        k: v
        for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        if isinstance(v := usage.get(k), int)
        and not isinstance(v, bool)
        and 0 <= v <= MAX_USAGE_TOKENS
    }
    if "total_tokens" not in clean and ("prompt_tokens" in clean or "completion_tokens" in clean):
        clean["total_tokens"] = clean.get("prompt_tokens", 0) + clean.get("completion_tokens", 0)
    return clean or None


def _characters(value: Any) -> int:
    """Characters of text in messages, a prompt or an input, without serializing it."""
    if isinstance(value, str):
        return len(value)
    total = 0
    if isinstance(value, list):  # token ids count one each
        for v in value:
            if isinstance(v, str):
                total += len(v)
            elif isinstance(v, dict):  # a message, read here: a call fewer per message
                for w in v.values():
                    total += len(w) if isinstance(w, str) else _characters(w)
            else:
                total += 1 if isinstance(v, int) else _characters(v)
    elif isinstance(value, dict):
        for v in value.values():
            total += len(v) if isinstance(v, str) else _characters(v)
    return total
