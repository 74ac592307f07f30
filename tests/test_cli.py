"""The meshgate command: check, serve refusing bad configs, shutdown, workers."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.conftest import ROOT, start_fake_upstream, start_gateway


def meshgate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)  # fmt: skip


def test_version():
    result = meshgate("--version")
    assert result.returncode == 0 and result.stdout.startswith("meshgate 0.")


def test_check_prints_what_would_be_served():
    result = meshgate("check", "--config", "proxy.yaml")
    assert result.returncode == 0
    assert "demo\n    -> simulated/meshgate-simulated" in result.stdout
    assert "openai (openai)  NOT USABLE: OPENAI_API_KEY not set" in result.stdout


def test_invalid_config_refused_by_check_and_serve(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    deployments: [{provider: ghost, model: x}]\n")
    for command in ("check", "serve"):
        result = meshgate(command, "--config", str(bad))
        assert result.returncode == 1
        assert (
            f"{bad}:3: models[0].deployments[0].provider: no provider named 'ghost'"
            in result.stderr
        )


def test_plugin_settings_naming_unknown_models_refused_by_check_and_serve(tmp_path):
    base = (
        "providers: {sim: {type: simulated}}\n"
        "models: [{name: m, deployments: [{provider: sim, model: s}]}]\n"
    )
    cases = {
        "fallback": ("pipeline: [{fallback: {models: {m: {fallbacks: [ghost]}}}}]\n",
                     "fallback names model 'ghost', which is not in models:"),
        "embedder": ("pipeline: [{cache: {semantic: {embedder: {model: ghost}}}}]\n",
                     "cache.semantic.embedder names model 'ghost', which is not in models:"),
    }  # fmt: skip
    for name, (pipeline, message) in cases.items():
        bad = tmp_path / f"{name}.yaml"
        bad.write_text(base + pipeline)
        for command in ("check", "serve"):
            result = meshgate(command, "--config", str(bad))
            assert result.returncode == 1, (name, command, result.stderr)
            assert f"meshgate: invalid config: {bad}: {message}" in result.stderr
            assert "Traceback" not in result.stderr


def test_importing_the_gateway_stays_light():
    code = (
        "import sys; from proxy.app import create_app; from proxy.config import load_config;"
        "create_app(load_config('proxy.yaml'));"
        "heavy = [m for m in ('litellm', 'torch', 'sentence_transformers') if m in sys.modules];"
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stderr


def test_default_config_serves_chat_and_stream_with_no_keys(tmp_path):
    gateway = start_gateway(tmp_path, (ROOT / "proxy.yaml").read_text())
    try:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        body["stream"] = False
        r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)
        assert "simulated" in r.json()["choices"][0]["message"]["content"]
    finally:
        gateway.stop()


def test_sigterm_drains_in_flight_stream(tmp_path):
    upstream = start_fake_upstream(tmp_path)
    gateway = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1, graceful_timeout_s: 10}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}
models:
  - name: m
    deployments: [{{provider: up, model: m}}]
""")  # fmt: skip
    result = {}

    def stream():
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                "fake": {"tokens": 20, "token_delay_ms": 50}}  # fmt: skip
        r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=20)
        result["body"] = r.text

    try:
        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(0.3)  # the stream is under way
        gateway.proc.send_signal(signal.SIGTERM)
        thread.join(20)
        assert gateway.proc.wait(20) == 0
        assert result["body"].endswith("data: [DONE]\n\n")
        tokens = result["body"].count('"content":"tok"') + result["body"].count('"content":" tok"')
        assert tokens == 20
    finally:
        gateway.stop()
        upstream.stop()


def test_two_workers_serve_and_aggregate_metrics(tmp_path):
    config = (ROOT / "proxy.yaml").read_text()
    gateway = start_gateway(tmp_path, config, "--workers", "2")
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(20):
                assert http.post("/v1/chat/completions", json=body).status_code == 200
            time.sleep(0.2)
            metrics = http.get("/metrics").text
        line = next(
            x
            for x in metrics.splitlines()
            if x.startswith("meshgate_requests_total{") and 'status="200"' in x
        )
        assert float(line.rsplit(" ", 1)[1]) == 20.0
        started = [x for x in gateway.output().splitlines() if '"serving 4 models' in x]
        assert len(started) == 2  # one per worker
    finally:
        gateway.stop()
