"""proxy/asgi.py: a request's headers answer `get` exactly as starlette's do."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import Headers

from proxy.asgi import RequestHeaders, accepts_gzip

NAMES = st.sampled_from(["authorization", "Cache-Control", "x-meshgate-cache-ttl", "X-Request-Id"])
VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=8)


@given(
    st.lists(st.tuples(NAMES, VALUES), max_size=6),
    st.lists(NAMES, min_size=1, max_size=4),
    st.sampled_from([None, "", "d"]),
)
def test_get_matches_starlettes_headers_in_any_case(fields, asked, default):
    """Asked several times (the first `get` builds a table the others read)."""
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in fields]
    scope = {"type": "http", "headers": raw}
    ours, theirs = RequestHeaders(scope=scope), Headers(scope=scope)
    for name in asked:
        for spelled in (name, name.upper(), name.lower()):
            assert ours.get(spelled, default) == theirs.get(spelled, default)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("gzip", True), ("gzip, deflate, br", True), ("br;q=1.0, gzip;q=0.5", True),
        ("GZIP", True), ("x-gzip", True), ("*", True), ("*;q=0.1", True),
        (None, False), ("", False), ("identity", False), ("br", False),
        ("gzip;q=0", False), ("gzip;q=0.0, *", False), ("*;q=0", False),
        ("gzip;q=nonsense", False), ("deflate, *;q=0", False),
    ],
)  # fmt: skip
def test_gzip_is_used_only_where_accept_encoding_allows_it(value, accepted):
    assert accepts_gzip(value) is accepted


@given(st.text(max_size=40))
def test_any_accept_encoding_gets_an_answer_never_an_exception(value):
    assert accepts_gzip(value) in (True, False)
