"""A queued background job costs no status writes while it waits, and little memory (issue 14,
"Restart" item: the operator's memory and write volume at N = 1,000, where most schema jobs wait
for a slot).

Found by profiling the benchmark: status.progress carried `seconds` (an age) and a queued job's
resource was reconciled every progress_seconds, so each look at each waiting resource rewrote its
status (at N = 1,000 on one pool: ~990 resources, one write each every 10 s, and as many
reconciles). Now progress carries `since` (a timestamp), a queued job is not polled, and the
job's start wakes its resource. One background slot; the first resource's index build waits
for a lock held in its database, so the second resource's job stays queued. kopf in-process
against KMock, real PostgreSQL 15.
"""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import secrets
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import kopf
import kubernetes
import psycopg
import pytest

from harness.kube import KubeObjects, eventually, kopf_runner
from harness.postgres import FreshDatabase, PostgresServer
from marketplacedb_operator import handlers, jobs, naming
from marketplacedb_operator.api.v1alpha1 import MarketplaceDB
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.sql import plan as planning

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/ is a top-level package
from bench.env import example_body

NS = "prod"
API = "marketplacedb.io/v1alpha1"
PROGRESS_SECONDS = 0.5
WATCHED_PERIODS = 8  # the queued resource's status is watched this many progress periods


def _new_database(pg: PostgresServer) -> FreshDatabase:
    suffix = uuid.uuid4().hex[:10]
    name, owner, password = f"mdb_{suffix}", f"mdb_{suffix}_owner", secrets.token_urlsafe(16)
    pg.create_role(owner, password)
    pg.create_database(name, owner)
    return FreshDatabase(name=name, owner=owner, owner_password=password, dsn=pg.dsn(name, owner, password),
                         superuser_dsn=pg.dsn(name), server=pg)


@pytest.fixture
def two_databases(pg: PostgresServer) -> Iterator[list[FreshDatabase]]:
    made = [_new_database(pg) for _ in range(2)]
    try:
        for db in made:
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, sku text NOT NULL)")
                conn.execute("INSERT INTO items SELECT g, 'sku-' || g FROM generate_series(1, 2000) g")
        yield made
    finally:
        for db in made:
            pg.drop_database(db.name)
            pg.drop_role(db.owner)


def _resource(i: int, db: FreshDatabase) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MarketplaceDB",
        "metadata": {"name": f"shop-{i}", "namespace": NS},
        "spec": {
            "database": {"host": db.server.host, "port": db.server.port, "dbname": db.name, "sslMode": "disable",
                         "credentialsSecretRef": {"name": f"owner-{i}"}},
            "ddl": {"deletionPolicy": "Retain"},
            "indexes": [{"name": "idx_items_sku", "table": "items", "columns": [{"name": "sku"}]}],
            "pooler": {"enabled": False},
        },
    }


def _get(objects: KubeObjects, name: str) -> dict[str, Any]:
    return dict(objects.get(API, "MarketplaceDB", name, NS) or {})


def _ready(objects: KubeObjects, name: str) -> bool:
    conditions = (_get(objects, name).get("status") or {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def test_a_queued_job_is_not_rewritten_while_it_waits(
    kube_api: Any, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
    two_databases: list[FreshDatabase],
) -> None:
    await kube_objects.ensure_namespace(NS)
    for i, db in enumerate(two_databases):
        await kube_objects.create({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": f"owner-{i}", "namespace": NS, "labels": {naming.LABEL_CREDENTIALS: "true"},
                         "annotations": {naming.ANN_CREDENTIALS_FOR: f"shop-{i}"}},
            "stringData": {"username": db.owner, "password": db.owner_password},
        })
    settings = Settings(resync_seconds=300.0, tick_seconds=0.25, retry_base_seconds=1.0, max_backoff_seconds=8.0,
                        index_lock_timeout_seconds=120.0, ddl_retries=0, progress_seconds=PROGRESS_SECONDS,
                        max_background_jobs=1, max_background_jobs_per_database=1)
    registry = kopf.OperatorRegistry()
    deps = make_deps(settings, kube_client)
    handlers.register(registry, deps)
    # A lock that CREATE INDEX CONCURRENTLY waits for (SHARE UPDATE EXCLUSIVE conflicts with itself).
    holder = await asyncio.to_thread(psycopg.connect, two_databases[0].superuser_dsn)
    try:
        await asyncio.to_thread(holder.execute, "BEGIN")
        await asyncio.to_thread(holder.execute, "LOCK TABLE items IN SHARE UPDATE EXCLUSIVE MODE")
        async with kopf_runner(kube_api, registry, namespaces=[NS]):
            await kube_objects.create(_resource(0, two_databases[0]))
            await eventually(lambda: ((_get(kube_objects, "shop-0").get("status") or {}).get("progress") or {})
                             .get("phase") not in (None, "queued"), timeout=60, interval=0.1,
                             message="the first build running (waiting for the lock)")
            await kube_objects.create(_resource(1, two_databases[1]))
            progress = await eventually(
                lambda: (_get(kube_objects, "shop-1").get("status") or {}).get("progress"),
                timeout=60, interval=0.1, message="the second resource's job reported")
            assert progress["phase"] == "queued", progress
            # What the waiting job holds: its inputs packed (the spec as compressed JSON), not the
            # spec model and desired state (~43 KiB of objects for the example; ~990 wait at N = 1,000).
            assert deps.background is not None
            waiting = deps.background.get(("prod/shop-1", "schema"))
            assert waiting is not None and waiting.started is None
            assert isinstance(waiting.inputs[0], bytes) and len(waiting.inputs[0]) < 4096, type(waiting.inputs[0])
            version = _get(kube_objects, "shop-1")["metadata"]["resourceVersion"]
            # Time passes; nothing about the queued job changes: its resource is not rewritten.
            await asyncio.sleep(WATCHED_PERIODS * PROGRESS_SECONDS)
            after = _get(kube_objects, "shop-1")
            assert after["metadata"]["resourceVersion"] == version, (progress, after.get("status", {}).get("progress"))
            # When it was queued, as a timestamp (an age would be the rewrite above).
            since = datetime.datetime.fromisoformat(progress["since"].replace("Z", "+00:00"))
            assert abs((datetime.datetime.now(datetime.UTC) - since).total_seconds()) < 120
            # The slot frees: the queued job starts (its start and end wake the resource) and ends.
            await asyncio.to_thread(holder.execute, "ROLLBACK")
            await eventually(lambda: _ready(kube_objects, "shop-0") and _ready(kube_objects, "shop-1"),
                             timeout=90, interval=0.2, message="both Ready once the lock is gone")
    finally:
        await asyncio.to_thread(holder.close)


def test_packed_inputs_rebuild_the_same_desired_state() -> None:
    """The example resource (indexes, partial and expression ones, views, settings) round-trips
    through jobs.pack/unpack to the very desired state reconcile planned from."""
    body = example_body()
    body["metadata"] = {"name": "shop", "namespace": NS}
    spec = MarketplaceDB.model_validate(body).spec
    packed = jobs.pack(spec, "prod/shop", ["work_mem"])
    assert len(packed) < 4096
    assert jobs.unpack(packed) == planning.desired_state(spec, "prod/shop", ["work_mem"])
