"""The example plugin of docs/plugins.md, loaded by import path into a real gateway."""

from __future__ import annotations

import openai

from tests.conftest import one_model, start_gateway


def test_user_plugin_by_import_path_rewrites_request(tmp_path, upstream):
    gateway = start_gateway(
        tmp_path,
        one_model(
            upstream.port,
            """\
  - params: {rules: [{models: ["m"], overrides: {seed: 42}}]}
  - "examples.plugins.redact:RedactEmails": {replacement: "[hidden]"}
""",
        ),
    )
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="m",
            messages=[{"role": "user", "content": "mail ann@example.com and bob@corp.io"}],
            extra_body={"fake": {"echo": 1}},
        )
        sent = raw.parse().model_extra["echo"]["body"]
        assert sent["messages"][0]["content"] == "mail [hidden] and [hidden]"
        assert sent["seed"] == 42  # the built-in params plugin ran first
        assert raw.headers["x-redacted-emails"] == "2"
        client.close()
    finally:
        gateway.stop()
