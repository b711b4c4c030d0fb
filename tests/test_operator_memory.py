"""Where the operator holds object bodies, and for how long (issue 14: resident memory at N = 1,000).

A parsed MarketplaceDB body is ~21 KiB for the example resource. A bulk create of 1,000 (a
GitOps sync) or a resync pass makes ~1,000 of them at once; whatever keeps them past their use
sets the operator's peak, and Python's allocator keeps the arenas they filled. Found with
BENCH_ALLOCATOR_STATS (bench/operator_proc.py): kopf's per-object workers, the event pool's
queue and the scheduler's reconcile queue each held one body per waiting resource.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import threading
import time
import zlib
from typing import Any

import kopf
import kubernetes
import pytest
from kopf._cogs.configs.configuration import OperatorSettings
from kopf._core.actions import lifecycles
from kopf._core.engines import activities
from kopf._core.intents import causes
from kopf._core.reactor import queueing

from harness.kube import KubeEmulator, KubeObjects, eventually, iter_requests, kopf_runner
from marketplacedb_operator import handlers, naming
from marketplacedb_operator import scheduler as scheduler_module
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.scheduler import PeeringPause, Scheduler
from marketplacedb_operator.settings import Settings

NS = "prod"
COUNT = 30


def _resource(i: int) -> dict[str, Any]:
    return {"apiVersion": naming.API_VERSION, "kind": naming.KIND, "metadata": {"name": f"shop-{i}", "namespace": NS},
            "spec": {"indexes": [{"name": f"idx_{n}", "table": "items", "columns": [{"name": "sku"}]}
                                 for n in range(20)]}}


async def test_kopf_workers_let_go_of_an_objects_body_soon_after_its_last_event(
    kube_client: kubernetes.client.ApiClient,
) -> None:
    """kopf's per-object worker keeps the object's last event (the whole parsed body) until it has
    idled settings.queueing.idle_timeout (5 s by default): a bulk create of 1,000 resources held
    ~1,000 bodies at once and the allocator kept the arenas they filled (bench/REPORT-fleet.md,
    issue 14's memory goal). The operator's startup shortens it; the value must reach the setting
    kopf's worker reads (a renamed setting in a kopf upgrade would fail here, not silently)."""
    assert "settings.queueing.idle_timeout" in inspect.getsource(queueing.worker)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, make_deps(Settings(), kube_client))
    settings = OperatorSettings()
    assert settings.queueing.idle_timeout == 5.0  # kopf's default, for the record
    await activities.run_activity(lifecycle=lifecycles.all_at_once, registry=registry, settings=settings,
                                  activity=causes.Activity.STARTUP, indices={}, memo=kopf.Memo())
    try:
        assert settings.queueing.idle_timeout == handlers.KOPF_WORKER_IDLE_SECONDS <= 1.0
    finally:
        await activities.run_activity(lifecycle=lifecycles.all_at_once, registry=registry, settings=settings,
                                      activity=causes.Activity.CLEANUP, indices={}, memo=kopf.Memo())


async def test_reconciles_queued_by_events_wait_with_their_body_packed(
    kube_api: KubeEmulator, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each event for a new generation queues a reconcile on the event pool (4 threads); after a bulk
    create most wait there for minutes, each with the body kopf delivered, long after kopf let go
    of its own copy. What waits is the body compressed (_pack), unpacked when the run starts: the
    same object, a fraction of the memory."""
    await kube_objects.ensure_namespace(NS)
    received: list[Any] = []
    release = threading.Event()
    original = handlers._run_packed

    def recording(deps: Any, packed: Any, state: Any, logger: Any) -> None:
        received.append(packed)  # what waited in the pool's queue
        release.wait(30)  # the first EVENT_RECONCILES block: every later one waits in the pool's queue
        original(deps, packed, state, logger)

    monkeypatch.setattr(handlers, "_run_packed", recording)
    monkeypatch.setattr(handlers, "reconcile", lambda body, deps: None)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, make_deps(Settings(resync_seconds=3600), kube_client))
    try:
        async with kopf_runner(kube_api, registry, namespaces=[NS]):
            for i in range(COUNT):
                await kube_objects.create(_resource(i))
            await eventually(lambda: len(received) == handlers.EVENT_RECONCILES, timeout=30, interval=0.05,
                             message="the event pool's threads are busy")
            release.set()
            await eventually(lambda: len(received) == COUNT, timeout=30, interval=0.05,
                             message="every queued reconcile ran")
    finally:
        release.set()
    assert all(isinstance(body, bytes) for body in received), {type(body).__name__ for body in received}
    sizes = sorted(len(body) for body in received)
    parsed = len(json.dumps(_resource(0)))
    assert sizes[-1] < parsed / 3, f"packed {sizes[-1]} bytes for a body of {parsed} bytes of JSON"
    names = {json.loads(zlib.decompress(body))["metadata"]["name"] for body in received}
    assert names == {f"shop-{i}" for i in range(COUNT)}


async def test_a_resync_pass_reads_a_body_only_when_a_reconcile_thread_can_take_it(
    kube_api: KubeEmulator, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
) -> None:
    """The scheduler reads due resources on READERS_PER_WORKER x workers reader threads and hands
    each body to `workers` reconcile threads. Reads are fast, reconciles slow: every due body
    waited in the reconcile pool's queue (at N = 1,000 a resync pass held hundreds: the largest
    share of the live memory the benchmark's profile found after the restart). Now a reader reads
    the next one only after handing its body on: at most one body per reader waits."""
    await kube_objects.ensure_namespace(NS)
    for i in range(COUNT):
        await kube_objects.create(_resource(i))
    deps = make_deps(Settings(tick_seconds=0.05), kube_client)
    release, started = threading.Event(), []

    def run(body: Any, state: Any, logger: Any) -> None:
        started.append(body["metadata"]["name"])
        release.wait(30)
        state.next_due = time.monotonic() + 3600

    states = {f"{NS}/shop-{i}": handlers.ResourceState() for i in range(COUNT)}
    scheduler = Scheduler(deps, states, run, workers=1, backoff=lambda failures: 1.0, pause=PeeringPause())
    scheduler.context = contextvars.copy_context()
    readers = scheduler_module.READERS_PER_WORKER

    def reads() -> int:
        return sum(1 for r in iter_requests(kube_api, "GET") if r.resource is not None
                   and r.resource.plural == naming.PLURAL and r.name is not None)

    before = reads()
    try:
        scheduler.start()
        await eventually(lambda: len(started) == 1 and reads() - before >= readers + 1, timeout=30, interval=0.05,
                         message="one reconcile running, every reader holding a body")
        for _ in range(20):  # many more ticks: every other resource is due all along
            await asyncio.sleep(0.05)
        assert reads() - before == readers + 1, f"{reads() - before} bodies read while one reconcile runs"
        release.set()
        await eventually(lambda: len(started) == COUNT, timeout=60, interval=0.05, message="all reconciled")
    finally:
        release.set()
        scheduler.stop()
