"""cache: answers to repeated requests, served without calling the upstream.

    pipeline:
      - auth: {...}
      - cache: {backend: redis, ttl_s: 3600}
      - quotas: {...}

The key is a hash of the canonical request (endpoint, model, whether it
streams, and every field that can change the answer) inside the caller's
namespace: `team:<team>`, else `key:<key name>` or `jwt:<token subject>`, so
names from different kinds of identity never meet. One tenant's answers are
never served to another unless `shared_namespace` says so. A buffered answer is stored as
its bytes and a stream as its events' bytes, captured as they pass (no chunk
waits) and stored only when the stream ended cleanly, so a hit replays exactly
what the upstream sent, as valid SSE for streams.

With `semantic:` set, an exact miss is also looked up by meaning: see
semantic.py for the scope and the index, verify.py for the near-miss checks a
candidate must pass before it is served.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram

from plugins.cache.judge import SOFT
from plugins.cache.parts import Probe
from plugins.cache.semantic import SemanticCache, SemanticConfig, create_semantic_cache
from plugins.cache.store import MemoryStore, RedisStore, pack, unpack
from plugins.cache.verify import Refusal
from proxy import tracing
from proxy.context import PluginContext
from proxy.errors import GatewayError, InvalidRequest
from proxy.metrics import OVERHEAD_BUCKETS, Labelled, Metrics
from proxy.pipeline import MODEL_CALLS, Call, Next, Reply
from proxy.sse import EventSplitter
from proxy.state import StateUnavailable
from proxy.tracing import span

log = logging.getLogger("meshgate.cache")

# Fields that do not change the answer, left out of the key.
NOT_IN_KEY = frozenset({"stream_options", "user", "store", "metadata", "service_tier"})
BODY, EVENTS = b"B", b"E"
# Failures of the index (Redis) or of a served embedder (its upstream), logged in
# one line: under an outage every request meets them.
SEMANTIC_FAILURES = (StateUnavailable, GatewayError, RuntimeError)


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None  # Redis; default: state.url
    ttl_s: float = 3600.0
    max_ttl_s: float = 86400.0  # the most an x-meshgate-cache-ttl header may ask for
    max_entries: int = 10_000  # memory backend
    max_bytes: int = 256 * 1024 * 1024  # memory backend
    compress_min_bytes: int = 2048
    max_entry_bytes: int = 8 * 1024 * 1024  # a larger answer is served, not stored
    allow_temperature: bool = False  # also cache answers sampled with temperature > 0
    shared_namespace: str | None = None  # every tenant shares this namespace instead
    semantic: SemanticConfig | None = None  # also answer near-repeated prompts

    def __post_init__(self) -> None:
        if min(self.ttl_s, self.max_ttl_s) <= 0 or min(self.max_entries, self.max_entry_bytes) < 1:
            raise ValueError("ttl_s, max_ttl_s, max_entries and max_entry_bytes must be positive")
        if self.semantic and self.semantic.index == "redis" and self.backend != "redis":
            raise ValueError(
                "semantic.index: redis shares prompts between replicas, so the answers "
                "must be shared too: set backend: redis"
            )


class Cache:
    Config = CacheConfig

    def __init__(self, config: CacheConfig, context: PluginContext) -> None:
        self.config = config
        state = context.config.state
        url = config.url or state.url
        self.store: MemoryStore | RedisStore
        if config.backend == "redis":
            self.store = RedisStore(url, state.prefix + "cache:", state.timeout_s)
        else:
            self.store = MemoryStore(config.max_entries, config.max_bytes)
        self.semantic: SemanticCache | None = None
        if config.semantic is not None:
            prefix = state.prefix + "cache:"
            self.semantic = create_semantic_cache(config.semantic, context, url, prefix)
        self.metrics = CacheMetrics(context.registry, context.metrics)
        context.add_admin_route("cache/stats", ("GET",), self.stats)
        context.add_admin_route("cache", ("DELETE",), self.clear)

    async def start(self) -> None:
        if self.semantic is not None:
            await self.semantic.start()  # loads the embedding model: /ready waits for it

    def ready(self) -> bool:
        return self.semantic is None or self.semantic.loaded

    async def close(self) -> None:
        if self.semantic is not None:
            await self.semantic.close()
        await self.store.close()

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        if call.endpoint not in MODEL_CALLS or call.model is None:
            return await call_next(call)
        ttl = self.ttl(call)  # a bad header is refused before anything is paid for
        control = call.headers.get("cache-control", "").lower()
        if "no-store" in control or not self.cacheable(call.body):
            reply = await call_next(call)
            reply.headers["x-meshgate-cache"] = "bypass"
            self.metrics.exact_bypassed.inc()
            return reply
        namespace = self.namespace(call)
        canonical = canonical_request(call)
        key = self.key(call, namespace, canonical)
        lookup = "no-cache" not in control
        if lookup:
            store = self.store
            if isinstance(store, MemoryStore) and not tracing.enabled():
                hit = self.served(store.read(key))  # a dict read: no coroutine for it
            else:
                hit = await (self.traced_lookup(key) if tracing.enabled() else self.lookup(key))
            if hit is not None:
                return hit
        probe = None  # built after an exact miss only
        refusal = None  # why the nearest semantic candidate was not served
        if self.semantic is not None:
            probe = self.semantic.probe(call.endpoint, call.model.name, namespace, canonical)
            if lookup and probe:
                with span("meshgate.cache.lookup", {"meshgate.cache.kind": "semantic"}):
                    hit, refusal = await self.lookup_semantic(probe, call)
                if hit is not None:
                    return hit
        reply = await call_next(call)
        reply.headers["x-meshgate-cache"] = "miss"
        if refusal is not None:  # the kind only: the words are another request's
            reply.headers["x-meshgate-cache-refused"] = refusal.kind
        if reply.status == 200:
            self.capture(key, reply, probe, ttl)
        return reply

    def cacheable(self, body: dict) -> bool:
        temperature = body.get("temperature")
        if not self.config.allow_temperature and isinstance(temperature, (int, float)):
            if temperature > 0:
                return False
        n = body.get("n")
        return not (isinstance(n, int) and n > 1)

    def namespace(self, call: Call) -> str:
        """Typed, so a team, an API key and a token subject never share one by name."""
        if self.config.shared_namespace:
            return f"shared:{quote(self.config.shared_namespace, safe='')}"
        return call.identity.tenant if call.identity is not None else "anonymous"

    def key(self, call: Call, namespace: str, canonical: dict) -> str:
        digest = hashlib.blake2b(  # Python's own, for the reason Auth.seen gives
            call.endpoint.encode() + orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS),
            digest_size=32,
        ).hexdigest()
        assert call.model is not None
        return f"{namespace}:{call.model.name}:{digest}"

    async def traced_lookup(self, key: str) -> Reply | None:
        """`lookup` in a span of its own (with tracing on: else no span is made)."""
        with span("meshgate.cache.lookup", {"meshgate.cache.kind": "exact"}) as traced:
            hit = await self.lookup(key)
            if traced is not None:
                traced.set_attribute("meshgate.cache.result", "miss" if hit is None else "hit")
        return hit

    async def lookup(self, key: str) -> Reply | None:
        store = self.store
        if isinstance(store, MemoryStore):  # a dict read: nothing worth timing
            return self.served(store.read(key))
        started = time.perf_counter()
        try:
            stored = await store.get(key)
        except StateUnavailable as exc:
            log.warning("cache lookup failed, serving a miss: %s", exc)
            return None
        finally:
            self.metrics.exact_latency.observe(time.perf_counter() - started)
        return self.served(stored)

    def served(self, stored: bytes | None) -> Reply | None:
        """The hit a stored entry makes, counted as a hit or a miss."""
        reply = _reply(stored) if stored is not None else None
        if reply is None:
            self.metrics.exact_misses.inc()
            return None
        self.metrics.exact_hits.inc()
        reply.headers["x-meshgate-cache"] = "hit-exact"
        return reply

    async def lookup_semantic(
        self, probe: Probe, call: Call
    ) -> tuple[Reply | None, Refusal | None]:
        """The answer to a verified near-repeat of this prompt, if one is cached; else
        why the nearest candidate was refused, if one was."""
        started = time.perf_counter()
        result = "miss"
        semantic = self.semantic
        assert semantic is not None  # a probe is made only when it is configured
        try:
            matches, refused = await asyncio.wait_for(
                semantic.find(probe), semantic.config.lookup_timeout_s
            )
            judge = semantic.judge
            if judge is not None and not matches:  # refused for their words only: ask
                for candidate, refusal in refused:
                    if refusal.kind not in SOFT:
                        continue
                    same = await judge.same(
                        candidate.prompt, probe.prompt, call.identity, call.request_id
                    )
                    self.metrics.judged_of("same" if same else "different").inc()
                    if same:  # the nearest the judge accepts; no more calls
                        matches.append(candidate)
                        break
            for match in matches:
                stored = await self.store.get(match.key)
                reply = _reply(stored) if stored is not None else None
                if reply is None:  # the answer expired, was evicted, or is unreadable
                    await semantic.forget(match.key)
                    continue
                result = "hit"
                reply.headers["x-meshgate-cache"] = "hit-semantic"
                reply.headers["x-meshgate-cache-similarity"] = f"{match.similarity:.4f}"
                return reply, None
            if refused:
                result = "refused"  # near enough, but the checks found a difference
                return None, refused[0][1]
            return None, None
        except TimeoutError:
            result = "timeout"  # the embedder is backed up: the upstream is the faster way
            return None, None
        except SEMANTIC_FAILURES as exc:
            log.warning("semantic cache lookup failed, serving a miss: %s", exc)
            return None, None
        except Exception:
            log.exception("semantic cache lookup failed, serving a miss")
            return None, None
        finally:
            self.metrics.latency.labels("semantic").observe(time.perf_counter() - started)
            self.metrics.lookups.labels("semantic", result).inc()

    def capture(self, key: str, reply: Reply, probe: Probe | None, ttl: float) -> None:
        """Store the answer once it has been delivered whole, without delaying it."""
        most = self.config.max_entry_bytes
        if reply.body is not None:
            body = reply.body
            if b'"tool_calls"' not in body and len(body) <= most:
                reply.on_complete(
                    lambda r: self.put_now(key, BODY + body, ttl, probe) if _storable(r) else None
                )
            return
        captured: list[bytes] = []

        async def tap(events):
            size = 0
            async with aclosing(events):  # closing the tap closes the stream it wraps
                async for event in events:
                    if size <= most:  # past it the answer will not be stored: stop keeping it
                        size += len(event.raw)
                        captured.append(event.raw)
                        if size > most:
                            captured.clear()
                    yield event

        async def store(r: Reply) -> None:
            data = b"".join(captured)
            clean = _storable(r) and captured and captured[-1].startswith(b"data: [DONE]")
            if clean and b'"tool_calls"' not in data and b'data: {"error"' not in data:
                await self.put(key, EVENTS + data, ttl, probe)

        reply.wrap_events(tap).on_complete(store)

    def ttl(self, call: Call) -> float:
        asked = call.headers.get("x-meshgate-cache-ttl")
        if asked is None:
            return self.config.ttl_s
        try:
            seconds = float(asked)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise InvalidRequest(
                "x-meshgate-cache-ttl must be a positive number of seconds",
                param="x-meshgate-cache-ttl",
            )
        return max(1.0, min(seconds, self.config.max_ttl_s))

    def put_now(self, key: str, value: bytes, ttl: float, probe: Probe | None):
        """As `put`, done at once when that needs no await (the memory store, nothing
        semantic to index): then None, else put's coroutine."""
        store = self.store
        if probe is not None or not isinstance(store, MemoryStore):
            return self.put(key, value, ttl, probe)
        store.write(key, pack(value, self.config.compress_min_bytes), ttl)
        self.metrics.exact_stored.inc()
        return None

    async def put(self, key: str, value: bytes, ttl: float, probe: Probe | None) -> None:
        try:
            await self.store.set(key, pack(value, self.config.compress_min_bytes), ttl)
        except StateUnavailable as exc:
            log.warning("cache store failed: %s", exc)
            return
        self.metrics.exact_stored.inc()
        if probe is None or self.semantic is None:
            return
        try:
            await self.semantic.add(probe, key, ttl)
        except SEMANTIC_FAILURES as exc:
            log.warning("semantic cache store failed: %s", exc)
            return
        except Exception:
            log.exception("semantic cache store failed")
            return
        self.metrics.stores.labels("semantic").inc()

    async def stats(self, request) -> dict:
        entries, size = await self.store.size()
        lookups: dict[str, dict[str, float]] = {}
        self.metrics.flush()
        for metric in self.metrics.lookups.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    kind, result = sample.labels["kind"], sample.labels["result"]
                    lookups.setdefault(kind, {})[result] = int(sample.value)
        stats = {"backend": self.config.backend, "entries": entries, "bytes": size,
                 "lookups": lookups}  # fmt: skip
        if self.semantic is not None:
            stats["semantic"] = await self.semantic.stats()
        return stats

    async def clear(self, request) -> dict:
        namespace = request.query_params.get("namespace") or "*"
        model = request.query_params.get("model") or "*"
        deleted = await self.store.delete(f"{namespace}:{model}:*")
        result = {"deleted": deleted}
        if self.semantic is not None:
            result["deleted_semantic"] = await self.semantic.index.delete(namespace, model)
        return result


def canonical_request(call: Call) -> dict:
    """The request as far as it decides the answer."""
    canonical = {k: v for k, v in call.body.items() if k not in NOT_IN_KEY}
    canonical["stream"] = call.stream
    return canonical


def _storable(reply: Reply) -> bool:
    """Delivered whole, and not marked `cache-control: no-store` by a plugin inside
    (an answer that failed verification)."""
    return reply.completed and "no-store" not in reply.headers.get("cache-control", "")


def _reply(stored: bytes) -> Reply | None:
    """The stored answer as a reply; None, logged, when the entry cannot be read."""
    try:
        value = unpack(stored)
    except ValueError as exc:
        log.warning("serving a miss: %s", exc)
        return None
    if value[:1] == BODY:
        return Reply(body=value[1:])
    return Reply(events=_replay(value[1:]))


async def _replay(data: bytes):
    for event in EventSplitter().feed(data):
        yield event


class CacheMetrics:
    """The cache's own metrics, registered on the gateway's registry."""

    def __init__(self, r: CollectorRegistry, gateway: Metrics) -> None:
        tally = gateway.tally
        self.flush = gateway.flush  # hands every tally's counts on, these among them
        self.lookups = Counter(
            "meshgate_cache_lookups",
            "Cache lookups by kind and result (hit, miss, bypass, refused, timeout).",
            ["kind", "result"], registry=r,
        )  # fmt: skip
        self.stores = Counter(
            "meshgate_cache_stores", "Answers stored in the cache.", ["kind"], registry=r
        )
        self.latency = Histogram(
            "meshgate_cache_lookup_seconds",
            "Time to look an answer up, by kind (exact: on Redis only).",
            ["kind"], buckets=OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.judged = Counter(
            "meshgate_cache_judged",
            "Refused semantic candidates put to the verify_with model, by its verdict.",
            ["verdict"], registry=r,
        )  # fmt: skip
        self.judged_of = Labelled(self.judged)
        # the exact cache's series, resolved once and tallied: they change on every call
        self.exact_hits = tally(self.lookups.labels("exact", "hit"))
        self.exact_misses = tally(self.lookups.labels("exact", "miss"))
        self.exact_bypassed = tally(self.lookups.labels("exact", "bypass"))
        self.exact_stored = tally(self.stores.labels("exact"))
        self.exact_latency = self.latency.labels("exact")
