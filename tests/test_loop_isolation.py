"""The control loop's edges (issue 14): every part of a reconcile isolated, refresh-now handled
exactly once in effect, teardown bounded. kopf in-process against KMock, real PostgreSQL 15.

Tick-rate checks count requests in a window and assert a ceiling: a slower machine only makes
fewer requests, so the verdict never depends on speed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import kubernetes
import psycopg
import pytest
from psycopg import sql

from harness.kube import KubeEmulator, KubeObjects, eventually, iter_requests
from marketplacedb_operator import naming
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.settings import Settings
from test_operator import CANARY, NS, PROBED, Env, _ready, app_deployment, example_resource

Matcher = Callable[[Any], bool]
TEARDOWN_TIMEOUT = 6.0


@pytest.fixture
async def env(
    kube_api: KubeEmulator, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient, workload_db: Any
) -> AsyncIterator[Env]:
    """test_operator's environment (Secret with the canary password, probed Deployments), with
    the backoff ceiling lowered to 8 s so that recovery after a fault is seen within seconds."""
    with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(workload_db.owner), sql.Literal(CANARY))
        )
    await kube_objects.ensure_namespace(NS)
    await kube_objects.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "shop-db-owner",
                "namespace": NS,
                "labels": {naming.LABEL_CREDENTIALS: "true"},
                "annotations": {naming.ANN_CREDENTIALS_FOR: "shop"},
            },
            "stringData": {"username": workload_db.owner, "password": CANARY},
        }
    )
    for name in PROBED:
        await kube_objects.create(app_deployment(name))
    settings = Settings(
        resync_seconds=1.0,
        tick_seconds=0.5,
        retry_base_seconds=1.0,
        max_backoff_seconds=8.0,
        teardown_timeout_seconds=TEARDOWN_TIMEOUT,
        ddl_retry_base_seconds=0.05,
    )
    yield Env(kube_api, kube_objects, workload_db, make_deps(settings, kube_client), [])


def _plural(request: Any) -> str:
    return str(request.resource.plural) if request.resource is not None else ""


# part -> (the failing request, the condition it must show, its reason). The faults are reads (a 500
# on the GET/LIST a part starts with): a failed *write* is still stored by the emulator, so it
# would heal itself on the next pass.
FAULTS: dict[str, tuple[Matcher, str, str]] = {
    "probes": (
        lambda r: r.method == "GET" and _plural(r) == "deployments" and r.name in PROBED,
        "ProbesApplied",
        "ProbesApplyFailed",
    ),
    "cronjobs": (
        lambda r: r.method == "GET" and _plural(r) == "cronjobs" and r.params.get("watch") != "true",
        "RefreshScheduled",
        "CronJobApplyFailed",
    ),
    "pooler": (
        lambda r: r.method == "GET" and _plural(r) == "configmaps" and r.params.get("watch") != "true",
        "PoolerAvailable",
        "PoolerApplyFailed",
    ),
}


def refresh_count(db: Any) -> int:
    """How many refreshes the state table recorded (every outcome, all views)."""
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", [f"{naming.STATE_SCHEMA}.{naming.STATE_TABLE}"]
        ).fetchone()
        if not exists or not exists[0]:
            return 0
        rows = conn.execute(
            sql.SQL("SELECT outcomes FROM {}").format(sql.Identifier(naming.STATE_SCHEMA, naming.STATE_TABLE))
        ).fetchall()
    return sum(int(v) for (outcomes,) in rows for v in (outcomes or {}).values())


@pytest.mark.parametrize("part", sorted(FAULTS))
async def test_a_failing_part_is_a_condition_with_backoff(env: Env, part: str) -> None:
    """Finding 2: _cronjobs, _pooler and _probes ran outside the guarded block; an exception there
    escaped, no status was written and the reconcile (with a forced refresh when refresh-now was
    set) re-ran at every retry of kopf's timer."""
    matcher, condition, reason = FAULTS[part]
    fault = {"on": True}
    env.api[lambda r: fault["on"] and matcher(r)] << 500
    body = example_resource(env.db)
    body["metadata"]["annotations"] = {naming.ANN_REFRESH_NOW: "r-1"}
    async with env.operator():
        await env.objects.create(body)
        failed = await eventually(
            lambda: env.condition(condition).get("reason") == reason and env.condition(condition),
            timeout=60,
            message=f"{condition}={reason}; now {env.condition(condition)}",
        )
        assert failed["status"] == "False" and failed["message"] and CANARY not in failed["message"]
        assert env.condition("Ready")["status"] == "False"
        # The refresh-now request is acted upon once (after the views exist) and recorded, although
        # a later part fails.
        await eventually(
            lambda: env.resource()["status"].get("handledRefreshRequest") == "r-1",
            timeout=60,
            message="r-1 handled",
        )
        failed = env.condition(condition)
        assert failed["status"] == "False" and failed["reason"] == reason
        # Backoff: retry_base 1 s doubling up to 8 s (with jitter) instead of every retry of kopf's
        # timer (1 s) or every 0.5 s tick.
        hits = sum(1 for r in iter_requests(env.api) if matcher(r))
        refreshes = refresh_count(env.db)
        await asyncio.sleep(12)
        retries = sum(1 for r in iter_requests(env.api) if matcher(r)) - hits
        assert 1 <= retries <= 6, retries
        assert refresh_count(env.db) == refreshes == 2  # one forced refresh per view, never repeated
        fault["on"] = False
        await env.pooler_controller()
        await _ready(env, timeout=60)
        assert refresh_count(env.db) == 2


async def _hold_view_lock(db: Any, view: str) -> psycopg.Connection[Any]:
    """Another session holding the view's refresh advisory lock (as a running CronJob would)."""
    from marketplacedb_operator.sql.refresh import ViewTarget, lock_key

    conn = await asyncio.to_thread(psycopg.connect, db.superuser_dsn, autocommit=True)
    key = lock_key(ViewTarget("public", view))
    await asyncio.to_thread(conn.execute, "SELECT pg_advisory_lock(%s, %s)", list(key))
    return conn


async def test_refresh_now_is_not_lost_when_busy_or_unreachable(env: Env) -> None:
    """Finding 3: a refresh-now value was marked handled when the database was unreachable and
    when the refresh was skipped because another one held the view's lock."""
    body = example_resource(env.db)
    body["spec"]["pooler"]["enabled"] = False
    body["spec"].pop("healthProbes")
    async with env.operator():
        created = await env.objects.create(body)
        await _ready(env)
        before = refresh_count(env.db)
        # 1. Another refresh holds mv_hot_products' lock: the request stays pending.
        holder = await _hold_view_lock(env.db, "mv_hot_products")
        try:
            await env.objects.patch(created, {"metadata": {"annotations": {naming.ANN_REFRESH_NOW: "busy-1"}}})
            await eventually(
                lambda: _outcome(env.db, "mv_hot_products", "skipped-busy"),
                timeout=30,
                message="a skipped-busy refresh",
            )
            await asyncio.sleep(1)
            assert env.resource()["status"].get("handledRefreshRequest") != "busy-1"
        finally:
            await asyncio.to_thread(holder.close)
        # ... and is handled once the lock is free (retried with backoff, not forgotten).
        await eventually(
            lambda: env.resource()["status"].get("handledRefreshRequest") == "busy-1",
            timeout=30,
            message="busy-1 handled after the lock was released",
        )
        assert _outcome(env.db, "mv_hot_products", "refreshed")
        # 2. The database is down when the request arrives: not handled until it ran.
        env.db.server.stop()
        try:
            await env.objects.patch(created, {"metadata": {"annotations": {naming.ANN_REFRESH_NOW: "down-2"}}})
            await eventually(
                lambda: env.condition("DatabaseReachable").get("status") == "False",
                timeout=30,
                message="DatabaseReachable=False",
            )
            await asyncio.sleep(2)
            assert env.resource()["status"].get("handledRefreshRequest") == "busy-1"
        finally:
            env.db.server.start()
        await eventually(
            lambda: env.resource()["status"].get("handledRefreshRequest") == "down-2",
            timeout=60,
            message="down-2 handled after the database came back",
        )
        counted = refresh_count(env.db)
        await asyncio.sleep(3)
        assert refresh_count(env.db) == counted  # handled: not repeated
        assert counted > before


def _outcome(db: Any, view: str, outcome: str) -> bool:
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", [f"{naming.STATE_SCHEMA}.{naming.STATE_TABLE}"]
        ).fetchone()
        if not exists or not exists[0]:
            return False
        row = conn.execute(
            sql.SQL("SELECT outcomes FROM {} WHERE view_name = %s").format(
                sql.Identifier(naming.STATE_SCHEMA, naming.STATE_TABLE)
            ),
            [view],
        ).fetchone()
    return bool(row and json.loads(json.dumps(row[0])).get(outcome))


async def test_drop_teardown_is_bounded_when_the_secret_is_gone(env: Env) -> None:
    """Finding 6: deletionPolicy Drop with the Secret deleted first (as a namespace deletion does)
    hung forever, and every retry re-patched the probed Deployments."""
    body = example_resource(env.db)
    body["spec"]["ddl"]["deletionPolicy"] = "Drop"
    body["spec"]["pooler"]["enabled"] = False
    async with env.operator():
        await env.objects.create(body)
        await _ready(env)
        created = await eventually(
            lambda: naming.FINALIZER in (env.resource()["metadata"].get("finalizers") or []) and env.resource(),
            message="the finalizer",
        )
        await env.objects.delete(env.objects.get("v1", "Secret", "shop-db-owner", NS) or {})
        deleted_at = asyncio.get_running_loop().time()
        await env.objects.delete(created)
        # Bound: the timeout plus one retry delay (backoff capped at the time left) and kopf's pass.
        await eventually(lambda: env.resource() == {}, timeout=TEARDOWN_TIMEOUT + 30, message="finalizer released")
        assert asyncio.get_running_loop().time() - deleted_at >= TEARDOWN_TIMEOUT - 1
        warnings = [e for e in env.objects.events(NS, involved_name="shop") if e.get("reason") == "TeardownTimedOut"]
        assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
        message = warnings[0]["message"]
        for name in [i["name"] for i in body["spec"]["indexes"]] + [
            v["name"] for v in body["spec"]["materializedViews"]
        ]:
            assert name in message
        assert "Secret prod/shop-db-owner not found" in message and CANARY not in message
        # The probes were released once per Deployment, not once per retry.
        releases = [
            r.url.path.rsplit("/", 1)[-1]
            for r in iter_requests(env.api, "PATCH")
            if r.url.path.rsplit("/", 1)[-1] in PROBED and set(r.data or {}) == {"apiVersion", "kind", "metadata"}
        ]
        assert sorted(releases) == sorted(PROBED)
