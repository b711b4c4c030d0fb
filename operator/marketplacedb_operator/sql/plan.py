"""plan(desired, observed) -> Plan: the DDL that brings the database to the spec, as data.

Pure: no connection, no clock, no environment. A Plan is an ordered tuple of Steps; the steps of
one object are contiguous and the executor (gateways/postgres/schema.py) stops an object at its
first failed step, undoes what that object left behind, and goes on with the next object.

Safety rules the planner encodes (docs/architecture.md, "PostgreSQL and PgBouncer facts" and "Ownership and trust"):
* an object is this resource's only when the ownership record names its very OID (ownership.py);
  a name pattern (`__new`, `__old`, `__key`) or a COMMENT marker proves nothing. Everything else
  is never dropped, renamed or rebuilt, under any deletion policy: it is reported ("left alone");
* an existing object under a declared name whose definition equals the declared one is adopted
  (recorded, no DDL); one that differs is a Conflict until the object says `adopt: Replace`;
* indexes are built and dropped CONCURRENTLY, outside any transaction; a build is preceded by an
  intent record so that what an interrupted build leaves is provably ours;
* a drifted index is rebuilt under a temporary name, swapped by two renames in one short
  transaction, and the old one dropped CONCURRENTLY; never when a foreign key depends on it;
* every drop and rename first checks the object still has the OID that was planned for;
* views first, then indexes declared on views (they need the view); a changed view is rebuilt
  and swapped with everything it had (plan_views.py); indexes are planned in plan_indexes.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .. import naming
from ..api.v1alpha1 import MarketplaceDBSpec
from ..sqlcheck import normalize_predicate, normalize_select
from . import ddl, ownership, settings_check, view_calls
from .catalog import Catalog, IndexInfo, ViewInfo
from .plan_guards import bound as _bound
from .plan_indexes import drop_index_step, index_steps, sweepable
from .plan_partitions import observed_child_names
from .plan_views import drop_view_step, view_steps
from .prerequisites import prerequisites
from .steps import (
    Desired,
    DesiredIndex,
    DesiredView,
    ExecutionPolicy,
    LockPolicy,
    Plan,
    Step,
    StepOutcome,
    ViewCheck,
    index_drift,
    relkind,
    view_drift,
)

__all__ = ["Desired", "DesiredIndex", "DesiredView", "ExecutionPolicy", "LockPolicy", "Plan", "Step", "StepOutcome",
           "ViewCheck", "desired_state", "index_drift", "observed_names", "owner_of", "plan", "teardown_plan",
           "view_drift"]


# --- desired state ---------------------------------------------------------------------------------


def desired_state(spec: MarketplaceDBSpec, owner: str, previously_managed_settings: Iterable[str] = ()) -> Desired:
    """What the database should hold for `spec`, owned by `owner` (`namespace/name`).

    SQL fragments go through the parser again (idempotent on validated specs), so a spec built
    without validation still cannot carry a second statement. `previously_managed_settings` are
    setting names this resource applied before (from its status): those no longer declared are
    RESET; settings someone else set by hand are never touched.
    """
    indexes = []
    for number, index in enumerate(spec.indexes):
        if index.where is not None:
            index = index.model_copy(update={"where": normalize_predicate(index.where)})
        indexes.append(DesiredIndex(index, ddl.index_hash(index), f"spec.indexes[{number}]"))
    views = []
    for number, view in enumerate(spec.materialized_views):
        view = view.model_copy(update={"query": normalize_select(view.query)})
        views.append(DesiredView(view, ddl.view_hash(view), f"spec.materializedViews[{number}]"))
    settings = tuple(sorted(spec.database.settings.items()))
    declared = {name for name, _ in settings}
    return Desired(
        owner=owner,
        indexes=tuple(indexes),
        views=tuple(views),
        settings=settings,
        reset_settings=tuple(sorted(set(previously_managed_settings) - declared)),
        deletion_policy=spec.ddl.deletion_policy,
        approval=spec.ddl.approval,
        extensions=tuple(sorted(spec.database.extensions)),
    )




def observed_names(desired: Desired) -> list[tuple[str, str]]:
    """The relations observation reads by name: declared objects, their temporaries, their tables."""
    names = []
    for d in desired.indexes:
        s, n = d.spec.schema_name, d.spec.name
        names += [(s, n), (s, ddl.temp_name(n)), (s, ddl.old_name(n)), (s, d.spec.table)]
    for v in desired.views:
        s, n = v.spec.schema_name, v.spec.name
        names += [(s, n), (s, ddl.temp_name(n)), (s, ddl.view_key_name(n)), (s, ddl.view_key_name(ddl.temp_name(n)))]
    return sorted(set(names))


def _setting_steps(desired: Desired, cat: Catalog) -> list[Step]:
    steps = []
    current = cat.settings
    for name, value in desired.settings:
        if current.get(name) != value:
            was = f" (was {current[name]})" if name in current else ""
            steps.append(Step("set-setting", f"setting/{name}", f"set {name} = {value} on database {cat.database}{was}",
                              (ddl.set_database(cat.database, name, value),), transactional=True))
    for name in desired.reset_settings:
        if name in current:
            steps.append(Step("reset-setting", f"setting/{name}", f"reset {name} on database {cat.database}",
                              (ddl.reset_database(cat.database, name),), transactional=True))
    return steps


def _declared(desired: Desired) -> set[tuple[str, str]]:
    names = {(d.spec.schema_name, d.spec.name) for d in desired.indexes}
    return names | {(d.spec.schema_name, d.spec.name) for d in desired.views}


def _ours_not_declared(desired: Desired, cat: Catalog) -> tuple[list[IndexInfo], list[ViewInfo]]:
    """Objects recorded as this resource's that the spec no longer declares (nor their temporaries)."""
    keep = set()
    for schema, name in _declared(desired):
        keep |= {(schema, name), (schema, ddl.temp_name(name)), (schema, ddl.old_name(name))}
    keep |= set(observed_child_names(desired, cat.partitions))  # partitions' indexes: plan_partitions
    our_views = {(v.schema, v.name) for v in cat.views if v.owned_by(desired.owner)}
    dropped_with = {(v.schema, v.name) for v in cat.views if v.owned_by(desired.owner) and not _adopted(v)}
    indexes = [i for i in cat.indexes if sweepable(i, desired.owner) and not cat.is_attached_child(i.schema, i.name)
               and (i.schema, i.name) not in keep and (i.table_schema, i.table) not in dropped_with]
    views = [v for v in cat.views if (v.schema, v.name) in our_views and (v.schema, v.name) not in keep]
    return indexes, views


def _adopted(info: IndexInfo | ViewInfo) -> bool:
    return info.record is not None and info.record.how == "adopted"


def _drop_owned_steps(owner: str, indexes: Sequence[IndexInfo], views: Sequence[ViewInfo],
                      why: str, cat: Catalog) -> tuple[list[Step], list[str]]:
    """Drop what this resource created. What it adopted existed before it: kept (and reported)."""
    steps, notes = [], []
    everything: list[IndexInfo | ViewInfo] = [*indexes, *views]
    for info in everything:
        if _adopted(info):
            kind = "index" if isinstance(info, IndexInfo) else "materialized view"
            notes.append(f"kept: {kind} {info.schema}.{info.name} was adopted, not created, by this resource")
    indexes = [i for i in indexes if not _adopted(i)]
    views = [v for v in views if not _adopted(v)]
    for index in indexes:
        if _bound(index):
            notes.append(f"left in place: index {index.schema}.{index.name}: {_bound(index)}; drop the "
                         "constraint(s) first to remove it")
            continue
        # DROP INDEX on a partitioned index drops every index attached to it, and PostgreSQL attaches a
        # DBA's matching index when their table becomes a partition: never drop one that is not ours.
        foreign = [c for s, c, _, _ in cat.children(index.schema, index.name)
                   if (child := cat.index(s, c)) is None or not child.owned_by(owner)]
        if foreign:
            notes.append(f"left in place: partitioned index {index.schema}.{index.name}: "
                         f"{', '.join(foreign)} (not this resource's) attached to it would be dropped with it; "
                         "drop it by hand if that is intended")
            continue
        steps.append(drop_index_step(f"index/{index.schema}.{index.name}", owner, index, why))
    for view in views:
        foreign = [i.name for i in cat.indexes_on(view.schema, view.name) if not i.owned_by(owner)]
        if view.dependents or foreign:
            what = ", ".join([*view.dependents, *(f"index {name} (not this resource's)" for name in foreign)])
            notes.append(f"left in place: materialized view {view.schema}.{view.name}: {what} depend on it")
            continue
        steps.append(drop_view_step(f"view/{view.schema}.{view.name}", owner, view, why))
    return steps, notes


def _left_alone_marked(desired: Desired, cat: Catalog) -> list[str]:
    declared = _declared(desired)
    return [f"left alone: {relkind(kind)} {schema}.{name} carries this resource's marker in its comment but no "
            "ownership record names it (a copied or forged comment, or made before ownership records); "
            "never dropped"
            for schema, name, kind in cat.marked if (schema, name) not in declared]


def _on_declared_view(d: DesiredIndex, desired: Desired) -> bool:
    return any(v.spec.schema_name == d.spec.schema_name and v.spec.name == d.spec.table for v in desired.views)


def _view_refused(d: DesiredIndex, desired: Desired, cat: Catalog) -> bool:
    """The index is declared on a view that does not exist and whose creation is refused."""
    schema, table = d.spec.schema_name, d.spec.table
    return cat.view(schema, table) is None and any(
        view_calls.refusal(v.spec, v.field, cat.calls_of(schema, table)) is not None
        for v in desired.views if (v.spec.schema_name, v.spec.name) == (schema, table))


def plan(desired: Desired, observed: Catalog) -> Plan:
    """The steps that bring `observed` to `desired`; empty when they already match."""
    notes: list[str] = []
    declared = _declared(desired)
    steps, conflicts, blocked = prerequisites(desired, observed)
    on_views = [d for d in desired.indexes if _on_declared_view(d, desired) and d.object not in blocked]
    on_tables = [d for d in desired.indexes if d not in on_views and d.object not in blocked]
    for index in on_tables:
        found, conflict, note = index_steps(index, desired.owner, observed, declared)
        steps, conflicts, notes = steps + found, conflicts + conflict, notes + note
    for view in desired.views:
        found, conflict, note = view_steps(view, desired.owner, observed, declared)
        steps, conflicts, notes = steps + found, conflicts + conflict, notes + note
    for index in on_views:  # after their view: it must exist first
        if _view_refused(index, desired, observed):
            notes.append(f"{index.field}: not built: its view {index.spec.schema_name}.{index.spec.table} is refused")
            continue
        found, conflict, note = index_steps(index, desired.owner, observed, declared)
        steps, conflicts, notes = steps + found, conflicts + conflict, notes + note
    # Settings go in whole or not at all: one value the server's pg_settings refuses blocks them all.
    refused = settings_check.refused(desired.settings, observed.guc_facts)
    steps += [] if refused else _setting_steps(desired, observed)
    conflicts += refused
    indexes, views = _ours_not_declared(desired, observed)
    if desired.deletion_policy == "Drop":
        dropped, kept = _drop_owned_steps(desired.owner, indexes, views, "no longer declared (deletionPolicy: Drop)",
                                        observed)
        steps += dropped
        notes += kept
    else:
        kept_names = [f"index {i.schema}.{i.name}" for i in indexes]
        kept_names += [f"materialized view {v.schema}.{v.name}" for v in views]
        notes += [f"{what} is no longer declared; kept (deletionPolicy: Retain)" for what in kept_names]
    notes += _left_alone_marked(desired, observed)
    return Plan(tuple(steps), tuple(conflicts), tuple(dict.fromkeys(notes)))


def teardown_plan(desired: Desired, observed: Catalog) -> Plan:
    """What deleting the resource does: with deletionPolicy Drop, drop every object recorded as this
    resource's (OID checked) and reset the settings it applied (when still at the applied value);
    with Retain, nothing. What cannot be dropped (a foreign key or a view depends on it) is reported
    and left in place: teardown still finishes. Never touches the refresh state schema."""
    if desired.deletion_policy != "Drop":
        return Plan(notes=("deletionPolicy: Retain: database objects are kept",))
    our_views = {(v.schema, v.name) for v in observed.views if v.owned_by(desired.owner)}
    # The indexes of a view we drop go with it; those we created on an adopted (kept) view do not.
    dropped_with = {(v.schema, v.name) for v in observed.views if v.owned_by(desired.owner) and not _adopted(v)}
    indexes = [i for i in observed.indexes if sweepable(i, desired.owner)
               and not observed.is_attached_child(i.schema, i.name)
               and (i.table_schema, i.table) not in dropped_with]
    views = [v for v in observed.views if (v.schema, v.name) in our_views]
    steps, notes = _drop_owned_steps(desired.owner, indexes, views, "resource deleted (deletionPolicy: Drop)", observed)
    current = observed.settings
    for name, value in desired.settings:
        if current.get(name) == value:
            steps.append(Step("reset-setting", f"setting/{name}", f"reset {name} on database {observed.database}",
                              (ddl.reset_database(observed.database, name),), transactional=True))
    if observed.records:
        steps.append(Step("forget", f"records/{desired.owner}",
                          f"forget the ownership records of {desired.owner} whose objects are gone",
                          (ownership.forget_stale(desired.owner),), transactional=True))
    notes += _left_alone_marked(desired, observed)
    return Plan(tuple(steps), (), tuple(dict.fromkeys(notes)))


def owner_of(namespace: str | None, name: str) -> str:
    return naming.owner_key(namespace or "default", name)
