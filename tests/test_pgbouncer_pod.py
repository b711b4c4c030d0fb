"""Pure pooler builders for production: pod and Service customisation, client TLS, app roles in the
auth file, the image allow-list, the run-as uid and sizing with several users. Every manifest is
validated with kubernetes-validate against the Kubernetes 1.30 schemas."""

from __future__ import annotations

import base64
import copy
import pathlib
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from marketplacedb_operator import naming
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.specs import pgbouncer as pgb
from marketplacedb_operator.specs.pooler_manifests import PRESTOP_DRAIN, build_pooler, image_repository, pooler_image
from marketplacedb_operator.specs.pooler_sizing import compute_budget
from test_pgbouncer_specs import RESOURCE, VERIFIER, make_spec

SETTINGS = Settings()
CUSTOM = {
    "replicas": 3,
    "pod": {
        "labels": {"team": "checkout"},
        "annotations": {"example.com/owner": "checkout"},
        "nodeSelector": {"pool": "pooler"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "pooler", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "topologySpreadConstraints": [{"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "DoNotSchedule",
                                       "labelSelector": {"matchLabels": {"team": "checkout"}}}],
        "priorityClassName": "business-critical",
        "imagePullSecrets": [{"name": "registry"}],
    },
    "service": {"type": "LoadBalancer",
                "annotations": {"networking.gke.io/load-balancer-type": "Internal"}},
    "tls": {"secretRef": {"name": "shop-pooler-tls"}},
    "users": [{"credentialsSecretRef": {"name": "shop-app"}}, {"credentialsSecretRef": {"name": "shop-reports"}}],
    "metrics": {"enabled": True},
    "paused": True,
}


def built(spec: MarketplaceDBSpec, settings: Settings = SETTINGS,
          credentials: Any = None) -> dict[str, dict[str, Any]]:
    budget = compute_budget(spec.pooler, settings, 100, 3)
    return {o["kind"]: o for o in build_pooler(RESOURCE, spec, settings, budget, credentials)}


def validate(objects: dict[str, dict[str, Any]]) -> None:
    for obj in objects.values():
        kubernetes_validate.validate(copy.deepcopy(obj), "1.30.0", strict=True)


def test_pod_and_service_customisation_is_rendered_and_valid() -> None:
    objects = built(make_spec(**CUSTOM))
    validate(objects)
    template = objects["Deployment"]["spec"]["template"]
    pod = template["spec"]
    assert template["metadata"]["labels"]["team"] == "checkout"
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "pooler"
    assert template["metadata"]["annotations"]["example.com/owner"] == "checkout"
    assert naming.ANN_RESTART_HASH in template["metadata"]["annotations"]
    assert pod["nodeSelector"] == {"pool": "pooler"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["priorityClassName"] == "business-critical"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    # The default spread is kept: the user's zone constraint replaces the default zone one only.
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["topology.kubernetes.io/zone"]["maxSkew"] == 2
    assert set(pod["affinity"]) == {"nodeAffinity", "podAntiAffinity"}  # the default anti-affinity too
    service = objects["Service"]
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == {"networking.gke.io/load-balancer-type": "Internal"}
    # The operator's security settings are not customisable.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False


def test_defaults_keep_the_spread_and_a_cluster_ip_service() -> None:
    objects = built(make_spec(replicas=2))
    validate(objects)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert [c["topologyKey"] for c in pod["topologySpreadConstraints"]] == [
        "kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    assert "nodeSelector" not in pod and "tolerations" not in pod and "priorityClassName" not in pod
    assert objects["Service"]["spec"]["type"] == "ClusterIP" and "annotations" not in objects["Service"]["metadata"]


@pytest.mark.parametrize("pod, field", [
    ({"labels": {"app.kubernetes.io/instance": "other"}}, "labels"),
    ({"priorityClassName": "Not A Name"}, "priorityClassName"),
    ({"tolerations": [{}] * 33}, "tolerations"),
])
def test_bad_pod_customisation_is_refused_naming_the_field(pod: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        make_spec(pod=pod)
    assert field in str(info.value)


def test_client_tls_mounts_the_secret_and_the_agent_watches_it() -> None:
    objects = built(make_spec(tls={"secretRef": {"name": "shop-pooler-tls"}}))
    validate(objects)
    section = pgb.parse_ini(objects["ConfigMap"]["data"][pgb.INI_KEY])["pgbouncer"]
    assert section["client_tls_sslmode"] == "require"
    assert section["client_tls_cert_file"] == pgb.TLS_CERT_PATH
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "shop-pooler-tls"
    bouncer, agent = pod["containers"]
    assert {"name": "tls", "mountPath": pgb.TLS_DIR, "readOnly": True} in bouncer["volumeMounts"]
    assert agent["args"][agent["args"].index("--watch") + 1] == pgb.TLS_CERT_PATH
    # A certificate rotation is a Secret change: no new pod template.
    assert objects["Deployment"] == built(make_spec(tls={"secretRef": {"name": "shop-pooler-tls"}}))["Deployment"]
    assert "client_tls_sslmode" not in pgb.parse_ini(built(make_spec())["ConfigMap"]["data"][pgb.INI_KEY])["pgbouncer"]


def test_paused_reaches_the_agent_through_the_config_map_without_a_restart() -> None:
    running, paused = built(make_spec()), built(make_spec(paused=True))
    assert running["ConfigMap"]["data"][pgb.PAUSED_KEY] == "false"
    assert paused["ConfigMap"]["data"][pgb.PAUSED_KEY] == "true"
    assert running["Deployment"] == paused["Deployment"]
    agent = paused["Deployment"]["spec"]["template"]["spec"]["containers"][1]
    assert agent["args"][agent["args"].index("--paused-file") + 1] == pgb.PAUSED_PATH


def test_auth_file_lists_the_app_roles_and_not_the_owner() -> None:
    app = pgb.PoolerCredentials("shop_app", VERIFIER, "spec.pooler.users[0].credentialsSecretRef")
    reports = pgb.PoolerCredentials("shop_reports", "pw", "spec.pooler.users[1].credentialsSecretRef")
    objects = built(make_spec(**CUSTOM), credentials=[app, reports])
    userlist = base64.b64decode(objects["Secret"]["data"][pgb.AUTH_KEY]).decode()
    assert userlist == f'"shop_app" "{VERIFIER}"\n"shop_reports" "pw"\n'
    assert "shop_app" not in str(objects["ConfigMap"]) and VERIFIER not in str(objects["Deployment"])
    with pytest.raises(pgb.PoolerConfigError, match=r"spec.pooler.users\[1\].credentialsSecretRef"):
        pgb.render_userlist(app, pgb.PoolerCredentials("shop_app", "x", "spec.pooler.users[1].credentialsSecretRef"))


def test_max_db_connections_caps_the_sum_of_several_users() -> None:
    spec = make_spec(users=[{"credentialsSecretRef": {"name": f"u{i}"}} for i in range(4)], replicas=2)
    budget = compute_budget(spec.pooler, SETTINGS, 100, 3)
    assert not budget.oversubscribed and budget.budgeted_pods * budget.max_db_connections <= budget.available
    # Only "no limit" makes the number of users count, and then it is said.
    unbounded = make_spec(users=[{"credentialsSecretRef": {"name": f"u{i}"}} for i in range(4)],
                          defaultPoolSize=10, parameters={"max_db_connections": "0"})
    budget = compute_budget(unbounded.pooler, SETTINGS, 100, 3)
    assert budget.oversubscribed and "120" in budget.message  # 3 pods x 4 users x 10


def test_image_outside_the_allowed_repositories_is_refused() -> None:
    assert image_repository("ghcr.io/cloudnative-pg/pgbouncer:1.25.1-trixie@sha256:" + "0" * 64) == \
        "ghcr.io/cloudnative-pg/pgbouncer"
    assert pooler_image(make_spec(image="ghcr.io/cloudnative-pg/pgbouncer:1.24.1"), SETTINGS).endswith(":1.24.1")
    for image in ("docker.io/evil/pgbouncer:1.25.2", "ghcr.io/cloudnative-pg/pgbouncer-evil:1", "busybox"):
        with pytest.raises(pgb.PoolerConfigError, match="spec.pooler.image"):
            built(make_spec(image=image))
    mirror = Settings(pooler_allowed_images=("registry.internal/mirror/",))
    assert built(make_spec(image="registry.internal/mirror/pgbouncer:1.25.2"), mirror)
    with pytest.raises(pgb.PoolerConfigError):  # the list replaces the default
        built(make_spec(), mirror)


def test_default_image_is_pinned_and_its_version_drives_the_rendered_parameters() -> None:
    assert SETTINGS.pgbouncer_image == "ghcr.io/cloudnative-pg/pgbouncer:1.25.2"
    assert pgb.image_version(SETTINGS.pgbouncer_image) == (1, 25, 2)
    assert pgb.image_version("ghcr.io/cloudnative-pg/pgbouncer:1.25.1-trixie@sha256:" + "0" * 64) == (1, 25, 1)
    assert pgb.image_version("registry:5000/pgbouncer") is None
    spec = make_spec(image="ghcr.io/cloudnative-pg/pgbouncer:1.20.1",
                     parameters={"max_prepared_statements": "100", "track_extra_parameters": "search_path"})
    section = pgb.parse_ini(built(spec)["ConfigMap"]["data"][pgb.INI_KEY])["pgbouncer"]
    assert section["track_extra_parameters"] == "search_path" and "max_prepared_statements" not in section


def test_run_as_uid_is_a_setting() -> None:
    pod = built(make_spec(), Settings(pooler_run_as_uid=70))["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 70
    assert Settings.from_env({"MARKETPLACEDB_POOLER_RUN_AS_UID": "70"}).pooler_run_as_uid == 70
    assert Settings.from_env({"MARKETPLACEDB_POOLER_ALLOWED_IMAGES": "a/b, c/"}).pooler_allowed_images == ("a/b", "c/")


def test_prestop_reaches_only_loopback() -> None:
    assert "127.0.0.1" in PRESTOP_DRAIN and "POST /drain" in PRESTOP_DRAIN
    pod = built(make_spec())["Deployment"]["spec"]["template"]["spec"]
    agent = pod["containers"][1]
    assert [p["containerPort"] for p in agent["ports"]] == [SETTINGS.health_port]  # no admin port exposed


def test_the_app_role_example_is_valid() -> None:
    example = pathlib.Path(__file__).parents[1] / "examples" / "pooler-app-role.yaml"
    docs = list(yaml.safe_load_all(example.read_text()))
    resource = next(d for d in docs if d["kind"] == "MarketplaceDB")
    spec = MarketplaceDBSpec.model_validate(resource["spec"])
    assert spec.pooler.users and spec.pooler.tls is not None
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert {u.credentials_secret_ref.name for u in spec.pooler.users} <= set(secrets)
    for secret in secrets.values():
        kubernetes_validate.validate(copy.deepcopy(secret), "1.30.0", strict=True)
    validate(built(spec))


def test_readme_gives_the_exact_lookup_sql_the_operator_composes() -> None:
    from marketplacedb_operator.specs.pooler_auth import lookup_function_ddl
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```sql\n", 1)[1].split("```", 1)[0]
    statements = lookup_function_ddl("pgbouncer.user_lookup", "pgbouncer_auth")
    expected = "\n".join(s.as_string(None) + ";" for s in statements)
    assert "\n".join(line.strip() for line in block.strip().splitlines()) == \
        "\n".join(line.strip() for line in expected.splitlines())


def test_agent_refuses_an_admin_listener_off_loopback(tmp_path: pathlib.Path) -> None:
    from marketplacedb_operator.pooler_agent import AgentOptions, PoolerAgent, serve
    options = AgentOptions(socket_dir=str(tmp_path), port=5432, config=str(tmp_path / "ini"),
                           auth_file=str(tmp_path / "auth"), database="db", listen_port=0, admin_port=0,
                           admin_host="0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        serve(PoolerAgent(options))
    with pytest.raises(ValidationError, match="sslMode"):
        make_spec(tls={"secretRef": {"name": "t"}, "sslMode": "verify-full"})
