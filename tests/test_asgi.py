"""proxy/asgi.py: a request's headers answer `get` exactly as starlette's do."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import Headers

from proxy.asgi import RequestHeaders

NAMES = st.sampled_from(["authorization", "Cache-Control", "x-meshgate-cache-ttl", "X-Request-Id"])
VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=8)


@given(st.lists(st.tuples(NAMES, VALUES), max_size=6), NAMES, st.sampled_from([None, "", "d"]))
def test_get_matches_starlettes_headers_in_any_case(fields, asked, default):
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in fields]
    scope = {"type": "http", "headers": raw}
    for name in (asked, asked.upper(), asked.lower()):
        assert RequestHeaders(scope=scope).get(name, default) == Headers(scope=scope).get(
            name, default
        )
