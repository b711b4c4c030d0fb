"""The database parts of a reconcile: the schema (indexes, views, settings) and refreshes.

Long work (index builds, mode Operator refreshes) is submitted to the background pool (jobs.py);
these functions report a job's progress while it runs and its outcome once. No kopf here.
"""

from __future__ import annotations

import logging
from typing import Any

from . import jobs, metrics, naming
from .api.v1alpha1 import PlanStatus
from .ports import Database
from .reconcile_context import Context, background_job, scrubbed
from .sql import plan as planning
from .sql import refresh_truth
from .sql import report as schema_report
from .status import Problem, Report

log = logging.getLogger(__name__)


def schema(ctx: Context, database: Database, report: Report) -> None:
    previous_settings = ctx.previous.managed_settings if ctx.previous else []
    desired = planning.desired_state(ctx.spec, ctx.owner, previous_settings)
    catalog = database.observe(desired)
    plan = planning.plan(desired, catalog)
    report.advice = schema_report.advice(desired, catalog) + list(plan.notes)
    outcomes: list[Any] = []
    running, finished = background_job(ctx, jobs.SCHEMA)
    if finished is not None:  # a background run ended: report its outcome (once)
        outcomes = list(finished.result or [])
        metrics.record_ddl(ctx.namespace, ctx.name, sum(o.ok for o in outcomes), sum(not o.ok for o in outcomes))
        if finished.error:
            report.schema_problem = Problem("DDLFailed", finished.error.replace(ctx.password or "\0", "***"))
    retry_later = finished is not None and (finished.error is not None or any(not o.ok for o in outcomes))
    if running is not None:
        if running.started is None and ctx.deps.background is not None:  # still queued: start from today's spec
            manual = ctx.spec.ddl.approval == "Manual"
            approved = (ctx.annotation(naming.ANN_APPROVE_PLAN) or "") if manual else plan.hash
            policy = planning.ExecutionPolicy.from_spec(ctx.spec.ddl, ctx.deps.settings)
            ctx.deps.background.refresh_inputs(running.key, (
                jobs.pack(ctx.spec, ctx.owner, previous_settings), approved, policy, manual))
        report.progress = jobs.progress(running, database, len(plan.steps))
    elif not plan.empty and not retry_later:  # a failed run is retried at the next resync, not now
        if ctx.spec.ddl.approval == "Manual" and ctx.annotation(naming.ANN_APPROVE_PLAN) != plan.hash:
            report.plan = PlanStatus(hash=plan.hash, steps=plan.descriptions(), approved=False)
            report.schema_problem = Problem(
                "AwaitingApproval",
                f"{len(plan.steps)} step(s) wait for approval: annotate {naming.ANN_APPROVE_PLAN}={plan.hash}",
            )
        elif ctx.deps.background is not None and ctx.info is not None:
            policy = planning.ExecutionPolicy.from_spec(ctx.spec.ddl, ctx.deps.settings)
            packed = jobs.pack(ctx.spec, ctx.owner, previous_settings)  # not `desired`: most jobs wait (jobs.pack)
            job = jobs.submit_schema(ctx.deps, jobs.key(ctx.namespace, ctx.name, jobs.SCHEMA), ctx.info, packed,
                                     plan.hash, policy, manual=ctx.spec.ddl.approval == "Manual")
            report.progress = jobs.progress(job, database, len(plan.steps))
        else:  # no background pool (the CLI): inline
            policy = planning.ExecutionPolicy.from_spec(ctx.spec.ddl, ctx.deps.settings)
            outcomes = database.execute(plan, policy)
            metrics.record_ddl(ctx.namespace, ctx.name, sum(o.ok for o in outcomes), sum(not o.ok for o in outcomes))
            catalog = database.observe(desired)
    report.indexes = schema_report.index_statuses(desired, catalog, outcomes)
    report.views = schema_report.view_statuses(desired, catalog, outcomes)
    # Only a failed build's blockers explain a condition; a build that waited and then succeeded
    # listed them once and the next reconcile cleared them: a write owed after Ready (a restart
    # in that window was not quiet). Its waits are in the log instead.
    report.blocking = schema_report.blocking_status(s for o in outcomes if not o.ok for s in o.blocking)
    for waited in (o for o in outcomes if o.ok and o.blocking):
        log.info("%s/%s: %s built after waiting for %d session(s)", ctx.namespace, ctx.name, waited.object,
                 len(waited.blocking))
    report.drifted = [i.name for i in report.indexes if i.state in ("Drifted", "Invalid")]
    report.drifted += [v.name for v in report.views if v.message.startswith("Drifted")]
    failed = [o for o in outcomes if not o.ok]
    conflicts = list(plan.conflicts) + [f"index {i.name}: {i.message}" for i in report.indexes if i.state == "Conflict"]
    conflicts += [f"view {v.name}: {v.message}" for v in report.views if v.message.startswith("Conflict")]
    if failed:
        report.schema_problem = Problem("DDLFailed", "; ".join(f"{o.object}: {o.message}" for o in failed))
    elif conflicts:
        report.schema_problem = Problem("Conflict", "; ".join(dict.fromkeys(conflicts)))
    elif report.progress is not None and report.schema_problem is None:
        # A retry after a failure keeps reporting the failure (no DDLFailed/Applying flapping,
        # no Event per retry), with the retry's progress appended.
        last = next((c for c in (ctx.previous.conditions if ctx.previous else []) if c.type == "SchemaApplied"), None)
        if last is not None and last.reason == "DDLFailed":
            first = last.message.split("; retrying in the background")[0]
            report.schema_problem = Problem("DDLFailed", f"{first}; retrying in the background: "
                                            f"{jobs.describe(report.progress)}")
        else:
            report.schema_problem = Problem("Applying", jobs.describe(report.progress))


def refreshes(ctx: Context, database: Database, report: Report) -> None:
    """Operator-mode refreshes that are due, on-demand refreshes, then status from the state table.

    The truth (failures from any scheduler, never-refreshed views, next due time) is computed by
    sql/refresh_truth.py from the rows of this resource's declared views, keyed by (schema, view).
    A resource without views never touches the operator's schema.
    """
    views = ctx.spec.materialized_views
    if not views:
        metrics.set_view_metrics(ctx.namespace, ctx.name, [], ctx.now)
        return
    unreadable: Problem | None = None
    try:
        states = refresh_truth.by_key(database.refresh_states())
    except Exception as exc:  # e.g. no privilege on the operator's schema: say so, views go stale
        states, unreadable = {}, Problem("RefreshStateUnreadable", scrubbed(exc, ctx))
    request = ctx.annotation(naming.ANN_REFRESH_NOW)
    requested = bool(request) and request != (ctx.previous.handled_refresh_request if ctx.previous else None)
    failures: list[str] = []
    attempted: set[str] = set()
    running, finished = background_job(ctx, jobs.REFRESH)
    if finished is not None:  # background refreshes ended: their outcome, once
        results = list(finished.result or [])
        attempted |= {r.view for r in results}
        failures += [f"{r.view}: {r.error or r.reason}" for r in results if not r.ok]
        if finished.error or any(r.outcome == "skipped-busy" for r in results):
            report.retry_soon = True  # unreachable, or another refresh held a lock: not handled
        elif finished.tag and finished.tag == request:
            report.handled_refresh_request = request
        if finished.error:
            failures.append(finished.error.replace(ctx.password or "\0", "***"))
    requested = requested and report.handled_refresh_request != request and not report.retry_soon
    wanted = []
    for view in views:
        due_in = refresh_truth.operator_due_in(view, states.get((view.schema_name, view.name)), ctx.now)
        if requested or (due_in is not None and due_in <= 0):
            wanted.append(view)
    # Not while this resource's DDL runs in the background: a view may be created or swapped.
    if wanted and running is None and finished is None and report.progress is None:
        if ctx.deps.background is not None and ctx.info is not None:
            job_key = jobs.key(ctx.namespace, ctx.name, jobs.REFRESH)
            jobs.submit_refresh(ctx.deps, job_key, ctx.info, wanted, requested, request if requested else "")
        else:  # no background pool (the CLI): inline
            outcomes = [database.refresh(view, ctx.now, requested) for view in wanted]
            attempted |= {view.name for view in wanted}
            failures += [f"{v.schema_name}.{v.name}: {r.error or r.reason}"
                         for v, r in zip(wanted, outcomes, strict=True) if not r.ok]
            if requested and all(r.outcome != "skipped-busy" for r in outcomes):
                report.handled_refresh_request = request
            elif requested:
                report.retry_soon = True  # another refresh holds a view's lock: ask again after a backoff
    if attempted and unreadable is None:
        try:
            states = refresh_truth.by_key(database.refresh_states())
        except Exception as exc:
            unreadable = Problem("RefreshStateUnreadable", scrubbed(exc, ctx))
    previous = {v.name: v for v in ctx.previous.materialized_views} if ctx.previous else {}
    truth = refresh_truth.assess(views, report.views, states, previous, ctx.now, frozenset(attempted))
    report.views = truth.views
    report.refresh_due_seconds = truth.due_in
    metrics.set_view_metrics(ctx.namespace, ctx.name, truth.series, ctx.now)
    report.refresh_scheduled = sum(1 for v in views if v.refresh and not v.refresh.suspend)
    recorded = {f.split(":", 1)[0] for f in truth.failing}
    failing = truth.failing + [f for f in failures if f.split(":", 1)[0] not in recorded]
    if failing:
        report.refresh_problem = Problem("RefreshFailed", "; ".join(failing))
    elif unreadable is not None:
        report.refresh_problem = unreadable
