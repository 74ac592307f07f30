"""proxy/config_schema.py: the JSON Schema `meshgate schema` prints accepts the
configs the gateway serves and refuses what its loader refuses for one key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from proxy.config import ConfigError, parse_config
from tests.conftest import ROOT
from tests.test_cli import meshgate

EXAMPLES = [ROOT / "proxy.yaml", *sorted((ROOT / "config").glob("*.yaml"))]  # gateway configs


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    result = meshgate("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(Path(p).relative_to(ROOT)))
def test_every_example_config_is_valid(validator, path):
    assert [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))] == []


BASE = """
providers: {up: {type: openai, base_url: "http://127.0.0.1:9/v1"}}
models: [{name: m, deployments: [{provider: up, model: m}]}]
"""

MISTAKES = {
    "a typo at the top": "serevr: {port: 8080}\n",
    "a typo in a section": "server: {prot: 8080}\n",
    "a wrong type": "server: {port: eighty}\n",
    "a value outside a choice": "state: {backend: mongo}\n",
    "an unknown provider type": "providers: {x: {type: grpc}}\n",
    "a provider's unknown key": "providers: {x: {type: openai, base_url: http://h, api_kye: k}}\n",
    "an unknown plugin setting": "pipeline: [{quotas: {limits: [{per: key, rpn: 5}]}}]\n",
    "a verify rule's unknown check": "pipeline: [{verify: {rules: [{checks: [speling]}]}}]\n",
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_what_the_loader_refuses_for_one_key_the_schema_refuses_too(validator, name):
    text = BASE + MISTAKES[name]
    with pytest.raises(ConfigError):
        parse_config(text, "t.yaml", env={})
    assert list(validator.iter_errors(yaml.safe_load(text)))


def test_numbers_may_come_from_the_environment(validator):
    text = BASE + 'server: {port: "${PORT:-8080}", workers: "${WORKERS}"}\n'
    assert list(validator.iter_errors(yaml.safe_load(text))) == []
    assert parse_config(text, "t.yaml", env={"WORKERS": "2"}).server.port == 8080
