"""Refresh truth whatever the scheduler: reconcile() on the KMock API, real PostgreSQL 15.

Issue 16 finding 6 (CronJob failures and never-recorded views reach status and metrics), issue 14
findings 4 and 5 (state keyed by schema and view, declared views only, mode Operator follows its
schedule, several roles on one database).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import json
from typing import Any

import kubernetes
import psycopg
import pytest
from psycopg import sql

from harness.kube import KubeObjects
from marketplacedb_operator import metrics, naming
from marketplacedb_operator.cli import main
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh, read_refresh_states
from marketplacedb_operator.reconcile import reconcile
from marketplacedb_operator.refresh import RefreshOptions, ViewTarget, refresh_view
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.specs.cronjobs import build_cronjobs
from marketplacedb_operator.sql.refresh import seconds_until_due

NS = "refresh"
API = "marketplacedb.io/v1alpha1"
T0 = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)


def resource(db: Any, name: str, views: list[dict[str, Any]], secret: str = "db") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "MarketplaceDB", "metadata": {"name": name, "namespace": NS},
            "spec": {"database": {"host": db.server.host, "port": db.server.port, "dbname": db.name,
                                  "sslMode": "disable", "credentialsSecretRef": {"name": secret}},
                     "materializedViews": views}}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now


async def setup(objects: KubeObjects, client: kubernetes.client.ApiClient, user: str, password: str,
                secret: str = "db") -> tuple[Any, Clock]:
    await objects.ensure_namespace(NS)
    # The operator reads only Secrets that opt in, for the MarketplaceDBs they name.
    labels = {naming.LABEL_CREDENTIALS: "true"}
    annotations = {naming.ANN_CREDENTIALS_FOR: "shop,never,keyed,noviews,fast,unwritable"}
    await objects.create({"apiVersion": "v1", "kind": "Secret",
                          "metadata": {"name": secret, "namespace": NS, "labels": labels,
                                       "annotations": annotations},
                          "stringData": {"username": user, "password": password}})
    clock = Clock()
    deps = make_deps(Settings(resync_seconds=300.0), client)
    deps.now = clock
    return deps, clock


async def run(objects: KubeObjects, deps: Any, name: str) -> tuple[dict[str, Any], Any]:
    body = objects.get(API, "MarketplaceDB", name, NS)
    assert body is not None
    outcome = await asyncio.to_thread(reconcile, body, deps)
    after = objects.get(API, "MarketplaceDB", name, NS)
    assert after is not None
    return after["status"], outcome


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def sample(name: str, resource_name: str, view: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, {"namespace": NS, "resource": resource_name, "view": view})


def cli(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


async def test_failed_cronjob_runs_turn_ready_false_with_the_view_named(
        kube_objects: KubeObjects, kube_client: Any, workload_db: Any, monkeypatch: Any) -> None:
    view = {"name": "mv_by_order", "query": "SELECT display_order AS id, name FROM categories", "uniqueKey": ["id"],
            "refresh": {"schedule": "*/5 * * * *"}}
    deps, _ = await setup(kube_objects, kube_client, workload_db.owner, workload_db.owner_password)
    await kube_objects.create(resource(workload_db, "shop", [view]))
    status, _ = await run(kube_objects, deps, "shop")
    assert condition(status, "Ready")["status"] == "True", status["conditions"]
    with psycopg.connect(workload_db.dsn, autocommit=True) as conn:
        conn.execute("UPDATE categories SET display_order = 1 WHERE id = 2")  # duplicate key in the new rows
    monkeypatch.setenv("PGPASSWORD", workload_db.owner_password)
    dsn = workload_db.server.dsn(workload_db.name, workload_db.owner, "")
    codes = [cli(["refresh", "--view", "mv_by_order", "--dsn", dsn, "--no-skip-if-unchanged", "-o", "json"])
             for _ in range(4)]
    assert codes == [1, 1, 1, 1]
    status, _ = await run(kube_objects, deps, "shop")
    ready, scheduled = condition(status, "Ready"), condition(status, "RefreshScheduled")
    assert ready["status"] == "False" and scheduled["status"] == "False", status["conditions"]
    assert scheduled["reason"] == "RefreshFailed"
    assert "public.mv_by_order: 4 failed run(s) in a row: 23505 unique_violation" in scheduled["message"]
    assert "mv_by_order" in ready["message"]
    view_status = status["materializedViews"][0]
    assert view_status["recentOutcomes"][:4] == ["failed"] * 4
    assert sample("marketplacedb_refresh_consecutive_failures", "shop", "mv_by_order") == 4


async def test_a_view_never_recorded_goes_stale_and_its_metric_says_so(
        kube_objects: KubeObjects, kube_client: Any, workload_db: Any) -> None:
    views = [{"name": "mv_never", "query": "SELECT id, name FROM categories", "uniqueKey": ["id"],
              "refresh": {"schedule": "0 3 * * *", "maxStaleness": "1h"}}]
    deps, clock = await setup(kube_objects, kube_client, workload_db.owner, workload_db.owner_password)
    await kube_objects.create(resource(workload_db, "never", views))
    status, _ = await run(kube_objects, deps, "never")
    assert condition(status, "Stale")["status"] == "False"
    assert status["materializedViews"][0]["firstSeenTime"].startswith("2026-03-01T12:00")
    assert sample("marketplacedb_refresh_never_refreshed", "never", "mv_never") == 1
    assert sample("marketplacedb_refresh_stale", "never", "mv_never") == 0
    clock.now = T0 + datetime.timedelta(hours=1, minutes=1)
    status, _ = await run(kube_objects, deps, "never")
    stale = condition(status, "Stale")
    assert stale["status"] == "True" and "mv_never" in stale["message"], status["conditions"]
    assert sample("marketplacedb_refresh_stale", "never", "mv_never") == 1
    assert sample("marketplacedb_refresh_staleness_seconds", "never", "mv_never") == 3660
    assert "lastRefreshTime" not in status["materializedViews"][0]


async def test_state_is_keyed_by_schema_and_only_declared_views_are_exported(
        kube_objects: KubeObjects, kube_client: Any, workload_db: Any) -> None:
    with psycopg.connect(workload_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA reporting")
        for schema in ("public", "reporting"):
            view = sql.Identifier(schema, "mv_i")
            conn.execute(sql.SQL("CREATE MATERIALIZED VIEW {} AS SELECT id FROM categories").format(view))
            conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} (id)").format(view))
        conn.execute("CREATE MATERIALIZED VIEW mv_other AS SELECT id FROM categories")
        conn.execute("CREATE UNIQUE INDEX ON mv_other (id)")
        db = PostgresRefresh(conn)
        # reporting.mv_i refreshed three days ago; public.mv_i (declared) now; another resource's view too.
        assert refresh_view(db, ViewTarget("reporting", "mv_i"), RefreshOptions(), T0 - datetime.timedelta(days=3)).ok
        assert refresh_view(db, ViewTarget("public", "mv_i"), RefreshOptions(), T0).ok
        assert refresh_view(db, ViewTarget("public", "mv_other"), RefreshOptions(), T0).ok
    views = [{"name": "mv_i", "query": "SELECT id FROM categories", "uniqueKey": ["id"],
              "refresh": {"schedule": "0 * * * *", "maxStaleness": "1h"}}]
    deps, clock = await setup(kube_objects, kube_client, workload_db.owner, workload_db.owner_password)
    await kube_objects.create(resource(workload_db, "keyed", views))
    clock.now = T0 + datetime.timedelta(minutes=5)
    status, _ = await run(kube_objects, deps, "keyed")
    assert condition(status, "Stale")["status"] == "False", status["conditions"]
    assert status["materializedViews"][0]["lastRefreshTime"].startswith("2026-03-01T12:00")
    assert sample("marketplacedb_refresh_staleness_seconds", "keyed", "mv_i") == 300
    assert sample("marketplacedb_refresh_rows", "keyed", "mv_other") is None  # not this resource's view
    body = kube_objects.get(API, "MarketplaceDB", "keyed", NS)
    assert body is not None
    await kube_objects.patch_spec(body, {"materializedViews": []})
    await run(kube_objects, deps, "keyed")
    assert sample("marketplacedb_refresh_staleness_seconds", "keyed", "mv_i") is None  # left the spec


async def test_a_second_role_without_views_never_fails_and_with_views_shares_the_schema(
        kube_objects: KubeObjects, kube_client: Any, workload_db: Any) -> None:
    server = workload_db.server
    other, password = f"{workload_db.owner}_b", "b-password-1"
    server.create_role(other, password)
    try:
        with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as admin:
            role = sql.Identifier(other)
            admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(workload_db.name), role))
            admin.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(role))
            admin.execute(sql.SQL("GRANT SELECT ON categories TO {}").format(role))
        with psycopg.connect(workload_db.dsn, autocommit=True) as conn:  # the owner creates the schema
            conn.execute("CREATE MATERIALIZED VIEW mv_owner AS SELECT id FROM categories")
            conn.execute("CREATE UNIQUE INDEX ON mv_owner (id)")
            assert refresh_view(PostgresRefresh(conn), ViewTarget("public", "mv_owner"), RefreshOptions(), T0).ok
        deps, _ = await setup(kube_objects, kube_client, other, password, secret="db-b")
        await kube_objects.create(resource(workload_db, "noviews", [], secret="db-b"))
        status, _ = await run(kube_objects, deps, "noviews")
        # The refresh part never touches the operator's schema without views. (The schema engine's
        # ownership table is trusted for one operator role per database: README Limits.)
        assert condition(status, "RefreshScheduled")["status"] == "True", status["conditions"]
        # With a view of its own, role B records in the same schema and cannot touch A's rows.
        b_dsn = server.dsn(workload_db.name, other, password)
        with psycopg.connect(b_dsn, autocommit=True) as conn:
            conn.execute("CREATE MATERIALIZED VIEW mv_b AS SELECT id FROM categories")
            conn.execute("CREATE UNIQUE INDEX ON mv_b (id)")
            outcome = refresh_view(PostgresRefresh(conn), ViewTarget("public", "mv_b"), RefreshOptions(), T0)
            assert outcome.outcome == "refreshed", outcome
            assert refresh_view(PostgresRefresh(conn), ViewTarget("public", "mv_b"), RefreshOptions(), T0).ok
            forged = conn.execute("UPDATE marketplacedb.refresh_state SET counters = 0 WHERE view_name = 'mv_owner'")
            assert forged.rowcount == 0  # row-level security: only who may refresh a view writes its row
            names = {s.name for s in read_refresh_states(conn)}
        assert {"mv_owner", "mv_b"} <= names
    finally:
        with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(other)))
        server.drop_role(other)


async def test_operator_mode_follows_every_and_its_time_zone(
        kube_objects: KubeObjects, kube_client: Any, workload_db: Any) -> None:
    views = [{"name": "mv_fast", "query": "SELECT id, name FROM categories", "uniqueKey": ["id"],
              "refresh": {"mode": "Operator", "every": "30s", "maxStaleness": "5m"}}]
    deps, clock = await setup(kube_objects, kube_client, workload_db.owner, workload_db.owner_password)
    await kube_objects.create(resource(workload_db, "fast", views))
    status, outcome = await run(kube_objects, deps, "fast")
    assert status["materializedViews"][0]["lastResult"] == "refreshed"
    assert outcome.requeue_after == 30  # next run in 30 s, not the 300 s resync
    clock.now = T0 + datetime.timedelta(seconds=10)
    status, outcome = await run(kube_objects, deps, "fast")
    assert status["materializedViews"][0]["recentOutcomes"] == ["refreshed"]  # not due yet
    assert outcome.requeue_after == 20
    clock.now = T0 + datetime.timedelta(seconds=31)
    status, _ = await run(kube_objects, deps, "fast")
    assert status["materializedViews"][0]["recentOutcomes"][0] in ("skipped-unchanged", "refreshed")
    assert len(status["materializedViews"][0]["recentOutcomes"]) == 2


async def test_an_unwritable_state_schema_fails_loudly_without_a_refresh_storm(
        kube_objects: KubeObjects, kube_client: Any, workload_db: Any) -> None:
    """A role that may not create the operator's schema (and nobody created it): every refresh
    fails and says why; the operator's timer still waits for `every`, not one second."""
    server = workload_db.server
    other, password = f"{workload_db.owner}_c", "c-password-1"
    server.create_role(other, password)
    try:
        with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as admin:
            role = sql.Identifier(other)
            admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(workload_db.name), role))
            admin.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(role))
            admin.execute(sql.SQL("GRANT SELECT ON categories TO {}").format(role))
        views = [{"name": "mv_c", "query": "SELECT id, name FROM categories", "uniqueKey": ["id"],
                  "refresh": {"mode": "Operator", "every": "30s", "maxStaleness": "1m"}}]
        deps, clock = await setup(kube_objects, kube_client, other, password, secret="db-c")
        await kube_objects.create(resource(workload_db, "unwritable", views, secret="db-c"))
        status, outcome = await run(kube_objects, deps, "unwritable")
        scheduled = condition(status, "RefreshScheduled")
        assert scheduled["status"] == "False" and "public.mv_c" in scheduled["message"], status["conditions"]
        assert "42501" in scheduled["message"]  # insufficient_privilege, by SQLSTATE
        assert outcome.requeue_after == 30
        clock.now = T0 + datetime.timedelta(minutes=2)
        status, _ = await run(kube_objects, deps, "unwritable")
        assert condition(status, "Stale")["status"] == "True"
        assert sample("marketplacedb_refresh_never_refreshed", "unwritable", "mv_c") == 1
    finally:
        with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(other)))
        server.drop_role(other)


def test_cron_schedules_are_read_in_their_time_zone() -> None:
    last = datetime.datetime(2026, 7, 1, 0, 30, tzinfo=datetime.UTC)  # 02:30 in Berlin (CEST)
    now = datetime.datetime(2026, 7, 1, 0, 59, tzinfo=datetime.UTC)
    assert seconds_until_due("0 3 * * *", last, now, "Europe/Berlin") == 60  # 03:00 Berlin = 01:00 UTC
    assert seconds_until_due("0 3 * * *", last, now) == 2 * 3600 + 60  # 03:00 UTC
    assert seconds_until_due(None, last, now, every=30) == 30 - 29 * 60
    spec = resource(type("Db", (), {"server": type("S", (), {"host": "h", "port": 5432})(), "name": "d"})(), "tz", [
        {"name": "mv", "query": "SELECT 1 AS id", "uniqueKey": ["id"],
         "refresh": {"schedule": "0 3 * * *", "timeZone": "Europe/Berlin"}}])
    from marketplacedb_operator.api.v1alpha1 import MarketplaceDB

    parsed = MarketplaceDB.model_validate({**spec, "metadata": {"name": "tz", "namespace": NS, "uid": "u"}})
    job = build_cronjobs({"metadata": {"name": "tz", "namespace": NS, "uid": "u"}, "apiVersion": API,
                          "kind": "MarketplaceDB"}, parsed.spec, Settings())[0]
    assert job["spec"]["timeZone"] == "Europe/Berlin"


@pytest.mark.parametrize("bad", [{"every": "30s"}, {"mode": "Operator", "every": "2s"},
                                 {"mode": "Operator", "every": "30s", "schedule": "* * * * *"}, {},
                                 {"schedule": "* * * * *", "timeZone": "Mars/Olympus"}])
def test_schedule_fields_are_checked_with_the_field_named(bad: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from marketplacedb_operator.api.v1alpha1 import MaterializedViewSpec

    with pytest.raises(ValidationError) as caught:
        MaterializedViewSpec.model_validate({"name": "mv", "query": "SELECT 1 AS id", "uniqueKey": ["id"],
                                             "refresh": bad})
    assert "refresh" in json.dumps(caught.value.errors(), default=str)


def test_cronjob_args_carry_the_view_policy_and_parse_as_the_cli() -> None:
    from marketplacedb_operator.api.v1alpha1 import MaterializedViewSpec
    from marketplacedb_operator.cli import build_parser
    from marketplacedb_operator.cli.refresh import _overrides
    from marketplacedb_operator.specs.cronjobs import refresh_args

    view = MaterializedViewSpec.model_validate({
        "name": "mv", "query": "SELECT random() AS id", "uniqueKey": ["id"], "allowVolatileFunctions": True,
        "refresh": {"schedule": "* * * * *", "dependsOn": ["prices", "s.t"], "historyLimit": 7}})
    assert view.refresh is not None
    options = _overrides(build_parser().parse_args(refresh_args(view, view.refresh)), RefreshOptions())
    assert (options.depends_on, options.allow_volatile, options.history_limit) == (("prices", "s.t"), True, 7)
