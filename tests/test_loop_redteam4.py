"""Red team on the scheduler that replaced kopf's per-object timers (issue 14; commits 0eb61dd,
04e4777, 0456b0e): one resource's failures must not stop the others' periodic reconciles, a spec
change that arrives while a scheduled reconcile is finishing must still be applied, the API load of
the scheduler stays at one read per resync, and a queued job's packed inputs rebuild the spec.

kopf in-process against KMock, real PostgreSQL 15. Verdicts are on state reached within bounded
waits and on request counts against ceilings (a slower machine makes fewer requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import subprocess
import threading
from collections.abc import AsyncIterator
from typing import Any

import kopf
import kubernetes
import psycopg
import pytest
from psycopg import sql

import loop_kit
from admission_corpus import CORPUS, EXAMPLE, Case
from harness.kube import KubeEmulator, KubeObjects, eventually, iter_requests, kopf_runner
from marketplacedb_operator import handlers, jobs, scheduler
from marketplacedb_operator.api.v1alpha1 import MarketplaceDB
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.sql import plan as planning

NS = "prod"
PASSWORD = "redloop4-Pa55-w0rd-19d2"


def _resource(name: str, db: Any) -> dict[str, Any]:
    """A small resource: one setting, no index or view (a reconcile is quick and needs no job)."""
    return loop_kit.resource(name, NS, db, database={"settings": {"work_mem": "32MB"}},
                             ddl={"deletionPolicy": "Retain"})


async def _secret(objects: KubeObjects, name: str, db: Any) -> None:
    await objects.create(loop_kit.credentials_secret(name, NS, db.owner, PASSWORD))


def _get(objects: KubeObjects, name: str) -> dict[str, Any]:
    return loop_kit.get(objects, name, NS)


def _observed(objects: KubeObjects, name: str) -> Any:
    return (_get(objects, name).get("status") or {}).get("observedGeneration")


def _secret_reads(api: KubeEmulator, name: str) -> int:
    """Reconciles of `name`: each one reads its credentials Secret once."""
    return sum(1 for r in iter_requests(api, "GET") if r.resource is not None and r.resource.plural == "secrets"
               and r.name == f"{name}-owner")


def _mdb_gets(api: KubeEmulator, name: str) -> int:
    return sum(1 for r in iter_requests(api, "GET") if r.resource is not None and r.resource.plural == "marketplacedbs"
               and r.name == name and r.params.get("watch") != "true")


def _set_password(db: Any, password: str) -> None:
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(db.owner), sql.Literal(password)))


@pytest.fixture
async def db(fresh_db: Any) -> AsyncIterator[Any]:
    _set_password(fresh_db, PASSWORD)
    yield fresh_db


def _operator(api: KubeEmulator, client: kubernetes.client.ApiClient, settings: Settings) -> Any:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, make_deps(settings, client))
    return kopf_runner(api, registry, namespaces=[NS])


# -- 1. a spec change that lands while a scheduled reconcile is finishing -----------------------------

class _Gate(logging.Handler):
    """Holds a scheduled reconcile (a "resync" thread) at its "conditions changed" log line: after
    _run set next_due and before it released the resource's lock. A thread can be preempted there
    for as long (a blocked log sink, a loaded machine); the gate only makes it deterministic."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.armed = False
        self.entered = threading.Event()
        self.opened = threading.Event()

    def handle(self, record: logging.LogRecord) -> bool:  # not emit(): no handler lock held while waiting
        if (self.armed and threading.current_thread().name.startswith("resync")
                and "conditions changed" in record.getMessage()):
            self.armed = False
            self.entered.set()
            self.opened.wait(30)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        pass


async def test_a_spec_change_during_a_scheduled_reconciles_end_is_applied(
    kube_api: KubeEmulator, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient, db: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event reconcile for generation 2 finds the lock held by the scheduled one (which already
    chose its next_due) and only sets `pending`; on_event had set next_due = inf and `queued` =
    generation 2. Nobody clears either: the resource is never reconciled again (no resync, and
    later events for generation 2 are deduplicated by `queued`)."""
    await kube_objects.ensure_namespace(NS)
    await _secret(kube_objects, "shop", db)
    calls: list[tuple[str, Any, Any]] = []  # (thread, generation, state) of each _run that returned
    original = handlers._run

    def recorded(deps: Any, body: Any, state: Any, logger: Any) -> None:
        original(deps, body, state, logger)
        calls.append((threading.current_thread().name, body.get("metadata", {}).get("generation"), state))

    monkeypatch.setattr(handlers, "_run", recorded)
    gate = _Gate()
    objects_logger = logging.getLogger("kopf.objects")
    objects_logger.addHandler(gate)
    level = objects_logger.level
    # The "conditions changed" line is INFO. setLevel, not the attribute: loggers cache isEnabledFor()
    # and only setLevel clears it (after an earlier test's INFO record was dropped, it stayed dropped).
    objects_logger.setLevel(logging.INFO)
    settings = Settings(resync_seconds=1.0, tick_seconds=0.25, retry_base_seconds=1.0, max_backoff_seconds=4.0)
    try:
        async with _operator(kube_api, kube_client, settings):
            created = await kube_objects.create(_resource("shop", db))
            await eventually(lambda: _observed(kube_objects, "shop") == 1, timeout=60, interval=0.1,
                             message="generation 1 reconciled")
            # The next resync fails to log in: a condition transition, posted and logged by the
            # scheduled reconcile, which the gate holds there.
            gate.armed = True
            await asyncio.to_thread(_set_password, db, "not-the-password")
            entered = await asyncio.to_thread(gate.entered.wait, 30)
            assert entered, "no scheduled reconcile reported the failed login"
            spec = dict(created["spec"])
            spec["database"] = {**spec["database"], "settings": {"work_mem": "48MB"}}
            await kube_objects.patch_spec(_get(kube_objects, "shop"), spec)
            await eventually(lambda: any(t.startswith("reconcile") and g == 2 for t, g, _ in calls), timeout=30,
                             interval=0.05, message="the event reconcile for generation 2 tried (lock held)")
            state = calls[-1][2]
            gate.opened.set()
            await asyncio.to_thread(_set_password, db, PASSWORD)
            try:
                await eventually(lambda: _observed(kube_objects, "shop") == 2, timeout=30, interval=0.2,
                                 message="generation 2 reconciled")
            except TimeoutError as exc:
                raise AssertionError(
                    f"generation 2 never reconciled: next_due={state.next_due} pending={state.pending} "
                    f"queued={state.queued} handled_generation={state.handled_generation}") from exc
    finally:
        gate.opened.set()
        objects_logger.removeHandler(gate)
        objects_logger.setLevel(level)


# -- 2. one resource's failures do not stop the others' resyncs; the load is one GET per resync -----

RESYNC = 1.0
WINDOW = 6.0


async def test_one_failing_resource_does_not_stop_the_others_resyncs(
    kube_api: KubeEmulator, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient, db: Any,
) -> None:
    """Three resources: `bad` whose GET by the scheduler answers 500, `gone` deleted while due
    (its deletion finishes), `good`. `good` keeps its resync cadence; `bad` is retried with backoff
    (not every tick), and resumes once its GET works; the scheduler reads each due object once per
    resync (the API load it adds), not once per tick."""
    await kube_objects.ensure_namespace(NS)
    names = ["good", "bad", "gone"]
    for name in names:
        await _secret(kube_objects, name, db)
    fault = {"on": False}
    kube_api[lambda r: fault["on"] and r.method == "GET" and r.resource is not None
             and r.resource.plural == "marketplacedbs" and r.name == "bad" and r.params.get("watch") != "true"] << 500
    settings = Settings(resync_seconds=RESYNC, tick_seconds=0.25, retry_base_seconds=1.0, max_backoff_seconds=8.0)
    async with _operator(kube_api, kube_client, settings):
        created = {name: await kube_objects.create(_resource(name, db)) for name in names}
        await eventually(lambda: all(_observed(kube_objects, n) == 1 for n in names), timeout=60, interval=0.1,
                         message="all reconciled once")
        fault["on"] = True
        await kube_objects.delete(created["gone"])
        await eventually(lambda: not _get(kube_objects, "gone"), timeout=30, message="gone deleted")
        good, bad = _secret_reads(kube_api, "good"), _secret_reads(kube_api, "bad")
        good_gets, bad_gets = _mdb_gets(kube_api, "good"), _mdb_gets(kube_api, "bad")
        await asyncio.sleep(WINDOW)
        good_runs, good_reads = _secret_reads(kube_api, "good") - good, _mdb_gets(kube_api, "good") - good_gets
        bad_tries = _mdb_gets(kube_api, "bad") - bad_gets
        assert good_runs >= 2, f"good was resynced {good_runs} times in {WINDOW}s (resync {RESYNC}s)"
        # One read per resync at most (plus the one in flight), not one per 0.25 s tick.
        assert good_reads <= WINDOW / RESYNC + 2, good_reads
        assert _secret_reads(kube_api, "bad") == bad, "bad reconciled without a successful read"
        # Backoff 1, 2, 4 s (with jitter) on the failed read: a handful of tries, not 24 ticks.
        assert 1 <= bad_tries <= 5, bad_tries
        fault["on"] = False
        spec = dict(created["bad"]["spec"])
        await eventually(lambda: _secret_reads(kube_api, "bad") > bad, timeout=30, interval=0.2,
                         message="bad resynced again once its read works")
        await kube_objects.patch_spec(_get(kube_objects, "bad"), {**spec, "ddl": {"deletionPolicy": "Retain",
                                                                                   "approval": "Auto"}})
        await eventually(lambda: _observed(kube_objects, "bad") == 2, timeout=30, interval=0.2,
                         message="bad's edit applied")
        # `gone` recreated under the same name: a new object, reconciled and then resynced.
        recreated = await kube_objects.create(_resource("gone", db))
        assert recreated["metadata"]["uid"] != created["gone"]["metadata"]["uid"]
        await eventually(lambda: _observed(kube_objects, "gone") == 1, timeout=30, interval=0.2,
                         message="gone recreated and reconciled")
        runs = _secret_reads(kube_api, "gone")
        await eventually(lambda: _secret_reads(kube_api, "gone") >= runs + 2, timeout=20, interval=0.2,
                         message="the recreated gone resynced")


async def test_hung_reads_of_a_few_resources_do_not_stall_every_resync(
    kube_api: KubeEmulator, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient, db: Any,
) -> None:
    """The scheduler reads each due object on its pool of RESYNC_RECONCILES (4) threads, and the
    kube gateway sets no request timeout: four reads that the API server (or a half-open
    connection) never answers take every thread, and no other resource is resynced, retried or
    told that its background job ended, while /healthz (kopf's, no probe of the scheduler) stays
    green. Here the API holds the reads of four resources for up to a minute; a fifth must keep its
    1 s resync."""
    await kube_objects.ensure_namespace(NS)
    slow = [f"slow-{i}" for i in range(handlers.RESYNC_RECONCILES)]
    for name in [*slow, "good"]:
        await _secret(kube_objects, name, db)
    holding = {"on": False}
    released = asyncio.Event()

    def matches(request: Any) -> bool:
        return bool(holding["on"] and request.method == "GET" and request.resource is not None
                    and request.resource.plural == "marketplacedbs" and request.name in slow
                    and request.params.get("watch") != "true")

    async def hold(_: Any) -> int:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(released.wait(), 60)
        return 503

    kube_api[matches] << hold
    settings = Settings(resync_seconds=RESYNC, tick_seconds=0.25, retry_base_seconds=1.0, max_backoff_seconds=8.0)
    try:
        async with _operator(kube_api, kube_client, settings):
            for name in [*slow, "good"]:
                await kube_objects.create(_resource(name, db))
            await eventually(lambda: all(_observed(kube_objects, n) == 1 for n in [*slow, "good"]), timeout=60,
                             interval=0.1, message="all reconciled once")
            holding["on"] = True
            await eventually(lambda: sum(1 for r in iter_requests(kube_api, "GET") if matches(r))
                             >= len(slow), timeout=30, interval=0.1, message="the four reads held")
            before, reads = _secret_reads(kube_api, "good"), _mdb_gets(kube_api, "good")
            try:
                await eventually(lambda: _secret_reads(kube_api, "good") >= before + 2, timeout=20, interval=0.2,
                                 message="good resynced twice while four reads hang")
            except TimeoutError as exc:
                raise AssertionError(f"good not resynced for 20 s (resync {RESYNC} s): "
                                     f"{_secret_reads(kube_api, 'good') - before} reconcile(s), "
                                     f"{_mdb_gets(kube_api, 'good') - reads} read(s) by the scheduler") from exc
            finally:
                holding["on"] = False
                released.set()
    finally:
        released.set()


# -- 3. a queued job's packed inputs rebuild the spec reconcile planned from -------------------------

def _at_limits() -> Case:
    """The example grown to the CRD's list bounds: 200 indexes, 50 views."""
    document = copy.deepcopy(EXAMPLE)
    spec = document["spec"]
    indexes, views = spec["indexes"], spec.get("materializedViews", [])
    spec["indexes"] = [{**copy.deepcopy(indexes[i % len(indexes)]), "name": f"idx_limit_{i}"} for i in range(200)]
    spec["materializedViews"] = [{**copy.deepcopy(views[i % len(views)]), "name": f"mv_limit_{i}"}
                                 for i in range(50)] if views else []
    return Case("at the CRD's list bounds", "ok", document)


@pytest.mark.parametrize("case", [c for c in CORPUS if c.layer == "ok"] + [_at_limits()], ids=lambda c: c.id)
def test_packed_inputs_round_trip_every_accepted_spec(case: Any) -> None:
    """jobs.pack/unpack (0456b0e) against every spec the admission corpus accepts, not only the
    example: a field that does not survive model_dump(mode="json", by_alias=True) and back would
    make a queued job build another desired state than the one planned and approved."""
    body = copy.deepcopy(case.document)
    body.setdefault("metadata", {}).update(name="shop", namespace=NS)
    spec = MarketplaceDB.model_validate(body).spec
    expected = planning.desired_state(spec, "prod/shop", ["work_mem"])
    assert jobs.unpack(jobs.pack(spec, "prod/shop", ["work_mem"])) == expected


# -- 4. the memory trim ------------------------------------------------------------------------------

def test_trimming_freed_memory_starts_no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """scheduler.trim() runs once a minute in the operator (and cap_arenas() at start); each call
    looks libc up with ctypes.util.find_library, which on Linux runs `/sbin/ldconfig -p` every time
    (and `file -b <python>` the first time): a fork/exec of a process with the operator's RSS and
    threads, ~0.1 s, each minute; in an image without ldconfig it finds nothing and trims nothing,
    silently."""
    started: list[Any] = []
    original = subprocess.Popen.__init__

    def recorded(self: Any, *args: Any, **kwargs: Any) -> None:
        started.append(args[0] if args else kwargs.get("args"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", recorded)
    scheduler.trim()
    scheduler.trim()
    assert started == [], f"trim() started {len(started)} process(es): {started}"
