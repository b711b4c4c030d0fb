"""The operator's RBAC grants exactly what the code declares it calls: every need, nothing more.

Declarations: `RBAC_NEEDS` in gateways/kube.py (the gateway's calls) and `RBAC_NEEDS*` in
handlers.py (kopf's own). The chart's rule lists (templates/_rbac_rules.tpl) are generated from
them; here the chart is rendered in every scope and the granted (apiGroup, resource, verb)
triples are compared with the declared ones, both ways.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable
from typing import Any

import pytest

from chart_render import Rendered, render_chart
from marketplacedb_operator import handlers, install, naming
from marketplacedb_operator.cli import main
from marketplacedb_operator.gateways import kube

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "marketplacedb-operator"
Triple = tuple[str, str, str]

SCOPES: dict[str, dict[str, Any]] = {
    "all-namespaces": {},
    "all-namespaces-peering": {"replicas": 2, "peering": {"enabled": True}},
    "one-namespace": {"watchNamespaces": ["shop"]},
    "two-namespaces-peering": {"watchNamespaces": ["shop", "search"], "replicas": 2, "peering": {"enabled": True}},
}


def _triples(needs: Iterable[tuple[str, str, tuple[str, ...]]]) -> set[Triple]:
    return {(group, resource, verb) for group, resource, verbs in needs for verb in verbs}


def _granted(rules: list[dict[str, Any]]) -> set[Triple]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _expected(values: dict[str, Any]) -> tuple[set[Triple], set[Triple]]:
    """(per watched namespace, cluster-wide) triples the declarations call for in this scope."""
    peering = values.get("peering", {}).get("enabled", False)
    code = _triples([*kube.RBAC_NEEDS, *handlers.RBAC_NEEDS])
    crd_watch = _triples(handlers.RBAC_NEEDS_CLUSTER)
    peerings = {t for t in _triples(handlers.RBAC_NEEDS_PEERING) if peering}
    if values.get("watchNamespaces"):
        return code | {t for t in peerings if t[1] == "kopfpeerings"}, crd_watch
    return set(), code | crd_watch | {t for t in peerings if t[1] == "clusterkopfpeerings"}


def _bound_rules(rendered: Rendered, sa_namespace: str) -> tuple[dict[str, set[Triple]], set[Triple]]:
    """What the operator's ServiceAccount can do: per namespace (Roles) and cluster-wide."""
    (account,) = rendered.find("ServiceAccount")
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": sa_namespace}
    per_namespace: dict[str, set[Triple]] = {}
    cluster: set[Triple] = set()
    for binding in rendered.find("RoleBinding") + rendered.find("ClusterRoleBinding"):
        assert binding["subjects"] == [subject]
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace")
        (role,) = [
            r
            for r in rendered.find(ref["kind"], ref["name"])
            if ref["kind"] == "ClusterRole" or r["metadata"]["namespace"] == namespace
        ]
        if binding["kind"] == "ClusterRoleBinding":
            cluster |= _granted(role["rules"])
        else:
            per_namespace.setdefault(namespace, set()).update(_granted(role["rules"]))
    return per_namespace, cluster


def test_chart_rules_file_is_generated_from_the_declarations() -> None:
    assert (CHART / "templates" / "_rbac_rules.tpl").read_text() == install.chart_rbac_rules(), (
        "regenerate: marketplacedb install-manifests --chart-rbac-rules"
        " > charts/marketplacedb-operator/templates/_rbac_rules.tpl"
    )


def test_cli_prints_the_rules_file(capsys: Any) -> None:
    assert main(["install-manifests", "--chart-rbac-rules"]) == 0
    assert capsys.readouterr().out == install.chart_rbac_rules()


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_chart_grants_exactly_the_declared_needs(scope: str) -> None:
    values = SCOPES[scope]
    rendered = render_chart(CHART, values, namespace="ops")
    per_namespace, cluster = _bound_rules(rendered, "ops")
    namespaced, cluster_wide = _expected(values)
    # Both ways: every declared need is granted (covered), and nothing undeclared is (least privilege).
    assert cluster == cluster_wide
    assert set(per_namespace) == set(values.get("watchNamespaces", []))
    for namespace, granted in per_namespace.items():
        assert granted == namespaced, namespace
    if values.get("watchNamespaces"):
        assert not rendered.find("ClusterRole", "marketplacedb-operator"), "no cluster-wide role for named namespaces"
        assert {t[1] for t in cluster} == {"customresourcedefinitions"}


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_no_wildcards_and_secrets_are_narrow(scope: str) -> None:
    rendered = render_chart(CHART, SCOPES[scope])
    for role in rendered.find("Role") + rendered.find("ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], role["metadata"]["name"]
            assert "nonResourceURLs" not in rule
            if "secrets" in rule["resources"]:
                # get: the credentials Secret; patch/create/delete: the pooler's auth Secret (server-side
                # apply; deleted when the pooler is disabled). Never list or watch: no enumeration.
                assert set(rule["verbs"]) <= {"get", "patch", "create", "delete"}
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_install_yaml_rbac_matches_the_chart_in_every_scope() -> None:
    for values in SCOPES.values():
        rendered = render_chart(CHART, values)
        peering = values.get("peering", {}).get("enabled", False)
        built = install.rbac_objects(values.get("watchNamespaces", []), peering)
        for obj in built:
            namespace = obj["metadata"].get("namespace")
            candidates = rendered.find(obj["kind"], obj["metadata"]["name"])
            (match,) = [r for r in candidates if r["metadata"].get("namespace") == namespace]
            if "rules" in obj:
                assert _granted(match["rules"]) == _granted(obj["rules"])
            else:
                assert match["roleRef"] == obj["roleRef"]
        assert len(built) == len(rendered.find("Role") + rendered.find("RoleBinding")) + len(
            rendered.find("ClusterRole") + rendered.find("ClusterRoleBinding")
        )


def test_every_kind_the_gateway_serves_is_declared() -> None:
    """A kind added to the gateway's table without its RBAC need would fail with 403 in a cluster."""
    declared = {(group, resource) for group, resource, _ in kube.RBAC_NEEDS}
    for (api_version, _kind), plural in kube.RESOURCES.items():
        group = api_version.rpartition("/")[0]
        assert (group, plural) in declared, plural
    verbs = {resource: set(v) for _, resource, v in kube.RBAC_NEEDS}
    # apply() is a server-side-apply PATCH, which creates missing objects: patch and create.
    assert all({"patch", "create"} <= verbs[r] for r in ("configmaps", "secrets", "services", "deployments"))
    assert verbs[f"{naming.PLURAL}/status"] == {"patch"}  # patch_status()


def test_kopf_needs_are_declared() -> None:
    kopf = _triples(handlers.RBAC_NEEDS)
    assert {(naming.GROUP, naming.PLURAL, v) for v in ("list", "watch", "patch")} <= kopf
    assert ("", "events", "create") in kopf
    assert _triples(handlers.RBAC_NEEDS_CLUSTER) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }


def test_rules_refuse_wildcards() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        install.rules([("", "*", ("get",))])
    with pytest.raises(ValueError, match="wildcard"):
        install.rules([("", "secrets", ("*",))])
