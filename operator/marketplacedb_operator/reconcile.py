"""One level-based reconcile: observe, plan, act, report. No kopf here.

Every trigger (a new generation, a trigger annotation, the periodic timer) calls reconcile() with
the object as it is now; nothing depends on what changed. Re-running after a crash at any point
converges: DDL is planned from the catalog, manifests are applied idempotently, status is
recomputed from scratch.

The parts live beside it: reconcile_database.py (schema, refreshes), reconcile_objects.py
(CronJobs, pooler, probes), reconcile_context.py (what they share: Context, the database).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from . import metrics
from .api.errors import format_errors
from .api.v1alpha1 import MarketplaceDB, MarketplaceDBStatus, OwnedObject
from .owned import Record
from .ports import Database, Deps
from .reconcile_context import Context, DatabaseUnavailable, close_quietly, open_database, previous_status, scrubbed
from .reconcile_database import refreshes, schema
from .reconcile_objects import cronjobs, pooler, probes
from .status import Event, Problem, Report, compute

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    events: list[Event]
    temporary: bool  # a retry with backoff is due (unreachable database, missing Secret, ...)
    requeue_after: float
    status: dict[str, Any] | None = None  # the status as written (or found already in place)


def reconcile(body: dict[str, Any], deps: Deps) -> Outcome:
    started = time.perf_counter()
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    previous = previous_status(body)
    report = Report()
    try:
        spec = MarketplaceDB.model_validate(body).spec
    except ValidationError as exc:
        report.spec_problem = Problem("InvalidSpec", _validation_message(exc))
        return _finish(body, deps, previous, report, started, temporary=False)
    ctx = Context(body, spec, previous, deps, deps.now(), owned=_owned_record(previous))
    report.pooler_enabled, report.pooler_replicas = spec.pooler.enabled, spec.pooler.replicas
    database: Database | None = None
    try:
        database = open_database(ctx)
    except DatabaseUnavailable as exc:
        report.database_problem = exc.problem
    try:
        if database is not None:
            try:
                schema(ctx, database, report)
                refreshes(ctx, database, report)
            except Exception as exc:  # a session cut mid-reconcile (restart, pg_terminate_backend)
                report.database_problem = Problem("DatabaseError", scrubbed(exc, ctx))
                close_quietly(database)
                database = None
        # Each part is isolated: an exception (a 422 on a probe patch, a pooler config error, an
        # API outage) becomes that part's condition and a bounded backoff, never an escaped error
        # that would leave status unwritten and the whole reconcile re-running every tick.
        _isolated(ctx, report, "refresh", "CronJobApplyFailed", lambda: cronjobs(ctx, report))
        _isolated(ctx, report, "pooler", "PoolerApplyFailed", lambda: pooler(ctx, database, report))
        _isolated(ctx, report, "probes", "ProbesApplyFailed", lambda: probes(ctx, report))
    finally:
        if database is not None:
            close_quietly(database)
    _record_metrics(namespace, name, report, time.perf_counter() - started)
    temporary = (
        report.database_problem is not None
        or report.pooler_problem is not None and not report.pooler
        or bool(report.crashed)
        or report.retry_soon
    )
    return _finish(body, deps, previous, report, started, temporary=temporary, ctx=ctx)


def _isolated(ctx: Context, report: Report, part: str, reason: str, action: Callable[[], None]) -> None:
    """Run one part; an exception becomes `<part>_problem` (and a backoff), never an escape."""
    try:
        action()
    except Exception as exc:
        log.warning("%s/%s: part %s failed: %s", ctx.namespace, ctx.name, part, type(exc).__name__)
        setattr(report, f"{part}_problem", Problem(reason, scrubbed(exc, ctx)))
        report.crashed.append(part)


def _record_metrics(namespace: str, name: str, report: Report, seconds: float) -> None:
    problems = [
        report.database_problem,
        report.schema_problem,
        report.refresh_problem,
        report.pooler_problem,
        report.probes_problem,
    ]
    metrics.record_reconcile(
        namespace,
        name,
        seconds,
        invalid_indexes=sum(1 for i in report.indexes if i.state in ("Invalid", "Failed")),
        drifted=len(report.drifted),
        pooler_ready=report.pooler.ready_replicas if report.pooler else None,
        problems=[p.reason for p in problems if p is not None],
    )
    progress = report.progress
    metrics.record_progress(namespace, name, progress is not None, progress.blocks_done if progress else None,
                            progress.blocks_total if progress else None)


def _validation_message(exc: ValidationError) -> str:
    lines = format_errors(exc)
    more = f" (and {len(lines) - 10} more)" if len(lines) > 10 else ""
    return "; ".join(lines[:10]) + more


def _finish(
    body: dict[str, Any],
    deps: Deps,
    previous: MarketplaceDBStatus | None,
    report: Report,
    started: float,
    *,
    temporary: bool,
    ctx: Context | None = None,
) -> Outcome:
    generation = body["metadata"].get("generation")
    status, events = compute(previous, report, generation, deps.now())
    if ctx is not None:
        status.managed_settings = (
            sorted(ctx.spec.database.settings)
            if report.database_problem is None
            else (previous.managed_settings if previous else [])
        )
        status.probed_deployments = sorted(p.deployment for p in ctx.spec.health_probes)
    elif previous is not None:  # an invalid spec: keep what teardown will need to undo
        status.managed_settings, status.probed_deployments = previous.managed_settings, previous.probed_deployments
    # A refresh-now value counts as handled only once every refresh it asked for ran or was refused
    # for good (not when the database was unreachable or another refresh held the view's lock).
    status.handled_refresh_request = report.handled_refresh_request or (
        previous.handled_refresh_request if previous else None
    )
    status.owned_objects = _owned_list(ctx.owned) if ctx is not None else (previous.owned_objects if previous else [])
    rendered = status.model_dump(by_alias=True, mode="json", exclude_none=True)
    live = comparable_status(body.get("status"))
    if rendered != live:
        # A merge patch keeps keys it does not mention: a field that is gone (progress after a
        # build, plan after approval) is deleted with an explicit null, or it would stay forever
        # and every later reconcile would see a difference and write again.
        gone = {key: None for key in (live if isinstance(live, dict) else {}) if key not in rendered}
        deps.kube.patch_status(body["metadata"]["namespace"], body["metadata"]["name"], {**rendered, **gone})
    requeue = deps.settings.resync_seconds
    if report.refresh_due_seconds is not None:  # mode Operator: wake up when the next refresh is due
        requeue = min(requeue, max(1.0, report.refresh_due_seconds))
    if not temporary and report.pooler_enabled and (report.pooler is None or report.pooler.ready_replicas == 0):
        requeue = min(requeue, 15.0)  # pooler pods starting: look again soon
    if report.progress is not None and report.progress.phase != "queued":
        # Background DDL running: report its progress. A queued job is not polled (at N = 1,000 on
        # one pool most jobs wait, and a look every progress_seconds at each was most of the
        # operator's work): its start and its end wake the resource (Background.on_done).
        requeue = min(requeue, deps.settings.progress_seconds)
    return Outcome(events=events, temporary=temporary, requeue_after=requeue, status=rendered)


def _owned_record(previous: MarketplaceDBStatus | None) -> Record:
    return {(o.api_version, o.kind, o.name): o.uid for o in (previous.owned_objects if previous else [])}


def _owned_list(record: Record) -> list[OwnedObject]:
    return [OwnedObject(api_version=a, kind=k, name=n, uid=u) for (a, k, n), u in sorted(record.items())]


def comparable_status(status: Any) -> Any:
    """The live status as our own dump would render it, so an unchanged status is not rewritten."""
    if not isinstance(status, dict):
        return status
    try:
        parsed = MarketplaceDBStatus.model_validate(status)
    except ValidationError:
        return status
    return parsed.model_dump(by_alias=True, mode="json", exclude_none=True)
