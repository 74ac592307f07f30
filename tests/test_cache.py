"""The exact cache end to end: hits, tenant isolation, streams, controls, admin."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import RedisServer, held_after_a_hang, scrape, start_gateway, upstream_stats

ADMIN = "admin-key-0123456789abcdef"
KEYS = {"a1": "a", "a2": "a", "b1": "b", "b": None}  # key name -> team
JWT_SECRET = "jwt-secret-for-the-cache-tests-0123456789"


def config(upstream_port: int, backend: str = "memory", redis_url: str = "") -> str:
    keys = "\n".join(
        f"        - {{name: {k}, key: sk-{k}-0123456789" + (f", team: {t}}}" if t else "}")
        for k, t in KEYS.items()
    )
    state = f'state: {{backend: redis, url: "{redis_url}"}}' if redis_url else ""
    return f"""
server: {{host: 127.0.0.1, admin_key: {ADMIN}}}
{state}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1"}}
models:
  - {{name: m, deployments: [{{provider: up, model: m}}]}}
pipeline:
  - auth:
      keys:
{keys}
      jwt: {{algorithms: [HS256], secret: {JWT_SECRET}}}
  - cache: {{backend: {backend}, ttl_s: 60}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    server = start_gateway(tmp_path_factory.mktemp("cache"), config(upstream.port))
    yield server
    server.stop()


def token(**claims) -> str:
    import jwt

    return jwt.encode({"exp": int(time.time()) + 600, **claims}, JWT_SECRET, "HS256")


def ask(gateway, key="a1", content=None, headers=None, **extra):
    body = {"model": "m", "messages": [{"role": "user", "content": content or "q"}], **extra}
    credential = key if key.count(".") == 2 else f"sk-{key}-0123456789"
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10,
                      headers={"authorization": f"Bearer {credential}", **(headers or {})})  # fmt: skip


def unique() -> str:
    return uuid.uuid4().hex


def test_second_identical_request_is_a_hit(gateway, upstream):
    q = unique()
    first = ask(gateway, content=q)
    before = upstream_stats(upstream)["requests"]
    second = ask(gateway, content=q)
    assert first.headers["x-meshgate-cache"] == "miss"
    assert second.headers["x-meshgate-cache"] == "hit-exact"
    assert second.content == first.content  # byte for byte
    assert upstream_stats(upstream)["requests"] == before  # the upstream was not called


def test_tenants_are_isolated_and_teams_share(gateway):
    q = unique()
    assert ask(gateway, "a1", q).headers["x-meshgate-cache"] == "miss"
    assert ask(gateway, "a2", q).headers["x-meshgate-cache"] == "hit-exact"  # same team
    assert ask(gateway, "b1", q).headers["x-meshgate-cache"] == "miss"  # another team


def test_namespaces_are_typed_so_kinds_of_identity_never_collide(gateway):
    """A token whose subject is `b` is neither team `b` nor the key named `b`."""
    q = unique()
    assert ask(gateway, "b1", q).headers["x-meshgate-cache"] == "miss"  # team b
    assert ask(gateway, token(sub="b"), q).headers["x-meshgate-cache"] == "miss"
    assert ask(gateway, "b", q).headers["x-meshgate-cache"] == "miss"  # key b, no team
    assert ask(gateway, token(sub="b"), q).headers["x-meshgate-cache"] == "hit-exact"
    assert ask(gateway, token(sub="b", team="b"), q).headers["x-meshgate-cache"] == "hit-exact"
    assert ask(gateway, token(sub="team:b"), q).headers["x-meshgate-cache"] == "miss"
    assert ask(gateway, token(sub="b:m"), q).headers["x-meshgate-cache"] == "miss"


def test_parameters_that_change_the_answer_never_collide(gateway):
    q = unique()
    ask(gateway, content=q, max_tokens=5)
    for extra in ({"max_tokens": 6}, {"seed": 1}, {"stop": ["x"]}, {"response_format": {"type": "json_object"}},
                  {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"temperature": 0}):  # fmt: skip
        assert ask(gateway, content=q, **extra).headers["x-meshgate-cache"] == "miss", extra
    assert (
        ask(gateway, content=q, max_tokens=5, user="someone").headers["x-meshgate-cache"]
        == "hit-exact"
    )


def test_rules_and_controls(gateway):
    q = unique()
    assert ask(gateway, content=q, temperature=0.7).headers["x-meshgate-cache"] == "bypass"
    assert ask(gateway, content=q, n=2).headers["x-meshgate-cache"] == "bypass"
    assert (
        ask(gateway, content=q, headers={"cache-control": "no-store"}).headers["x-meshgate-cache"]
        == "bypass"
    )
    assert ask(gateway, content=q).headers["x-meshgate-cache"] == "miss"  # nothing was stored
    # no-cache skips the lookup but stores the fresh answer
    assert (
        ask(gateway, content=q, headers={"cache-control": "no-cache"}).headers["x-meshgate-cache"]
        == "miss"
    )
    assert ask(gateway, content=q).headers["x-meshgate-cache"] == "hit-exact"


def test_ttl_header_expires_entries(gateway):
    q = unique()
    ask(gateway, content=q, headers={"x-meshgate-cache-ttl": "1"})
    assert ask(gateway, content=q).headers["x-meshgate-cache"] == "hit-exact"
    time.sleep(1.2)
    assert ask(gateway, content=q).headers["x-meshgate-cache"] == "miss"


def test_stream_captured_then_replayed_for_the_sdk(gateway, upstream):
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-a1-0123456789", max_retries=0)
    q = unique()
    try:

        def run():
            raw = c.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": q}], stream=True
            )
            chunks = list(raw.parse())
            return (
                raw.headers["x-meshgate-cache"],
                "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                chunks,
            )

        first = run()
        before = upstream_stats(upstream)["requests"]
        second = run()
        assert (first[0], second[0]) == ("miss", "hit-exact")
        assert second[1] == first[1] == " ".join(["tok"] * 16)
        assert all(ch.usage is None for ch in second[2])  # the stored usage chunk is not shown
        assert upstream_stats(upstream)["requests"] == before
    finally:
        c.close()


def test_aborted_stream_is_not_stored(gateway):
    q = unique()
    body = {"stream": True, "fake": {"abort_after": 3}}
    r = ask(gateway, content=q, **body)
    assert b'"error"' in r.content  # the client saw the failure
    assert ask(gateway, content=q, **body).headers["x-meshgate-cache"] == "miss"


def test_admin_stats_and_delete(gateway):
    auth = {"authorization": f"Bearer {ADMIN}"}
    q = unique()
    ask(gateway, "b1", q)
    stats = httpx.get(gateway.url + "/admin/cache/stats", headers=auth).json()
    assert stats["entries"] >= 1 and stats["bytes"] > 0
    assert stats["lookups"]["exact"]["hit"] >= 1
    deleted = httpx.delete(gateway.url + "/admin/cache", params={"namespace": "team:b", "model": "m"},
                           headers=auth).json()  # fmt: skip
    assert deleted["deleted"] >= 1
    assert ask(gateway, "b1", q).headers["x-meshgate-cache"] == "miss"
    assert httpx.get(gateway.url + "/admin/cache/stats").status_code == 401
    assert "meshgate_cache_lookups_total" in scrape(gateway.url, ADMIN)


def test_redis_backend(tmp_path, upstream):
    redis = RedisServer(tmp_path).start()
    gateway = start_gateway(tmp_path, config(upstream.port, "redis", redis.url))
    try:
        q = unique()
        big = "x" * 5000  # compressed in Redis
        assert ask(gateway, content=q + big).headers["x-meshgate-cache"] == "miss"
        hit = ask(gateway, content=q + big)
        assert hit.headers["x-meshgate-cache"] == "hit-exact"
        assert hit.json()["choices"][0]["message"]["content"].startswith("tok")
        assert ask(gateway, "b1", q + big).headers["x-meshgate-cache"] == "miss"
        assert ask(gateway, token(sub="b"), q + big).headers["x-meshgate-cache"] == "miss"
        assert ask(gateway, "b", q + big).headers["x-meshgate-cache"] == "miss"
        ask(gateway, content=q, headers={"x-meshgate-cache-ttl": "1"})
        time.sleep(1.2)
        assert ask(gateway, content=q).headers["x-meshgate-cache"] == "miss"
    finally:
        gateway.stop()
        redis.stop()


def test_a_hung_cache_redis_costs_one_timeout_then_lookups_miss_at_once(clock, hung_url):
    """The store's first call waits out its timeout; reads and writes after it fail
    at once, with no connection, until the hold is over (the plugin serves a miss
    for each and stores nothing)."""
    from plugins.cache.store import RedisStore

    url, accepted = hung_url

    async def main():
        store = RedisStore(url, "t:", 0.3)
        try:
            held = [lambda: store.get("k"), lambda: store.set("k", b"v", 60),
                    lambda: store.get("other")]  # fmt: skip
            await held_after_a_hang(clock, "Timeout", held[0], held, held[0])
        finally:
            await store.close()
        return len(accepted)

    assert asyncio.run(main()) == 2


def test_exact_cache_needs_none_of_the_semantic_extra(tmp_path):
    # A base install has no numpy, torch or sentence-transformers: the exact cache
    # must load and build without them (they are imported only for `semantic:`).
    config = tmp_path / "exact.yaml"
    config.write_text(
        "providers: {sim: {type: simulated}}\n"
        "models: [{name: m, deployments: [{provider: sim, model: s}]}]\n"
        "pipeline: [{cache: {}}]\n"
    )
    script = (
        "import sys\n"
        "for name in ('numpy', 'torch', 'sentence_transformers', 'redisvl'):\n"
        "    sys.modules[name] = None  # importing it now raises ImportError\n"
        "from proxy.app import create_app\n"
        "from proxy.config import load_config\n"
        f"create_app(load_config({str(config)!r}))\n"
        "print('built')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("built")
