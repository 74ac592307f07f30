"""What the semantic cache shares with its parts (the embedder, the two indexes):
the embedder's settings, what an index is asked (Probe) and what it answers
(Candidate). A leaf: the parts import it, never the cache itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbedderConfig:
    path: str | None = None  # a sentence-transformers model directory; default all-MiniLM-L6-v2
    model: str | None = None  # or an embeddings model served by this gateway
    max_batch: int = 32
    # torch's CPU threads. One: a short prompt gains little from more, and with
    # the cores busy serving, torch's default (one per core) made a lookup 10x
    # slower at the tail, past lookup_timeout_s.
    threads: int = 1
    # One model per host (embedder_host.py): `auto` shares it when the server runs
    # several workers, `always` even with one, `never` loads it in every worker.
    share: Literal["auto", "always", "never"] = "auto"
    socket: str | None = None  # the host's Unix socket; default: per user and model
    idle_s: float = 60.0  # the host exits when no worker has been connected this long
    start_timeout_s: float = 120.0  # how long a worker waits for the host to load the model
    # How long a worker waits for the host's vectors: a host that hangs fails the
    # lookups (misses) instead of holding them, and the worker reconnects.
    host_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.path and self.model:
            raise ValueError("give either path (a local model) or model (served here), not both")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not 1 <= self.threads <= 256:
            raise ValueError("threads must be between 1 and 256")
        if min(self.idle_s, self.start_timeout_s, self.host_timeout_s) <= 0:
            raise ValueError("idle_s, start_timeout_s and host_timeout_s must be positive")


@dataclass(slots=True)
class Probe:
    """One request's side of a semantic lookup."""

    scope: str  # digest of everything but the prompt
    namespace: str
    model: str
    prompt: str
    vector: np.ndarray | None = None  # set by the lookup


@dataclass(frozen=True, slots=True)
class Candidate:
    similarity: float
    prompt: str
    key: str  # the exact-cache entry holding the answer


class QueryEngineMissing(Exception):
    """The Redis named for the semantic index cannot run vector queries."""
