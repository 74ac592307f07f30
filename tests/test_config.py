"""Config loading: interpolation, validation errors with file, line and key path."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, parse_config

BASE = """
providers:
  up: {type: openai, base_url: "http://127.0.0.1:1/v1"}
models:
  - name: m
    deployments: [{provider: up, model: x}]
"""


def error_of(text: str, env=None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.yaml", env=env or {})
    return str(info.value)


def test_minimal_config_and_defaults():
    config = parse_config(BASE, "test.yaml", env={})
    assert config.server.port == 8080
    assert config.server.max_body_bytes == 10 * 1024 * 1024
    assert config.models[0].deployments[0].label == "up/x"
    assert config.providers["up"].timeouts.total_s == 600


def test_interpolation_with_defaults_and_types():
    text = """
server: {port: "${PORT:-9000}", host: "${HOST:-127.0.0.1}", access_log: "${LOG:-false}"}
providers:
  up:
    type: openai
    base_url: http://${UP_HOST}:${UP_PORT:-8000}/v1
    api_key: ${KEY}
"""
    env = {"HOST": "0.0.0.0", "UP_HOST": "vllm", "KEY": "12345"}
    config = parse_config(text, "t.yaml", env=env)
    assert config.server.port == 9000 and config.server.host == "0.0.0.0"
    assert config.server.access_log is False
    assert config.providers["up"].base_url == "http://vllm:8000/v1"
    assert config.providers["up"].api_key == "12345"  # digits stay text
    assert "server.port: must be int, not 'x'" in error_of(text, {"PORT": "x"})


def test_unknown_key_names_file_line_and_path():
    message = error_of(
        BASE + "  - name: n\n    deployments: [{provider: up, model: y, weigth: 2}]\n"
    )
    assert message.startswith("test.yaml:8: models[1].deployments[0].weigth: unknown key")


def test_wrong_type():
    message = error_of("server: {port: eighty}\n")
    assert message == "test.yaml:1: server.port: must be int, not a string"


def test_missing_provider_and_duplicate_model():
    message = error_of(BASE.replace("provider: up", "provider: nowhere"))
    assert "models[0].deployments[0].provider: no provider named 'nowhere'" in message
    message = error_of(BASE + "  - name: m\n    deployments: [{provider: up, model: y}]\n")
    assert "test.yaml:7: models[1].name: duplicate model name 'm'" in message


def test_bad_provider_type_and_top_level_key():
    assert "providers.up.type: must be one of" in error_of(BASE.replace("openai", "opnai"))
    assert "test.yaml:1: serve: unknown key" in error_of("serve: {}\n" + BASE)


def test_missing_secret_marks_provider_not_an_error():
    text = BASE.replace(
        'base_url: "http://127.0.0.1:1/v1"', 'base_url: "http://h/v1", api_key: "${KEY}"'
    )
    config = parse_config(text, "t.yaml", env={})
    assert config.missing_secrets() == {"up": ("KEY",)}
    assert parse_config(text, "t.yaml", env={"KEY": "k"}).missing_secrets() == {}


def test_unset_variable_outside_providers_is_an_error():
    assert "server.host: environment variable NOPE is not set" in error_of(
        "server:\n  host: ${NOPE}\n"
    )


def test_invalid_yaml_names_line():
    assert error_of("server: {port: 1\nmodels: [").startswith("test.yaml:")


def test_pipeline_plugins_validated_at_load():
    ok = parse_config(BASE + "pipeline:\n  - params: {rules: [{max_tokens: 10}]}\n", "t", env={})
    assert ok.pipeline[0].config.rules[0].max_tokens == 10
    message = error_of(BASE + "pipeline:\n  - params: {rulez: []}\n")
    assert "test.yaml:8: pipeline[0].params.rulez: unknown key" in message
    assert "no built-in plugin 'nope'" in error_of(BASE + "pipeline:\n  - nope: {}\n")
    assert "cannot import plugin module" in error_of(BASE + "pipeline:\n  - no.such.mod:X: {}\n")


def test_default_proxy_yaml_is_valid():
    from pathlib import Path

    from proxy.config import load_config

    config = load_config(Path(__file__).parent.parent / "proxy.yaml")
    assert {m.name for m in config.models} >= {"demo", "gpt-4o-mini"}


def test_example_configs_are_valid():
    from pathlib import Path

    from proxy.config import load_config

    examples = sorted((Path(__file__).parent.parent / "config").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)


def test_semantic_cache_settings_are_validated_at_load():
    cache = BASE + "pipeline:\n  - cache: {semantic: {threshold: 0.9, embedder: {max_batch: 8}}}\n"
    semantic = parse_config(cache, "t", env={}).pipeline[0].config.semantic
    assert (semantic.threshold, semantic.embedder.max_batch, semantic.index) == (0.9, 8, "embedded")
    assert "pipeline[0].cache.semantic.treshold: unknown key" in error_of(
        BASE + "pipeline:\n  - cache: {semantic: {treshold: 0.9}}\n"
    )
    assert "threshold is a cosine similarity" in error_of(
        BASE + "pipeline:\n  - cache: {semantic: {threshold: 1.5}}\n"
    )
    assert "set backend: redis" in error_of(
        BASE + "pipeline:\n  - cache: {semantic: {index: redis}}\n"
    )
    assert "either path" in error_of(
        BASE + "pipeline:\n  - cache: {semantic: {embedder: {path: /m, model: e}}}\n"
    )
