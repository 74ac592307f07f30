"""The meshgate command: check, serve refusing bad configs, shutdown, workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import orjson

from tests.conftest import METRICS_KEY, ROOT, scrape, start_fake_upstream, start_gateway


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


def refusal(result: subprocess.CompletedProcess, command: str) -> str:
    """Why `command` refused to go on: for check a line for a person, for serve one
    JSON log line (as everything serve writes), never a traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    if command == "check":
        assert result.stderr.startswith("meshgate: ")
        return result.stderr.removeprefix("meshgate: ").strip()
    lines = [orjson.loads(line) for line in result.stderr.splitlines()]
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1, lines
    return errors[0]["message"]


def test_invalid_config_refused_by_check_and_serve(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    deployments: [{provider: ghost, model: x}]\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    for command in ("check", "serve"):
        message = refusal(meshgate(command, "--config", str(bad)), command)
        assert message == (
            f"invalid config: {bad}:3: models[0].deployments[0].provider: "
            "no provider named 'ghost' under providers:"
        )
        message = refusal(meshgate(command, "--config", str(empty)), command)
        assert (
            message
            == f"invalid config: {empty}: the config is empty (see proxy.yaml for an example)"
        )


def test_serve_refuses_a_busy_port_or_one_out_of_range_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = meshgate("serve", "--config", "proxy.yaml", "--host", "127.0.0.1",
                          "--port", str(port))  # fmt: skip
        message = refusal(result, "serve")
        assert message == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    for flag, value in (("--port", "99999"), ("--port", "-1"), ("--workers", "0")):
        message = refusal(meshgate("serve", "--config", "proxy.yaml", flag, value), "serve")
        assert message.startswith(f"{flag} must be from 1 to ")


def test_plugin_settings_naming_unknown_models_refused_by_check_and_serve(tmp_path):
    base = (
        "providers: {sim: {type: simulated}}\n"
        "models: [{name: m, deployments: [{provider: sim, model: s}]}]\n"
    )
    cases = {
        "fallback": ("pipeline: [{fallback: {models: {m: {fallbacks: [ghost]}}}}]\n",
                     "3: pipeline[0].fallback.models.m.fallbacks[0]"),
        "embedder": ("pipeline: [{cache: {semantic: {embedder: {model: ghost}}}}]\n",
                     "3: pipeline[0].cache.semantic.embedder.model"),
    }  # fmt: skip
    for name, (pipeline, where) in cases.items():
        bad = tmp_path / f"{name}.yaml"
        bad.write_text(base + pipeline)
        for command in ("check", "serve"):
            message = refusal(meshgate(command, "--config", str(bad)), command)
            expected = f"invalid config: {bad}:{where}: no model named 'ghost' under models:"
            assert message == expected, (name, command)


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


def gateway_with_grace(tmp_path, graceful_timeout_s: float):
    """A fake upstream, and a gateway in front of it that stops within this grace."""
    upstream = start_fake_upstream(tmp_path)
    gateway = start_gateway(tmp_path, f"""
server: {{host: 127.0.0.1, graceful_timeout_s: {graceful_timeout_s}}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}
models:
  - name: m
    deployments: [{{provider: up, model: m}}]
""")  # fmt: skip
    return upstream, gateway


def test_sigterm_drains_in_flight_stream(tmp_path):
    upstream, gateway = gateway_with_grace(tmp_path, 10)
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


def test_streams_cut_at_shutdown_end_with_an_error_event_and_are_logged_as_cut(tmp_path):
    upstream, gateway = gateway_with_grace(tmp_path, 1)
    results: dict[str, object] = {}
    started = threading.Barrier(5)

    def raw(i: int) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                "fake": {"tokens": 2000, "token_delay_ms": 20}}  # fmt: skip
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                          timeout=30) as r:  # fmt: skip
            chunks = r.iter_raw()
            first = next(chunks)
            started.wait(30)
            results[f"raw{i}"] = first + b"".join(chunks)

    def sdk() -> None:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True,
            extra_body={"fake": {"tokens": 2000, "token_delay_ms": 20}},
        )  # fmt: skip
        try:
            next(iter(stream))
            started.wait(30)
            for _ in stream:
                pass
        except openai.APIError as exc:
            results["sdk"] = exc
        client.close()

    threads = [threading.Thread(target=raw, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=sdk))
    try:
        for t in threads:
            t.start()
        started.wait(30)  # every stream is under way
        gateway.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert gateway.proc.wait(30) == 0
        for i in range(3):
            body = results[f"raw{i}"]
            *_, last = [e for e in body.split(b"\n\n") if e]
            assert (
                orjson.loads(last.removeprefix(b"data: "))["error"]["code"]
                == "server_shutting_down"
            )
        assert isinstance(results["sdk"], openai.APIError)
        assert not isinstance(results["sdk"], openai.APIConnectionError)
        assert "shutting down" in str(results["sdk"])
        lines = [x for x in gateway.access_lines() if x.get("endpoint") == "chat"]
        assert len(lines) == 4
        assert {(x["status"], x["error"]) for x in lines} == {(503, "server_shutting_down")}
        assert "Traceback" not in gateway.output() and "CancelledError" not in gateway.output()
    finally:
        gateway.stop()
        upstream.stop()


def requests_answered(metrics: str) -> float:
    lines = [
        x
        for x in metrics.splitlines()
        if x.startswith("meshgate_requests_total{") and 'status="200"' in x
    ]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_two_workers_serve_and_aggregate_metrics(tmp_path):
    scraped = f"server:\n  metrics_key: {METRICS_KEY}\n"
    config = (ROOT / "proxy.yaml").read_text().replace("server:\n", scraped, 1)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    gateway = start_gateway(tmp_path, config, "--workers", "2", env={**env, "TMPDIR": str(tmp)})
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(20):
                assert http.post("/v1/chat/completions", json=body).status_code == 200
            # Whichever worker answers /metrics, the other's counts are there within
            # a flush of its tallies (FLUSH_S); a busy machine may take longer.
            answered = None
            deadline = time.monotonic() + 30
            while answered != 20.0 and time.monotonic() < deadline:
                time.sleep(0.2)
                answered = requests_answered(scrape(gateway.url))
        assert answered == 20.0
        started = [x for x in gateway.output().splitlines() if '"serving 4 models' in x]
        assert len(started) == 2  # one per worker
        assert len(list(tmp.glob("meshgate-metrics-*"))) == 1  # the workers' shared metrics
    finally:
        gateway.stop()
    assert not list(tmp.glob("meshgate-metrics-*"))  # removed once they stopped
