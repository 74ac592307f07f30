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
models: [{name: m, deployments: [{provider: up, model: m}]}]
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


@pytest.mark.parametrize(
    "line",
    [
        "  up: {type: openai, base_url: http://h/v1, api_key: ${KEY}}",
        "  up: {type: openai, base_url: ${URL}/v1}",
        "  up: {type: openai, headers: {x-key: ${KEY}}, base_url: http://h}",
    ],
)
def test_an_unquoted_variable_in_a_flow_mapping_is_explained(line):
    message = error_of(f"providers:\n{line}\n", {"KEY": "k", "URL": "http://h"})
    assert message.startswith("test.yaml:2: not valid YAML")
    assert 'must be quoted: key: "${VAR}"' in message
    quoted = line.replace("${KEY}", '"${KEY}"').replace("${URL}/v1", '"${URL}/v1"')
    text = f"providers:\n{quoted}\nmodels: [{{name: m, deployments: [{{provider: up, model: m}}]}}]"
    parse_config(text, "t", env={"KEY": "k", "URL": "http://h"})  # quoted, it loads


def test_other_yaml_errors_get_no_such_advice():
    assert "must be quoted" not in error_of("server: {port: 1\nmodels: [")


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here\n", "{}"])
def test_an_empty_config_is_refused(text):
    assert error_of(text) == "test.yaml: the config is empty (see proxy.yaml for an example)"


def test_a_config_without_models_is_refused():
    message = error_of("providers: {sim: {type: simulated}}\nmodels: []\n")
    assert message == "test.yaml:2: models: no models: the gateway would serve nothing"


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ("server:\n  host: h\n  port: 99999\n", "3: server.port"),
        ("server:\n  host: h\n  workers: 0\n", "3: server.workers"),
        ("server:\n  backlog: 0\n", "2: server.backlog"),
        ("pipeline:\n  - cache:\n      ttl_s: 5\n      semantic:\n        threshold: 1.5\n",
         "5: pipeline[0].cache.semantic.threshold"),
        ("pipeline:\n  - cache:\n      semantic:\n        embedder:\n          threads: 0\n",
         "5: pipeline[0].cache.semantic.embedder.threads"),
        ("pipeline:\n  - cache:\n      semantic:\n        lookup_timeout_s: -1\n",
         "4: pipeline[0].cache.semantic.lookup_timeout_s"),
        ("pipeline:\n  - quotas:\n      default_completion_tokens: 0\n",
         "3: pipeline[0].quotas.default_completion_tokens"),
    ],
)  # fmt: skip
def test_a_value_check_points_at_its_key(section, where):
    message = error_of(section + BASE)
    assert message.startswith(f"test.yaml:{where}: "), message


@pytest.mark.parametrize(
    ("pipeline", "where", "names"),
    [
        ("  - fallback:\n      models:\n        m:\n          fallbacks: [m, ghost]\n",
         "11: pipeline[0].fallback.models.m.fallbacks[1]", "model named 'ghost'"),
        ("  - fallback:\n      models:\n        ghost: {fallbacks: [m]}\n",
         "10: pipeline[0].fallback.models.ghost", "model named 'ghost'"),
        ("  - routing:\n      models:\n        m:\n          strategy: complexity\n"
         "          rules:\n            - {model: ghost}\n",
         "13: pipeline[0].routing.models.m.rules[0].model", "model named 'ghost'"),
        ("  - routing:\n      models:\n        ghost: {strategy: cost}\n",
         "10: pipeline[0].routing.models.ghost", "model named 'ghost'"),
        ("  - cache:\n      semantic:\n        embedder:\n          model: ghost\n",
         "11: pipeline[0].cache.semantic.embedder.model", "model named 'ghost'"),
    ],
)  # fmt: skip
def test_a_cross_reference_error_names_its_line_and_key(pipeline, where, names):
    from proxy.gateway import Gateway

    config = parse_config(BASE + "pipeline:\n" + pipeline, "test.yaml", env={})
    with pytest.raises(ConfigError) as info:
        Gateway(config)
    assert str(info.value).startswith(f"test.yaml:{where}: no {names} under "), str(info.value)


def test_health_settings_are_checked_where_they_are_and_old_places_say_where_they_moved():
    message = error_of(BASE + "health:\n  checks:\n    providers: [up, ghost]\n")
    assert "test.yaml:9: health.checks.providers[1]: no provider named 'ghost'" in message
    simulated = ("providers:\n  sim: {type: simulated}\nmodels: [{name: m, deployments: "
                 "[{provider: sim, model: x}]}]\nhealth:\n  checks: {providers: [sim]}\n")  # fmt: skip
    assert "health checks need an openai or tgi provider, not simulated" in error_of(simulated)
    for key, place in [("breaker", "health.breaker"), ("health_checks", "health.checks"),
                       ("breaker_sync_s", "health.sync_s")]:  # fmt: skip
        message = error_of(BASE + f"pipeline:\n  - fallback:\n      {key}: {{}}\n")
        assert f"pipeline[0].fallback.{key}: this setting moved to {place}" in message
    assert "failures must be at least 1" in error_of(BASE + "health:\n  breaker: {failures: 0}\n")


def test_pipeline_plugins_validated_at_load():
    ok = parse_config(BASE + "pipeline:\n  - params: {rules: [{max_tokens: 10}]}\n", "t", env={})
    assert ok.pipeline[0].config.rules[0].max_tokens == 10
    message = error_of(BASE + "pipeline:\n  - params: {rulez: []}\n")
    assert "test.yaml:8: pipeline[0].params.rulez: unknown key" in message
    assert "no plugin registered as 'nope'" in error_of(BASE + "pipeline:\n  - nope: {}\n")
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


@pytest.mark.parametrize("kind", ["openai", "tgi", "simulated"])
def test_max_response_bytes_is_range_checked_for_every_provider_type(kind):
    url = "" if kind == "simulated" else ', base_url: "http://127.0.0.1:1"'
    text = BASE.replace('{type: openai, base_url: "http://127.0.0.1:1/v1"}',
                        f"{{type: {kind}{url}, max_response_bytes: 100}}")  # fmt: skip
    assert "max_response_bytes must be at least 1024" in error_of(text)
    ok = parse_config(text.replace("100}", "2048}"), "test.yaml", env={})
    assert ok.providers["up"].max_response_bytes == 2048


BAD_URLS = {
    "ftp://h/v1": "must be an http:// or https:// URL with a host",
    "http:///v1": "must be an http:// or https:// URL with a host",
    "127.0.0.1:8000/v1": "must be an http:// or https:// URL with a host",
    "http://h:99999/v1": "is not a valid URL",
    "http://[::1/v1": "is not a valid URL",
    "http://bob:hunter2-SECRET@h/v1": "must not carry credentials",
    "http://tok3n-SECRET@h/v1": "must not carry credentials",
    "http://h/v1?key=SECRET": "must not have a query or a fragment",
    "http://h/v1#SECRET": "must not have a query or a fragment",
}


@pytest.mark.parametrize("kind,key", [("openai", "base_url"), ("tgi", "base_url"),
                                      ("litellm", "api_base")])  # fmt: skip
@pytest.mark.parametrize("url", BAD_URLS)
def test_a_provider_url_that_adapters_cannot_use_is_refused_without_quoting_it(kind, key, url):
    """A credential in a URL would be quoted wherever the URL is, and aiohttp refuses
    one beside the key's header on every call; a query would be cut off by the paths
    appended. Said at load, naming the key and never the URL."""
    text = BASE.replace('{type: openai, base_url: "http://127.0.0.1:1/v1"}',
                        f'{{type: {kind}, {key}: "{url}"}}')  # fmt: skip
    message = error_of(text)
    assert f"test.yaml:3: providers.up.{key}: {key} {BAD_URLS[url]}" in message
    assert "SECRET" not in message and "hunter2" not in message


@pytest.mark.parametrize("url", ["http://h/v1", "https://h:8443/openai/deployments/{model}",
                                 "http://[::1]:8000", "http://10.0.0.7"])  # fmt: skip
def test_a_provider_url_adapters_can_use_is_taken(url):
    for kind, key in (("openai", "base_url"), ("tgi", "base_url"), ("litellm", "api_base")):
        text = BASE.replace('{type: openai, base_url: "http://127.0.0.1:1/v1"}',
                            f'{{type: {kind}, {key}: "{url}"}}')  # fmt: skip
        assert getattr(parse_config(text, "test.yaml", env={}).providers["up"], key) == url
