"""plan(desired, observed) -> Plan: the DDL that brings the database to the spec, as data.

Pure: no connection, no clock, no environment. A Plan is an ordered tuple of Steps; the steps of
one object are contiguous and the executor (gateways/postgres/schema.py) stops an object at its
first failed step, undoes what that object left behind, and goes on with the next object.

Safety rules the planner encodes (DESIGN.md section 4):
* indexes are built and dropped CONCURRENTLY, outside any transaction, under the index lock policy;
* an INVALID index (failed or cancelled build) is dropped CONCURRENTLY and rebuilt;
* a drifted index is rebuilt under a temporary name, swapped by two renames in one short
  transaction (ShareUpdateExclusiveLock: writes go on), and the old one dropped CONCURRENTLY;
* a view is created with its unique index and marker in one transaction (all or nothing); a changed
  view is built under a temporary name, populated, indexed, given the old view's privileges, then
  swapped in one short transaction under lockTimeout;
* only objects carrying this resource's owner marker are ever dropped or replaced; anything else
  with a declared name is a conflict and is left alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from psycopg import sql

from .. import naming
from ..api.v1alpha1 import DDLPolicy, IndexSpec, MarketplaceDBSpec, MaterializedViewSpec
from ..durations import parse_duration
from ..settings import Settings
from ..sqlcheck import normalize_predicate, normalize_select
from . import ddl
from .catalog import Catalog, IndexInfo, SessionInfo, ViewInfo

LockPolicy = Literal["ddl", "index"]


# --- desired state ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DesiredIndex:
    spec: IndexSpec
    hash: str
    field: str  # where it is declared, for messages: spec.indexes[0]

    @property
    def object(self) -> str:
        return f"index/{self.spec.schema_name}.{self.spec.name}"


@dataclasses.dataclass(frozen=True)
class DesiredView:
    spec: MaterializedViewSpec
    hash: str
    field: str

    @property
    def object(self) -> str:
        return f"view/{self.spec.schema_name}.{self.spec.name}"


@dataclasses.dataclass(frozen=True)
class Desired:
    owner: str
    indexes: tuple[DesiredIndex, ...]
    views: tuple[DesiredView, ...]
    settings: tuple[tuple[str, str], ...]
    reset_settings: tuple[str, ...]
    deletion_policy: str
    approval: str


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
    )


# --- steps and plans ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViewCheck:
    """Before a view's DDL: run the query with LIMIT 0 (READ ONLY) and check the unique key."""

    query: str
    unique_key: tuple[str, ...]
    field: str


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str
    object: str
    description: str
    statements: tuple[sql.Composed, ...]
    transactional: bool  # False: must run outside a transaction block (CONCURRENTLY)
    lock_policy: LockPolicy = "ddl"
    verify_index: tuple[str, str] | None = None  # (schema, name): indisvalid checked after the step
    cleanup_index: tuple[str, str] | None = None  # an INVALID index a failure of this step may leave
    cleanup: tuple[sql.Composed, ...] = ()  # undoes this step if a later step of the object fails
    check_view: ViewCheck | None = None

    @property
    def sql(self) -> sql.Composed:
        return sql.Composed([sql.SQL(";\n").join(self.statements), sql.SQL(";")])

    @property
    def sql_text(self) -> str:
        return ddl.render(self.sql)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "object": self.object,
            "description": self.description,
            "sql": self.sql_text,
            "transaction": self.transactional,
            "lockPolicy": self.lock_policy,
        }


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = ()
    conflicts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.steps

    @property
    def hash(self) -> str:
        """sha256 of what would run (SQL and transaction mode), for `approval: Manual`."""
        digest = hashlib.sha256()
        for step in self.steps:
            digest.update(f"{'tx' if step.transactional else 'autocommit'}\x1f{step.sql_text}\x1e".encode())
        return digest.hexdigest()

    @property
    def objects(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(step.object for step in self.steps))

    def descriptions(self) -> list[str]:
        return [step.description for step in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "steps": [step.to_dict() for step in self.steps],
            "conflicts": list(self.conflicts),
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """Stable text: same plan, byte-identical output."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """Timeouts and retries: short lock waits for ordinary DDL, a longer one for index builds."""

    lock_timeout_seconds: float = 5.0
    statement_timeout_seconds: float = 1800.0
    index_lock_timeout_seconds: float = 60.0
    retries: int = 3
    retry_base_seconds: float = 0.5

    @classmethod
    def from_spec(cls, policy: DDLPolicy, settings: Settings) -> ExecutionPolicy:
        return cls(
            lock_timeout_seconds=parse_duration(policy.lock_timeout),
            statement_timeout_seconds=parse_duration(policy.statement_timeout),
            index_lock_timeout_seconds=settings.index_lock_timeout_seconds,
            retries=settings.ddl_retries,
            retry_base_seconds=settings.ddl_retry_base_seconds,
        )


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What executing one object's steps did (the executor returns one per object of the plan)."""

    object: str
    ok: bool
    executed: tuple[str, ...] = ()  # descriptions of the steps that completed
    message: str = ""
    blocking: tuple[SessionInfo, ...] = ()
    seconds: float = 0.0
    attempts: int = 0


# --- planning --------------------------------------------------------------------------------------


def _ours(marker: ddl.Marker | None, owner: str) -> bool:
    return marker is not None and marker.owner == owner


def _mine_or_unmarked(marker: ddl.Marker | None, owner: str) -> bool:
    return marker is None or marker.owner == owner


def _drop_index_step(obj: str, schema: str, name: str, why: str) -> Step:
    return Step("drop-index", obj, f"drop index {schema}.{name} CONCURRENTLY: {why}",
                (ddl.drop_index(schema, name),), transactional=False, lock_policy="index")


def _build_index_steps(d: DesiredIndex, owner: str, name: str, why: str) -> list[Step]:
    spec = d.spec
    schema = spec.schema_name
    build = Step(
        "create-index", d.object, f"build index {schema}.{name} on {spec.table} CONCURRENTLY: {why}",
        (ddl.create_index(spec, name),), transactional=False, lock_policy="index",
        verify_index=(schema, name), cleanup_index=(schema, name), cleanup=(ddl.drop_index(schema, name),),
    )
    return [build]


def _create_index_steps(d: DesiredIndex, owner: str, why: str) -> list[Step]:
    """Build under the temporary name, then rename and mark in one short transaction.

    Building under the declared name and marking afterwards leaves, when the operator dies between
    the two (or its orphaned backend finishes the build after a SIGKILL), a valid *unmarked* index
    under the declared name: a permanent Conflict. A valid unmarked `__new` is a leftover the next
    plan drops and rebuilds (found by tests/reliability/test_rel_kill.py).
    """
    schema, name = d.spec.schema_name, d.spec.name
    new = ddl.temp_name(name)
    steps = _build_index_steps(d, owner, new, why)
    steps.append(Step("mark", d.object, f"rename index {schema}.{new} to {name} and mark it as owned by {owner}",
                      (ddl.rename_index(schema, new, name),
                       ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash))), transactional=True))
    return steps


def _replace_index_steps(d: DesiredIndex, owner: str, why: str) -> list[Step]:
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    new, old = ddl.temp_name(name), ddl.old_name(name)
    steps = _build_index_steps(d, owner, new, f"replacement for {name} ({why})")
    steps.append(Step(
        "swap-index", d.object, f"swap {schema}.{new} in for {schema}.{name} (two renames, one short transaction)",
        (ddl.rename_index(schema, name, old), ddl.rename_index(schema, new, name),
         ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash))),
        transactional=True,
    ))
    steps.append(_drop_index_step(d.object, schema, old, f"replaced by the new {name}"))
    return steps


def _index_steps(d: DesiredIndex, owner: str, cat: Catalog, declared: set[tuple[str, str]]) -> tuple[list[Step], str]:
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    steps: list[Step] = []
    for leftover in (ddl.temp_name(name), ddl.old_name(name)):
        info = cat.index(schema, leftover)
        if info and (schema, leftover) not in declared and _mine_or_unmarked(info.marker, owner):
            steps.append(_drop_index_step(d.object, schema, leftover, "left over by an interrupted replacement"))
    other = cat.other_relation(schema, name) or ("materialized view" if cat.view(schema, name) else None)
    if other:
        return [], f"{d.field}: {schema}.{name} already exists as a {_relkind(other)}; left alone"
    existing = cat.index(schema, name)
    if existing is None:
        return steps + _create_index_steps(d, owner, "missing"), ""
    if not _ours(existing.marker, owner):
        if existing.marker is None and not existing.valid and not existing.primary:
            # INVALID and unmarked: what an interrupted build of ours leaves behind. It is never used
            # by queries yet slows every write, and the resource declares the name: rebuild it.
            return steps + [_drop_index_step(d.object, schema, name, "INVALID (failed or cancelled build)"),
                            *_create_index_steps(d, owner, "rebuild of an INVALID index")], ""
        return [], _conflict(d.field, "index", schema, name, existing.marker)
    if not existing.valid:
        return steps + [_drop_index_step(d.object, schema, name, "INVALID (failed or cancelled build)"),
                        *_create_index_steps(d, owner, "rebuild of an INVALID index")], ""
    drift = index_drift(d, existing)
    if drift:
        return steps + _replace_index_steps(d, owner, drift), ""
    return steps, ""


def index_drift(d: DesiredIndex, existing: IndexInfo) -> str:
    """Why an index of ours no longer matches, or "" when it does."""
    marker = existing.marker
    if marker is None:
        return "no owner marker"
    if marker.spec_hash != d.hash:
        return "definition changed in the resource"
    if marker.def_hash != existing.def_hash:
        return "changed by hand in the database"
    return ""


def view_drift(d: DesiredView, existing: ViewInfo) -> str:
    marker = existing.marker
    if marker is None:
        return "no owner marker"
    if marker.spec_hash != d.hash:
        return "query or unique key changed in the resource"
    if marker.def_hash != existing.def_hash:
        return "changed by hand in the database"
    return ""


def _relkind(kind: str) -> str:
    return {"r": "table", "p": "partitioned table", "v": "view", "S": "sequence", "f": "foreign table",
            "c": "composite type"}.get(kind, kind)


def _conflict(field: str, what: str, schema: str, name: str, marker: ddl.Marker | None) -> str:
    who = f"owned by {marker.owner}" if marker else "not created by this operator (no owner marker)"
    return f"{field}: {what} {schema}.{name} exists, {who}; left alone"


def _view_key_ok(view: ViewInfo, cat: Catalog, key: Sequence[str]) -> IndexInfo | None:
    """The view's unique index when it is usable by REFRESH ... CONCURRENTLY."""
    info = cat.index(view.schema, ddl.view_key_name(view.name))
    if info and info.table == view.name and info.valid and info.unique and not info.partial \
            and not info.expressions and info.key_columns == tuple(key):
        return info
    return None


def _create_view_statements(d: DesiredView, owner: str, name: str, grants: Iterable[Any]) -> tuple[sql.Composed, ...]:
    spec = d.spec
    schema = spec.schema_name
    statements = [
        ddl.create_view(schema, name, spec.query),
        # Inside the creating transaction the view is invisible to everyone else: a plain
        # CREATE INDEX is atomic with it (no INVALID leftover possible) and blocks nobody.
        ddl.create_view_index(schema, name, ddl.view_key_name(name), spec.unique_key, concurrently=False),
    ]
    statements += [ddl.grant(g.privilege, schema, name, g.grantee, g.grantable) for g in grants
                   if g.privilege in ddl.PRIVILEGES]
    statements.append(ddl.mark("MATERIALIZED VIEW", schema, name, ddl.marker_prefix(owner, d.hash)))
    return tuple(statements)


def _view_steps(d: DesiredView, owner: str, cat: Catalog, declared: set[tuple[str, str]]) -> tuple[list[Step], str]:
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    check = ViewCheck(spec.query, tuple(spec.unique_key), d.field)
    steps: list[Step] = []
    tmp = ddl.temp_name(name)
    leftover = cat.view(schema, tmp)
    if leftover and (schema, tmp) not in declared and _mine_or_unmarked(leftover.marker, owner):
        steps.append(Step("drop-view", d.object, f"drop {schema}.{tmp}: left over by an interrupted swap",
                          (ddl.drop_view(schema, tmp),), transactional=True))
    other = cat.other_relation(schema, name) or ("index" if cat.index(schema, name) else None)
    if other:
        return [], f"{d.field}: {schema}.{name} already exists as a{'n' if other == 'index' else ''} " \
                   f"{_relkind(other)}; left alone"
    existing = cat.view(schema, name)
    if existing is None:
        steps.append(Step(
            "create-view", d.object,
            f"create materialized view {schema}.{name} with its unique index ({', '.join(spec.unique_key)}), "
            "populated, in one transaction",
            _create_view_statements(d, owner, name, ()), transactional=True, check_view=check,
        ))
        return steps, ""
    if not _ours(existing.marker, owner):
        return [], _conflict(d.field, "materialized view", schema, name, existing.marker)
    drift = view_drift(d, existing)
    if drift:
        if existing.dependents:
            return steps, (f"{d.field}: {schema}.{name} must be rebuilt ({drift}) but "
                           f"{', '.join(existing.dependents)} depend on it; left alone")
        steps.append(Step(
            "create-view", d.object,
            f"build {schema}.{tmp} ({drift}): populated, indexed, with {len(existing.grants)} privilege(s) of "
            f"{name} copied",
            _create_view_statements(d, owner, tmp, existing.grants), transactional=True, check_view=check,
            cleanup=(ddl.drop_view(schema, tmp),),
        ))
        steps.append(Step(
            "swap-view", d.object, f"swap {schema}.{tmp} in for {schema}.{name} (one short transaction)",
            (ddl.drop_view(schema, name), ddl.rename_view(schema, tmp, name),
             ddl.rename_index(schema, ddl.view_key_name(tmp), ddl.view_key_name(name))),
            transactional=True,
        ))
        return steps, ""
    if not existing.populated:
        steps.append(Step("refresh-view", d.object, f"populate {schema}.{name} (it holds no data)",
                          (ddl.refresh_view(schema, name),), transactional=True))
    if _view_key_ok(existing, cat, spec.unique_key) is None:
        key_name = ddl.view_key_name(name)
        if cat.index(schema, key_name):
            steps.append(_drop_index_step(d.object, schema, key_name, "not the unique index the view needs"))
        steps.append(Step(
            "create-index", d.object, f"build unique index {schema}.{key_name} on {name} CONCURRENTLY",
            (ddl.create_view_index(schema, name, key_name, spec.unique_key, concurrently=True),),
            transactional=False, lock_policy="index", verify_index=(schema, key_name),
            cleanup_index=(schema, key_name),
        ))
    return steps, ""


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
    """Objects carrying this resource's marker that the spec no longer declares (nor their temporaries)."""
    keep = set()
    for schema, name in _declared(desired):
        keep |= {(schema, name), (schema, ddl.temp_name(name)), (schema, ddl.old_name(name))}
    our_views = {(v.schema, v.name) for v in cat.views if _ours(v.marker, desired.owner)}
    indexes = [i for i in cat.indexes if _ours(i.marker, desired.owner) and (i.schema, i.name) not in keep
               and (i.table_schema, i.table) not in our_views]
    views = [v for v in cat.views if (v.schema, v.name) in our_views and (v.schema, v.name) not in keep]
    return indexes, views


def _drop_owned_steps(indexes: Sequence[IndexInfo], views: Sequence[ViewInfo]) -> tuple[list[Step], list[str]]:
    steps, conflicts = [], []
    for index in indexes:
        steps.append(_drop_index_step(f"index/{index.schema}.{index.name}", index.schema, index.name,
                                      "no longer declared (deletionPolicy: Drop)"))
    for view in views:
        if view.dependents:
            conflicts.append(f"materialized view {view.schema}.{view.name}: not dropped, "
                             f"{', '.join(view.dependents)} depend on it")
            continue
        steps.append(Step("drop-view", f"view/{view.schema}.{view.name}",
                          f"drop materialized view {view.schema}.{view.name} (deletionPolicy: Drop)",
                          (ddl.drop_view(view.schema, view.name),), transactional=True))
    return steps, conflicts


def plan(desired: Desired, observed: Catalog) -> Plan:
    """The steps that bring `observed` to `desired`; empty when they already match."""
    steps: list[Step] = []
    conflicts: list[str] = []
    notes: list[str] = []
    declared = _declared(desired)
    for index in desired.indexes:
        found, conflict = _index_steps(index, desired.owner, observed, declared)
        steps += found
        conflicts += [conflict] if conflict else []
    for view in desired.views:
        found, conflict = _view_steps(view, desired.owner, observed, declared)
        steps += found
        conflicts += [conflict] if conflict else []
    steps += _setting_steps(desired, observed)
    indexes, views = _ours_not_declared(desired, observed)
    if desired.deletion_policy == "Drop":
        dropped, blocked = _drop_owned_steps(indexes, views)
        steps += dropped
        conflicts += blocked
    else:
        kept = [f"index {i.schema}.{i.name}" for i in indexes]
        kept += [f"materialized view {v.schema}.{v.name}" for v in views]
        notes += [f"{what} is no longer declared; kept (deletionPolicy: Retain)" for what in kept]
    return Plan(tuple(steps), tuple(conflicts), tuple(notes))


def teardown_plan(desired: Desired, observed: Catalog) -> Plan:
    """What deleting the resource does: with deletionPolicy Drop, drop every object carrying this
    resource's marker and reset the settings it applied (when still at the applied value); with
    Retain, nothing. Never touches the refresh state schema (it is not even observed)."""
    if desired.deletion_policy != "Drop":
        return Plan(notes=("deletionPolicy: Retain: database objects are kept",))
    our_views = {(v.schema, v.name) for v in observed.views if _ours(v.marker, desired.owner)}
    indexes = [i for i in observed.indexes
               if _ours(i.marker, desired.owner) and (i.table_schema, i.table) not in our_views]
    views = [v for v in observed.views if (v.schema, v.name) in our_views]
    steps, conflicts = _drop_owned_steps(indexes, views)
    current = observed.settings
    for name, value in desired.settings:
        if current.get(name) == value:
            steps.append(Step("reset-setting", f"setting/{name}", f"reset {name} on database {observed.database}",
                              (ddl.reset_database(observed.database, name),), transactional=True))
    return Plan(tuple(steps), tuple(conflicts))


def owner_of(namespace: str | None, name: str) -> str:
    return naming.owner_key(namespace or "default", name)
