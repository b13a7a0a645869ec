"""The deployment kit checked by the tools made for it: promtool for the Prometheus config, the
alert rules (and their unit tests) and every PromQL expression of the dashboard;
kubernetes-validate for the Kubernetes manifests; and the names every query uses against the
metrics the gateway exports."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import generate_latest

from gateway.metrics import Metrics
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from tests.deploy.conftest import (
    DEPLOY,
    TEMPLATE,
    load_entrypoint,
    needs_admin_listener,
    promtool,
    require_tool,
)

PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "kvgate.json"
KUBERNETES = DEPLOY / "kubernetes"
SECRET_PATH = "/run/secrets/kvgate-admin-token"

# Names the kit uses that the gateway does not export (yet): none.
PENDING_METRICS: set[str] = set()
# Series Prometheus makes itself; PromQL function names and keywords are not metric names.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "le",
}  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus receives it from Grafana (all values selected)."""
    expr = expr.replace("$__rate_interval", "1m")
    return re.sub(r"\$\w+", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Identifiers in selector position: not quoted, not a label inside braces, not a function."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", n)}


def exported_metric_names() -> set[str]:
    metrics = Metrics()
    metrics.watch_admission(dict)
    page = generate_latest(metrics.registry).decode()
    families = re.findall(r"^# TYPE (\S+) (\S+)$", page, flags=re.MULTILINE)
    names: set[str] = set()
    for name, kind in families:
        names.add(name)
        if kind == "counter":
            names.add(f"{name}_total")
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    tool = promtool()
    config = (PROMETHEUS / "prometheus.yml").read_text()
    # the compose secret's path exists only in the container
    assert config.count(SECRET_PATH) == 1
    token = tmp_path / "token"
    token.write_text("t\n")
    (tmp_path / "prometheus.yml").write_text(config.replace(SECRET_PATH, str(token)))
    (tmp_path / "alerts.yaml").write_bytes((PROMETHEUS / "alerts.yaml").read_bytes())
    result = run(tool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    tool = promtool()
    checked = run(tool, "check", "rules", str(PROMETHEUS / "alerts.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(tool, "test", "rules", str(PROMETHEUS / "alerts.test.yaml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_or_is_named_untested() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yaml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]}
    rules = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert tested <= alerts
    assert len(tested) >= 6


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, with the dashboard's variables filled in, as a recording rule: promtool parses
    it as Prometheus would."""
    tool = promtool()
    exprs = dashboard_exprs()
    rules = [{"record": f"kvgate:dashboard:{i}", "expr": as_promql(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(tool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_dashboard_structure() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "kvgate"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used - variables)


def test_queries_name_only_metrics_the_gateway_exports() -> None:
    exported = exported_metric_names() | PROMETHEUS_SERIES
    exprs = [as_promql(e) for e in dashboard_exprs()] + alert_exprs()
    used = set().union(*(metric_names(e) for e in exprs))
    assert {"kvgate_requests_total", "kvgate_backend_phase", "up"} <= used
    missing = used - exported
    assert missing == PENDING_METRICS, (
        f"not exported: {sorted(missing - PENDING_METRICS)}; "
        f"exported now, remove from PENDING_METRICS: {sorted(PENDING_METRICS - missing)}"
    )


def test_metric_names_reads_selectors_only() -> None:
    expr = 'sum by (model, le) (rate(a_total{outcome=~"shed_.*"}[5m])) / on (x) b_bytes > 0.05'
    assert metric_names(expr) == {"a_total", "b_bytes"}


# --- Kubernetes -----------------------------------------------------------------------------

MANIFESTS = ["configmap.yaml", "deployment.yaml", "service.yaml", "pdb.yaml"]


def kubernetes_validate() -> str:
    return require_tool("kubernetes-validate", "pip install kubernetes-validate")


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_the_kubernetes_schema(name: str) -> None:
    result = run(kubernetes_validate(), "--strict", str(KUBERNETES / name))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def test_kubernetes_validation_refuses_a_misspelt_field(tmp_path: Path) -> None:
    deployment = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = run(kubernetes_validate(), "--strict", str(path))
    assert result.returncode != 0
    assert "readinesProbe" in result.stdout + result.stderr


# The fields this kit sets, as the Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com
# v1) defines them; anything else is refused, so a typo cannot pass.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["key"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "key": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def load_manifest(name: str) -> Any:
    return yaml.safe_load((KUBERNETES / name).read_text())


def test_service_monitor_scrapes_the_admin_port_of_the_service() -> None:
    monitor = load_manifest("servicemonitor.yaml")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    service = load_manifest("service.yaml")
    selected = monitor["spec"]["selector"]["matchLabels"].items()
    assert selected <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "admin"
    assert endpoint["authorization"]["credentials"] == {"name": "kvgate", "key": "admin-token"}


def test_service_monitor_schema_refuses_a_misspelt_field() -> None:
    monitor = copy.deepcopy(load_manifest("servicemonitor.yaml"))
    monitor["spec"]["endpoints"][0]["bearerToken"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_deployment_service_and_pdb_select_the_same_pods() -> None:
    deployment = load_manifest("deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels
    assert load_manifest("service.yaml")["spec"]["selector"].items() <= pod_labels
    assert load_manifest("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= pod_labels
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz?scope=gateway"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # the policy is a directory mount: a subPath mount never sees the ConfigMap change
    mount = next(m for m in container["volumeMounts"] if m["name"] == "policy")
    assert "subPath" not in mount
    policy_path = next(e["value"] for e in container["env"] if e["name"] == "KVGATE_POLICY")
    assert Path(policy_path).parent == Path(mount["mountPath"])
    assert Path(policy_path).name in load_manifest("configmap.yaml")["data"]


def test_grace_period_fits_in_the_pods_termination_grace() -> None:
    deployment = load_manifest("deployment.yaml")
    policy = yaml.safe_load(load_manifest("configmap.yaml")["data"]["policy.yaml"])
    grace_s = int(policy["server"]["grace_period"].removesuffix("s"))
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace_s
    replicas = deployment["spec"]["replicas"]
    assert policy["store"]["replicas"] == replicas


@needs_admin_listener
def test_configmap_policy_is_valid() -> None:
    text = load_manifest("configmap.yaml")["data"]["policy.yaml"]
    env = {"KVGATE_API_KEY": "k", "KVGATE_ADMIN_TOKEN": "t"}
    policy = compile_policy(load_text(text, "configmap"), "configmap", env)
    assert set(policy.tenants) == {"default"}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_manifest("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted([*MANIFESTS, "servicemonitor.yaml"])


# --- compose --------------------------------------------------------------------------------


def test_compose_replicas_give_the_policy_every_variable_it_requires() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "gpu-sim", "kvgate-1", "kvgate-2", "prometheus", "grafana"} <= set(services)
    required = {
        name for name, default in load_entrypoint().PLACEHOLDER.findall(TEMPLATE.read_text())
    }
    required = {n for n in required if f"${{{n}:-" not in TEMPLATE.read_text()}
    required |= set(re.findall(r"env:(\w+)", TEMPLATE.read_text()))
    for name in ("kvgate-1", "kvgate-2"):
        env = services[name]["environment"]
        assert required <= set(env), (name, required - set(env))
        assert env["KVGATE_REPLICAS"] == "2"
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])
    # the replicas' backend and Redis are the compose services of those names
    backend = services["kvgate-1"]["environment"]["KVGATE_BACKEND_URL"]
    assert backend == "http://gpu-sim:8000"
    assert services["gpu-sim"]["entrypoint"][-4:] == ["--host", "0.0.0.0", "--port", "8000"]
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    kvgate_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "kvgate")
    assert kvgate_job["static_configs"][0]["targets"] == ["kvgate-1:9464", "kvgate-2:9464"]
