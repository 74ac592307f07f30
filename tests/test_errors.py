"""The error tree's reading of what upstreams say: Retry-After."""

from __future__ import annotations

import email.utils
import math

from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import MAX_RETRY_AFTER_S, retry_after_header, retry_after_s

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
)
DATES = st.integers(min_value=0, max_value=2**33).map(
    lambda t: email.utils.formatdate(t, usegmt=True)
)


@given(st.one_of(NUMBERS, DATES, st.text(max_size=40)))
def test_a_retry_after_is_a_sane_number_of_seconds_or_nothing(value):
    seconds = retry_after_s(value)
    assert seconds is None or 0 <= seconds <= MAX_RETRY_AFTER_S
    header = retry_after_header(value)
    if seconds is None:
        assert header == {}
    else:
        assert header == {"retry-after": str(math.ceil(seconds))}
        assert header["retry-after"].isdigit()


@given(st.floats(min_value=0, max_value=MAX_RETRY_AFTER_S))
def test_a_number_of_seconds_is_taken_as_it_is(seconds):
    assert retry_after_s(repr(seconds)) == seconds


@given(st.floats(allow_nan=True, allow_infinity=True).filter(
    lambda x: not 0 <= x <= MAX_RETRY_AFTER_S))  # fmt: skip
def test_a_number_out_of_range_is_nothing(seconds):
    assert retry_after_s(repr(seconds)) is None
