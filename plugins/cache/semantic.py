"""The semantic part of the cache: near-repeated prompts answered from cached entries.

The prompt (the last user message, or a completion's prompt) is embedded and
looked up among earlier prompts of the same *scope*: same tenant namespace,
model, endpoint, stream flag, and the same request in every other respect
(system prompt, earlier turns, temperature, tools, ...). So the vector only
ever compares the question; everything else must match exactly. Candidates
above `threshold` pass the near-miss checks of `verify.py` before one is
served. An index entry points at an exact-cache entry, where the answer lives
once; when that entry has expired the candidate is dropped.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import orjson

from plugins.cache.judge import Judge, JudgeConfig
from plugins.cache.parts import Candidate, EmbedderConfig, Probe, QueryEngineMissing
from plugins.cache.verify import Checker, Prompt, Refusal, analyse, known_words
from proxy.config import SettingError

if TYPE_CHECKING:
    from plugins.cache.embedded_index import EmbeddedIndex
    from plugins.cache.embedder import Embedder
    from plugins.cache.redis_index import RedisIndex
    from proxy.context import PluginContext

    Index = EmbeddedIndex | RedisIndex

log = logging.getLogger("meshgate.cache")


@dataclass(frozen=True, slots=True, kw_only=True)
class SemanticConfig:
    # Cosine similarity. Low, because the near-miss checks decide: at 0.7 all-MiniLM-L6-v2
    # lets 96% of the labelled paraphrases in load/semantic_pairs_lexical.tsv through
    # (0.86 at 0.85), and 93% of the near-misses, which the checks refuse.
    threshold: float = 0.7
    index: Literal["embedded", "redis"] = "embedded"
    url: str | None = None  # a Redis with the query engine; default: the cache's Redis
    # A Redis without the query engine: refuse to start, or warn and use the embedded index.
    on_missing_query_engine: Literal["error", "embedded"] = "error"
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    verify: bool = True  # the near-miss checks; off serves any candidate above threshold
    candidates: int = 3  # how many of the nearest are checked, best first
    max_entries: int = 10_000  # embedded index
    max_prompt_chars: int = 2000  # longer prompts use the exact cache only
    lookup_timeout_s: float = 0.5  # a lookup slower than this (embedder backed up) is a miss
    verify_with: JudgeConfig | None = None  # a model's second opinion on refused candidates

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError("threshold is a cosine similarity in (0, 1]")
        if min(self.candidates, self.max_entries, self.max_prompt_chars) < 1:
            raise ValueError("candidates, max_entries and max_prompt_chars must be positive")
        if self.lookup_timeout_s <= 0:
            raise ValueError("lookup_timeout_s must be positive")


class SemanticCache:
    """Embeds prompts, finds candidates in the index, and keeps those that pass the checks."""

    def __init__(
        self, config: SemanticConfig, embedder: Embedder, index: Index, judge: Judge | None = None
    ) -> None:
        self.config = config
        self.embedder = embedder
        self.index = index
        self.judge = judge
        self.loaded = False
        self.analysed: OrderedDict[str, Prompt] = OrderedDict()  # stored prompts, checked often
        self.checker = Checker()

    async def start(self) -> None:
        started = time.perf_counter()
        try:
            await self.index.start()
        except QueryEngineMissing as exc:
            if self.config.on_missing_query_engine == "error":
                raise
            log.warning("%s; using the embedded index instead", exc)
            await self.index.close()
            from plugins.cache.embedded_index import EmbeddedIndex

            self.index = EmbeddedIndex(self.config.max_entries)
        await self.embedder.start()
        # The model's vocabulary tells a typo from another word (verify.py).
        self.checker = Checker(known_words(self.config.embedder.path))
        self.loaded = True
        log.info("semantic cache ready in %.1f s", time.perf_counter() - started)

    async def close(self) -> None:
        await self.embedder.close()
        await self.index.close()

    def probe(self, endpoint: str, model: str, namespace: str, canonical: dict) -> Probe | None:
        """What to look up for a request, given as the exact cache's canonical body; None
        when it has no single prompt to compare."""
        body = canonical
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list):
                return None
            last = _last_user(messages)
            if last is None:
                return None
            prompt = _text(messages[last].get("content"))
            rest = {**body, "messages": [*messages[:last], {**messages[last], "content": None},
                                         *messages[last + 1 :]]}  # fmt: skip
        elif endpoint == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            prompt = prompt if isinstance(prompt, str) else None
            rest = {**body, "prompt": None}
        else:
            return None
        if not prompt or len(prompt) > self.config.max_prompt_chars:
            return None
        digest = hashlib.sha256(
            f"{namespace}\0{model}\0{endpoint}\0".encode()
            + orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)
        ).hexdigest()
        return Probe(digest, namespace, model, prompt)

    async def find(self, probe: Probe) -> tuple[list[Candidate], list[tuple[Candidate, Refusal]]]:
        """Candidates that passed the checks, best first, and the others with the reason
        each was refused."""
        probe.vector = await self.embedder.embed(probe.prompt)
        candidates = await self.index.search(
            probe.scope, probe.vector, self.config.candidates, self.config.threshold
        )
        matches = []
        refused = []
        asked = analyse(probe.prompt) if candidates and self.config.verify else None
        for candidate in candidates:
            refusal = None if asked is None else self._check(candidate.prompt, asked)
            if refusal is None:
                matches.append(candidate)
            else:
                log.debug("semantic candidate refused (similarity %.3f): %s",
                          candidate.similarity, refusal)  # fmt: skip
                refused.append((candidate, refusal))
        return matches, refused

    def _check(self, stored: str, asked: Prompt) -> Refusal | None:
        """Both ways round: a word added on one side is a word dropped on the other."""
        analysed = self._analysed(stored)
        return self.checker.check(analysed, asked) or self.checker.check(asked, analysed)

    async def add(self, probe: Probe, key: str, ttl_s: float) -> None:
        if probe.vector is None:  # the lookup was skipped (Cache-Control: no-cache)
            probe.vector = await self.embedder.embed(probe.prompt)
        await self.index.add(probe, key, ttl_s)

    async def forget(self, key: str) -> None:
        """Drop index entries whose answer is no longer in the cache."""
        await self.index.forget(key)

    async def stats(self) -> dict:
        return {
            "index": self.index.kind,
            "entries": await self.index.size(),
            "threshold": self.config.threshold,
            "embedder_batches": self.embedder.batches,
        }

    def _analysed(self, prompt: str) -> Prompt:
        analysed = self.analysed.get(prompt)
        if analysed is None:
            analysed = self.analysed[prompt] = analyse(prompt)
            if len(self.analysed) > 4096:
                self.analysed.popitem(last=False)
        return analysed


def create_semantic_cache(
    config: SemanticConfig, context: PluginContext, redis_url: str, prefix: str
) -> SemanticCache:
    """Imported only when `semantic:` is configured: numpy and the model stay optional."""

    index: Index
    if config.index == "redis":
        from plugins.cache.redis_index import RedisIndex

        index = RedisIndex(config.url or redis_url, prefix, context.config.state.timeout_s)
    else:
        from plugins.cache.embedded_index import EmbeddedIndex

        index = EmbeddedIndex(config.max_entries)
    judge = None
    if config.verify_with is not None:
        if context.catalog.find(config.verify_with.model) is None:
            where = ("semantic", "verify_with", "model")
            raise SettingError(where, f"no model named '{config.verify_with.model}' under models:")
        judge = Judge(config.verify_with, context)
    return SemanticCache(config, _embedder(config.embedder, context), index, judge)


def _embedder(config: EmbedderConfig, context: PluginContext) -> Embedder:
    """A model the gateway serves, the host's (one per host), or this worker's own."""
    if config.model:
        from plugins.cache.embedder import GatewayEmbedder

        if context.catalog.find(config.model) is None:
            raise SettingError(
                ("semantic", "embedder", "model"), f"no model named '{config.model}' under models:"
            )
        return GatewayEmbedder(config, context)
    if config.share == "always" or (config.share == "auto" and context.workers > 1):
        from plugins.cache.embedder_host import HostedEmbedder

        return HostedEmbedder(config)
    from plugins.cache.embedder import LocalEmbedder

    return LocalEmbedder(config)


def _last_user(messages) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if isinstance(message, dict) and message.get("role") == "user":
            return i
    return None


def _text(content) -> str | None:
    """A message's text; None when it carries anything but text (an image, audio)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                return None
            parts.append(part.get("text") or "")
        return "\n".join(parts)
    return None
