"""The semantic cache's embedded vector index: in-process, bounded, no server."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from plugins.cache.parts import Candidate, Probe


class EmbeddedIndex:
    """An in-process vector index: one float32 matrix, searched exactly per scope.

    Bounded by `max_entries`; the least recently used entry goes first. A scope
    holds the few prompts of one tenant, model and parameter set, so an exact
    dot product over its rows is faster than any approximate structure."""

    kind = "embedded"

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.vectors: np.ndarray | None = None  # allocated on the first add, when dims are known
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # row -> entry, LRU order
        self.scopes: dict[str, list[int]] = {}
        self.rows_by_key: dict[str, int] = {}
        self.free: list[int] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def search(
        self, scope: str, vector: np.ndarray, k: int, threshold: float
    ) -> list[Candidate]:
        rows = self.scopes.get(scope)
        if not rows or self.vectors is None:
            return []
        now = time.monotonic()
        for row in [r for r in rows if self.entries[r].expires <= now]:
            self._drop(row)
        rows = self.scopes.get(scope)
        if not rows:
            return []
        index = np.fromiter(rows, dtype=np.intp, count=len(rows))
        similarities = self.vectors[index] @ vector
        best = np.argsort(-similarities)[:k]
        found = []
        for i in best:
            similarity = float(similarities[i])
            if similarity < threshold:
                break
            row = int(index[i])
            entry = self.entries[row]
            self.entries.move_to_end(row)
            found.append(Candidate(similarity, entry.prompt, entry.key))
        return found

    async def add(self, probe: Probe, key: str, ttl_s: float) -> None:
        vector = probe.vector
        assert vector is not None, "the lookup embeds the probe before it is added"
        if self.vectors is None:
            self.vectors = np.zeros((self.max_entries, vector.shape[0]), dtype=np.float32)
        if key in self.rows_by_key:
            self._drop(self.rows_by_key[key])
        if self.free:
            row = self.free.pop()
        elif len(self.entries) < self.max_entries:
            row = len(self.entries)
        else:
            row = next(iter(self.entries))
            self._drop(row)
            row = self.free.pop()
        self.vectors[row] = vector
        entry = _Entry(probe.scope, probe.namespace, probe.model, probe.prompt, key,
                       time.monotonic() + ttl_s)  # fmt: skip
        self.entries[row] = entry
        self.scopes.setdefault(probe.scope, []).append(row)
        self.rows_by_key[key] = row

    async def forget(self, key: str) -> None:
        row = self.rows_by_key.get(key)
        if row is not None:
            self._drop(row)

    async def delete(self, namespace: str, model: str) -> int:
        doomed = [
            row
            for row, e in self.entries.items()
            if fnmatchcase(e.namespace, namespace) and fnmatchcase(e.model, model)
        ]
        for row in doomed:
            self._drop(row)
        return len(doomed)

    async def size(self) -> int:
        return len(self.entries)

    def _drop(self, row: int) -> None:
        entry = self.entries.pop(row)
        rows = self.scopes[entry.scope]
        rows.remove(row)
        if not rows:
            del self.scopes[entry.scope]
        if self.rows_by_key.get(entry.key) == row:
            del self.rows_by_key[entry.key]
        self.free.append(row)


@dataclass(slots=True)
class _Entry:
    scope: str
    namespace: str
    model: str
    prompt: str
    key: str
    expires: float
