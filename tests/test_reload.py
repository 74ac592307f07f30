"""proxy/reload.py: a changed config file or SIGHUP makes a new config live,
atomically, with no request failing on the way; a bad one is refused and the
old one stays; what did not change is taken over, not rebuilt."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import signal
import threading
import time

import httpx
import pytest

from proxy.config import parse_config
from proxy.gateway import Gateway
from tests.conftest import scrape, start_gateway

ADMIN = "admin-key-0123456789abcdef"


def config(upstream_port: int, models: list[str], pipeline: str = "[]", extra: str = "") -> str:
    listed = "".join(
        f"  - {{name: {m}, deployments: [{{provider: up, model: {m}}}]}}\n" for m in models
    )
    return f"""
server: {{host: 127.0.0.1, admin_key: {ADMIN}, reload_check_s: 0.1}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1"}}
{extra}
models:
{listed}
pipeline: {pipeline}
"""


def ask(server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)


def live_hash(server) -> str | None:
    for line in scrape(server.url, ADMIN).splitlines():
        if line.startswith("meshgate_config_info{") and line.endswith(" 1.0"):
            return line.split('hash="')[1].split('"')[0]
    return None


def until(predicate, within_s: float = 15) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@pytest.fixture
def gateway(tmp_path, upstream):
    text = config(upstream.port, ["a", "b"])
    server = start_gateway(tmp_path, text)
    server.config = tmp_path / f"gateway-{server.port}.yaml"
    yield server
    server.stop()


def test_a_changed_file_is_live_within_a_moment_and_says_which(gateway, upstream):
    assert live_hash(gateway) == digest(gateway.config.read_text())
    new = config(upstream.port, ["a", "c"])
    gateway.config.write_text(new)
    assert until(lambda: live_hash(gateway) == digest(new))
    assert ask(gateway, "c").status_code == 200
    removed = ask(gateway, "b")
    assert removed.status_code == 404 and removed.json()["error"]["code"] == "model_not_found"
    assert f"config reloaded (the file changed): {digest(config(upstream.port, ['a', 'b']))}" in (
        gateway.output()
    )


def test_sighup_reloads_a_gateway_that_does_not_watch(tmp_path, upstream):
    unwatched = config(upstream.port, ["a"]).replace("reload_check_s: 0.1", "reload_check_s: 0")
    server = start_gateway(tmp_path, unwatched)
    try:
        path = tmp_path / f"gateway-{server.port}.yaml"
        path.write_text(
            unwatched.replace(
                "models:\n", "models:\n  - {name: d, deployments: [{provider: up, model: d}]}\n"
            )
        )
        time.sleep(0.5)
        assert ask(server, "d").status_code == 404  # not watched: nothing happens
        server.proc.send_signal(signal.SIGHUP)
        assert until(lambda: ask(server, "d").status_code == 200)
        assert server.proc.poll() is None
    finally:
        server.stop()


@pytest.mark.parametrize(
    "bad",
    ["models: [{name: a, deployments: [{provider: nowhere, model: a}]}]\n",
     "server: {prot: 1}\nmodels: [{name: a, deployments: []}]\n",
     "models: [\n"],
)  # fmt: skip
def test_a_bad_config_is_refused_with_its_line_and_the_old_one_stays(gateway, bad):
    before = live_hash(gateway)
    gateway.config.write_text(bad)
    assert until(lambda: "config reload (the file changed) rejected" in gateway.output())
    line = next(x for x in gateway.output().splitlines() if "rejected" in x)
    assert str(gateway.config) + ":" in line  # file and line of the mistake
    assert live_hash(gateway) == before
    assert ask(gateway, "b").status_code == 200
    metrics = scrape(gateway.url, ADMIN)
    assert 'meshgate_config_reloads_total{result="rejected"} 1.0' in metrics


def test_reloads_under_load_fail_no_request_and_streams_finish(gateway, upstream):
    stop = threading.Event()
    statuses: list[int] = []

    def load(stream: bool) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                body = {"model": "a", "messages": [{"role": "user", "content": "hi"}],
                        "stream": stream, "fake": {"token_delay_ms": 20 if stream else 0}}  # fmt: skip
                r = client.post(gateway.url + "/v1/chat/completions", json=body)
                if stream and not r.text.rstrip().endswith("data: [DONE]"):
                    statuses.append(-1)
                statuses.append(r.status_code)

    with concurrent.futures.ThreadPoolExecutor(6) as threads:
        workers = [threads.submit(load, i % 2 == 0) for i in range(6)]
        for i in range(6):  # models come and go; plugins change; the upstream stays
            models = ["a", "b"] if i % 2 else ["a", f"m{i}"]
            pipeline = "[{cache: {}}]" if i % 3 else "[]"
            text = config(upstream.port, models, pipeline)
            gateway.config.write_text(text)
            assert until(lambda t=text: live_hash(gateway) == digest(t))
            time.sleep(0.3)
        stop.set()
        for w in workers:
            w.result()
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


def test_what_did_not_change_is_taken_over_and_the_rest_rebuilt():
    base = config(9, ["a"], "[{cache: {}}]", "state: {backend: memory}")
    old = Gateway(parse_config(base, "t.yaml", env={}))
    same = Gateway(parse_config(base.replace("name: a", "name: a, aliases: [x]"), "t.yaml"),
                   previous=old)  # fmt: skip
    assert same.upstreams["up"] is old.upstreams["up"] and same.pools["up"] is old.pools["up"]
    assert same.state is old.state and same.metrics is old.metrics
    assert same.plugins[0] is not old.plugins[0]  # the models changed: plugins rebuilt

    other = base.replace("http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    moved = Gateway(parse_config(other, "t.yaml", env={}), previous=same)
    assert moved.upstreams["up"] is not same.upstreams["up"]
    twin = Gateway(parse_config(other, "t.yaml", env={}), previous=moved)
    assert twin.plugins[0] is moved.plugins[0] and twin.health is moved.health

    async def lifecycle():
        await old.start()
        await same.start(previous=old)
        await old.close(successor=same)  # the shared upstream client stays open
        assert same.upstreams["up"].session is not None
        assert not same.upstreams["up"].session.closed
        await same.close()
        assert same.upstreams["up"].session.closed

    asyncio.run(lifecycle())


def test_admin_routes_follow_the_live_plugins(gateway, upstream):
    auth = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.get(gateway.url + "/admin/cache/stats", headers=auth).status_code == 404
    text = config(upstream.port, ["a", "b"], "[{cache: {}}]")
    gateway.config.write_text(text)
    assert until(lambda: live_hash(gateway) == digest(text))
    stats = httpx.get(gateway.url + "/admin/cache/stats", headers=auth)
    assert stats.status_code == 200 and stats.json()["backend"] == "memory"
    assert httpx.get(gateway.url + "/admin/cache/stats").status_code in (401, 403)


def test_a_new_metrics_key_takes_over_at_the_reload(gateway, upstream):
    first, second = "metrics-key-first-0123456789", "metrics-key-second-0123456789"
    for key, old in ((first, None), (second, first)):
        text = config(upstream.port, ["a"]).replace(
            "reload_check_s: 0.1", f"reload_check_s: 0.1, metrics_key: {key}"
        )
        gateway.config.write_text(text)
        assert until(lambda text=text: live_hash(gateway) == digest(text))
        assert "meshgate_config_info" in scrape(gateway.url, key)
        if old is not None:
            stale = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {old}"})
            assert stale.status_code == 401 and "meshgate_" not in stale.text


def test_sighup_to_a_multi_worker_gateway_reloads_every_worker(tmp_path, upstream):
    text = config(upstream.port, ["a"]).replace("reload_check_s: 0.1", "reload_check_s: 0")
    server = start_gateway(tmp_path, text, "--workers", "2")
    try:
        path = tmp_path / f"gateway-{server.port}.yaml"
        path.write_text(text.replace("name: a", "name: e"))
        server.proc.send_signal(signal.SIGHUP)
        # Every answer, whichever worker gives it, comes from the new config.
        assert until(lambda: all(ask(server, "e").status_code == 200 for _ in range(10)))
        assert all(ask(server, "a").status_code == 404 for _ in range(10))
        assert server.proc.poll() is None
    finally:
        server.stop()
