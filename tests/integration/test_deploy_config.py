"""The deployment files SREs rely on are valid and agree with the code.

Prometheus config and alert rules are checked by promtool itself (installed from Debian when
missing), alert rules are unit-tested with `promtool test rules`, every metric an alert or the
dashboard uses is one the services export, and the Kubernetes manifests and docker-compose.yml
have what running omnicrm needs (probes, secrets, disruption budgets, scaling, the whole stack).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from shared.config import SERVICE_PORTS
from shared.metrics import ServiceMetrics
from tests.conftest import ROOT
from tests.support.prometheus import ensure_docker_compose, ensure_prometheus

PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = GRAFANA / "dashboards" / "omnicrm.json"
SERVICES = tuple(SERVICE_PORTS)

# What an SRE must be told about (the brief of issue 9); more alerts may exist.
REQUIRED_ALERTS = {
    "OmnicrmServiceDown", "OmnicrmServiceNotReady", "OmnicrmConsumerLagGrowing",
    "OmnicrmDeadLetterRate", "OmnicrmOutboxStuck", "OmnicrmProviderErrorRate",
    "OmnicrmBatchLatencyHigh", "OmnicrmNotificationLatencyHigh",
}
NAME_REGEX = re.compile(r'__name__\s*=~\s*"([^"]+)"')
LITERAL_NAME = re.compile(r"\bomnicrm_[a-z0-9_]+\b")


@pytest.fixture(scope="module")
def promtool() -> str:
    return ensure_prometheus()[1]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"] if "alert" in r]


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


# -- exported metric names -------------------------------------------------------------------
METRIC_CALL = re.compile(
    r"""\.(counter|gauge|histogram)\(\s*["']([a-z][a-z0-9_]*)["']\s*,\s*"""  # kind, name
    r"""(?:(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')\s*)+"""  # the doc string, maybe split
    r"""(?:,\s*(?:labels\s*=\s*)?[(\[]([^)\]]*)[)\]])?""", re.S)  # the label names
QUOTED = re.compile(r"[\"']([a-zA-Z_][a-zA-Z0-9_]*)[\"']")
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
# Labels every scraped series has, or that PromQL/Prometheus itself adds.
ALWAYS = {"job", "instance", "le", "__name__", "alertname", "alertstate"}


def _sample_names(name: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{name.removesuffix('_total')}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    if kind == "summary":
        return {name, f"{name}_count", f"{name}_sum"}
    return {name}


def exported_metrics() -> dict[str, set[str]]:
    """Every sample name the services can export, with its label names: shared families
    (shared/metrics.py) plus what each service registers through ServiceMetrics helpers."""
    found: dict[str, set[str]] = {}
    for service in SERVICES:
        for metric in vars(ServiceMetrics(service)).values():
            if isinstance(metric, MetricWrapperBase):
                for sample in _sample_names(metric._name, metric._type):
                    found[sample] = set(metric._labelnames)
    for path in sorted((ROOT / "services").glob("*/**/*.py")):
        service = path.relative_to(ROOT / "services").parts[0]
        for kind, name, labels in METRIC_CALL.findall(path.read_text(encoding="utf-8")):
            for sample in _sample_names(f"omnicrm_{service}_{name}", kind):
                found[sample] = set(QUOTED.findall(labels))
    return found


def exported_metric_names() -> set[str]:
    return set(exported_metrics())


def metric_references(expr: str) -> tuple[set[str], set[str]]:
    """(regexes over __name__, literal omnicrm_* names) used by a PromQL expression."""
    regexes = set(NAME_REGEX.findall(expr))
    literals = set(LITERAL_NAME.findall(NAME_REGEX.sub("", expr)))
    return regexes, literals


def label_references(expr: str) -> set[str]:
    """Label names an expression groups, matches or joins on."""
    used = {label.strip() for group in LABEL_LISTS.findall(expr) for label in group.split(",")}
    used |= set(MATCHER.findall(expr))
    return {label for label in used if label}


# -- Prometheus --------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.docker.yml"])
def test_promtool_accepts_the_scrape_configs(promtool: str, config: str) -> None:
    result = run([promtool, "check", "config", str(PROM / config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(PROM / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass(promtool: str) -> None:
    result = run([promtool, "test", "rules", str(PROM / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_shown_firing_and_silent_in_the_unit_tests() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(PROM / "alerts_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"


def test_alerts_cover_what_an_sre_needs_and_say_what_to_do() -> None:
    rules = alert_rules()
    assert REQUIRED_ALERTS <= {r["alert"] for r in rules}
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        notes = rule["annotations"]
        for key in ("summary", "description", "runbook"):
            assert len(notes.get(key, "").strip()) > 20, f"{rule['alert']} lacks a useful {key}"
        assert rule.get("for"), f"{rule['alert']} would fire on a single evaluation"


def test_scrape_configs_have_one_job_per_service_on_its_port() -> None:
    for config, host in (("prometheus.yml", None), ("prometheus.docker.yml", "service")):
        parsed = load_yaml(PROM / config)
        assert parsed["rule_files"] == ["alerts.yml"], config
        jobs = {job["job_name"]: job for job in parsed["scrape_configs"]}
        assert set(jobs) == set(SERVICES), config
        for service, port in SERVICE_PORTS.items():
            targets = [t for sc in jobs[service]["static_configs"] for t in sc["targets"]]
            expected = f"{'127.0.0.1' if host is None else service}:{port}"
            assert targets == [expected], (config, service, targets)
    k8s = load_yaml(PROM / "prometheus.k8s.yml")
    assert k8s["rule_files"] == ["alerts.yml"]
    relabels = k8s["scrape_configs"][0]["relabel_configs"]
    assert any(r.get("target_label") == "job"
               and r["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
               for r in relabels), "k8s jobs must be named after the service like the others"


def used_expressions() -> list[tuple[str, str, str]]:
    """(where, expr, legend) of every alert and dashboard query."""
    exprs = [(r["alert"], r["expr"], "") for r in alert_rules()]
    exprs += [(f"dashboard {p['title']!r}", t["expr"], t.get("legendFormat", ""))
              for p in dashboard_panels() for t in p.get("targets", [])]
    return exprs


def test_every_metric_in_alerts_and_dashboard_is_exported() -> None:
    exported = exported_metrics()
    missing: list[str] = []
    for where, expr, legend in used_expressions():
        regexes, literals = metric_references(expr)
        labels: set[str] = set(ALWAYS)
        for literal in literals:
            if literal not in exported:
                missing.append(f"{where}: {literal} is not exported")
            labels |= exported.get(literal, set())
        for regex in regexes:
            matched = {n for n in exported if re.fullmatch(regex, n)}
            if not matched:
                missing.append(f"{where}: nothing exported matches {regex}")
            elif regex.startswith("omnicrm_[a-z]+_"):
                # A cross-service selector of a shared family must see every service.
                services = {n.split("_")[1] for n in matched}
                if services != set(SERVICES):
                    missing.append(f"{where}: {regex} sees only {sorted(services)}")
            for name in matched:
                labels |= exported[name]
        unknown = (label_references(expr) | set(LEGEND.findall(legend))) - labels
        if (literals or regexes) and unknown:
            missing.append(f"{where}: labels {sorted(unknown)} are not on its metrics")
        assert regexes or literals or "up{" in expr or "ALERTS" in expr, f"{where}: no metric"
    assert missing == [], "metrics used but not exported:\n" + "\n".join(sorted(set(missing)))


def test_metric_reference_parsing() -> None:
    regexes, literals = metric_references(
        'sum(rate({__name__=~"omnicrm_[a-z]+_dlq_total", job!="x"}[5m])) / omnicrm_notifications_provider_seconds_count')
    assert regexes == {"omnicrm_[a-z]+_dlq_total"}
    assert literals == {"omnicrm_notifications_provider_seconds_count"}
    assert "omnicrm_loyalty_events_consumed_total" in exported_metric_names()
    assert "omnicrm_loyalty_batch_seconds_bucket" in exported_metric_names()
    assert exported_metrics()["omnicrm_identity_consumer_lag"] == {"topic", "partition"}
    assert label_references('sum by (job, topic) (x{status=~"5..", route!="/ready"})') == {
        "job", "topic", "status", "route"}
    ((_, name, labels),) = METRIC_CALL.findall(
        'm.counter("decisions", "Decisions "\n "by channel.", ("channel", "status"))')
    assert name == "decisions" and QUOTED.findall(labels) == ["channel", "status"]


# -- Grafana -----------------------------------------------------------------------------------
def test_dashboard_is_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["uid"] and board["title"]
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("consumed", "produced", "lag", "dead letters", "outbox", "batch latency",
                  "triggers fired", "notification decisions", "provider errors", "end-to-end"):
        assert topic in titles, f"dashboard has no {topic} panel"


def test_grafana_provisioning_matches_compose() -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    (source,) = datasources
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variable = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == source["uid"]
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "omnicrm.yml")["providers"]
    grafana = load_yaml(ROOT / "docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]


# -- docker compose ----------------------------------------------------------------------------
def test_compose_runs_the_whole_stack() -> None:
    services = load_yaml(ROOT / "docker-compose.yml")["services"]
    assert {"kafka", "postgres", "prometheus", "grafana", "topics", *SERVICES} <= set(services)
    for service, port in SERVICE_PORTS.items():
        spec = services[service]
        assert spec["environment"]["SERVICE"] == service
        assert f"{port}:{port}" in spec["ports"]
        assert spec["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "KRaft" in (ROOT / "docker-compose.yml").read_text() or \
        services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    prometheus = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.docker.yml" in prometheus["command"]


def test_compose_file_validates_with_docker_compose() -> None:
    compose = ensure_docker_compose()
    result = run([compose, "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"])
    assert result.returncode == 0, result.stdout + result.stderr


# -- Kubernetes --------------------------------------------------------------------------------
def k8s_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        if path.name != "kustomization.yaml":
            objects += docs
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_k8s_manifests_parse_and_kustomization_lists_them() -> None:
    objects = k8s_objects()
    assert all({"apiVersion", "kind", "metadata"} <= set(o) for o in objects)
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert all(o["metadata"].get("namespace", "omnicrm") == "omnicrm" for o in objects)
    example = list(yaml.safe_load_all((K8S / "secret.yaml.example").read_text()))
    assert example[0]["kind"] == "Secret"
    assert set(example[0]["stringData"]) == {"api-keys", "database-url", "shopify-webhook-secret"}


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_service_has_probes_secrets_resources_and_budget(service: str) -> None:
    objects = k8s_objects()
    port = SERVICE_PORTS[service]
    deployment = find(objects, "Deployment", service)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].split(":")[0] == "omnicrm"
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert secrets["OMNICRM_API_KEYS"]["name"] == "omnicrm-secrets"
    assert secrets["DATABASE_URL"]["name"] == "omnicrm-secrets"
    if service == "ingestion":
        assert secrets["OMNICRM_SHOPIFY_WEBHOOK_SECRET"]["name"] == "omnicrm-secrets"
    assert {"configMapRef": {"name": "omnicrm-env"}} in container["envFrom"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == service

    svc = find(objects, "Service", service)
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": service}
    assert svc["spec"]["ports"][0]["port"] == port
    budget = find(objects, "PodDisruptionBudget", service)
    assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": service}

    if service == "ingestion":
        hpa = find(objects, "HorizontalPodAutoscaler", service)
        assert hpa["spec"]["scaleTargetRef"]["name"] == service
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    else:
        scaled = find(objects, "ScaledObject", service)
        assert scaled["spec"]["scaleTargetRef"]["name"] == service
        kafka = next(t for t in scaled["spec"]["triggers"] if t["type"] == "kafka")
        assert kafka["metadata"]["consumerGroup"] == f"{service}.hot"
        assert any(t["type"] == "cpu" for t in scaled["spec"]["triggers"])
        env_config = find(objects, "ConfigMap", "omnicrm-env")["data"]
        assert scaled["spec"]["maxReplicaCount"] <= int(env_config["OMNICRM_PARTITIONS"])


def test_k8s_rules_configmap_is_the_rules_file() -> None:
    objects = k8s_objects()
    rules = find(objects, "ConfigMap", "omnicrm-rules")["data"]["rules.yaml"]
    assert yaml.safe_load(rules) == load_yaml(ROOT / "deploy" / "config" / "rules.yaml"), \
        "run `python deploy/k8s/sync_rules.py` after changing deploy/config/rules.yaml"
    env = find(objects, "ConfigMap", "omnicrm-env")["data"]
    assert env["OMNICRM_RULES"] == "/etc/omnicrm/rules.yaml"
    for service in SERVICES:
        pod = find(objects, "Deployment", service)["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["rules"] == "/etc/omnicrm"
        assert volumes["rules"]["configMap"]["name"] == "omnicrm-rules"


# The oldest Kubernetes the manifests promise to work on (autoscaling/v2, policy/v1 are GA there).
K8S_VERSION = "1.29"
# KEDA's ScaledObject, as far as these manifests use it (kubernetes-validate has no CRD schemas).
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"],
                                   "properties": {"name": {"type": "string"}}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object"},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object"},
                            # KEDA reads every metadata value as a string
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    checked = 0
    for obj in k8s_objects() + list(yaml.safe_load_all((K8S / "secret.yaml.example").read_text())):
        if obj["kind"] == "ScaledObject":
            jsonschema.validate(obj, SCALED_OBJECT)
            spec = obj["spec"]
            assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 5 * 3 + 4
