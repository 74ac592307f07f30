"""What every upstream adapter shares: common settings and the adapter contract."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.errors import InvalidRequest, ProviderNotConfigured

if TYPE_CHECKING:
    from proxy.catalog import Deployment
    from proxy.pipeline import Call, Reply
    from proxy.sse import Event

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


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderConfig:
    type: str
    headers: dict[str, str] = field(default_factory=dict)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    # Environment variables the config names but the environment lacks.
    missing_env: tuple[str, ...] = field(default=(), metadata={"internal": True})


class Upstream:
    """Sends a Call to one provider and returns its Reply in OpenAI's format."""

    endpoints: frozenset[str] = frozenset(ENDPOINT_PATHS)

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config

    async def start(self) -> None:
        """Open clients and pools; runs in the worker's event loop."""

    async def close(self) -> None:
        """Release what start() opened."""

    async def send(self, call: Call, deployment: Deployment) -> Reply:
        raise NotImplementedError

    def check_ready(self, endpoint: str) -> None:
        if self.config.missing_env:
            names = ", ".join(self.config.missing_env)
            raise ProviderNotConfigured(
                f"provider '{self.name}' cannot be called: environment variable {names} is not set"
            )
        if endpoint not in self.endpoints:
            raise InvalidRequest(
                f"provider '{self.name}' ({self.config.type}) does not serve /v1/{_path(endpoint)}"
            )


def _path(endpoint: str) -> str:
    return ENDPOINT_PATHS[endpoint].lstrip("/")


async def timed(events: AsyncIterator[Event], call: Call) -> AsyncIterator[Event]:
    """Count the time spent waiting for each event as upstream time."""
    try:
        waited = time.perf_counter()
        async for event in events:
            call.upstream_s += time.perf_counter() - waited
            yield event
            waited = time.perf_counter()
    finally:
        await events.aclose()  # type: ignore[attr-defined]
