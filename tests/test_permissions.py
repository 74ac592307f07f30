"""Permission is decided on the model that serves, in one place, over real sockets:
complexity rules and fallbacks never reach a model the caller may not use, and an
alias is the model it names."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server, start_gateway

KEYS = {"b-only": ["gpt-b*", "shared-*"], "a-only": ["gpt-a*"], "b-strict": ["gpt-b"]}


def config(upstream_port: int) -> str:
    keys = "\n".join(
        f"        - {{name: {name}, key: sk-{name}-0123456789, models: {models}}}"
        for name, models in KEYS.items()
    )
    up = f"http://127.0.0.1:{upstream_port}/v1"
    return f"""
server: {{host: 127.0.0.1}}
providers:
  up: {{type: openai, base_url: "{up}"}}
models:
  - {{name: gpt-a, aliases: [fast], deployments: [{{provider: up, model: upstream-a}}]}}
  - {{name: gpt-b, deployments: [{{provider: up, model: upstream-b}}]}}
  - {{name: shared-auto, deployments: [{{provider: up, model: upstream-shared}}]}}
  - {{name: shared-a-only, deployments: [{{provider: up, model: upstream-a}}]}}
pipeline:
  - auth:
      keys:
{keys}
  - routing:
      models:
        shared-auto:
          strategy: complexity
          rules: [{{model: gpt-a, contains_code: true}}, {{model: gpt-b}}]
        shared-a-only:
          strategy: complexity
          rules: [{{model: gpt-a}}]
  - fallback:
      attempts: 1
      models: {{gpt-b: {{fallbacks: [gpt-a]}}}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream) -> Iterator[Server]:
    server = start_gateway(tmp_path_factory.mktemp("permissions"), config(upstream.port))
    yield server
    server.stop()


def ask(gateway: Server, key: str, model: str, content: str = "hello", **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10,
                      headers={"authorization": f"Bearer sk-{key}-0123456789"})  # fmt: skip


def test_a_complexity_rule_never_serves_a_model_the_caller_may_not_use(gateway):
    answer = ask(gateway, "b-only", "shared-auto", "```python\ndef f(): pass\n```")
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "upstream-b"  # the code rule's gpt-a was skipped
    assert answer.headers["x-meshgate-deployment"] == "up/upstream-b"


def test_when_no_rule_is_allowed_the_call_is_refused(gateway):
    refused = ask(gateway, "b-only", "shared-a-only")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"


def test_a_fallback_never_serves_a_model_the_caller_may_not_use(gateway):
    fake = {"fail_times": 5, "fail_key": "perm-fallback", "error_status": 500}
    failed = ask(gateway, "b-strict", "gpt-b", fake=fake)
    assert failed.status_code == 500  # gpt-b failed; its fallback gpt-a is not this key's
    allowed = ask(gateway, "b-only", "gpt-b", fake={**fake, "fail_key": "perm-fallback-2"})
    assert allowed.status_code == 500  # b-only may not use gpt-a either


def test_an_alias_is_the_model_it_names(gateway):
    assert ask(gateway, "a-only", "fast").status_code == 200
    assert ask(gateway, "a-only", "gpt-a").status_code == 200
    assert ask(gateway, "b-only", "fast").status_code == 403


def test_models_list_shows_what_the_caller_may_use(gateway):
    listed = httpx.get(gateway.url + "/v1/models",
                       headers={"authorization": "Bearer sk-a-only-0123456789"}).json()  # fmt: skip
    assert [m["id"] for m in listed["data"]] == ["gpt-a"]
