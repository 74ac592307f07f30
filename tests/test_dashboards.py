"""config/grafana/meshgate.json and config/prometheus/alerts.yaml: every query
parses as PromQL and names only metrics a running gateway exports; the rules
file has the shape Prometheus loads."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import orjson
import promql_parser
import pytest
import yaml

from tests.conftest import ROOT, Server, start_gateway

DASHBOARD = ROOT / "config/grafana/meshgate.json"
ALERTS = ROOT / "config/prometheus/alerts.yaml"
METRIC = re.compile(r"\bmeshgate_[a-z_]+\b")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created")}  # fmt: skip


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream) -> Iterator[Server]:
    """Every plugin that exports metrics, so /metrics names them all (public here:
    read as a scraper on a network of its own would)."""
    config = f"""
server: {{host: 127.0.0.1, metrics_public: true}}
providers: {{up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}}}
models:
  - {{name: m, deployments: [{{provider: up, model: m, price: {{input_usd_per_mtok: 1, output_usd_per_mtok: 1}}}}]}}
pipeline:
  - auth: {{keys: [{{name: k, key: sk-dashboards-0123456789, team: t}}]}}
  - verify: {{}}
  - quotas: {{limits: [{{per: team, rpm: 1000, budget_usd_day: 10}}]}}
  - cache: {{}}
  - routing: {{strategy: least-busy}}
  - fallback: {{}}
"""
    server = start_gateway(tmp_path_factory.mktemp("dashboards"), config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def exported(gateway) -> set[str]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": "Bearer sk-dashboards-0123456789"}
    assert httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers).is_success
    names = set()
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + suffix for suffix in SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_queries() -> list[str]:
    panels = orjson.loads(DASHBOARD.read_bytes())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def alert_rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def promql(expr: str) -> str:
    """Grafana's variables as values Prometheus would see."""
    return expr.replace("$__rate_interval", "5m").replace('=~"$job"', '=~".+"')


@pytest.mark.parametrize("expr", dashboard_queries() + [r["expr"] for r in alert_rules()])
def test_every_query_parses_and_names_only_exported_metrics(expr, exported):
    promql_parser.parse(promql(expr))
    named = set(METRIC.findall(expr))
    assert named and named <= exported, named - exported


def test_the_dashboard_covers_what_operators_watch():
    titles = " ".join(p["title"] for p in orjson.loads(DASHBOARD.read_bytes())["panels"]).lower()
    for topic in ("traffic", "errors", "latency", "first token", "overhead", "tokens", "cost",
                  "cache hit", "breakers", "quota", "verification"):  # fmt: skip
        assert topic in titles, topic


def test_the_alert_rules_have_the_shape_prometheus_loads():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert re.fullmatch(r"\d+[smhd]", rule["for"])  # Prometheus durations; 0m: at once
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    covered = " ".join(r["expr"] for r in rules)
    for metric in ("meshgate_requests_total", "meshgate_overhead_seconds_bucket",
                   "meshgate_breaker_open", "meshgate_budget_used_ratio",
                   'result="timeout"', "meshgate_state_errors_total"):  # fmt: skip
        assert metric in covered


def test_a_query_with_a_metric_the_gateway_lacks_is_caught(exported):
    """The check above can fail: a misspelt metric is not among the exported names."""
    assert "meshgate_request_total" not in exported
    assert "meshgate_requests_total" in exported
