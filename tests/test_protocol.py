"""proxy/protocol.py's one token estimate: about four characters a token, counting
every string of the input (roles, names, tool calls and their arguments) and one
per token id, whatever shape the input takes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol import DEFAULT_COMPLETION_TOKENS, estimate_prompt_tokens, estimate_tokens

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
