"""charts/meshgate, rendered with helm's own engine (helm-python-sdk) for each
values file under ci/, linted strictly, every manifest validated offline against
Kubernetes 1.30's schemas (kubernetes-validate; the ServiceMonitor, PrometheusRule
and ScaledObject against the models cloudcoil generates from their CRDs), and what
matters asserted."""

from __future__ import annotations

import json
from typing import Any

import helm_python
import kubernetes_validate
import promql_parser
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

from proxy.config import parse_config
from tests.conftest import ROOT

CHART = ROOT / "charts/meshgate"
KUBE = "1.30.0"
VALUES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
CRDS = {"ServiceMonitor": ServiceMonitor, "PrometheusRule": PrometheusRule,
        "ScaledObject": ScaledObject}  # fmt: skip
ENV = {"OPENAI_API_KEY": "sk-x", "MESHGATE_ADMIN_KEY": "a" * 20, "TEAM_A_KEY": "sk-team-a-0123",
       "MESHGATE_METRICS_KEY": "m" * 20}  # fmt: skip


def values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


def render(overrides: dict[str, Any]) -> list[dict[str, Any]]:
    out = helm_python.Chart.load(str(CHART)).render(overrides, name="mg", namespace="llm")
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def kind(docs: list[dict], name: str) -> list[dict]:
    return [d for d in docs if d["kind"] == name]


@pytest.fixture(scope="module", params=VALUES)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(values(request.param))


def test_the_chart_lints_strictly(rendered):
    name, _ = rendered
    result = helm_python.lint(str(CHART), values(name), strict=True, kube_version=f"v{KUBE}")
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []  # 1: info only


def test_lint_reports_what_is_wrong():
    result = helm_python.lint(str(CHART), {"replicaCounts": 3}, strict=True,
                              kube_version=f"v{KUBE}")  # fmt: skip
    assert any("replicaCounts" in error for error in result["errors"])


def test_every_manifest_is_valid_for_kubernetes(rendered):
    _, docs = rendered
    for doc in docs:
        if doc["kind"] in CRDS:
            # the CRD's types checked, and nothing the CRD does not know: the model
            # keeps every field it knows, so a field it dropped is unknown
            model = CRDS[doc["kind"]].model_validate(doc)
            assert model.model_dump(by_alias=True, exclude_none=True, mode="json") == doc
        else:
            kubernetes_validate.validate(doc, KUBE, strict=True)


def test_the_gateway_pod_is_locked_down_probed_and_drains(rendered):
    _, docs = rendered
    (deployment,) = [
        d for d in kind(docs, "Deployment") if not d["metadata"]["name"].endswith("-redis")
    ]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert (
        pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    )
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    config = yaml.safe_load(_configmap(docs)["data"]["proxy.yaml"])
    graceful = config.get("server", {}).get("graceful_timeout_s", 30)
    assert pod["terminationGracePeriodSeconds"] > graceful + 5  # preStop sleep, then drain
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/meshgate"]["readOnly"] is True and "/tmp" in mounts
    assert container["args"] == ["serve", "--config", "/etc/meshgate/proxy.yaml"]


def test_secrets_are_referenced_never_inlined(rendered):
    name, docs = rendered
    assert kind(docs, "Secret") == []
    (deployment,) = [
        d for d in kind(docs, "Deployment") if not d["metadata"]["name"].endswith("-redis")
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": values(name)["existingSecret"]}}]
    text = _configmap(docs)["data"]["proxy.yaml"]
    assert "${OPENAI_API_KEY}" in text and "sk-" not in text


def test_the_mounted_config_is_one_the_gateway_serves(rendered):
    _, docs = rendered
    config = parse_config(_configmap(docs)["data"]["proxy.yaml"], "proxy.yaml", env=ENV)
    assert config.models and config.server.port == 8080


def test_a_config_change_rolls_the_pods():
    def checksum(docs):
        (d,) = kind(docs, "Deployment")
        return d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = values("minimal-values.yaml")
    changed = {**base, "config": {**yaml.safe_load((CHART / "values.yaml").read_text())["config"],
                                  "pipeline": [{"params": None}]}}  # fmt: skip
    assert checksum(render(base)) == checksum(render(base))
    assert checksum(render(base)) != checksum(render(changed))


def test_production_autoscales_on_in_flight_requests_and_ships_monitoring():
    docs = render(values("production-values.yaml"))
    (hpa,) = kind(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "meshgate_in_flight_requests"
    (monitor,) = kind(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"] == {
        "type": "Bearer", "credentials": {"name": "meshgate-keys", "key": "MESHGATE_METRICS_KEY"}
    }  # fmt: skip
    (rule,) = kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "config/prometheus/alerts.yaml").read_text())
    dashboard = [c for c in kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = json.loads((ROOT / "config/grafana/meshgate.json").read_text())
    assert json.loads(dashboard[0]["data"]["meshgate.json"]) == expected
    assert kind(docs, "PodDisruptionBudget")
    (policy,) = kind(docs, "NetworkPolicy")
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["from"] == [  # the API's pods, the ingress controller, Prometheus
        {"podSelector": {"matchLabels": {"app": "api"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
    ]  # fmt: skip
    anyone = {**values("production-values.yaml"), "networkPolicy": {"enabled": True}}
    (policy,) = kind(render(anyone), "NetworkPolicy")
    assert "from" not in policy["spec"]["ingress"][0]
    state = yaml.safe_load(_configmap(docs)["data"]["proxy.yaml"])["state"]
    assert state == {"backend": "redis", "url": "redis://redis.data.svc:6379/0"}
    (deployment,) = kind(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it


def test_prometheus_scrapes_with_the_metrics_key_or_the_install_fails():
    """/metrics is keyed (proxy/admin.py): a ServiceMonitor without the key would
    only ever scrape 401s, so the chart refuses one, unless the metrics are public."""
    base = values("minimal-values.yaml")
    server = {"host": "0.0.0.0", "port": 8080}
    config = {**yaml.safe_load((CHART / "values.yaml").read_text())["config"], "server": server}
    monitored = {**base, "serviceMonitor": {"enabled": True}, "config": config}
    with pytest.raises(Exception, match=r"config\.server\.metrics_key"):
        render(monitored)
    keyed = {**monitored, "config": {**config, "server": {**server, "metrics_key": "${K}"}},
             "existingSecret": ""}  # fmt: skip
    with pytest.raises(Exception, match=r"serviceMonitor\.keySecret\.name"):
        render(keyed)
    named = {**keyed, "serviceMonitor": {"enabled": True, "keySecret": {"name": "scrape"}}}
    (monitor,) = kind(render(named), "ServiceMonitor")
    credentials = monitor["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert credentials == {"name": "scrape", "key": "MESHGATE_METRICS_KEY"}
    public = {**monitored, "config": {**config, "server": {**server, "metrics_public": True}}}
    (monitor,) = kind(render(public), "ServiceMonitor")
    assert "authorization" not in monitor["spec"]["endpoints"][0]


def test_predictive_scaling_asks_keda_for_the_trend_ahead_of_the_peak():
    docs = render(values("predictive-values.yaml"))
    assert kind(docs, "HorizontalPodAutoscaler") == []
    (scaled,) = kind(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    promql_parser.parse(query)
    assert "predict_linear(" in query and "meshgate_in_flight_requests" in query and "900s" in query
    assert trigger["metadata"]["threshold"] == "250"


def test_the_bundled_redis_is_wired_in_and_kept_apart_from_the_gateway():
    docs = render(values("predictive-values.yaml"))
    redis = [d for d in kind(docs, "Deployment") if d["metadata"]["name"] == "mg-meshgate-redis"]
    assert redis
    state = yaml.safe_load(_configmap(docs)["data"]["proxy.yaml"])["state"]
    assert state["url"] == "redis://mg-meshgate-redis:6379/0"
    (service,) = [s for s in kind(docs, "Service") if s["metadata"]["name"] == "mg-meshgate"]
    redis_labels = redis[0]["spec"]["template"]["metadata"]["labels"]
    assert not all(redis_labels.get(k) == v for k, v in service["spec"]["selector"].items())


@pytest.mark.parametrize("typo", [{"replicaCounts": 3}, {"autoscaling": {"enabeld": True}},
                                  {"service": {"port": "eighty"}}, {"redis": {"url": "mongodb://x"}}])  # fmt: skip
def test_a_typo_in_values_fails_at_install(typo):
    with pytest.raises(helm_python.HelmError):
        render({**values("minimal-values.yaml"), **typo})


def _configmap(docs: list[dict]) -> dict:
    (config,) = [c for c in kind(docs, "ConfigMap") if "proxy.yaml" in c.get("data", {})]
    return config


def test_the_crd_check_catches_a_field_the_crd_does_not_know():
    docs = render(values("predictive-values.yaml"))
    (scaled,) = kind(docs, "ScaledObject")
    scaled["spec"]["minReplicas"] = 2  # the HPA's name, not KEDA's minReplicaCount
    model = ScaledObject.model_validate(scaled)
    assert model.model_dump(by_alias=True, exclude_none=True, mode="json") != scaled
