"""What every upstream adapter shares: common settings and the adapter contract."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from proxy.errors import (
    GatewayError,
    InvalidRequest,
    ProviderNotConfigured,
    UpstreamStatus,
    UpstreamTooLarge,
    from_upstream_body,
    retry_after_header,
)
from proxy.redact import Redactor

if TYPE_CHECKING:
    from proxy.pipeline import Call, Reply

ENDPOINT_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    connect_s: float = 10.0
    read_s: float = 300.0  # longest silence between two bytes of an answer
    total_s: float = 600.0  # the whole request, stream included

    def __post_init__(self) -> None:
        if min(self.connect_s, self.read_s, self.total_s) <= 0:
            raise ValueError("timeouts must be positive")


MIN_RESPONSE_BYTES = 1024
ERROR_BODY_BYTES = 64 * 1024  # of an upstream's error answer: its message is at the start


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderConfig:
    type: str
    headers: dict[str, str] = field(default_factory=dict)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    # Connections one worker holds open to this provider at once (default: as many
    # as the worker takes from clients, server.max_connections); a call past them
    # waits pool_timeout_s at most, then gets 503 upstream_pool_exhausted.
    max_connections: int | None = None
    pool_timeout_s: float = 10.0
    # The most of one answer held in memory: a buffered body (as decompressed), or
    # one event of a stream. Past it the answer is cut off with a 502 (an upstream
    # that never ends a body or an event cannot grow a worker without bound).
    max_response_bytes: int = 128 * 1024 * 1024
    # Environment variables the config names but the environment lacks.
    missing_env: tuple[str, ...] = field(default=(), metadata={"internal": True})

    def __post_init__(self) -> None:  # a subclass's own calls it by name: slots break super()
        if self.max_response_bytes < MIN_RESPONSE_BYTES:
            raise ValueError(f"max_response_bytes must be at least {MIN_RESPONSE_BYTES}")


class Upstream:
    """Sends a Call to one provider and returns its Reply in OpenAI's format."""

    endpoints: frozenset[str] = frozenset(ENDPOINT_PATHS)

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config
        self.redact = Redactor(secrets_of(config), credentials_of(config))

    async def start(self) -> None:
        """Open clients and pools; runs in the worker's event loop."""

    async def close(self) -> None:
        """Release what start() opened."""

    async def send(self, call: Call, model: str) -> Reply:
        """Send `call` as a request for `model` (the provider's name for it)."""
        raise NotImplementedError

    def refusal(self, call: Call) -> GatewayError | None:
        """Why this provider cannot take `call` at all, known before anything is sent
        (a credential missing, the endpoint not served; an adapter adds what its
        protocol lacks); None when it can. The gateway asks before choosing a
        deployment, so a model's other deployments serve what this one cannot."""
        if not self.config.missing_env and call.endpoint in self.endpoints:
            return None
        try:
            self.check_ready(call.endpoint)
        except GatewayError as exc:
            return exc
        return None

    def check_ready(self, endpoint: str) -> None:
        if self.config.missing_env:
            names = ", ".join(self.config.missing_env)
            raise ProviderNotConfigured(
                f"provider '{self.name}' cannot be called: environment variable {names} is not set"
            )
        if endpoint not in self.endpoints:
            raise InvalidRequest(
                f"provider '{self.name}' ({self.config.type}) does not serve /v1/{_path(endpoint)}",
                param="model",
            )

    def too_large(self, what: str) -> UpstreamTooLarge:
        most = self.config.max_response_bytes
        return UpstreamTooLarge(
            f"provider '{self.name}' sent {what} larger than max_response_bytes ({most}); "
            "it was cut off"
        )

    def status_error(self, status: int, raw: bytes, headers) -> GatewayError:
        """The gateway's error for an upstream's non-2xx answer: the one status policy
        every adapter shares."""
        if 300 <= status < 400:
            # Following would re-send the body, and for some providers the key, to a
            # host the config never named.
            return UpstreamStatus(
                502,
                f"provider '{self.name}' answered with a redirect (status {status}); "
                "the gateway does not follow upstream redirects",
                code="upstream_redirect",
            )
        if status in (401, 403):
            # The client cannot fix the gateway's credentials, and the upstream's
            # message may quote part of the key.
            return UpstreamStatus(
                502,
                f"provider '{self.name}' rejected the gateway's credentials (status {status})",
                code="upstream_auth_failed",
            )
        passed = retry_after_header(headers.get("retry-after") if headers else None)
        return from_upstream_body(status, self.redact.bytes(raw), passed)


def provider_headers(config: ProviderConfig) -> dict[str, str]:
    """What every request to a provider carries: its key (Azure's `api-key` header,
    else a bearer token), then its configured headers, which win."""
    headers = {}
    key = getattr(config, "api_key", None)
    if key:
        if getattr(config, "azure", False):
            headers["api-key"] = key
        else:
            headers["authorization"] = f"Bearer {key}"
    headers.update({k.lower(): v for k, v in config.headers.items()})
    return headers


def check_base_url(url: str | None, key: str = "base_url") -> None:
    """A provider's address as an adapter joins paths to it: http or https, a host,
    and no credentials in it (they belong in api_key or headers, which are kept out
    of errors and logs; aiohttp refuses a URL's beside an Authorization header),
    query or fragment (the paths go after it; Azure's version is api_version). The
    URL itself is never quoted: it may hold a credential. An empty one is an unset
    ${VAR}: the provider is reported as unusable instead."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # parses the port: a bad one raises ValueError
    except ValueError:
        raise ValueError(f"{key} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key} must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{key} must not carry credentials (user:password@): use api_key or headers"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"{key} must not have a query or a fragment: paths are appended to it")


async def gather(chunks: AsyncIterator[bytes], most: int) -> bytes | None:
    """A body from its chunks, or None once they pass `most` bytes (the rest unread)."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > most:
            return None
        parts.append(chunk)
    return b"".join(parts)


def secrets_of(config: ProviderConfig) -> list[str]:
    """Every credential a provider's config holds: its key, header values, and the
    string settings passed through to a client library."""
    found = [getattr(config, "api_key", None), *config.headers.values()]
    extra = getattr(config, "extra", None)
    if isinstance(extra, dict):
        found += [v for v in extra.values() if isinstance(v, str)]
    return [s for s in found if isinstance(s, str)]


# Settings named like these hold a credential; other header values (an
# organisation, a feature flag) are not hidden from answers, only from errors.
_CREDENTIAL = re.compile(r"auth|key|token|secret|password|cookie|credential", re.IGNORECASE)


def credentials_of(config: ProviderConfig) -> list[str]:
    """The credentials among a provider's settings, hidden even from answers: its key,
    and header values and pass-through settings whose names say they are one."""
    found = [getattr(config, "api_key", None)]
    found += [v for k, v in config.headers.items() if _CREDENTIAL.search(k)]
    extra = getattr(config, "extra", None)
    if isinstance(extra, dict):
        found += [v for k, v in extra.items() if isinstance(v, str) and _CREDENTIAL.search(k)]
    return [s for s in found if isinstance(s, str)]


def _path(endpoint: str) -> str:
    return ENDPOINT_PATHS[endpoint].lstrip("/")
