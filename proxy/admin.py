"""`/admin/*` endpoints: plugins register them, one guard checks the admin key.

The admin key is the server's (`server.admin_key`); without it the admin
endpoints answer 403. It is separate from client keys and compared in
constant time. `/metrics` has its guard here too: it shows every tenant's
usage and spend, so it takes `server.metrics_key` or the admin key, unless
`server.metrics_public` opens it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from proxy.errors import AuthenticationFailed, PermissionDenied


@dataclass(frozen=True, slots=True)
class AdminRoute:
    path: str  # under /admin/
    methods: tuple[str, ...]
    handler: Callable[[Request], Awaitable[Any]]  # returns a JSON-able value


def bearer_token(headers) -> str | None:
    """The caller's key from `Authorization: Bearer`, `api-key` or `x-api-key`."""
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return headers.get("api-key") or headers.get("x-api-key")


def check_admin(headers, admin_key: str | None) -> None:
    """Refuse unless the request carries the admin key."""
    if admin_key is None:
        raise PermissionDenied(
            "Admin endpoints are disabled: set `server.admin_key` in the config.",
            code="admin_disabled",
        )
    token = bearer_token(headers) or ""
    if not hmac.compare_digest(token.encode(), admin_key.encode()):
        raise AuthenticationFailed("This endpoint needs the admin key.")


def check_metrics(headers, metrics_key: str | None, admin_key: str | None, public: bool) -> None:
    """Refuse /metrics unless it is public or the request carries either key."""
    if public:
        return
    keys = [key.encode() for key in (metrics_key, admin_key) if key is not None]
    if not keys:
        raise PermissionDenied(
            "/metrics shows every tenant's usage and spend: set `server.metrics_key` "
            "(Prometheus sends it as a bearer token) or `server.metrics_public: true`.",
            code="metrics_disabled",
        )
    token = (bearer_token(headers) or "").encode()
    matches = [hmac.compare_digest(token, key) for key in keys]  # each compared, always
    if not any(matches):
        raise AuthenticationFailed("/metrics needs the metrics key (or the admin key).")
