"""The scheduler that replaced kopf's per-object timers (issue 14, "Restart" item: operator memory
at N = 1,000; a kopf timer keeps a live copy of each object's body). Against kopf's own peering
code and the KMock emulator: the scheduler pauses exactly when kopf pauses the replica in favour
of a peer, and a due resource is reconciled once (read fresh from the API), not once per tick.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import logging
import threading
import time
from typing import Any

import kopf
import kubernetes
import pytest
from kopf._cogs.aiokits import aiotoggles
from kopf._cogs.configs.configuration import OperatorSettings
from kopf._cogs.structs.references import Resource
from kopf._core.actions import lifecycles
from kopf._core.engines import activities, peering
from kopf._core.intents import causes

from harness.kube import KubeObjects, eventually
from marketplacedb_operator import handlers
from marketplacedb_operator import scheduler as scheduler_module
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.scheduler import PEERING_LOGGER, PeeringPause, Scheduler
from marketplacedb_operator.settings import Settings

NS = "prod"
PEERINGS = Resource(group="kopf.dev", version="v1", plural="kopfpeerings", namespaced=True)


def _peering_event(peers: dict[str, dict[str, Any]]) -> Any:
    return {"type": "MODIFIED", "object": {"metadata": {"name": "mdb"}, "status": peers}}


async def test_the_scheduler_pauses_while_kopf_pauses_this_replica() -> None:
    pause = PeeringPause()
    logger = logging.getLogger(PEERING_LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)  # attach() makes the INFO records it needs visible
    pause.attach()
    try:
        settings = OperatorSettings()
        settings.peering.name, settings.peering.priority = "mdb", 100
        conflicts = aiotoggles.Toggle(False)
        seen = datetime.datetime.now(datetime.UTC).isoformat()
        higher = _peering_event({"older-replica": {"priority": 200, "lifetime": 60, "lastseen": seen}})
        # kopf decides, logs "Pausing operations ...", then sleeps until the peer would expire.
        task = asyncio.create_task(peering.process_peering_event(
            raw_event=higher, namespace=NS, resource=PEERINGS, identity=peering.Identity("me"),
            settings=settings, autoclean=False, conflicts_found=conflicts))
        await eventually(conflicts.is_on, timeout=10, interval=0.05, message="kopf paused")
        task.cancel()
        assert pause.paused
        # The peer is gone: kopf resumes, and so does the scheduler.
        await peering.process_peering_event(
            raw_event=_peering_event({}), namespace=NS, resource=PEERINGS, identity=peering.Identity("me"),
            settings=settings, autoclean=False, conflicts_found=conflicts)
        assert conflicts.is_off() and not pause.paused
    finally:
        pause.detach()
        logger.setLevel(level)


async def test_a_due_resource_is_run_once_from_a_fresh_read(
    kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
) -> None:
    await kube_objects.ensure_namespace(NS)
    await kube_objects.create({"apiVersion": "marketplacedb.io/v1alpha1", "kind": "MarketplaceDB",
                               "metadata": {"name": "shop", "namespace": NS}, "spec": {}})
    deps = make_deps(Settings(tick_seconds=0.1), kube_client)
    runs: list[dict[str, Any]] = []
    release = threading.Event()

    def run(body: Any, state: Any, logger: Any) -> None:
        runs.append(dict(body))
        release.wait(10)
        state.next_due = time.monotonic() + 300

    state = handlers.ResourceState()
    pause = PeeringPause()
    scheduler = Scheduler(deps, {f"{NS}/shop": state}, run, workers=2, backoff=lambda failures: 1.0, pause=pause)
    scheduler.context = contextvars.copy_context()
    try:
        pause.paused = True
        assert scheduler.tick() == 0 and state.next_due == 0.0  # paused: nothing runs
        pause.paused = False
        assert scheduler.tick() == 1
        await eventually(lambda: len(runs) == 1, timeout=10, interval=0.05, message="the due resource ran")
        assert scheduler.tick() == 0 and scheduler.tick() == 0  # still running: not submitted again
        release.set()
        await asyncio.sleep(0.2)
        assert len(runs) == 1 and state.next_due > time.monotonic() + 200
        assert runs[0]["metadata"]["name"] == "shop" and "spec" in runs[0]  # read from the API
    finally:
        release.set()
        scheduler.stop()


async def test_a_dead_or_stalled_scheduler_fails_liveness(
    kube_client: kubernetes.client.ApiClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kopf's /healthz runs the operator's probes (kopf.on.probe) and fails when one raises. The
    scheduler is every resource's resync: /healthz stayed green with its thread dead or stuck
    (test_loop_redteam4: hung reads). Through kopf's own probe activity, with the handlers' registry."""
    monkeypatch.setattr(scheduler_module, "STALL_MIN_SECONDS", 0.5)  # stalled after 10 ticks or 0.5 s
    registry = kopf.OperatorRegistry()
    handlers.register(registry, make_deps(Settings(tick_seconds=0.02), kube_client))

    async def probe() -> dict[str, Any]:
        return await activities.run_activity(lifecycle=lifecycles.all_at_once, registry=registry,
                                             settings=OperatorSettings(), activity=causes.Activity.PROBE,
                                             indices={}, memo=kopf.Memo())

    with pytest.raises(activities.ActivityError):  # not started (or its thread died): no resyncs
        await probe()
    stuck, release = threading.Event(), threading.Event()

    def tick(self: Scheduler) -> int:
        if stuck.is_set():
            release.wait(30)
        return 0

    monkeypatch.setattr(Scheduler, "tick", tick)
    await activities.run_activity(lifecycle=lifecycles.all_at_once, registry=registry, settings=OperatorSettings(),
                                  activity=causes.Activity.STARTUP, indices={},
                                  memo=kopf.Memo())
    try:
        reports: list[dict[str, Any]] = []

        async def healthy() -> bool:
            try:
                reports.append((await probe())["scheduler"])
            except activities.ActivityError:
                return False
            return True

        async def failing() -> bool:
            return not await healthy()

        await eventually(healthy, timeout=30, interval=0.1, message="the running scheduler passes the probe")
        assert reports[-1]["alive"] is True and reports[-1]["paused"] is False, reports[-1]
        stuck.set()  # a tick that never returns: the thread is alive, the resyncs are not
        await eventually(failing, timeout=30, interval=0.2, message="the stalled scheduler fails the probe")
        with pytest.raises(activities.ActivityError) as failed:
            await probe()
        assert "last tick" in str(failed.value.__cause__)
    finally:
        release.set()
        await activities.run_activity(lifecycle=lifecycles.all_at_once, registry=registry,
                                      settings=OperatorSettings(), activity=causes.Activity.CLEANUP,
                                      indices={}, memo=kopf.Memo())

