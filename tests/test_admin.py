"""The guards of /admin/* and /metrics (proxy/admin.py), on every mix of keys set and
credentials sent."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.admin import check_admin, check_metrics
from proxy.errors import AuthenticationFailed, PermissionDenied

METRICS = "metrics-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
keys = st.sampled_from([METRICS, ADMIN])
# what a caller may send: no header, either key in any of the headers keys are read
# from, keys close to them, other schemes, junk
sent = st.one_of(
    st.just({}),
    st.builds(lambda k: {"authorization": f"Bearer {k}"}, keys),
    st.builds(lambda k: {"authorization": f"bearer  {k} "}, keys),
    st.builds(lambda k: {"x-api-key": k}, keys),
    st.builds(lambda k: {"api-key": k}, keys),
    st.builds(lambda k, cut: {"authorization": f"Bearer {k[:cut]}"}, keys, st.integers(0, 25)),
    st.builds(lambda k: {"authorization": f"Bearer {k}x"}, keys),
    st.builds(lambda k: {"authorization": f"Basic {k}"}, keys),
    st.builds(lambda t: {"authorization": t}, st.text(max_size=40)),
)


def offered(headers: dict) -> str | None:
    """The key a request offers, as a bearer token or an api-key header."""
    value = headers.get("authorization")
    if value is not None:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return headers.get("api-key") or headers.get("x-api-key")


@given(sent, st.sampled_from([None, METRICS]), st.sampled_from([None, ADMIN]), st.booleans())
def test_metrics_open_only_to_its_keys(headers, metrics_key, admin_key, public):
    def check() -> None:
        check_metrics(headers, metrics_key, admin_key, public)

    if public:
        check()
    elif metrics_key is None and admin_key is None:
        with pytest.raises(PermissionDenied) as refused:
            check()
        assert refused.value.code == "metrics_disabled"
    elif offered(headers) in {metrics_key, admin_key} - {None}:
        check()
    else:
        with pytest.raises(AuthenticationFailed) as refused:
            check()
        assert METRICS not in refused.value.message and ADMIN not in refused.value.message


@given(sent)
def test_the_metrics_key_does_not_open_admin_endpoints(headers):
    if offered(headers) == ADMIN:
        check_admin(headers, ADMIN)
    else:
        with pytest.raises(AuthenticationFailed):
            check_admin(headers, ADMIN)
    with pytest.raises(PermissionDenied):
        check_admin(headers, None)
