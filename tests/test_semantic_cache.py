"""The semantic cache end to end: the real all-MiniLM-L6-v2 model, the gateway
under hypercorn, the fake upstream, and a real redis-server."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import RedisServer, scrape, start_gateway, upstream_stats

pytest.importorskip("sentence_transformers", reason="needs the semantic extra")

ADMIN = "admin-key-0123456789abcdef"
KEYS = {"a1": "a", "b1": "b"}  # key name -> team


def config(upstream_port: int, semantic: str = "", backend: str = "memory", state: str = "") -> str:
    """`semantic` is the inside of the cache's semantic mapping. Lookups here may
    take 60 s (the default is 0.5 s), so a busy machine slows the tests but never
    turns a hit into a timeout miss; the timeout test sets its own."""
    if "lookup_timeout_s" not in semantic:
        semantic = ", ".join(s for s in (semantic, "lookup_timeout_s: 60") if s)
    keys = "\n".join(
        f"        - {{name: {k}, key: sk-{k}-0123456789, team: {t}}}" for k, t in KEYS.items()
    )
    return f"""
server: {{host: 127.0.0.1, admin_key: {ADMIN}}}
{state}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1"}}
  sim: {{type: simulated}}
models:
  - {{name: m, deployments: [{{provider: up, model: m}}]}}
  - {{name: emb, deployments: [{{provider: sim, model: e}}]}}
pipeline:
  - auth:
      keys:
{keys}
  - cache: {{backend: {backend}, ttl_s: 60, semantic: {{{semantic}}}}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    server = start_gateway(tmp_path_factory.mktemp("semantic"), config(upstream.port))
    yield server
    server.stop()


def ask(gateway, content, key="a1", headers=None, system=None, **extra):
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "m", "messages": messages, **extra},
        headers={"authorization": f"Bearer sk-{key}-0123456789", **(headers or {})},
        timeout=30,
    )


def tag() -> str:
    """A system prompt of its own per test, so that tests sharing a gateway never
    meet each other's entries (the system prompt is part of a lookup's scope)."""
    return f"You are test {uuid.uuid4().hex}."


def until_indexed(server, entries: int) -> int:
    """The semantic index's size once it holds `entries` (or as it is at 30 s):
    answers are embedded for the index after they were sent."""
    deadline = time.monotonic() + 30
    while True:
        stats = httpx.get(server.url + "/admin/cache/stats",
                          headers={"authorization": f"Bearer {ADMIN}"}).json()  # fmt: skip
        assert "semantic" in stats, stats
        found = stats["semantic"]["entries"]
        if found >= entries or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def cache_of(response) -> str:
    return response.headers["x-meshgate-cache"]


def test_paraphrase_hits_without_calling_the_upstream(gateway, upstream):
    s = tag()
    first = ask(gateway, "How do I reverse a list in Python?", system=s)
    before = upstream_stats(upstream)["requests"]
    second = ask(gateway, "What's the best way to reverse a list in Python?", system=s)
    assert cache_of(first) == "miss"
    assert cache_of(second) == "hit-semantic"
    assert 0.85 <= float(second.headers["x-meshgate-cache-similarity"]) < 1
    assert second.content == first.content
    assert upstream_stats(upstream)["requests"] == before


def test_unrelated_prompts_and_near_misses_are_not_served(gateway):
    s = tag()
    ask(gateway, "How do I convert a string to an integer in JavaScript?", system=s)
    for other in (
        "What is the capital of France?",  # unrelated: below the threshold
        "How do I convert an integer to a string in JavaScript?",  # swapped operands
        "How do I convert a string to a float in JavaScript?",  # another entity
    ):
        assert cache_of(ask(gateway, other, system=s)) == "miss", other
    metrics = scrape(gateway.url, ADMIN)
    assert 'meshgate_cache_lookups_total{kind="semantic",result="refused"}' in metrics


def test_tenants_are_isolated(gateway):
    s = tag()
    ask(gateway, "What is the boiling point of water at sea level?", key="a1", system=s)
    paraphrase = "At sea level, what is the boiling point of water?"
    assert cache_of(ask(gateway, paraphrase, key="b1", system=s)) == "miss"  # another team
    assert cache_of(ask(gateway, paraphrase, key="a1", system=s)) == "hit-semantic"


def test_other_parameters_and_system_prompts_never_collide(gateway):
    s = tag()
    ask(gateway, "How do I undo the last git commit?", system=s, max_tokens=5)
    paraphrase = "How can I undo my last commit in git?"
    assert cache_of(ask(gateway, paraphrase, system=s, max_tokens=6)) == "miss"
    assert cache_of(ask(gateway, paraphrase, system=tag(), max_tokens=5)) == "miss"
    assert cache_of(ask(gateway, paraphrase, system=s, max_tokens=5, seed=3)) == "miss"
    assert cache_of(ask(gateway, paraphrase, system=s, max_tokens=5)) == "hit-semantic"


def test_streamed_semantic_hit_is_parsed_by_the_sdk(gateway, upstream):
    s = tag()
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-a1-0123456789", max_retries=0)

    def run(question):
        raw = client.chat.completions.with_raw_response.create(
            model="m",
            messages=[{"role": "system", "content": s}, {"role": "user", "content": question}],
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        return raw.headers["x-meshgate-cache"], text

    try:
        assert run("How do I merge two dictionaries in Python?") == ("miss", " ".join(["tok"] * 16))
        before = upstream_stats(upstream)["requests"]
        hit = run("What is the way to merge two dictionaries in Python?")
        assert hit == ("hit-semantic", " ".join(["tok"] * 16))
        assert upstream_stats(upstream)["requests"] == before
        # a buffered request is another scope: it never gets the stored stream
        assert (
            cache_of(ask(gateway, "How do I merge two dictionaries in Python?", system=s)) == "miss"
        )
    finally:
        client.close()


def test_aborted_stream_is_not_indexed(gateway):
    s = tag()
    broken = {"stream": True, "fake": {"abort_after": 3}}
    assert b'"error"' in ask(gateway, "How do I exit vim?", system=s, **broken).content
    assert cache_of(ask(gateway, "How can I exit vim?", system=s, stream=True)) == "miss"


def test_an_expired_answer_is_not_served_by_meaning(gateway):
    s = tag()
    ask(
        gateway, "How do I rename a file in Linux?", system=s, headers={"x-meshgate-cache-ttl": "1"}
    )
    assert cache_of(ask(gateway, "How can I rename a file on Linux?", system=s)) == "hit-semantic"
    time.sleep(1.2)
    assert cache_of(ask(gateway, "How can I rename a file on Linux?", system=s)) == "miss"


def test_no_cache_stores_and_indexes_the_fresh_answer(gateway):
    s = tag()
    fresh = ask(gateway, "How do I clone a git repository?", system=s,
                headers={"cache-control": "no-cache"})  # fmt: skip
    assert cache_of(fresh) == "miss"
    assert (
        cache_of(ask(gateway, "How can I clone a repository with git?", system=s)) == "hit-semantic"
    )


def test_admin_stats_and_delete_cover_the_semantic_index(gateway):
    auth = {"authorization": f"Bearer {ADMIN}"}
    s = tag()
    ask(gateway, "What is the tallest mountain in the world?", key="b1", system=s)
    stats = httpx.get(gateway.url + "/admin/cache/stats", headers=auth).json()
    assert stats["semantic"]["index"] == "embedded"
    assert stats["semantic"]["entries"] >= 1
    assert stats["lookups"]["semantic"]["hit"] >= 1
    deleted = httpx.delete(gateway.url + "/admin/cache?namespace=team:b", headers=auth).json()
    assert deleted["deleted_semantic"] >= 1
    paraphrase = "Which mountain is the tallest in the world?"
    assert cache_of(ask(gateway, paraphrase, key="b1", system=s)) == "miss"


def test_embedder_can_be_a_model_the_gateway_serves(tmp_path, upstream):
    # The simulated embeddings model gives one vector per exact text, so the same
    # question sent as text parts instead of a string is an exact miss but a
    # semantic hit at similarity 1. The embeddings go through the gateway's own
    # chain, as the internal caller semantic-cache, and are accounted like any call.
    server = start_gateway(tmp_path, config(upstream.port, "embedder: {model: emb}"))
    try:
        ask(server, "How do I exit vim?")
        parts = [{"type": "text", "text": "How do I exit vim?"}]
        hit = ask(server, parts)
        assert cache_of(hit) == "hit-semantic"
        assert float(hit.headers["x-meshgate-cache-similarity"]) > 0.999
        deadline = time.monotonic() + 20
        while True:
            embedded = [x for x in server.access_lines() if x["endpoint"] == "embeddings"]
            if len(embedded) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(embedded) >= 2  # the prompt of each lookup; answers reuse them
        assert {(x["key"], x["model"], x["status"]) for x in embedded} == {
            ("semantic-cache", "emb", 200)
        }
    finally:
        server.stop()


def test_redis_without_the_query_engine_is_named_at_start(tmp_path, upstream):
    redis = RedisServer(tmp_path).start()
    try:
        state = f'state: {{backend: redis, url: "{redis.url}"}}'
        text = config(upstream.port, "index: redis", backend="redis", state=state)
        with pytest.raises(RuntimeError, match="exited"):
            start_gateway(tmp_path, text)
        log = "".join(p.read_text() for p in tmp_path.glob("gateway-*.log"))
        assert "has no query engine" in log
        assert "version 7." in log and "Redis 8 or Redis Stack" in log

        fallback = "index: redis, on_missing_query_engine: embedded"
        server = start_gateway(tmp_path, config(upstream.port, fallback, "redis", state))
        try:
            assert "using the embedded index instead" in server.output()
            ask(server, "How do I exit vim?")
            assert cache_of(ask(server, "How can I exit vim?")) == "hit-semantic"
        finally:
            server.stop()
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def shared_index(tmp_path_factory, upstream, redis_search):
    """Two gateways sharing one RedisVL index on a real Redis with the query engine,
    and one embedding model: the host process both reach over a Unix socket."""
    tmp = tmp_path_factory.mktemp("redisvl")
    state = f'state: {{backend: redis, url: "{redis_search}", prefix: "mg{uuid.uuid4().hex[:8]}:"}}'
    host = f'embedder: {{share: always, socket: "{tmp / "e.sock"}", idle_s: 5}}'
    text = config(upstream.port, f"index: redis, {host}", backend="redis", state=state)
    one, two = start_gateway(tmp, text), start_gateway(tmp, text)
    yield one, two
    one.stop()
    two.stop()


def torch_loaded(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def test_one_embedding_model_for_both_gateways(shared_index):
    import psutil

    one, two = shared_index
    hosts = [p for p in psutil.process_iter(["cmdline"])
             if "plugins.cache.embedder_host" in (p.info["cmdline"] or [])
             and any(str(one.log.parent) in a for a in p.info["cmdline"])]  # fmt: skip
    assert len(hosts) == 1
    assert torch_loaded(hosts[0].pid)
    for gateway in (one, two):
        assert not torch_loaded(gateway.proc.pid)


def test_workers_of_one_server_share_the_host(tmp_path, upstream, redis_search):
    """`share: auto` with two workers: neither loads the model; paraphrases are served
    whichever worker answers."""
    import psutil

    state = f'state: {{backend: redis, url: "{redis_search}", prefix: "mg{uuid.uuid4().hex[:8]}:"}}'
    host = f'embedder: {{socket: "{tmp_path / "w.sock"}", idle_s: 5}}'
    text = config(upstream.port, f"index: redis, {host}", backend="redis", state=state)
    server = start_gateway(tmp_path, text, "--workers", "2")
    try:
        workers = psutil.Process(server.proc.pid).children()
        serving = [w for w in workers if "resource_tracker" not in " ".join(w.cmdline())]
        assert len(serving) == 2, [w.cmdline() for w in workers]
        assert not any(torch_loaded(w.pid) for w in serving)
        s = tag()
        assert cache_of(ask(server, "How do I exit vim?", system=s)) == "miss"
        assert until_indexed(server, 1) == 1
        answers = [ask(server, "How can I exit vim?", system=s) for _ in range(6)]
        hits = [cache_of(a) for a in answers]
        if hits != ["hit-semantic"] * 6:  # what each worker saw, to tell a miss's cause
            refused = [a.headers.get("x-meshgate-cache-refused") for a in answers]
            logs = [x for x in server.output().splitlines() if '"request_id"' not in x]
            stats = [httpx.get(server.url + "/admin/cache/stats",
                               headers={"authorization": f"Bearer {ADMIN}"}).json()
                     for _ in range(4)]  # fmt: skip
            pytest.fail(f"{hits} refused={refused} stats={stats} log={logs[-10:]}")
    finally:
        server.stop()


def entries(server) -> int:
    return until_indexed(server, 0)


def test_redisvl_index_shared_by_two_gateways(shared_index):
    one, two = shared_index
    s = tag()
    before = entries(one)
    assert cache_of(ask(one, "How do I reverse a list in Python?", system=s)) == "miss"
    assert until_indexed(two, before + 1) == before + 1  # indexed after it was sent
    hit = ask(two, "What's the best way to reverse a list in Python?", system=s)
    assert cache_of(hit) == "hit-semantic"
    assert cache_of(ask(two, "How do I reverse a list in Java?", system=s)) == "miss"
    stats = httpx.get(two.url + "/admin/cache/stats",
                      headers={"authorization": f"Bearer {ADMIN}"}).json()  # fmt: skip
    assert stats["semantic"] == {**stats["semantic"], "index": "redis"}
    assert stats["semantic"]["entries"] >= 1


def test_redisvl_index_keeps_tenants_apart(shared_index):
    one, two = shared_index
    s = tag()
    before = entries(one)
    assert cache_of(ask(one, "How do I exit vim?", system=s)) == "miss"
    until_indexed(two, before + 1)
    paraphrase = "How can I exit vim?"
    assert cache_of(ask(two, paraphrase, key="b1", system=s)) == "miss"  # another team
    assert cache_of(ask(two, paraphrase, key="a1", system=s)) == "hit-semantic"  # same team


def test_redisvl_index_entries_expire_with_their_answers(shared_index):
    one, two = shared_index
    s = tag()
    ttl = {"x-meshgate-cache-ttl": "1"}
    before = entries(one)
    ask(one, "How do I rename a file in Linux?", system=s, headers=ttl)
    until_indexed(two, before + 1)
    assert cache_of(ask(two, "How can I rename a file on Linux?", system=s)) == "hit-semantic"
    time.sleep(1.5)
    assert cache_of(ask(two, "How can I rename a file on Linux?", system=s)) == "miss"


def test_redisvl_index_entries_are_deleted_for_every_gateway(shared_index):
    one, two = shared_index
    auth = {"authorization": f"Bearer {ADMIN}"}
    s = tag()
    before = entries(one)
    ask(one, "What is the tallest mountain in the world?", key="b1", system=s)
    until_indexed(two, before + 1)
    paraphrase = "Which mountain is the tallest in the world?"
    assert cache_of(ask(two, paraphrase, key="b1", system=s)) == "hit-semantic"
    deleted = httpx.delete(one.url + "/admin/cache?namespace=team:b", headers=auth).json()
    assert deleted["deleted_semantic"] >= 1
    assert cache_of(ask(two, paraphrase, key="b1", system=s)) == "miss"


def test_a_slow_lookup_is_a_miss_and_the_answer_is_still_indexed(tmp_path, upstream):
    # No embedder answers within a microsecond: every lookup times out and is a
    # miss, and the answer is embedded for the index after it was sent.
    semantic = "embedder: {model: emb}, lookup_timeout_s: 0.000001"
    server = start_gateway(tmp_path, config(upstream.port, semantic))
    try:
        ask(server, "How do I exit vim?")
        parts = [{"type": "text", "text": "How do I exit vim?"}]
        assert cache_of(ask(server, parts)) == "miss"
        metrics = scrape(server.url, ADMIN)
        assert 'meshgate_cache_lookups_total{kind="semantic",result="timeout"} 2.0' in metrics
        assert until_indexed(server, 2) == 2
    finally:
        server.stop()


def judged_config(upstream_port: int, judge_port: int, judge: str) -> str:
    """`judge`: the model the judge upstream is asked for: `say-same` answers "Same.",
    `say-different` answers "different"."""
    text = config(upstream_port, f"verify_with: {{model: {judge}}}")
    return text.replace(
        "  sim: {type: simulated}",
        f'  sim: {{type: simulated}}\n  j: {{type: openai, base_url: "http://127.0.0.1:{judge_port}/v1"}}',
    ).replace(
        "models:\n",
        "models:\n  - {name: say-same, deployments: [{provider: j, model: say-same}]}\n"
        "  - {name: say-different, deployments: [{provider: j, model: say-different}]}\n",
    )


@pytest.fixture(scope="module")
def judge_upstream(tmp_path_factory):
    from tests.conftest import start_fake_upstream

    server = start_fake_upstream(
        tmp_path_factory.mktemp("judge"),
        "--reply-by-model",
        '{"say-same": "Same.", "say-different": "different"}',
    )
    yield server
    server.stop()


@pytest.mark.parametrize("judge", ["say-same", "say-different"])
def test_a_judge_decides_candidates_refused_for_their_words_only(
    tmp_path, upstream, judge_upstream, judge
):
    server = start_gateway(tmp_path, judged_config(upstream.port, judge_upstream.port, judge))
    try:
        s = tag()
        assert cache_of(ask(server, "What does a CPU do?", system=s)) == "miss"
        until_indexed(server, 1)
        before = upstream_stats(judge_upstream)["requests"]
        # the words do not align ("function"): put to the judge, which decides
        r = ask(server, "What is the function of a CPU?", system=s)
        assert cache_of(r) == ("hit-semantic" if judge == "say-same" else "miss")
        assert upstream_stats(judge_upstream)["requests"] == before + 1
        if judge == "say-different":
            assert r.headers["x-meshgate-cache-refused"] == "added word"
        if judge == "say-same":  # asked again: the verdict is remembered
            assert (
                cache_of(ask(server, "What is the function of a CPU?", system=s)) == "hit-semantic"
            )
        # a mark (a negation) is never put to the judge
        r = ask(server, "What does a CPU not do?", system=s)
        assert cache_of(r) == "miss" and r.headers["x-meshgate-cache-refused"] == "negation"
        assert upstream_stats(judge_upstream)["requests"] == before + 1
        # the judge's call went through the chain as the caller, not around it
        judged = [x for x in server.access_lines() if x["model"] == judge]
        assert [(x["key"], x["status"]) for x in judged] == [("a1", 200)]
    finally:
        server.stop()


def test_a_judge_that_is_not_a_model_is_refused_at_start(tmp_path, upstream):
    path = tmp_path / "bad.yaml"
    path.write_text(config(upstream.port, "verify_with: {model: nowhere}"))
    result = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert "verify_with" in result.stderr and "nowhere" in result.stderr
