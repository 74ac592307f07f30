"""The semantic index on Redis, shared by every replica, through RedisVL.

Needs a Redis with the query engine (Redis 8, or Redis Stack for 7.x); a Redis
without it is detected at start and named in the error. Each entry is a hash
with the scope, namespace and model as tags, the prompt, the exact-cache key
of its answer and the vector, expiring with that answer. The index is created
when the first vector shows its size.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from plugins.cache.parts import Candidate, Probe, QueryEngineMissing
from proxy.state import StateUnavailable
from proxy.state.outage import Outage


class RedisIndex:
    kind = "redis"

    def __init__(self, url: str, prefix: str, timeout_s: float) -> None:
        self.name = prefix.rstrip(":").replace(":", "-") + "-semantic"
        self.prefix = prefix + "semantic"
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=max(timeout_s, 1.0), socket_connect_timeout=max(timeout_s, 1.0)
        )
        self.index: Any = None  # redisvl's AsyncSearchIndex, once the vector size is known
        self.outage = Outage("the semantic index's redis")

    async def start(self) -> None:
        try:
            names = await self.redis.execute_command("FT._LIST")
        except ResponseError as exc:
            info = await self.redis.info("server")
            where = self.redis.connection_pool.connection_kwargs
            raise QueryEngineMissing(
                f"the Redis at {where.get('host')}:{where.get('port')} (version "
                f"{info.get('redis_version', 'unknown')}) has no query engine ({exc}): the "
                "semantic cache's redis index needs Redis 8 or Redis Stack (or set "
                "semantic.on_missing_query_engine: embedded)"
            ) from None
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis for the semantic index: {exc}") from exc
        if self.name.encode() in names:  # made by another replica, or before a restart
            await self._adopt()

    async def _adopt(self) -> None:
        from redisvl.index import AsyncSearchIndex

        self.index = await AsyncSearchIndex.from_existing(self.name, redis_client=self.redis)

    async def _found(self) -> bool:
        """Whether the index exists: made here, or since made by another replica. Until
        it is found, every lookup asks (a round trip beside the lookup's embedding,
        and only before the first answer is stored anywhere): looking less often
        left a replica missing every paraphrase for as long as it did not look,
        though another had made the index and stored the answer."""
        if self.index is not None:
            return True
        if self.name.encode() in await self.redis.execute_command("FT._LIST"):
            await self._adopt()
        return self.index is not None

    async def close(self) -> None:
        await self.redis.aclose()

    async def _create(self, dims: int):
        """The index for vectors of `dims` floats, unless another replica just made it."""
        from redisvl.index import AsyncSearchIndex
        from redisvl.schema import IndexSchema

        schema = IndexSchema.from_dict(
            {
                "index": {"name": self.name, "prefix": self.prefix, "storage_type": "hash"},
                "fields": [
                    {"name": "scope", "type": "tag"},
                    {"name": "namespace", "type": "tag"},
                    {"name": "model", "type": "tag"},
                    {"name": "key", "type": "tag"},
                    {"name": "vector", "type": "vector",
                     "attrs": {"dims": dims, "distance_metric": "cosine",
                               "algorithm": "hnsw", "datatype": "float32"}},
                ],
            }
        )  # fmt: skip
        index = AsyncSearchIndex(schema, redis_client=self.redis)
        await index.create(overwrite=False)
        return index

    async def search(
        self, scope: str, vector: np.ndarray, k: int, threshold: float
    ) -> list[Candidate]:
        from redisvl.query import VectorQuery
        from redisvl.query.filter import Tag

        query = VectorQuery(
            vector.astype(np.float32).tobytes(),
            "vector",
            return_fields=["prompt", "key"],
            filter_expression=Tag("scope") == scope,
            num_results=k,
        )
        with self.outage.guarded():
            if not await self._found():
                return []
            rows = await self.index.query(query)
        found = []
        for row in rows:
            similarity = 1.0 - float(row["vector_distance"])  # cosine distance
            if similarity >= threshold:
                found.append(Candidate(similarity, row["prompt"], row["key"]))
        return sorted(found, key=lambda c: -c.similarity)

    async def add(self, probe: Probe, key: str, ttl_s: float) -> None:
        vector = probe.vector
        assert vector is not None, "the lookup embeds the probe before it is added"
        with self.outage.guarded():
            if not await self._found():
                self.index = await self._create(int(vector.shape[0]))
            doc = {
                "scope": probe.scope,
                "namespace": probe.namespace,
                "model": probe.model,
                "key": key,
                "prompt": probe.prompt,
                "vector": vector.astype(np.float32).tobytes(),
            }
            await self.index.load([doc], keys=[self._id(key)], ttl=max(1, int(ttl_s)))

    async def forget(self, key: str) -> None:
        with self.outage.guarded():
            await self.redis.delete(self._id(key))

    async def delete(self, namespace: str, model: str) -> int:
        from redisvl.query.filter import Tag

        condition = None
        if namespace != "*":
            condition = Tag("namespace") == namespace
        if model != "*":
            by_model = Tag("model") == model
            condition = by_model if condition is None else condition & by_model
        with self.outage.guarded():
            if not await self._found():
                return 0
            if condition is None:
                return await self.index.clear()
            result = await self.index.drop_by_filter(condition)
        return result.processed

    async def size(self) -> int:
        with self.outage.guarded():
            if not await self._found():
                return 0
            info = await self.index.info()
        return int(info.get("num_docs", 0))

    def _id(self, key: str) -> str:
        return f"{self.prefix}:{hashlib.sha256(key.encode()).hexdigest()}"
