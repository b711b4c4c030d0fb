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
import sys
import threading
from collections.abc import Iterator
from typing import Any

import kopf
import kubernetes
import psycopg
import pytest

from harness.kube import KubeObjects, eventually, kopf_runner
from harness.postgres import FreshDatabase, PostgresServer, new_database
from marketplacedb_operator import handlers, jobs, naming
from marketplacedb_operator.api.v1alpha1 import MarketplaceDB
from marketplacedb_operator.background import Job
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.sql import plan as planning

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/ is a top-level package
from bench.env import example_body

NS = "prod"
API = "marketplacedb.io/v1alpha1"
PROGRESS_SECONDS = 0.5
WATCHED_PERIODS = 8  # the queued resource's status is watched this many progress periods


@pytest.fixture
def two_databases(pg: PostgresServer) -> Iterator[list[FreshDatabase]]:
    made = [new_database(pg) for _ in range(2)]
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


async def test_a_job_still_queued_at_a_restart_keeps_its_since(
    kube_api: Any, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
    two_databases: list[FreshDatabase], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator restart loses its queue: the new process queues the same work again. Its
    status said `queued since T`; with the new process's queue time in it, every resource still
    waiting was rewritten after the restart (and its condition message changed). Each process has
    one background slot, held by an unrelated job, so the resource's schema job is queued in both."""
    await kube_objects.ensure_namespace(NS)
    db = two_databases[1]
    await kube_objects.create({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "owner-1", "namespace": NS, "labels": {naming.LABEL_CREDENTIALS: "true"},
                     "annotations": {naming.ANN_CREDENTIALS_FOR: "shop-1"}},
        "stringData": {"username": db.owner, "password": db.owner_password},
    })
    settings = Settings(resync_seconds=300.0, tick_seconds=0.25, retry_base_seconds=1.0, max_backoff_seconds=8.0,
                        progress_seconds=PROGRESS_SECONDS, max_background_jobs=1, max_background_jobs_per_database=1)
    finished: list[str] = []  # resources whose reconcile returned, in the second process
    original = handlers._run

    def recorded(deps: Any, body: Any, state: Any, logger: Any) -> None:
        original(deps, body, state, logger)
        finished.append(body.get("metadata", {}).get("name"))

    slot = threading.Event()

    def blocker(deps: Any) -> None:
        assert deps.background is not None
        deps.background.submit(Job(("other/blocker", "schema"), "elsewhere", lambda job: slot.wait(120)))

    first = make_deps(settings, kube_client)
    # The second process gets its own API client: a connection from the first one's pool was
    # not answered by the emulator after the first kopf stopped.
    client = kubernetes.client.ApiClient(kube_client.configuration)
    try:
        registry = kopf.OperatorRegistry()
        handlers.register(registry, first)
        blocker(first)
        async with kopf_runner(kube_api, registry, namespaces=[NS]):
            await kube_objects.create(_resource(1, db))
            queued = await eventually(lambda: (_get(kube_objects, "shop-1").get("status") or {}).get("progress"),
                                      timeout=60, interval=0.1, message="the resource's job reported")
            assert queued["phase"] == "queued", queued
        assert first.background is not None
        await asyncio.to_thread(first.background.cancel, (f"{NS}/shop-1", "schema"), 10.0)  # the process is gone
        assert first.background.get((f"{NS}/shop-1", "schema")) is None
        before = _get(kube_objects, "shop-1")
        await asyncio.sleep(1.1)  # `since` has whole seconds: the new process's queue time differs
        monkeypatch.setattr(handlers, "_run", recorded)
        registry, second = kopf.OperatorRegistry(), make_deps(settings, client)
        handlers.register(registry, second)
        assert second.background is not None
        blocker(second)
        async with kopf_runner(kube_api, registry, namespaces=[NS]):
            await eventually(lambda: "shop-1" in finished, timeout=60, interval=0.1,
                             message="the second process reconciled shop-1")
            job = second.background.get((f"{NS}/shop-1", "schema"))
            assert job is not None and job.started is None, "shop-1's job is queued again"
            after = _get(kube_objects, "shop-1")
            assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], (
                queued, (after.get("status") or {}).get("progress"))
            slot.set()
            await eventually(lambda: _ready(kube_objects, "shop-1"), timeout=90, interval=0.2,
                             message="Ready once the slot is free")
    finally:
        slot.set()
        client.close()  # type: ignore[no-untyped-call]
