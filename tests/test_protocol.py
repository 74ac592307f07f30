"""proxy/protocol.py: the one token estimate (about four characters a token, counting
every string of the input, roles, names, tool calls and their arguments, and one
per token id, whatever shape the input takes), and the checks of OpenAI's
established parameters."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.protocol import (
    COMPLETION_PARAMETERS,
    DEFAULT_COMPLETION_TOKENS,
    PARAMETERS,
    estimate_prompt_tokens,
    estimate_tokens,
    parse_request,
)
from tests.conftest import PARAM_VALUES

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)


def characters(value) -> int:
    """The count, written as plainly as possible."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(characters(v) for v in value.values())
    if isinstance(value, list):
        return sum(1 if isinstance(v, int) and not isinstance(v, str) else characters(v)
                   for v in value)  # fmt: skip
    return 0


MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"])},
        optional={"content": JSON, "name": st.text(max_size=8), "tool_calls": JSON},
    ),
    max_size=4,
)


@given(st.one_of(MESSAGES, JSON))
def test_a_chat_prompt_counts_every_string_of_its_messages(messages):
    assert estimate_prompt_tokens("chat", {"messages": messages}) == characters(messages) // 4 + 1


@given(JSON, st.sampled_from(["completions", "embeddings"]))
def test_a_prompt_or_an_input_counts_the_same_way(prompt, endpoint):
    field = "prompt" if endpoint == "completions" else "input"
    assert estimate_prompt_tokens(endpoint, {field: prompt}) == characters(prompt) // 4 + 1


@given(
    MESSAGES,
    st.none() | st.integers(-3, 5000) | st.text(max_size=3),
    st.none() | st.integers(-3, 8),
    st.none() | st.integers(1, 4096),
)
def test_a_call_reserves_its_prompt_and_its_answers_limit_times_n(messages, limit, n, default):
    body = {"messages": messages, "max_tokens": limit, "n": n}
    answer = limit if isinstance(limit, int) and limit > 0 else None
    if answer is None:
        answer = DEFAULT_COMPLETION_TOKENS if default is None else default
    times = n if isinstance(n, int) and n > 0 else 1
    expected = characters(messages) // 4 + 1 + answer * times
    assert estimate_tokens("chat", body, default) == expected
    assert estimate_tokens("embeddings", {"input": messages}) == characters(messages) // 4 + 1


def fits(spec: tuple, value) -> bool:
    """Whether `value` is of a parameter's JSON type, and within its range or of its
    items' type, as PARAMETERS says; written out apart from the code under test."""
    types = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    if isinstance(value, bool) and bool not in types:
        return False
    if not isinstance(value, types):
        return False
    if len(spec) == 3:
        return spec[1] <= value <= spec[2]
    if len(spec) == 2:
        return all(isinstance(v, spec[1]) and not isinstance(v, bool) for v in value)
    return True


SAMPLES = PARAM_VALUES | st.integers(-30, 30) | st.floats(-3, 3) | st.lists(
    st.dictionaries(st.sampled_from(["type", "function"]), st.text(max_size=5)), max_size=2
)  # fmt: skip


@given(st.sampled_from(["chat", "completions", "embeddings"]),
       st.sampled_from(sorted(PARAMETERS)), SAMPLES)  # fmt: skip
def test_an_established_parameter_passes_only_with_its_type_and_range(endpoint, name, value):
    spec = (COMPLETION_PARAMETERS if endpoint == "completions" else PARAMETERS)[name]
    first = {"chat": {"messages": [{"role": "user", "content": "hi"}]},
             "completions": {"prompt": "hi"}, "embeddings": {"input": "hi"}}[endpoint]  # fmt: skip
    raw = orjson.dumps({"model": "m", **first, name: value})
    allowed = value is None or fits(spec, value)
    if name == "response_format" and allowed and value is not None:
        allowed = isinstance(value.get("type"), str)
    if name == "logit_bias" and allowed and value is not None:
        allowed = all(type(v) in (int, float) and -100 <= v <= 100 for v in value.values())
    if allowed:
        assert parse_request(endpoint, raw)[name] == value
    else:
        with pytest.raises(InvalidRequest) as refused:
            parse_request(endpoint, raw)
        assert refused.value.param == name and refused.value.status == 400


@pytest.mark.parametrize(
    ("endpoint", "logprobs", "ok"),
    [("chat", True, True), ("chat", 3, False), ("completions", 3, True),
     ("completions", True, False), ("completions", 6, False)],
)  # fmt: skip
def test_logprobs_is_a_flag_in_chat_and_a_count_in_completions(endpoint, logprobs, ok):
    first = {"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat" else {
        "prompt": "hi"}  # fmt: skip
    raw = orjson.dumps({"model": "m", **first, "logprobs": logprobs})
    if ok:
        assert parse_request(endpoint, raw)["logprobs"] == logprobs
    else:
        with pytest.raises(InvalidRequest):
            parse_request(endpoint, raw)
