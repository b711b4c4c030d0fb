"""kopf wiring, and nothing else: every handler calls the same level-based reconcile().

Why an event handler plus a scheduler rather than on.create/on.update: kopf's change detection
keeps a copy of the whole spec in an annotation (a large spec would outgrow the 256 KiB annotation
limit) and retries through progress annotations (more writes). Reconcile is level-based: a watch
event for a new generation or a trigger annotation runs it at once; one scheduler thread
(scheduler.py) runs it when due (periodic drift detection, or the next attempt of a bounded
exponential backoff). kopf keeps no state on the object except the finalizer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import datetime
import hashlib
import json
import logging
import math
import threading
import zlib
from collections.abc import Mapping
from typing import Any, cast

import kopf

from . import naming, webhook
from .background import Background
from .backoff import delay as backoff_delay
from .ports import Deps
from .reconcile import Outcome, comparable_status, reconcile
from .scheduler import PeeringPause, Scheduler, SchedulerStalled, cap_arenas, peering_priority
from .teardown import teardown

log = logging.getLogger(__name__)

# What kopf itself needs from RBAC, as (apiGroup, resource, verbs); install.py builds the chart's
# and deploy/install.yaml's rules from these and gateways/kube.py's RBAC_NEEDS, and
# tests/test_rbac.py checks both ways. https://kopf.readthedocs.io/en/stable/deployment/#rbac
RBAC_NEEDS: list[tuple[str, str, tuple[str, ...]]] = [
    (naming.GROUP, naming.PLURAL, ("list", "watch", "patch")),  # the watch; finalizer and annotations
    ("", "events", ("create",)),  # kopf.event() posts core v1 Events
]
# Cluster-scoped in every mode: kopf watches CRDs so a re-installed CRD is noticed without a restart
# (else it logs "Not enough permissions to watch for resources" and carries on). Namespaces are not
# granted: kopf lists them only for named namespaces, falling back to the names given (observation.py).
RBAC_NEEDS_CLUSTER: list[tuple[str, str, tuple[str, ...]]] = [
    ("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),
]
# With `--peering NAME` only: KopfPeering in each watched namespace, ClusterKopfPeering cluster-wide.
RBAC_NEEDS_PEERING: list[tuple[str, str, tuple[str, ...]]] = [
    ("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch")),
    ("kopf.dev", "clusterkopfpeerings", ("get", "list", "watch", "patch")),
]


# Threads for reconciles triggered by events (a new generation, a trigger annotation), and for
# the periodic ones (resync, retries) that the scheduler runs.
EVENT_RECONCILES = 4
RESYNC_RECONCILES = 4
# kopf's worker per object keeps its last event (the parsed body, ~21 KiB) until idle this long (5 s by
# default): a bulk create of 1,000 held ~1,000 at once (tests/test_operator_memory.py); re-created on events.
KOPF_WORKER_IDLE_SECONDS = 0.5


class ResourceState:
    """Per-resource memory of the operator process (lost on restart: reconcile is level-based)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handled_generation: int | None = None
        self.handled_triggers: tuple[str, str] = ("", "")
        self.next_due: float = 0.0
        # A reconcile was asked for and did not run (it found the lock held; a background job
        # woke the resource): the scheduler runs one from a fresh read, which clears this.
        self.pending = False
        # (generation, triggers) an event reconcile was queued for and has not started yet: later
        # events for the same (kopf's finalizer patch, our status write) queue no second one.
        self.queued: tuple[Any, tuple[str, str]] | None = None
        self.failures = 0  # consecutive reconciles that hit a temporary problem (for the backoff)
        self.released: set[str] = set()  # Deployments whose probes teardown already released
        self.deletion_seen = 0.0  # when this process first tried teardown (epoch seconds)
        # A digest of the status this process last wrote (or found in place): a body with another
        # status may predate that write, and is read again before it is reconciled (_current).
        # A digest, not the status: 32 bytes instead of a copy of it for every resource.
        self.written: bytes | None = None
        # on_delete tore the resource down (set under the lock): a reconcile still queued with an
        # older body must not put back what teardown removed (tests/test_loop_deleted.py).
        self.deleted = False


def _state(memo: kopf.Memo) -> ResourceState:
    state = memo.get("state")
    if not isinstance(state, ResourceState):
        state = ResourceState()
        memo["state"] = state
    return state


def _wanted(body: Mapping[str, Any]) -> tuple[Any, tuple[str, str]]:
    """What an event asks a reconcile for: the object's generation and its trigger annotations."""
    return body.get("metadata", {}).get("generation"), _triggers(body)


def _triggers(body: Mapping[str, Any]) -> tuple[str, str]:
    annotations = body.get("metadata", {}).get("annotations") or {}
    return annotations.get(naming.ANN_REFRESH_NOW, ""), annotations.get(naming.ANN_APPROVE_PLAN, "")


def _run(deps: Deps, body: Mapping[str, Any], state: ResourceState, logger: Any) -> None:
    """Reconcile once (serialized per resource), post Events, schedule the next run.

    A run that cannot take the lock does not happen; it leaves a request (`pending`) that the
    scheduler serves with a fresh read once the lock is free, and never leaves next_due infinite
    (on_event set it so) nor its own `queued` behind. The order matters: it sets `pending` and
    then looks at the lock; the holder releases the lock and then looks at `pending`: one of the
    two always sees the other and re-arms next_due."""
    wanted = _wanted(body)
    if not state.lock.acquire(blocking=False):
        if state.queued == wanted:  # nothing is queued for it any more: the scheduler's run covers it
            state.queued = None
        state.pending = True
        if not state.lock.locked():  # the holder released meanwhile, perhaps before `pending` was set
            state.next_due = 0.0
        return
    try:
        if state.deleted:  # queued before on_delete tore it down: its body is stale, nothing to do
            return
        try:
            current = _current(deps, body, state)
            if current is None:  # deleted meanwhile: on_delete's business (the scheduler looks again)
                state.next_due = deps.monotonic() + deps.settings.resync_seconds
                return
            state.handled_generation = current.get("metadata", {}).get("generation")
            state.handled_triggers = _triggers(current)
            # Cleared once `handled` says the same: an event for it in between is deduplicated
            # by one or the other, never queued a second time (a duplicate reconcile).
            if state.queued == wanted:
                state.queued = None
            outcome: Outcome | None = reconcile(current, deps)
            if outcome is not None and outcome.status is not None:
                state.written = _digest(outcome.status)
        except Exception as exc:  # reconcile isolates its parts; this is the last line (e.g. status 422)
            logger.warning("reconcile failed, retrying with backoff: %s", type(exc).__name__)
            outcome = None
        temporary = outcome is None or outcome.temporary
        state.failures = state.failures + 1 if temporary else 0
        delay = backoff(deps, state.failures) if temporary or outcome is None else outcome.requeue_after
        state.next_due = 0.0 if state.pending else deps.monotonic() + delay
        about = body if isinstance(body, kopf.Body) else kopf.Body(cast(kopf.RawBody, dict(body)))
        for event in outcome.events if outcome is not None else []:
            try:
                kopf.event(about, type=event.type, reason=event.reason, message=event.message)
            except Exception:  # an Event is best effort; never a reason to spin
                logger.debug("posting an Event failed", exc_info=True)
        if outcome is not None and outcome.events:
            logger.info("conditions changed: %s", "; ".join(e.message for e in outcome.events))
    finally:
        if state.queued == wanted:  # a run that failed before reconcile(): nothing queued for it either
            state.queued = None
        state.lock.release()
    if state.pending:  # asked for after next_due was chosen above (a run that found the lock held)
        state.next_due = 0.0


def _pack(body: Mapping[str, Any]) -> bytes:  # compressed JSON: ~1.7 KB, not ~21 KiB parsed, while queued
    return zlib.compress(json.dumps(dict(body), separators=(",", ":")).encode(), 1)


def _run_packed(deps: Deps, packed: bytes, state: ResourceState, logger: Any) -> None:
    _run(deps, kopf.Body(cast(kopf.RawBody, json.loads(zlib.decompress(packed)))), state, logger)


def _current(deps: Deps, body: Mapping[str, Any], state: ResourceState) -> dict[str, Any] | None:
    """The object to reconcile: the body as delivered, or read again when its status is not the
    one this process last wrote. Such a body may predate that write (kopf's own annotation patch
    can land between a reconcile's read and its status write; the watch then delivers the old
    status under a new resourceVersion): compared with it, an unchanged status would be written
    again and its condition transitions posted as Events again. resourceVersions are opaque
    (no ordering), so the API server is asked; a steady state never needs to (same status)."""
    current = dict(body)
    if state.written is None or _digest(comparable_status(current.get("status"))) == state.written:
        return current
    meta = current.get("metadata", {})
    fresh = deps.kube.get(naming.API_VERSION, naming.KIND, str(meta.get("namespace")), str(meta.get("name")))
    if fresh is None or fresh.get("metadata", {}).get("deletionTimestamp"):
        return None
    return fresh


def _digest(status: Any) -> bytes:
    return hashlib.sha256(json.dumps(status, sort_keys=True, separators=(",", ":")).encode()).digest()


def _teardown_deadline(body: kopf.Body, deps: Deps, state: ResourceState) -> float:
    """When teardown gives up (epoch seconds): the deletionTimestamp plus the timeout. The
    timestamp survives an operator restart; without one, the first attempt this process saw."""
    stamp = body.get("metadata", {}).get("deletionTimestamp")
    started = state.deletion_seen or deps.now().timestamp()
    state.deletion_seen = started
    if isinstance(stamp, str):
        try:
            started = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return started + deps.settings.teardown_timeout_seconds


def backoff(deps: Deps, failures: int) -> float:
    """Exponential backoff with jitter, bounded (backoff.py, the one policy): no hot loop against a dead database."""
    settings = deps.settings
    return backoff_delay(settings.retry_base_seconds, failures - 1, settings.max_backoff_seconds)


class SeenMarkerStorage(kopf.DiffBaseStorage):
    """kopf's diff base, reduced to a marker.

    kopf keeps a copy of the spec (its "essence") in an annotation to tell creation from update;
    a large spec would outgrow the 256 KiB annotation limit. This operator has no create/update
    handlers (reconcile is level-based) and needs kopf only for deletion (the finalizer), so it
    stores one small annotation and reports "unchanged" once it is there.
    """

    key = f"{naming.ANNOTATION_PREFIX}/seen"

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        annotations = body.get("metadata", {}).get("annotations") or {}
        return self.build(body=body) if self.key in annotations else None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        annotations = body.get("metadata", {}).get("annotations") or {}
        if annotations.get(self.key) != "true":
            patch.setdefault("metadata", {}).setdefault("annotations", {})[self.key] = "true"


def register(registry: kopf.OperatorRegistry, deps: Deps) -> None:
    """Register the handlers on `registry` (tests pass their own; `run` uses the default one)."""
    group, version, plural = naming.GROUP, naming.VERSION, naming.PLURAL
    states: dict[str, ResourceState] = {}  # namespace/name -> state, for waking a resource

    def wake(key: tuple[str, str]) -> None:
        """A background job started or ended: reconcile its resource at the next tick to report it."""
        state = states.get(key[0])
        if state is not None:
            state.pending = True  # also when the reconcile that submitted it is still running
            if state.queued is None:  # else the queued event reconcile runs first and then sees `pending`
                state.next_due = 0.0

    if deps.background is None:
        deps.background = Background(
            deps.settings.max_background_jobs, deps.settings.max_background_jobs_per_database, on_done=wake
        )
    background = deps.background

    def tracked(body: kopf.Body, state: ResourceState) -> bool:
        """Track the state; True when it was not tracked (new, or dropped by a read that found nothing)."""
        meta = body.get("metadata", {})
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        new, states[key] = states.get(key) is not state, state
        return new

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's own state lives under our annotation prefix; only the finalizer is ever written.
        settings.persistence.finalizer = naming.FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = SeenMarkerStorage()
        # Events are posted on condition transitions by us, not for every kopf log line.
        settings.posting.level = logging.CRITICAL
        settings.queueing.idle_timeout = KOPF_WORKER_IDLE_SECONDS
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.peering.lifetime = max(2, deps.settings.peering_lifetime_seconds)
        if webhook.enabled(deps.settings):
            settings.admission.server = kopf.WebhookServer(**webhook.server_options(deps.settings))

    if webhook.enabled(deps.settings):  # kopf refuses validate handlers without a server

        @kopf.on.validate(group, version, plural, id=webhook.HANDLER_ID, operations=["CREATE", "UPDATE"],
                          registry=registry)
        def validate(body: kopf.Body, **kwargs: Any) -> None:
            old = kwargs.get("old")  # the stored object on UPDATE
            problem = webhook.verdict(dict(body), dict(old) if old is not None else None)
            if problem is not None:
                raise kopf.AdmissionError(problem, code=422)

    # Event-driven reconciles run on this pool, not on kopf's handler threads, and on_event is async
    # and returns at once: kopf then writes its finalizer and `seen` marker right after the first
    # event instead of after a reconcile queued behind every other resource's on kopf's few
    # handler threads (else a restart soon after a bulk create writes that bookkeeping then).
    reconciles = concurrent.futures.ThreadPoolExecutor(max_workers=EVENT_RECONCILES, thread_name_prefix="reconcile")

    @kopf.on.event(group, version, plural, registry=registry)
    async def on_event(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        state = _state(memo)
        if state.deleted:  # the name created again (kopf's memo is per uid; this holds regardless)
            state = memo["state"] = ResourceState()
        if scheduler.context is None:  # kopf's context variables (kopf.event's queue) for its threads
            scheduler.context = contextvars.copy_context()
        wanted = _wanted(body)
        run = wanted != (state.handled_generation, state.handled_triggers) and wanted != state.queued
        if run:
            # The queued reconcile runs it: the scheduler must not run the same reconcile beside it
            # (after a restart every resource was reconciled twice at once). _run sets next_due,
            # also when it cannot run. Set before the scheduler sees a new resource (tracked).
            state.queued, state.next_due = wanted, math.inf
        if tracked(body, state) and not run and state.queued is None:
            state.next_due = 0.0  # re-tracked with nothing new: due now, else no resync ever again
        if run:
            # kopf.event() finds its posting queue through context variables: carry them over. Packed:
            context = contextvars.copy_context()  # after a bulk create ~1,000 wait here for minutes
            asyncio.get_running_loop().run_in_executor(reconciles, context.run, _run_packed, deps, _pack(body), state,
                                                       logger)

    # The periodic reconciles (resync, retries with backoff) run from one scheduler thread, not a
    # kopf timer per object: kopf keeps a live copy of the body of each object with a timer
    # (scheduler.py). Started and stopped with the operator; paused while kopf is paused.
    pause = PeeringPause()
    scheduler = Scheduler(deps, states, lambda body, state, logger: _run(deps, body, state, logger),
                          workers=RESYNC_RECONCILES, backoff=lambda failures: backoff(deps, failures), pause=pause)

    @kopf.on.startup(registry=registry)
    def start_scheduler(**_: Any) -> None:
        pause.attach()
        scheduler.start()

    @kopf.on.probe(id="scheduler", registry=registry)
    def scheduler_health(**_: Any) -> dict[str, Any]:
        # /healthz (kopf's liveness endpoint) fails while this raises: a dead or stalled scheduler
        # means no resync, retry or background-job report for any resource.
        try:
            return scheduler.health()
        except SchedulerStalled as exc:
            raise kopf.PermanentError(str(exc)) from None  # permanent: kopf would retry the probe

    @kopf.on.cleanup(registry=registry)
    def stop_scheduler(**_: Any) -> None:
        scheduler.stop()
        pause.detach()

    @kopf.on.delete(group, version, plural, registry=registry)
    def on_delete(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        state = _state(memo)
        meta = body.get("metadata", {})
        resource = f"{meta.get('namespace')}/{meta.get('name')}"
        # A deleted resource's background work stops now (its session is terminated): deletion is
        # never delayed by a build blocked on an old snapshot, and Drop never races a build.
        for kind in ("schema", "refresh"):
            background.cancel((resource, kind), wait=10.0)
        if states.get(resource) is state:
            states.pop(resource, None)
        with state.lock:
            state.deleted = True  # a reconcile queued meanwhile takes the lock after teardown: it stops
            # Again under the lock: a reconcile that was running when the first cancel ran may
            # have queued new work since, which would plan against the database after teardown.
            for kind in ("schema", "refresh"):
                background.cancel((resource, kind), wait=10.0)
            result = teardown(dict(body), deps, state.released)
        if result.problem is None:
            logger.info("teardown done (deletionPolicy honoured)")
            return
        remaining = _teardown_deadline(body, deps, state) - deps.now().timestamp()
        if remaining > 0:
            # The finalizer stays while teardown may still succeed; retried with backoff.
            state.failures += 1
            raise kopf.TemporaryError(result.problem, delay=max(1.0, min(remaining, backoff(deps, state.failures))))
        timeout = deps.settings.teardown_timeout_seconds
        message = (f"finalizer released after {timeout:g}s without teardown; retained: "
                   f"{', '.join(result.retained) or 'nothing known'}; last problem: {result.problem}")
        logger.warning("%s", message)
        try:
            kopf.event(body, type="Warning", reason="TeardownTimedOut", message=message[:1000])
        except Exception:  # the Event is best effort; the deletion must finish regardless
            logger.debug("posting the TeardownTimedOut Event failed", exc_info=True)


def run_operator(deps: Deps, *, namespaces: list[str], peering: str | None, liveness_endpoint: str) -> None:
    """Run kopf until stopped (SIGTERM/SIGINT), with the real cluster's credentials."""
    cap_arenas()  # before kopf's and our threads allocate (scheduler.py: memory)
    registry = kopf.OperatorRegistry()
    register(registry, deps)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In-cluster service account, else the current kubeconfig context.
        return kopf.login_via_client(**kwargs)

    kopf.run(
        registry=registry,
        standalone=peering is None,
        peering_name=peering,
        priority=peering_priority(),
        namespaces=namespaces,
        clusterwide=not namespaces,
        liveness_endpoint=liveness_endpoint,
    )
