"""The semantic cache's parts on their own: batching, the embedded index, probes."""

from __future__ import annotations

import asyncio
import functools

import numpy as np
import orjson
import pytest
from starlette.datastructures import Headers

from plugins.cache import canonical_request
from plugins.cache.embedded_index import EmbeddedIndex
from plugins.cache.embedder import Embedder
from plugins.cache.parts import Probe
from plugins.cache.semantic import SemanticCache, SemanticConfig
from proxy.pipeline import Call
from tests.conftest import held_after_a_hang


def run(test):
    """Run an async test on its own event loop (the suite has no async plugin)."""

    @functools.wraps(test)
    def sync() -> None:
        asyncio.run(test())

    return sync


class Recording(Embedder):
    def __init__(self, max_batch: int, fail: bool = False) -> None:
        super().__init__(max_batch)
        self.sizes: list[int] = []
        self.fail = fail

    async def encode(self, texts):
        self.sizes.append(len(texts))
        await asyncio.sleep(0.01)  # the model's time: callers arriving now wait for the next batch
        if self.fail:
            raise RuntimeError("model failed")
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)


@run
async def test_concurrent_lookups_share_one_model_run():
    embedder = Recording(max_batch=32)
    await embedder.start()
    try:
        texts = [f"prompt {'x' * i}" for i in range(70)]
        vectors = await asyncio.gather(*(embedder.embed(t) for t in texts))
        assert embedder.sizes == [32, 32, 6]
        assert [v[0] for v in vectors] == [float(len(t)) for t in texts]  # each gets its own
        late = await asyncio.gather(embedder.embed("a"), embedder.embed("bb"))
        assert embedder.sizes[-1] == 2 and [v[0] for v in late] == [1.0, 2.0]
    finally:
        await embedder.close()


@run
async def test_a_failed_batch_fails_its_callers_and_the_next_batch_runs():
    embedder = Recording(max_batch=8, fail=True)
    await embedder.start()
    try:
        results = await asyncio.gather(
            embedder.embed("a"), embedder.embed("b"), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        embedder.fail = False
        assert (await embedder.embed("abc"))[0] == 3.0
    finally:
        await embedder.close()


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def probe(scope="s", namespace="team", model="m", vector=(1.0, 0.0), prompt="p") -> Probe:
    return Probe(scope, namespace, model, prompt, unit(*vector))


@run
async def test_embedded_index_searches_one_scope_best_first_above_threshold():
    index = EmbeddedIndex(max_entries=10)
    await index.add(probe(vector=(1, 0.1), prompt="near"), "k1", 60)
    await index.add(probe(vector=(1, 0.5), prompt="farther"), "k2", 60)
    await index.add(probe(vector=(0, 1), prompt="unrelated"), "k3", 60)
    await index.add(probe(scope="other", vector=(1, 0)), "k4", 60)
    found = await index.search("s", unit(1, 0), k=3, threshold=0.8)
    assert [c.key for c in found] == ["k1", "k2"]
    assert found[0].similarity > found[1].similarity >= 0.8
    assert await index.search("missing", unit(1, 0), k=3, threshold=0.1) == []


@run
async def test_embedded_index_is_bounded_least_recently_used_first():
    index = EmbeddedIndex(max_entries=2)
    await index.add(probe(vector=(1, 0)), "old", 60)
    await index.add(probe(vector=(1, 0.1)), "used", 60)
    await index.search("s", unit(1, 0.1), k=1, threshold=0.99)  # touches "used"
    await index.add(probe(vector=(1, 0.2)), "new", 60)
    keys = {c.key for c in await index.search("s", unit(1, 0), k=5, threshold=0.5)}
    assert keys == {"used", "new"}
    assert await index.size() == 2


@run
async def test_embedded_index_expires_replaces_forgets_and_deletes():
    index = EmbeddedIndex(max_entries=10)
    await index.add(probe(), "short", 0.05)
    await index.add(probe(namespace="a", model="m1"), "a1", 60)
    await index.add(
        probe(namespace="a", model="m1", vector=(1, 0.1)), "a1", 60
    )  # same answer again
    await index.add(probe(namespace="b", model="m1"), "b1", 60)
    await asyncio.sleep(0.06)
    assert {c.key for c in await index.search("s", unit(1, 0), 5, 0.5)} == {"a1", "b1"}
    assert await index.size() == 2
    await index.forget("b1")
    assert await index.delete("a", "*") == 1
    assert await index.size() == 0


def chat_call(messages, **extra) -> Call:
    return Call("chat", {"model": "m", "messages": messages, **extra}, Headers(), "r")


def probe_of(semantic: SemanticCache, call: Call, namespace: str) -> Probe | None:
    return semantic.probe(call.endpoint, "m", namespace, canonical_request(call))


@pytest.fixture
def semantic():
    return SemanticCache(SemanticConfig(), Recording(8), EmbeddedIndex(10))


def test_probe_compares_the_last_user_message_and_scopes_the_rest(semantic):
    user = {"role": "user", "content": "How do I exit vim?"}
    base = probe_of(semantic, chat_call([{"role": "system", "content": "A"}, user]), "team")
    assert base.prompt == "How do I exit vim?"
    reworded = probe_of(semantic, chat_call([{"role": "system", "content": "A"},
                                         {"role": "user", "content": "Exiting vim?"}]), "team")  # fmt: skip
    assert reworded.scope == base.scope  # only the question differs
    for other in (
        probe_of(semantic, chat_call([{"role": "system", "content": "B"}, user]), "team"),
        probe_of(
            semantic, chat_call([{"role": "system", "content": "A"}, user], max_tokens=9), "team"
        ),
        probe_of(semantic, chat_call([{"role": "system", "content": "A"}, user]), "other-team"),
    ):
        assert other.scope != base.scope
    with_user_field = chat_call([{"role": "system", "content": "A"}, user], user="someone")
    assert probe_of(semantic, with_user_field, "team").scope == base.scope


def test_probe_skips_what_it_cannot_compare(semantic):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert probe_of(semantic, chat_call([{"role": "user", "content": [image]}]), "t") is None
    assert probe_of(semantic, chat_call([{"role": "system", "content": "only"}]), "t") is None
    assert probe_of(semantic, chat_call([{"role": "user", "content": "x" * 5000}]), "t") is None
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert probe_of(semantic, chat_call([{"role": "user", "content": parts}]), "t").prompt == "a\nb"
    completion = Call("completions", {"model": "m", "prompt": ["Say hi"]}, Headers(), "r")
    assert probe_of(semantic, completion, "t").prompt == "Say hi"
    embeddings = Call("embeddings", {"model": "m", "input": "x"}, Headers(), "r")
    assert probe_of(semantic, embeddings, "t") is None


@run
async def test_the_local_model_runs_on_one_torch_thread_unless_told():
    pytest.importorskip("sentence_transformers", reason="needs the semantic extra")
    import torch

    from plugins.cache.embedder import LocalEmbedder
    from plugins.cache.parts import EmbedderConfig

    for asked in (None, 2):
        config = EmbedderConfig() if asked is None else EmbedderConfig(threads=asked)
        embedder = LocalEmbedder(config)
        await embedder.start()
        try:
            loop = asyncio.get_running_loop()
            used = await loop.run_in_executor(embedder.pool, torch.get_num_threads)
            assert used == (asked or 1)
            vectors = await embedder.encode(["hello there"])
            assert vectors.shape == (1, 384)
        finally:
            await embedder.close()


@pytest.mark.parametrize("threads", [0, -1, 257])
def test_embedder_threads_out_of_range_are_refused(threads):
    from plugins.cache.parts import EmbedderConfig

    with pytest.raises(ValueError, match="threads"):
        EmbedderConfig(threads=threads)


@pytest.mark.parametrize(
    ("content", "same"),
    [("Same.", True), ("**same**", True), ("same, both ask for the capital", True),
     ("`same`", True), ("Different", False), ("not the same", False), ("", False),
     ("sameness", False), (None, False), (42, False)],
)  # fmt: skip
def test_the_judge_says_same_only_in_its_first_word(content, same):
    from plugins.cache.judge import _verdict

    body = orjson.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
    assert _verdict(body) is same


@pytest.mark.parametrize("body", [b"", b"not json", b"{}", b'{"choices": []}', b"[1]"])
def test_a_judge_answer_that_is_not_a_chat_completion_says_no(body):
    from plugins.cache.judge import _verdict

    assert _verdict(body) is False


def test_a_replica_finds_the_index_another_made_at_its_next_lookup(redis_search):
    """Replica B looks (no index yet), replica A stores the first answer (making the
    index), and B's very next lookup finds it: no window in which B goes on missing."""
    from plugins.cache.redis_index import RedisIndex

    prefix = f"t{np.random.randint(1 << 30)}:"
    vector = np.ones(8, dtype=np.float32) / np.sqrt(8)

    async def main():
        a, b = RedisIndex(redis_search, prefix, 1.0), RedisIndex(redis_search, prefix, 1.0)
        await a.start()
        await b.start()
        try:
            assert await b.search("scope", vector, 3, 0.9) == []  # nothing made yet
            await a.add(Probe("scope", "team:x", "m", "hi", vector), "answer-key", 60)
            (found,) = await b.search("scope", vector, 3, 0.9)
            assert found.key == "answer-key" and found.similarity > 0.99
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_hung_index_redis_costs_one_timeout_then_fails_at_once(clock, hung_url):
    """Lookups, stores and forgets after the first timeout fail at once, with no
    connection (the plugin serves a miss for each), until the hold is over."""
    from plugins.cache.redis_index import RedisIndex

    url, accepted = hung_url
    vector = np.ones(8, dtype=np.float32) / np.sqrt(8)

    async def main():
        index = RedisIndex(url, "t:", 0.2)  # its socket timeout is at least 1 s
        try:
            held = [
                lambda: index.search("scope", vector, 3, 0.9),
                lambda: index.add(Probe("scope", "team:x", "m", "hi", vector), "k", 60),
                lambda: index.forget("k"),
                index.size,
            ]
            await held_after_a_hang(clock, "Timeout", held[0], held, held[2])
        finally:
            await index.close()
        return len(accepted)

    assert asyncio.run(main()) == 2
