"""Deletion: undo what a MarketplaceDB did outside its owned objects, bounded in time.

Owned Kubernetes objects go with their ownerReferences (garbage collection). Database objects go
only with deletionPolicy Drop, and only those carrying this resource's owner marker. The handler
(handlers.on_delete) retries a teardown that could not finish until the timeout, then releases
the finalizer with a Warning Event listing what `Teardown.retained` names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ValidationError

from . import metrics
from .api.v1alpha1 import MarketplaceDB
from .ports import Deps
from .probe_sync import release as release_probes
from .reconcile_context import Context, DatabaseUnavailable, close_quietly, open_database, previous_status, scrubbed
from .sql import plan as planning


@dataclasses.dataclass(frozen=True)
class Teardown:
    """What a deletion attempt left: None when done, else why not yet and what would be retained."""

    problem: str | None = None
    retained: tuple[str, ...] = ()


def teardown(body: dict[str, Any], deps: Deps, released: set[str] | None = None) -> Teardown:
    """Undo what the resource did outside its owned objects.

    Owned Kubernetes objects go with their ownerReferences (garbage collection). Database objects
    go only with deletionPolicy Drop, and only those carrying this resource's owner marker.
    `released` remembers the Deployments whose probes were already released, so a retry (kopf
    retries until the finalizer can go) never re-patches them.
    """
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    released = set() if released is None else released
    previous = previous_status(body)
    pending = [d for d in (previous.probed_deployments if previous else []) if d not in released]
    release_probes(deps.kube, namespace, name, pending)
    released.update(pending)
    metrics.forget_resource(namespace, name)
    try:
        spec = MarketplaceDB.model_validate(body).spec
    except ValidationError:
        return Teardown()  # never applied anything we could identify
    if spec.ddl.deletion_policy != "Drop":
        return Teardown()
    retained = tuple(
        [f"index {i.name}" for i in spec.indexes]
        + [f"materialized view {v.name}" for v in spec.materialized_views]
        + [f"database setting {k}" for k in sorted(previous.managed_settings if previous else [])]
    )
    ctx = Context(body, spec, previous, deps, deps.now())
    try:
        database = open_database(ctx)
    except DatabaseUnavailable as exc:
        return Teardown(f"deletionPolicy Drop needs the database: {exc.problem.message}", retained)
    try:
        desired = planning.desired_state(spec, ctx.owner, previous.managed_settings if previous else [])
        plan = planning.teardown_plan(desired, database.observe(desired))
        policy = planning.ExecutionPolicy.from_spec(spec.ddl, deps.settings)
        failed = [o for o in database.execute(plan, policy) if not o.ok]
    except Exception as exc:  # a session cut mid-teardown: retried, then bounded by the timeout
        return Teardown(f"deletionPolicy Drop failed: {scrubbed(exc, ctx)}", retained)
    finally:
        close_quietly(database)
    if failed:
        return Teardown("; ".join(f"{o.object}: {o.message}" for o in failed), tuple(o.object for o in failed))
    return Teardown()

