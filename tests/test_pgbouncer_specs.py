"""Pure pooler builders: pgbouncer.ini, auth file, SCRAM, sizing, change classification, manifests."""

from __future__ import annotations

import base64
import copy
from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from marketplacedb_operator import naming
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.specs import pgbouncer as pgb
from marketplacedb_operator.specs.pooler_manifests import build_pooler, pooler_config
from marketplacedb_operator.specs.pooler_sizing import compute_budget, rollout_strategy

SETTINGS = Settings()
RESOURCE: dict[str, Any] = {"apiVersion": naming.API_VERSION, "kind": naming.KIND,
            "metadata": {"name": "shop", "namespace": "prod", "uid": "3f0c3c1e-7a53-4b8e-9a44-0d7c9a1f2b11"}}
VERIFIER = pgb.scram_verifier("correct horse", b"0123456789abcdef")


def make_spec(**pooler: Any) -> MarketplaceDBSpec:
    return MarketplaceDBSpec.model_validate({
        "database": {"host": "postgres.prod.svc", "dbname": "marketplace",
                     "credentialsSecretRef": {"name": "shop-db-owner"}},
        "pooler": {"enabled": True, **pooler},
    })


def config(spec: MarketplaceDBSpec, max_connections: int = 100, secret: str = VERIFIER) -> pgb.PoolerConfig:
    budget = compute_budget(spec.pooler, SETTINGS, max_connections, 3)
    return pooler_config(spec, SETTINGS, budget, pgb.PoolerCredentials("owner", secret))


# --- pgbouncer.ini ----------------------------------------------------------------------------


def test_ini_is_sorted_deterministic_and_transaction_mode() -> None:
    spec = make_spec(parameters={"server_idle_timeout": "600", "log_connections": "true"})
    first, second = config(spec).ini, config(make_spec(parameters={"log_connections": "1",
                                                                   "server_idle_timeout": 600})).ini
    assert first == second
    section = pgb.parse_ini(first)["pgbouncer"]
    keys = [line.split(" = ")[0] for line in first.split("[pgbouncer]\n")[1].splitlines()]
    assert keys == sorted(keys)
    assert section["pool_mode"] == "transaction"
    assert section["log_connections"] == "1"
    assert section["auth_type"] == "scram-sha-256"
    assert section["ignore_startup_parameters"] == "extra_float_digits,options"
    # The admin console: no admin/stats users, socket only for the pod's own uid.
    assert "admin_users" not in section and "stats_users" not in section
    assert section["unix_socket_mode"] == "0700"
    assert pgb.parse_ini(first)["databases"] == {"marketplace": "host=postgres.prod.svc port=5432 dbname=marketplace"}


def test_session_mode_only_through_the_field() -> None:
    assert pgb.parse_ini(config(make_spec(poolMode="session")).ini)["pgbouncer"]["pool_mode"] == "session"


@pytest.mark.parametrize("ssl_mode, ca", [("disable", None), ("require", None), ("verify-full", pgb.CA_BUNDLE)])
def test_upstream_tls_follows_the_resource(ssl_mode: str, ca: str | None) -> None:
    spec = make_spec()
    spec.database.ssl_mode = ssl_mode  # type: ignore[assignment]
    section = pgb.parse_ini(config(spec).ini)["pgbouncer"]
    assert section["server_tls_sslmode"] == ssl_mode
    assert section.get("server_tls_ca_file") == ca


@pytest.mark.parametrize("parameters, field", [
    ({"admin_users": "evil"}, "admin_users"),
    ({"no_such_setting": "1"}, "no_such_setting"),
    ({"server_idle_timeout": "600\nadmin_users = evil"}, "server_idle_timeout"),
    ({"log_connections": "1\r\nauth_type = trust"}, "log_connections"),
    ({"pool_mode": "session"}, "pool_mode"),
    ({"default_pool_size": "500"}, "default_pool_size"),
    ({"server_lifetime": "3600 # \"quoted\""}, "server_lifetime"),
])
def test_hostile_parameters_are_rejected_naming_the_field(parameters: dict[str, str], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make_spec(parameters=parameters)
    errors = caught.value.errors()
    assert errors[0]["loc"][-1] == "parameters"
    assert field in errors[0]["msg"]


@pytest.mark.parametrize("parameters, field", [
    ({"pool_mode": "session"}, "spec.pooler.parameters.pool_mode"),
    ({"listen_addr": "0.0.0.0"}, "spec.pooler.parameters.listen_addr"),
    ({"server_idle_timeout": "1\nauth_type = trust"}, "spec.pooler.parameters.server_idle_timeout"),
])
def test_builder_rejects_hostile_parameters_even_unvalidated(parameters: dict[str, str], field: str) -> None:
    # model_construct skips validation: the builder checks again before anything is rendered.
    spec = make_spec()
    spec.pooler = spec.pooler.model_construct(**{**spec.pooler.__dict__, "parameters": parameters})
    with pytest.raises(pgb.PoolerConfigError, match=field.replace(".", r"\.")):
        config(spec)


def test_unsafe_host_is_rejected_by_the_builder() -> None:
    spec = make_spec()
    spec.database = spec.database.model_construct(**{**spec.database.__dict__, "host": "db\nadmin_users=x"})
    with pytest.raises(pgb.PoolerConfigError, match=r"spec\.database\.host"):
        config(spec)


# --- auth file and SCRAM ----------------------------------------------------------------------


def test_userlist_quotes_and_refuses_line_breaks() -> None:
    assert pgb.render_userlist(pgb.PoolerCredentials('we"ird', 'pa"ss')) == '"we""ird" "pa""ss"\n'
    assert pgb.render_userlist(pgb.PoolerCredentials("owner", VERIFIER)) == f'"owner" "{VERIFIER}"\n'
    with pytest.raises(pgb.PoolerConfigError, match="password: contains a line break"):
        pgb.render_userlist(pgb.PoolerCredentials("owner", "pw\n\"pgbouncer\" \"\""))
    with pytest.raises(pgb.PoolerConfigError, match="reserved"):
        pgb.render_userlist(pgb.PoolerCredentials("pgbouncer", "x"))


def test_scram_verifier_roundtrip_and_choice() -> None:
    salt = pgb.derived_salt("s3cret", "prod", "shop", "owner")
    assert salt == pgb.derived_salt("s3cret", "prod", "shop", "owner")  # no churn
    assert salt != pgb.derived_salt("s3cret", "prod", "other", "owner")
    verifier = pgb.scram_verifier("s3cret", salt)
    assert pgb.is_scram_verifier(verifier)
    assert pgb.verifier_matches(verifier, "s3cret")
    assert not pgb.verifier_matches(verifier, "wrong")
    assert pgb.choose_credentials("owner", "s3cret", verifier).secret == verifier
    # A stale verifier (password rotated in the Secret) or none at all: the password is used.
    assert pgb.choose_credentials("owner", "rotated", verifier).kind == "password"
    assert pgb.choose_credentials("owner", "s3cret", None).kind == "password"
    assert "s3cret" not in repr(pgb.PoolerCredentials("owner", "s3cret"))


# --- sizing -----------------------------------------------------------------------------------


def test_auto_budget_fits_replicas_plus_one_under_max_connections() -> None:
    budget = compute_budget(make_spec(replicas=2).pooler, SETTINGS, 100, 3)
    assert (budget.headroom, budget.available, budget.budgeted_pods) == (10, 87, 3)
    assert budget.max_db_connections == 29
    assert budget.pool_size + budget.reserve_pool_size == 29
    assert budget.budgeted_pods * budget.max_db_connections <= budget.available
    assert not budget.oversubscribed


@pytest.mark.parametrize("max_connections", [20, 100, 500, 5000])
@pytest.mark.parametrize("replicas", [1, 2, 3, 10])
def test_auto_budget_never_oversubscribes_when_it_can_fit(max_connections: int, replicas: int) -> None:
    budget = compute_budget(make_spec(replicas=replicas).pooler, SETTINGS, max_connections, 3)
    if budget.available >= replicas + 1:
        assert not budget.oversubscribed
        assert (replicas + 1) * budget.max_db_connections <= budget.available
    else:
        assert budget.oversubscribed and "oversubscribed" in budget.message


def test_explicit_pool_size_that_does_not_fit_is_flagged() -> None:
    budget = compute_budget(make_spec(replicas=4, defaultPoolSize=50).pooler, SETTINGS, 100, 3)
    assert budget.oversubscribed
    assert budget.max_db_connections == 50
    assert "5 pods x 50" in budget.message


def test_rollout_strategy_matches_the_budget() -> None:
    assert rollout_strategy(1)["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert rollout_strategy(3)["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


# --- change classification and hashes ---------------------------------------------------------


def test_reload_safe_change() -> None:
    old = config(make_spec(parameters={"server_idle_timeout": "600"}))
    new = config(make_spec(parameters={"server_idle_timeout": "300"}))
    assert pgb.changed_keys(old.ini, new.ini) == {"pgbouncer.server_idle_timeout": "reload"}
    assert pgb.classify_change(old, new) == "reload"
    assert pgb.config_hash(old) != pgb.config_hash(new)
    assert pgb.restart_hash(old) == pgb.restart_hash(new)


def test_restart_required_change() -> None:
    old = config(make_spec())
    new = config(make_spec(parameters={"pkt_buf": "8192"}))
    assert pgb.classify_change(old, new) == "restart"
    assert pgb.restart_hash(old) != pgb.restart_hash(new)
    image = config(make_spec(image="ghcr.io/cloudnative-pg/pgbouncer:1.24.1"))
    assert pgb.classify_change(old, image) == "restart"


def test_no_change_and_credentials_only_change() -> None:
    old = config(make_spec())
    assert pgb.classify_change(old, config(make_spec())) == "none"
    rotated = config(make_spec(), secret="new password")
    assert pgb.classify_change(old, rotated) == "reload"
    # Nothing derived from a secret goes into the hashes (they end up in status and annotations).
    assert pgb.config_hash(old) == pgb.config_hash(rotated)


def test_budget_change_is_a_reload() -> None:
    old, new = config(make_spec(), 100), config(make_spec(), 200)
    assert set(pgb.changed_keys(old.ini, new.ini)) >= {"pgbouncer.default_pool_size", "pgbouncer.max_db_connections"}
    assert pgb.classify_change(old, new) == "reload"


# --- manifests --------------------------------------------------------------------------------


def objects(spec: MarketplaceDBSpec, credentials: pgb.PoolerCredentials | None = None) -> dict[str, dict[str, Any]]:
    budget = compute_budget(spec.pooler, SETTINGS, 100, 3)
    return {o["kind"]: o for o in build_pooler(RESOURCE, spec, SETTINGS, budget, credentials)}


def test_every_manifest_is_valid_kubernetes() -> None:
    built = objects(make_spec(replicas=3, metrics={"enabled": True, "serviceMonitor": True}),
                    pgb.PoolerCredentials("owner", VERIFIER))
    assert set(built) == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"}
    for kind, obj in built.items():
        if kind == "ServiceMonitor":  # a Prometheus Operator CRD: no schema in kubernetes-validate
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(copy.deepcopy(obj), "1.30.0", strict=True)
            assert obj["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s"}]
            continue
        kubernetes_validate.validate(copy.deepcopy(obj), "1.30.0", strict=True)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == RESOURCE["metadata"]["uid"]


def test_pdb_only_with_several_replicas_and_no_monitor_without_metrics() -> None:
    built = objects(make_spec(replicas=1))
    assert set(built) == {"ConfigMap", "Secret", "Deployment", "Service"}
    assert [c["name"] for c in built["Deployment"]["spec"]["template"]["spec"]["containers"]] == ["pgbouncer", "agent"]
    assert objects(make_spec(replicas=2))["PodDisruptionBudget"]["spec"] == {
        "maxUnavailable": 1, "selector": {"matchLabels": naming.selector_labels("shop", "pooler")}}
    disabled = make_spec()
    disabled.pooler.enabled = False
    assert build_pooler(RESOURCE, disabled, SETTINGS, compute_budget(disabled.pooler, SETTINGS, 100, 3), None) == []


def test_secret_holds_the_auth_file_and_the_config_map_does_not() -> None:
    built = objects(make_spec(), pgb.PoolerCredentials("owner", VERIFIER))
    assert base64.b64decode(built["Secret"]["data"][pgb.AUTH_KEY]).decode() == f'"owner" "{VERIFIER}"\n'
    assert VERIFIER not in str(built["ConfigMap"]) and VERIFIER not in str(built["Deployment"])
    placeholder = objects(make_spec())["Secret"]
    assert "filled in by the operator" in base64.b64decode(placeholder["data"][pgb.AUTH_KEY]).decode()


def test_deployment_mounts_reload_drains_and_is_restricted() -> None:
    dep = objects(make_spec(replicas=2))["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    bouncer, agent = pod["containers"]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert dep["spec"]["template"]["metadata"]["annotations"] == {
        naming.ANN_RESTART_HASH: pgb.restart_hash(config(make_spec(replicas=2)))}
    # Whole-volume mounts (never subPath), so kubelet updates the files in place for a RELOAD.
    for container in (bouncer, agent):
        assert all("subPath" not in m for m in container["volumeMounts"])
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert bouncer["command"] == ["pgbouncer", pgb.INI_PATH]
    assert bouncer["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert bouncer["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The drain is an exec over loopback (the agent's admin listener), not an httpGet on the pod IP.
    assert "httpGet" not in bouncer["lifecycle"]["preStop"]
    assert "/dev/tcp/127.0.0.1/" in bouncer["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert agent["args"][0] == "pooler-agent" and "--database" in agent["args"]
    assert pod["terminationGracePeriodSeconds"] >= 50
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert {v["name"] for v in pod["volumes"]} == {"config", "auth", "run"}


def test_a_reload_safe_change_does_not_touch_the_pod_template() -> None:
    before = objects(make_spec(parameters={"server_idle_timeout": "600"}))
    after = objects(make_spec(parameters={"server_idle_timeout": "60"}))
    assert before["Deployment"] == after["Deployment"]
    assert before["ConfigMap"]["data"] != after["ConfigMap"]["data"]
