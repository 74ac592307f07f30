"""State shared by plugins across requests, processes and replicas: the
contract and its checks are in `base`, the backends in `memory` and `redis`."""

from __future__ import annotations

from proxy.state.base import (
    LEASE_TTL_S,
    MAX_TAT_S,
    Limit,
    State,
    StateConfig,
    StateUnavailable,
    Verdict,
    valid_amount,
    valid_limit,
)

__all__ = [
    "LEASE_TTL_S",
    "MAX_TAT_S",
    "Limit",
    "State",
    "StateConfig",
    "StateUnavailable",
    "Verdict",
    "create_state",
    "valid_amount",
    "valid_limit",
]


def create_state(config: StateConfig) -> State:
    if config.backend == "redis":
        from proxy.state.redis import RedisState

        return RedisState(config)
    from proxy.state.memory import MemoryState

    return MemoryState(config)
