"""The simulated provider's answers read like a model's: whole sentences that end
with "stop", or a cut at max_tokens that ends with "length"."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.upstream.simulated import _answer


@given(
    tokens=st.integers(1, 300),
    max_tokens=st.none() | st.integers(1, 400) | st.integers(-5, 0) | st.booleans(),
)
def test_an_answer_is_whole_sentences_unless_max_tokens_cuts_it(tokens, max_tokens):
    words, finish = _answer(tokens, max_tokens)
    whole, _ = _answer(tokens, None)
    assert whole[-1].endswith(".") and len(whole) >= tokens
    limited = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0
    if limited and max_tokens < len(whole):
        assert (words, finish) == (whole[:max_tokens], "length")
    else:
        assert (words, finish) == (whole, "stop")
