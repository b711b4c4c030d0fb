"""The control loop after a deletion (issue 14, review findings).

1. A reconcile queued before the resource was deleted must not run after teardown: with
   deletionPolicy: Drop it re-queued the schema job that re-created the dropped index (recorded
   as owned by a resource that no longer exists). The queued reconcile is made to wait
   deterministically: one event-reconcile thread, held by another resource's reconcile.
2. A scheduler read that finds nothing (discovery caching the kind as missing, e.g. right after
   the CRD was applied) drops the resource's state; an event that tracks it again with nothing
   new ran no reconcile and left next_due infinite: no resync ever again.

kopf in-process against the KMock emulator, real PostgreSQL 15.
"""

from __future__ import annotations

import threading
from typing import Any

import kopf
import kubernetes
import psycopg
import pytest

import loop_kit
from harness.kube import KubeObjects, eventually, kopf_runner
from marketplacedb_operator import handlers, naming
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.settings import Settings

NS = "prod"
INDEX = "idx_items_sku"


def _resource(name: str, db: Any, policy: str, indexes: bool) -> dict[str, Any]:
    index = {"name": INDEX, "table": "items", "columns": [{"name": "sku"}]}
    return loop_kit.resource(name, NS, db, ddl={"deletionPolicy": policy}, indexes=[index] if indexes else [])


async def _secret(objects: KubeObjects, name: str, db: Any) -> None:
    await objects.create(loop_kit.credentials_secret(name, NS, db.owner, db.owner_password))


def _get(objects: KubeObjects, name: str) -> dict[str, Any]:
    return loop_kit.get(objects, name, NS)


def _ready(objects: KubeObjects, name: str) -> bool:
    conditions = (_get(objects, name).get("status") or {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _index_exists(db: Any) -> bool:
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = %s", (INDEX,)).fetchone()
    return bool(row and row[0])


@pytest.fixture
def items_db(fresh_db: Any) -> Any:
    with psycopg.connect(fresh_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, sku text NOT NULL)")
        conn.execute("INSERT INTO items SELECT g, 'sku-' || g FROM generate_series(1, 200) g")
    return fresh_db


class _Recorder:
    """Wraps handlers._run and handlers.reconcile: which resource's reconcile ran, and its state.
    The first reconcile of `blocker` holds its (only) event-reconcile thread until `gate` opens."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reconciled: list[str] = []
        self.finished: list[str] = []
        self.states: dict[str, handlers.ResourceState] = {}
        self.blocking, self.gate = threading.Event(), threading.Event()
        run, reconcile = handlers._run, handlers.reconcile

        def recorded_run(deps: Any, body: Any, state: Any, logger: Any) -> None:
            name = body.get("metadata", {}).get("name")
            self.states[name] = state
            try:
                run(deps, body, state, logger)
            finally:
                self.finished.append(name)

        def recorded_reconcile(body: Any, deps: Any) -> Any:
            name = body.get("metadata", {}).get("name")
            self.reconciled.append(name)
            if name == "blocker":
                if not self.blocking.is_set():
                    self.blocking.set()
                    self.gate.wait(120)
                return None  # its database work does not matter here (retried with backoff)
            return reconcile(body, deps)

        monkeypatch.setattr(handlers, "_run", recorded_run)
        monkeypatch.setattr(handlers, "reconcile", recorded_reconcile)


async def test_a_reconcile_queued_before_the_deletion_does_not_undo_teardown(
    kube_api: Any, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
    items_db: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handlers, "EVENT_RECONCILES", 1)  # one event-reconcile thread: a queue behind it
    recorder = _Recorder(monkeypatch)
    await kube_objects.ensure_namespace(NS)
    await _secret(kube_objects, "shop", items_db)
    await _secret(kube_objects, "blocker", items_db)
    settings = Settings(resync_seconds=300.0, tick_seconds=0.1, retry_base_seconds=60.0, max_backoff_seconds=120.0)
    deps = make_deps(settings, kube_client)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, deps)
    try:
        async with kopf_runner(kube_api, registry, namespaces=[NS]):
            shop = await kube_objects.create(_resource("shop", items_db, "Drop", indexes=True))
            await eventually(lambda: _ready(kube_objects, "shop"), timeout=90, interval=0.1, message="shop Ready")
            assert _index_exists(items_db)
            # Another resource's reconcile holds the only event-reconcile thread.
            await kube_objects.create(_resource("blocker", items_db, "Retain", indexes=False))
            await eventually(recorder.blocking.is_set, timeout=30, interval=0.05, message="blocker holding the thread")
            # A trigger annotation: shop's reconcile (with this body) is queued behind it.
            await kube_objects.patch(shop, {"metadata": {"annotations": {naming.ANN_REFRESH_NOW: "now-1"}}})
            state = recorder.states["shop"]
            await eventually(lambda: state.queued is not None and state.queued[1][0] == "now-1",
                             timeout=30, interval=0.05, message="shop's reconcile queued")
            finished = recorder.finished.count("shop")
            # Deleted while it waits: teardown drops the index and the finalizer goes.
            await kube_objects.delete(shop)
            await eventually(lambda: not _get(kube_objects, "shop"), timeout=60, interval=0.1,
                             message="teardown done, shop gone")
            assert not _index_exists(items_db)
            reconciled = recorder.reconciled.count("shop")
            recorder.gate.set()  # the queued reconcile of shop runs now
            await eventually(lambda: recorder.finished.count("shop") > finished, timeout=30, interval=0.05,
                             message="the queued reconcile of shop ran")
            # It stopped at once: no reconcile of the deleted resource, no schema job, no index.
            assert recorder.reconciled.count("shop") == reconciled, recorder.reconciled
            assert deps.background is not None and deps.background.get(("prod/shop", "schema")) is None
            assert not _index_exists(items_db)
            # The same name created again gets a fresh state and is reconciled (the index is back).
            await kube_objects.create(_resource("shop", items_db, "Drop", indexes=True))
            await eventually(lambda: _ready(kube_objects, "shop") and _index_exists(items_db), timeout=90,
                             interval=0.1, message="shop created again: Ready, index built")
            assert recorder.states["shop"] is not state and not recorder.states["shop"].deleted
    finally:
        recorder.gate.set()


async def test_a_resource_a_read_missed_keeps_its_resync_once_tracked_again(
    kube_api: Any, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
    items_db: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = _Recorder(monkeypatch)
    await kube_objects.ensure_namespace(NS)
    await _secret(kube_objects, "shop", items_db)
    settings = Settings(resync_seconds=1.0, tick_seconds=0.1, retry_base_seconds=1.0, max_backoff_seconds=4.0)
    deps = make_deps(settings, kube_client)
    # The scheduler's next read of shop finds nothing (as when discovery cached the kind as missing).
    missing, missed = threading.Event(), threading.Event()
    get = deps.kube.get

    def flaky_get(api_version: str, kind: str, namespace: str, name: str) -> Any:
        scheduler_read = threading.current_thread().name.startswith("scheduler-read")
        if kind == "MarketplaceDB" and name == "shop" and scheduler_read and missing.is_set():
            missing.clear()
            missed.set()
            return None
        return get(api_version, kind, namespace, name)

    monkeypatch.setattr(deps.kube, "get", flaky_get)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, deps)
    async with kopf_runner(kube_api, registry, namespaces=[NS]):
        shop = await kube_objects.create(_resource("shop", items_db, "Retain", indexes=False))
        await eventually(lambda: _ready(kube_objects, "shop"), timeout=90, interval=0.1, message="shop Ready")
        missing.set()
        await eventually(missed.is_set, timeout=30, interval=0.05, message="a read of shop found nothing")
        # An event with nothing new for a reconcile (a label) tracks the state again.
        await kube_objects.patch(shop, {"metadata": {"labels": {"team": "search"}}})
        await eventually(lambda: (_get(kube_objects, "shop").get("metadata", {}).get("labels") or {}).get("team"),
                         timeout=10, interval=0.05, message="label written")
        runs = recorder.reconciled.count("shop")
        # Resyncs go on (one a second): before the fix next_due stayed infinite and none ran.
        await eventually(lambda: recorder.reconciled.count("shop") >= runs + 2, timeout=60, interval=0.1,
                         message="shop resynced after it was tracked again")
