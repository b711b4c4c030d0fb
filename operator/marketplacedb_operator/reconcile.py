"""One level-based reconcile: observe, plan, act, report. No kopf here.

Every trigger (a new generation, a trigger annotation, the periodic timer) calls reconcile() with
the object as it is now; nothing depends on what changed. Re-running after a crash at any point
converges: DDL is planned from the catalog, manifests are applied idempotently, status is
recomputed from scratch.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from . import credentials as creds
from . import jobs, metrics, naming, pooler_logins
from .api.errors import format_errors
from .api.v1alpha1 import (
    MarketplaceDB,
    MarketplaceDBSpec,
    MarketplaceDBStatus,
    OwnedObject,
    PlanStatus,
    PoolerStatus,
)
from .background import Job
from .owned import OWNED_KINDS, Record, SyncResult, sync_owned
from .ports import ConnInfo, Database, Deps
from .probe_sync import release as release_probes
from .probe_sync import sync_probes
from .redact import UNREACHABLE, describe_db_error
from .specs import cronjobs, pgbouncer, pooler_manifests, pooler_sizing
from .sql import plan as planning
from .sql import refresh_truth
from .sql import report as schema_report
from .status import Event, Problem, Report, compute

log = logging.getLogger(__name__)


class DatabaseUnavailable(Exception):
    """Credentials or connection problem; carries the Problem to report (never a secret)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Outcome:
    events: list[Event]
    temporary: bool  # a retry with backoff is due (unreachable database, missing Secret, ...)
    requeue_after: float
    status: dict[str, Any] | None = None  # the status as written (or found already in place)


@dataclasses.dataclass
class Context:
    body: dict[str, Any]
    spec: MarketplaceDBSpec
    previous: MarketplaceDBStatus | None
    deps: Deps
    now: datetime.datetime
    password: str = ""  # kept only to mask it in messages
    info: ConnInfo | None = None  # how this reconcile connected (background jobs connect alike)
    # status.ownedObjects: what proves a Kubernetes object is ours (owned.py); updated by sync_owned.
    owned: Record = dataclasses.field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def owner(self) -> str:
        return naming.owner_key(self.namespace, self.name)

    def annotation(self, key: str) -> str:
        return str((self.body["metadata"].get("annotations") or {}).get(key, ""))


def _previous_status(body: dict[str, Any]) -> MarketplaceDBStatus | None:
    try:
        return MarketplaceDBStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None  # status written by someone else: recompute from scratch


def reconcile(body: dict[str, Any], deps: Deps) -> Outcome:
    started = time.perf_counter()
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    previous = _previous_status(body)
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
        database = _open_database(ctx)
    except DatabaseUnavailable as exc:
        report.database_problem = exc.problem
    try:
        if database is not None:
            try:
                _schema(ctx, database, report)
                _refreshes(ctx, database, report)
            except Exception as exc:  # a session cut mid-reconcile (restart, pg_terminate_backend)
                report.database_problem = Problem("DatabaseError", _scrubbed(exc, ctx))
                _close_quietly(database)
                database = None
        # Each part is isolated: an exception (a 422 on a probe patch, a pooler config error, an
        # API outage) becomes that part's condition and a bounded backoff, never an escaped error
        # that would leave status unwritten and the whole reconcile re-running every tick.
        _isolated(ctx, report, "refresh", "CronJobApplyFailed", lambda: _cronjobs(ctx, report))
        _isolated(ctx, report, "pooler", "PoolerApplyFailed", lambda: _pooler(ctx, database, report))
        _isolated(ctx, report, "probes", "ProbesApplyFailed", lambda: _probes(ctx, report))
    finally:
        if database is not None:
            _close_quietly(database)
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
        setattr(report, f"{part}_problem", Problem(reason, _scrubbed(exc, ctx)))
        report.crashed.append(part)


def _close_quietly(database: Database) -> None:
    try:
        database.close()
    except Exception:  # closing a cut session must not turn a reported problem into an escape
        log.debug("closing the database session failed", exc_info=True)


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
    if report.progress is not None:  # background DDL: report its progress (its end wakes us anyway)
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


# --- the database -----------------------------------------------------------------------------


def _credentials(ctx: Context) -> tuple[str, str]:
    """The opted-in Secret's user and password (credentials.py: the rule, and no value in messages)."""
    info = _conn_info(ctx)
    return info.user, info.password


def _pooler_login(ctx: Context, ref: Any, field: str) -> tuple[str, str]:
    """A pooler login's Secret (spec.pooler.users[], authQuery), read under the owner's opt-in rule."""
    try:
        found = creds.read_ref(ctx.deps.kube, ctx.namespace, ref, field, ctx.name)
    except creds.CredentialsRefused as exc:
        raise DatabaseUnavailable(exc.problem) from None
    return found.user, found.password


def _scrubbed(exc: BaseException, ctx: Context) -> str:
    """A database failure as SQLSTATE and object names (redact.py): never server text or row values."""
    return describe_db_error(exc)


def _conn_info(ctx: Context) -> ConnInfo:
    try:
        return creds.conn_info(ctx.deps.kube, ctx.namespace, ctx.spec.database, ctx.deps.settings, ctx.name)
    except creds.CredentialsRefused as exc:
        raise DatabaseUnavailable(exc.problem) from None


def _open_database(ctx: Context) -> Database:
    info = _conn_info(ctx)
    ctx.password, ctx.info = info.password, info
    try:
        return ctx.deps.open_database(info)
    except Exception as exc:  # the gateway raises DatabaseUnreachable: a class, no server text
        message = str(exc).replace(info.password, "***") if info.password else str(exc)
        raise DatabaseUnavailable(Problem(getattr(exc, "reason", UNREACHABLE), message)) from None


def _schema(ctx: Context, database: Database, report: Report) -> None:
    previous_settings = ctx.previous.managed_settings if ctx.previous else []
    desired = planning.desired_state(ctx.spec, ctx.owner, previous_settings)
    catalog = database.observe(desired)
    plan = planning.plan(desired, catalog)
    report.advice = schema_report.advice(desired, catalog) + list(plan.notes)
    outcomes: list[Any] = []
    running, finished = _job(ctx, jobs.SCHEMA)
    if finished is not None:  # a background run ended: report its outcome (once)
        outcomes = list(finished.result or [])
        metrics.record_ddl(ctx.namespace, ctx.name, sum(o.ok for o in outcomes), sum(not o.ok for o in outcomes))
        if finished.error:
            report.schema_problem = Problem("DDLFailed", finished.error.replace(ctx.password or "\0", "***"))
    retry_later = finished is not None and (finished.error is not None or any(not o.ok for o in outcomes))
    if running is not None:
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
            job = jobs.submit_schema(ctx.deps, jobs.key(ctx.namespace, ctx.name, jobs.SCHEMA), ctx.info, plan, policy)
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


def _job(ctx: Context, kind: str) -> tuple[Job | None, Job | None]:
    """(the running job, the finished one not yet reported) of this resource and kind."""
    background = ctx.deps.background
    if background is None:
        return None, None
    job_key = jobs.key(ctx.namespace, ctx.name, kind)
    current = background.get(job_key)
    if current is not None and current.running:
        return current, None
    return None, background.take(job_key)


# --- refreshes --------------------------------------------------------------------------------


def _refreshes(ctx: Context, database: Database, report: Report) -> None:
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
        states, unreadable = {}, Problem("RefreshStateUnreadable", _scrubbed(exc, ctx))
    request = ctx.annotation(naming.ANN_REFRESH_NOW)
    requested = bool(request) and request != (ctx.previous.handled_refresh_request if ctx.previous else None)
    failures: list[str] = []
    attempted: set[str] = set()
    running, finished = _job(ctx, jobs.REFRESH)
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
            unreadable = Problem("RefreshStateUnreadable", _scrubbed(exc, ctx))
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


# --- Kubernetes objects -----------------------------------------------------------------------


def _cronjobs(ctx: Context, report: Report) -> None:
    desired = cronjobs.build_cronjobs(ctx.body, ctx.spec, ctx.deps.settings)
    refused = report.database_problem
    if refused is not None and refused.reason in creds.REFUSALS:
        # Pods reference the Secrets by name: a refused Secret or host gets no CronJob (pruned).
        desired = []
        report.refresh_problem = Problem(refused.reason, "no refresh CronJob until the database spec is accepted")
    try:
        synced = sync_owned(ctx.deps.kube, ctx.namespace, ctx.name, cronjobs.COMPONENT, desired,
                            [("batch/v1", "CronJob")], owner_uid=_uid(ctx), record=ctx.owned)
        report.refresh_problem = _conflict(synced) or report.refresh_problem
    except Exception as exc:  # reported per part; the other parts go on
        report.refresh_problem = Problem("CronJobApplyFailed", _scrubbed(exc, ctx))
        report.crashed.append("cronjobs")


def _uid(ctx: Context) -> str | None:
    uid = ctx.body["metadata"].get("uid")
    return str(uid) if uid else None


def _conflict(synced: SyncResult) -> Problem | None:
    """Owned objects that exist but are not ours: a Conflict naming them (nothing was written)."""
    return Problem("Conflict", "; ".join(synced.conflicts)) if synced.conflicts else None


def _pooler(ctx: Context, database: Database | None, report: Report) -> None:
    component = pooler_manifests.COMPONENT
    refused = report.database_problem is not None and report.database_problem.reason in creds.REFUSALS
    if ctx.spec.pooler.enabled and refused and report.database_problem is not None:
        # The auth Secret holds the refused Secret's password and the Deployment serves it: pruned
        # like the CronJobs, until the Secret or host is accepted again.
        report.pooler_problem = Problem(report.database_problem.reason, "no pooler until the database spec is accepted")
    if not ctx.spec.pooler.enabled or refused:
        secrets = (naming.pooler_auth_secret_name(ctx.name),)
        sync_owned(ctx.deps.kube, ctx.namespace, ctx.name, component, [], OWNED_KINDS, secrets, owner_uid=_uid(ctx),
                   record=ctx.owned)
        return
    if database is None:
        # Sizing and auth need the database; keep whatever runs now and say why.
        report.pooler_problem = Problem("WaitingForDatabase", "pooler sizing needs the database's max_connections")
        report.pooler = _pooler_status(ctx, None, None)
        return
    max_connections, reserved = database.server_limits()
    budget = pooler_sizing.compute_budget(ctx.spec.pooler, ctx.deps.settings, max_connections, reserved)
    try:  # app roles and authQuery (pooler_logins.py): their Secrets, verifiers, lookup function
        credentials, auth_user = pooler_logins.entries(ctx.spec, database, lambda r, f: _pooler_login(ctx, r, f))
        objects = pooler_manifests.build_pooler(ctx.body, ctx.spec, ctx.deps.settings, budget, credentials, auth_user)
        config = pooler_manifests.pooler_config(ctx.spec, ctx.deps.settings, budget, credentials, auth_user)
    except (DatabaseUnavailable, pgbouncer.PoolerConfigError, pooler_logins.LookupFunctionMissing) as exc:
        problem = exc.problem if isinstance(exc, DatabaseUnavailable) else Problem(
            getattr(exc, "reason", "PoolerConfigInvalid"), str(exc))
        report.pooler_problem, report.pooler = problem, _pooler_status(ctx, budget, None)
        return
    try:
        synced = sync_owned(ctx.deps.kube, ctx.namespace, ctx.name, component, objects, OWNED_KINDS,
                            owner_uid=_uid(ctx), record=ctx.owned)
        report.pooler_problem = _conflict(synced) or report.pooler_problem
    except Exception as exc:  # reported per part; the other parts go on
        report.pooler_problem = Problem("PoolerApplyFailed", _scrubbed(exc, ctx))
        report.crashed.append("pooler")
    report.pooler = _pooler_status(ctx, budget, pgbouncer.config_hash(config))
    if budget.oversubscribed:
        report.pooler_problem = Problem("Oversubscribed", budget.message)
    elif report.pooler_problem is None and report.pooler.ready_replicas < ctx.spec.pooler.replicas:
        report.pooler_problem = Problem(
            "PoolerNotReady", f"{report.pooler.ready_replicas}/{ctx.spec.pooler.replicas} pooler replica(s) ready"
        )


def _pooler_status(ctx: Context, budget: Any, config_hash: str | None) -> PoolerStatus:
    name = naming.pooler_name(ctx.name)
    deployment = ctx.deps.kube.get("apps/v1", "Deployment", ctx.namespace, name) or {}
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    image = ctx.spec.pooler.image or ctx.deps.settings.pgbouncer_image
    version = pgbouncer.image_version(image)
    return PoolerStatus(
        ready_replicas=ready,
        endpoint=f"{name}.{ctx.namespace}.svc:5432",
        config_hash=config_hash,
        budget=budget,
        paused=ctx.spec.pooler.paused,
        pgbouncer_version=".".join(map(str, version)) if version else None,
        # Judged from the image tag here; the agent checks the running binary (SHOW CONFIG).
        unsupported_parameters=pgbouncer.unsupported_parameters(ctx.spec.pooler.parameters, version) if version else [],
    )


def _probes(ctx: Context, report: Report) -> None:
    """Probes on opted-in Deployments only (probe_sync.py); a claimed container is a Conflict."""
    kube = ctx.deps.kube
    result = sync_probes(kube, ctx.namespace, ctx.name, ctx.spec.health_probes)
    declared = {p.deployment for p in ctx.spec.health_probes}
    release_probes(kube, ctx.namespace, ctx.name, sorted(set(ctx.previous.probed_deployments if ctx.previous else [])
                                                         - declared))
    report.probes_applied = result.applied
    if result.conflicts or result.problems:
        reason = "Conflict" if result.conflicts else result.reason
        report.probes_problem = Problem(reason, "; ".join(result.conflicts + result.problems))

