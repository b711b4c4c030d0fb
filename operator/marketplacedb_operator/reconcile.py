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
from typing import Any

from pydantic import ValidationError

from . import credentials as creds
from . import metrics, naming, pooler_logins
from .api.errors import format_errors
from .api.v1alpha1 import (
    MarketplaceDB,
    MarketplaceDBSpec,
    MarketplaceDBStatus,
    OwnedObject,
    PlanStatus,
    PoolerStatus,
)
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


@dataclasses.dataclass
class Context:
    body: dict[str, Any]
    spec: MarketplaceDBSpec
    previous: MarketplaceDBStatus | None
    deps: Deps
    now: datetime.datetime
    password: str = ""  # kept only to mask it in messages
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
                database.close()
                database = None
        _cronjobs(ctx, report)
        _pooler(ctx, database, report)
        _probes(ctx, report)
    finally:
        if database is not None:
            database.close()
    _record_metrics(namespace, name, report, time.perf_counter() - started)
    temporary = report.database_problem is not None or report.pooler_problem is not None and not report.pooler
    return _finish(body, deps, previous, report, started, temporary=temporary, ctx=ctx)


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
        status.handled_refresh_request = ctx.annotation(naming.ANN_REFRESH_NOW) or (
            previous.handled_refresh_request if previous else None
        )
    status.owned_objects = _owned_list(ctx.owned) if ctx is not None else (previous.owned_objects if previous else [])
    rendered = status.model_dump(by_alias=True, mode="json", exclude_none=True)
    if rendered != _comparable(body.get("status")):
        deps.kube.patch_status(body["metadata"]["namespace"], body["metadata"]["name"], rendered)
    requeue = deps.settings.resync_seconds
    if report.refresh_due_seconds is not None:  # mode Operator: wake up when the next refresh is due
        requeue = min(requeue, max(1.0, report.refresh_due_seconds))
    if not temporary and report.pooler_enabled and (report.pooler is None or report.pooler.ready_replicas == 0):
        requeue = min(requeue, 15.0)  # pooler pods starting: look again soon
    return Outcome(events=events, temporary=temporary, requeue_after=requeue)


def _owned_record(previous: MarketplaceDBStatus | None) -> Record:
    return {(o.api_version, o.kind, o.name): o.uid for o in (previous.owned_objects if previous else [])}


def _owned_list(record: Record) -> list[OwnedObject]:
    return [OwnedObject(api_version=a, kind=k, name=n, uid=u) for (a, k, n), u in sorted(record.items())]


def _comparable(status: Any) -> Any:
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
    ctx.password = info.password
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
    outcomes = []
    if not plan.empty:
        if ctx.spec.ddl.approval == "Manual" and ctx.annotation(naming.ANN_APPROVE_PLAN) != plan.hash:
            report.plan = PlanStatus(hash=plan.hash, steps=plan.descriptions(), approved=False)
            report.schema_problem = Problem(
                "AwaitingApproval",
                f"{len(plan.steps)} step(s) wait for approval: annotate {naming.ANN_APPROVE_PLAN}={plan.hash}",
            )
        else:
            policy = planning.ExecutionPolicy.from_spec(ctx.spec.ddl, ctx.deps.settings)
            outcomes = database.execute(plan, policy)
            metrics.record_ddl(ctx.namespace, ctx.name, sum(o.ok for o in outcomes), sum(not o.ok for o in outcomes))
            catalog = database.observe(desired)
    report.indexes = schema_report.index_statuses(desired, catalog, outcomes)
    report.views = schema_report.view_statuses(desired, catalog, outcomes)
    report.blocking = schema_report.blocking_status(s for o in outcomes for s in o.blocking)
    report.drifted = [i.name for i in report.indexes if i.state in ("Drifted", "Invalid")]
    report.drifted += [v.name for v in report.views if v.message.startswith("Drifted")]
    failed = [o for o in outcomes if not o.ok]
    conflicts = list(plan.conflicts) + [f"index {i.name}: {i.message}" for i in report.indexes if i.state == "Conflict"]
    conflicts += [f"view {v.name}: {v.message}" for v in report.views if v.message.startswith("Conflict")]
    if failed:
        report.schema_problem = Problem("DDLFailed", "; ".join(f"{o.object}: {o.message}" for o in failed))
    elif conflicts:
        report.schema_problem = Problem("Conflict", "; ".join(dict.fromkeys(conflicts)))


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
    failures = []
    attempted: set[str] = set()
    for view in views:
        due_in = refresh_truth.operator_due_in(view, states.get((view.schema_name, view.name)), ctx.now)
        if requested or (due_in is not None and due_in <= 0):
            result = database.refresh(view, ctx.now, requested)
            attempted.add(view.name)
            if not result.ok:
                failures.append(f"{view.schema_name}.{view.name}: {result.error or result.reason}")
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
        report.refresh_problem = Problem("CronJobApplyFailed", str(exc)[:500])


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
        report.pooler_problem = Problem("PoolerApplyFailed", str(exc)[:500])
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


# --- deletion ---------------------------------------------------------------------------------


def teardown(body: dict[str, Any], deps: Deps) -> str | None:
    """Undo what the resource did outside its owned objects; None when done, else why not yet.

    Owned Kubernetes objects go with their ownerReferences (garbage collection). Database objects
    go only with deletionPolicy Drop, and only those carrying this resource's owner marker.
    """
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    previous = _previous_status(body)
    release_probes(deps.kube, namespace, name, previous.probed_deployments if previous else [])
    metrics.forget_resource(namespace, name)
    try:
        spec = MarketplaceDB.model_validate(body).spec
    except ValidationError:
        return None  # never applied anything we could identify
    if spec.ddl.deletion_policy != "Drop":
        return None
    ctx = Context(body, spec, previous, deps, deps.now())
    try:
        database = _open_database(ctx)
    except DatabaseUnavailable as exc:
        return f"deletionPolicy Drop needs the database: {exc.problem.message}"
    try:
        desired = planning.desired_state(spec, ctx.owner, previous.managed_settings if previous else [])
        plan = planning.teardown_plan(desired, database.observe(desired))
        policy = planning.ExecutionPolicy.from_spec(spec.ddl, deps.settings)
        failed = [o for o in database.execute(plan, policy) if not o.ok]
    finally:
        database.close()
    if failed:
        return "; ".join(f"{o.object}: {o.message}" for o in failed)
    return None
