"""Refresh CronJobs (pure builder) and the operator timer's `due()`: no cluster, no database."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import kubernetes_validate
import pytest

from marketplacedb_operator import naming
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.cli import build_parser
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.specs.cronjobs import build_cronjobs, starting_deadline
from marketplacedb_operator.sql.refresh import due

RESOURCE = {"metadata": {"name": "shop", "namespace": "prod", "uid": "0b5e8a8e-4f6a-4a53-9d0e-6f1f8d7b9c01"}}
SETTINGS = Settings(operator_image="registry.example/marketplacedb-operator:1.2.3")
SECRET_VALUES = ("s3cr3t-password",)


def make_spec(**refresh: Any) -> MarketplaceDBSpec:
    def view(name: str, policy: dict[str, Any] | None) -> dict[str, Any]:
        item: dict[str, Any] = {"name": name, "query": "SELECT id FROM categories", "uniqueKey": ["id"]}
        if policy is not None:
            item["refresh"] = policy
        return item

    return MarketplaceDBSpec.model_validate({
        "database": {"host": "postgres.prod.svc", "port": 5433, "dbname": "marketplace", "sslMode": "require",
                     "credentialsSecretRef": {"name": "shop-db-owner", "usernameKey": "user"}},
        "materializedViews": [
            view("mv_hot_products", {"schedule": "*/5 * * * *", "maxStaleness": "1h", "timeout": "5m", **refresh}),
            view("mv_category_counts", {"schedule": "@hourly", "skipIfUnchanged": False, "timeout": "90s"}),
            view("mv_operator_timer", {"schedule": "*/1 * * * *", "mode": "Operator"}),
            view("mv_on_demand", None),
        ],
    })


# https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security Standards' restricted profile, plus a read-only root filesystem."""
    problems = []
    pod_ctx = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(flag)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {kinds}")
    for container in pod.get("initContainers", []) + pod["containers"]:
        ctx, name = container.get("securityContext", {}), container["name"]
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if ctx.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities not dropped")
        if set(ctx.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities added")
        if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if 0 in (ctx.get("runAsUser"), pod_ctx.get("runAsUser")):
            problems.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: writable root filesystem")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


def test_one_cronjob_per_cronjob_mode_view_and_all_valid() -> None:
    jobs = build_cronjobs(RESOURCE, make_spec(), SETTINGS)
    assert [j["metadata"]["name"] for j in jobs] == [
        naming.refresh_cronjob_name("shop", "mv_hot_products"),
        naming.refresh_cronjob_name("shop", "mv_category_counts"),
    ]
    for job in jobs:
        kubernetes_validate.validate(copy.deepcopy(job), "1.30.0", strict=True)
        assert restricted_violations(job["spec"]["jobTemplate"]["spec"]["template"]["spec"]) == []


def test_cronjob_policy_fields() -> None:
    hot, counts = build_cronjobs(RESOURCE, make_spec(), SETTINGS)
    spec = hot["spec"]
    assert spec["schedule"] == "*/5 * * * *" and spec["concurrencyPolicy"] == "Forbid"
    assert spec["suspend"] is False
    assert spec["startingDeadlineSeconds"] == 150  # half of the 5-minute interval
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (1, 3)
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] == 300 + 60 and job["backoffLimit"] == 1
    assert counts["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 90 + 60
    assert counts["spec"]["startingDeadlineSeconds"] == 300  # capped
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    assert container["image"] == SETTINGS.operator_image
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert hot["metadata"]["labels"] == naming.labels("shop", "refresh")
    assert job["template"]["metadata"]["labels"] == naming.labels("shop", "refresh")
    assert hot["metadata"]["ownerReferences"][0]["uid"] == RESOURCE["metadata"]["uid"]
    suspended = build_cronjobs(RESOURCE, make_spec(suspend=True), SETTINGS)[0]
    assert suspended["spec"]["suspend"] is True


def test_args_carry_names_and_policy_and_parse_as_the_cli() -> None:
    hot, counts = build_cronjobs(RESOURCE, make_spec(), SETTINGS)
    container = hot["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["marketplacedb"]
    args = container["args"]
    assert args == ["refresh", "--view", "mv_hot_products", "--schema", "public", "--max-staleness", "1h",
                    "--timeout", "5m", "--skip-if-unchanged", "--history-limit", "20", "-o", "json"]
    parsed = build_parser().parse_args(args)
    assert (parsed.view, parsed.schema, parsed.max_staleness, parsed.timeout) == (["mv_hot_products"], "public",
                                                                                   3600, 300)
    assert parsed.skip_if_unchanged is True and parsed.dsn is None and parsed.filename is None
    counts_args = counts["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert build_parser().parse_args(counts_args).skip_if_unchanged is False


def test_credentials_come_from_the_secret_never_args() -> None:
    job = build_cronjobs(RESOURCE, make_spec(), SETTINGS)[0]
    container = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["PGHOST"]["value"] == "postgres.prod.svc" and env["PGPORT"]["value"] == "5433"
    assert env["PGDATABASE"]["value"] == "marketplace" and env["PGSSLMODE"]["value"] == "require"
    assert env["PGUSER"]["valueFrom"] == {"secretKeyRef": {"name": "shop-db-owner", "key": "user"}}
    assert env["PGPASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "shop-db-owner", "key": "password"}}
    assert "value" not in env["PGPASSWORD"]
    joined = " ".join(container["args"]).lower()
    assert "password" not in joined and "host=" not in joined and "postgres://" not in joined


def test_the_builder_is_deterministic() -> None:
    assert build_cronjobs(RESOURCE, make_spec(), SETTINGS) == build_cronjobs(RESOURCE, make_spec(), SETTINGS)


@pytest.mark.parametrize(("schedule", "seconds"), [("*/1 * * * *", 30), ("*/5 * * * *", 150), ("@daily", 300),
                                                   ("* * * * *", 30)])
def test_starting_deadline(schedule: str, seconds: int) -> None:
    assert starting_deadline(schedule) == seconds


def test_long_names_stay_within_the_cronjob_limit() -> None:
    spec = make_spec()
    spec.materialized_views[0].name = "mv_" + "x" * 60
    job = build_cronjobs({"metadata": {**RESOURCE["metadata"], "name": "a-very-long-resource-name-indeed"}},
                         spec, SETTINGS)[0]
    assert len(job["metadata"]["name"]) <= 52
    kubernetes_validate.validate(copy.deepcopy(job), "1.30.0", strict=True)


# --- the operator's own timer -----------------------------------------------------------------

T0 = datetime.datetime(2025, 3, 1, 12, 0, 30, tzinfo=datetime.UTC)


def test_due_follows_the_schedule() -> None:
    assert due("*/5 * * * *", None, T0)  # never attempted
    assert not due("*/5 * * * *", T0, T0 + datetime.timedelta(minutes=4))  # next fire 12:05
    assert due("*/5 * * * *", T0, T0 + datetime.timedelta(minutes=4, seconds=30))
    assert not due("@hourly", T0, T0 + datetime.timedelta(minutes=59))
    assert due("@hourly", T0, T0 + datetime.timedelta(minutes=60))
    # Many missed fires still mean one due refresh, not a backlog.
    assert due("* * * * *", T0, T0 + datetime.timedelta(days=1))


def test_due_reads_schedules_in_utc_whatever_the_session_time_zone() -> None:
    berlin = datetime.timezone(datetime.timedelta(hours=1))
    last = datetime.datetime(2025, 3, 1, 0, 30, tzinfo=berlin)  # 23:30 UTC the day before
    # "@daily" fires at 00:00 UTC: 30 minutes after `last`, not 23.5 hours.
    assert not due("@daily", last, last + datetime.timedelta(minutes=29))
    assert due("@daily", last, last + datetime.timedelta(minutes=30))
