"""The Kubernetes parts of a reconcile: refresh CronJobs, the PgBouncer pooler, health probes.

Each part is run isolated by reconcile.py (an exception becomes that part's condition). Objects
are applied through owned.py (proof of ownership) and probe_sync.py. No kopf here.
"""

from __future__ import annotations

from typing import Any

from . import credentials as creds
from . import naming, pooler_logins
from .api.v1alpha1 import PoolerStatus
from .owned import OWNED_KINDS, SyncResult, sync_owned
from .ports import Database
from .probe_sync import release as release_probes
from .probe_sync import sync_probes
from .reconcile_context import Context, DatabaseUnavailable, owner_uid, pooler_login, scrubbed
from .specs import cronjobs as cronjob_specs
from .specs import pgbouncer, pooler_manifests, pooler_sizing
from .status import Problem, Report


def cronjobs(ctx: Context, report: Report) -> None:
    desired = cronjob_specs.build_cronjobs(ctx.body, ctx.spec, ctx.deps.settings)
    refused = report.database_problem
    if refused is not None and refused.reason in creds.REFUSALS:
        # Pods reference the Secrets by name: a refused Secret or host gets no CronJob (pruned).
        desired = []
        report.refresh_problem = Problem(refused.reason, "no refresh CronJob until the database spec is accepted")
    try:
        synced = sync_owned(ctx.deps.kube, ctx.namespace, ctx.name, cronjob_specs.COMPONENT, desired,
                            [("batch/v1", "CronJob")], owner_uid=owner_uid(ctx), record=ctx.owned)
        report.refresh_problem = _conflict(synced) or report.refresh_problem
    except Exception as exc:  # reported per part; the other parts go on
        report.refresh_problem = Problem("CronJobApplyFailed", scrubbed(exc, ctx))
        report.crashed.append("cronjobs")


def _conflict(synced: SyncResult) -> Problem | None:
    """Owned objects that exist but are not ours: a Conflict naming them (nothing was written)."""
    return Problem("Conflict", "; ".join(synced.conflicts)) if synced.conflicts else None


def pooler(ctx: Context, database: Database | None, report: Report) -> None:
    component = pooler_manifests.COMPONENT
    refused = report.database_problem is not None and report.database_problem.reason in creds.REFUSALS
    if ctx.spec.pooler.enabled and refused and report.database_problem is not None:
        # The auth Secret holds the refused Secret's password and the Deployment serves it: pruned
        # like the CronJobs, until the Secret or host is accepted again.
        report.pooler_problem = Problem(report.database_problem.reason, "no pooler until the database spec is accepted")
    if not ctx.spec.pooler.enabled or refused:
        secrets = (naming.pooler_auth_secret_name(ctx.name),)
        sync_owned(ctx.deps.kube, ctx.namespace, ctx.name, component, [], OWNED_KINDS, secrets,
                   owner_uid=owner_uid(ctx), record=ctx.owned)
        return
    if database is None:
        # Sizing and auth need the database; keep whatever runs now and say why.
        report.pooler_problem = Problem("WaitingForDatabase", "pooler sizing needs the database's max_connections")
        report.pooler = _pooler_status(ctx, None, None)
        return
    max_connections, reserved = database.server_limits()
    budget = pooler_sizing.compute_budget(ctx.spec.pooler, ctx.deps.settings, max_connections, reserved)
    try:  # app roles and authQuery (pooler_logins.py): their Secrets, verifiers, lookup function
        credentials, auth_user = pooler_logins.entries(ctx.spec, database, lambda r, f: pooler_login(ctx, r, f))
        objects = pooler_manifests.build_pooler(ctx.body, ctx.spec, ctx.deps.settings, budget, credentials, auth_user)
        config = pooler_manifests.pooler_config(ctx.spec, ctx.deps.settings, budget, credentials, auth_user)
    except (DatabaseUnavailable, pgbouncer.PoolerConfigError, pooler_logins.LookupFunctionMissing) as exc:
        problem = exc.problem if isinstance(exc, DatabaseUnavailable) else Problem(
            getattr(exc, "reason", "PoolerConfigInvalid"), str(exc))
        report.pooler_problem, report.pooler = problem, _pooler_status(ctx, budget, None)
        return
    try:
        synced = sync_owned(ctx.deps.kube, ctx.namespace, ctx.name, component, objects, OWNED_KINDS,
                            owner_uid=owner_uid(ctx), record=ctx.owned)
        report.pooler_problem = _conflict(synced) or report.pooler_problem
    except Exception as exc:  # reported per part; the other parts go on
        report.pooler_problem = Problem("PoolerApplyFailed", scrubbed(exc, ctx))
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


def probes(ctx: Context, report: Report) -> None:
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
