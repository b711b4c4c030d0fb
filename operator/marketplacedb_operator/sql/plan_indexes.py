"""Planning of indexes (pure): create, adopt, repair, the two-rename swap, and the drop step.

An index is built CONCURRENTLY under a temporary name after an intent record (so that what an
interrupted build leaves is provably ours), then renamed into place, marked and recorded in one
short transaction. A drifted index is rebuilt the same way and swapped by two renames; the old one
is dropped CONCURRENTLY, never when a constraint or a foreign key needs it (plan_guards.py). A
finished build whose OID was never pinned is completed only when the server deparses it exactly
as declared. Every drop and rename first checks the object still has the planned OID.
"""

from __future__ import annotations

import dataclasses

from . import ddl, ownership
from .catalog import Catalog, IndexInfo
from .plan_guards import bound as _bound
from .plan_guards import fk_conflict as _fk_conflict
from .plan_partitions import partitioned_index_steps
from .steps import DesiredIndex, Step, foreign_reason, index_drift, relkind

# --- the drop step (also used for what the spec no longer declares and for teardown) ---------------


def drop_index_step(obj: str, owner: str, info: IndexInfo, why: str) -> Step:
    schema, name = info.schema, info.name
    if info.table_kind == "p":  # no CONCURRENTLY for a partitioned index (its partitions' go with it)
        return Step("drop-index", obj, f"drop partitioned index {schema}.{name} (with its partitions' indexes; "
                    f"a brief ACCESS EXCLUSIVE lock on the table): {why}",
                    (ownership.assert_oid(schema, name, info.oid),
                     ownership.assert_partitions_ours(owner, schema, name),
                     ddl.drop_partitioned_index(schema, name), ownership.forget(owner, schema, name)),
                    transactional=True)
    return Step("drop-index", obj, f"drop index {schema}.{name} CONCURRENTLY: {why}",
                (ownership.assert_oid(schema, name, info.oid), ddl.drop_index(schema, name),
                 ownership.forget(owner, schema, name)),
                transactional=False, lock_policy="index")


# --- indexes ---------------------------------------------------------------------------------------


def _build_steps(d: DesiredIndex, owner: str, name: str, why: str) -> list[Step]:
    """Intent record, then CREATE INDEX CONCURRENTLY under `name` (a temporary name)."""
    spec = d.spec
    schema = spec.schema_name
    return [
        Step("intent", d.object, f"record the intent to build {schema}.{name} (what a crash leaves is ours)",
             (ownership.intent(owner, schema, name, schema, spec.table, d.hash),), transactional=True,
             cleanup=(ownership.forget_intent(owner, schema, name),)),
        Step("create-index", d.object, f"build index {schema}.{name} on {spec.table} CONCURRENTLY: {why}",
             (ddl.create_index(spec, name),), transactional=False, lock_policy="index",
             verify_index=(schema, name), cleanup_index=(schema, name),
             cleanup=(ddl.drop_index(schema, name), ownership.forget(owner, schema, name)),
             build_table=(schema, spec.table)),
    ]


def _finished_build(d: DesiredIndex, info: IndexInfo, cat: Catalog) -> bool:
    """A valid index at the temporary name bound only by our build's intent for this very spec, and
    identical (as the server deparses it) to what that build makes: the build finished after the
    operator died, before it could pin the OID (ownership.pin_build)."""
    record = info.record
    expected = cat.expected_of(info.schema, info.name)
    return record is not None and record.how == "building" and not record.pinned and info.valid \
        and record.spec_hash == d.hash and bool(expected) and info.signature == expected \
        and info.table_schema == d.spec.schema_name and info.table == d.spec.table and info.building_pid is None


def _finish_build_step(d: DesiredIndex, owner: str) -> Step:
    schema, name = d.spec.schema_name, d.spec.name
    new = ddl.temp_name(name)
    return Step("mark", d.object, f"finish the interrupted build: rename index {schema}.{new} to {name}, "
                f"record it as owned by {owner}",
                (ddl.rename_index(schema, new, name), ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash)),
                 *ownership.record(owner, "index", schema, name, d.hash, "created"),
                 ownership.forget(owner, schema, new)), transactional=True)


def _create_index_steps(d: DesiredIndex, owner: str, why: str) -> list[Step]:
    """Build under the temporary name, then rename, mark and record in one short transaction."""
    schema, name = d.spec.schema_name, d.spec.name
    new = ddl.temp_name(name)
    steps = _build_steps(d, owner, new, why)
    steps.append(Step("mark", d.object, f"rename index {schema}.{new} to {name}, record it as owned by {owner}",
                      (ddl.rename_index(schema, new, name),
                       ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash)),
                       *ownership.record(owner, "index", schema, name, d.hash, "created"),
                       ownership.forget(owner, schema, new)), transactional=True))
    return steps


def _replace_index_steps(d: DesiredIndex, owner: str, existing: IndexInfo, why: str) -> list[Step]:
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    new, old = ddl.temp_name(name), ddl.old_name(name)
    steps = _build_steps(d, owner, new, f"replacement for {name} ({why})")
    steps.append(Step(
        "swap-index", d.object, f"swap {schema}.{new} in for {schema}.{name} (two renames, one short transaction)",
        (ownership.assert_oid(schema, name, existing.oid),
         ddl.rename_index(schema, name, old), ddl.rename_index(schema, new, name),
         ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash)),
         *ownership.record(owner, "index", schema, old, "", "replaced"),
         *ownership.record(owner, "index", schema, name, d.hash, "created"),
         ownership.forget(owner, schema, new)),
        transactional=True,
    ))
    renamed = dataclasses.replace(existing, name=old)  # same OID, under its new name
    steps.append(drop_index_step(d.object, owner, renamed, f"replaced by the new {name}"))
    return steps


def _adoptable(d: DesiredIndex, existing: IndexInfo, cat: Catalog) -> bool:
    expected = cat.expected_of(d.spec.schema_name, d.spec.name)
    return bool(expected) and existing.signature == expected and existing.valid and existing.ready \
        and existing.building_pid is None and existing.table_schema == d.spec.schema_name \
        and existing.table == d.spec.table


def index_steps(d: DesiredIndex, owner: str, cat: Catalog,
                 declared: set[tuple[str, str]]) -> tuple[list[Step], list[str], list[str]]:
    """(steps, conflicts, notes) for one declared index."""
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    steps: list[Step] = []
    notes: list[str] = []
    temp_taken = finished = False
    partitioned = cat.other_relation(schema, spec.table) == "p"
    for leftover in (ddl.temp_name(name), ddl.old_name(name)):
        info = cat.index(schema, leftover)
        if info is None or (schema, leftover) in declared or partitioned:  # plan_partitions sees to its own
            continue
        if _finished_build(d, info, cat) and cat.index(schema, name) is None:
            steps.append(_finish_build_step(d, owner))
            finished = True
        elif sweepable(info, owner) and not _bound(info):
            steps.append(drop_index_step(d.object, owner, info, "left over by an interrupted build or replacement"))
        else:
            why = _bound(info) if sweepable(info, owner) else foreign_reason(info, owner)
            notes.append(f"left alone: index {schema}.{leftover} ({why}); never dropped")
            temp_taken = temp_taken or leftover == ddl.temp_name(name)
    other = cat.other_relation(schema, name) or ("materialized view" if cat.view(schema, name) else None)
    if other:
        return [], [f"{d.field}: {schema}.{name} already exists as a {relkind(other)}; left alone"], notes
    existing = cat.index(schema, name)
    if partitioned:
        found, conflicts, found_notes = partitioned_index_steps(d, owner, cat, existing, declared)
        return steps + found, conflicts, notes + found_notes
    needs_build = existing is None or not existing.owned_by(owner) and spec.adopt == "Replace" \
        or existing.owned_by(owner) and (not existing.valid or bool(index_drift(d, existing)))
    if needs_build and temp_taken:
        return steps, [f"{d.field}: cannot build {schema}.{name}: the temporary name {ddl.temp_name(name)} is "
                       "taken by an index that is not this operator's; left alone (drop or rename it by hand)"], notes
    if existing is None:
        return steps + ([] if finished else _create_index_steps(d, owner, "missing")), [], notes
    if not existing.owned_by(owner):
        reason = foreign_reason(existing, owner)
        if existing.record is not None or existing.building_pid is not None or existing.primary:
            return steps, [f"{d.field}: index {schema}.{name} exists, {reason}; left alone"], notes
        if existing.constraint is not None:  # dropping or renaming it would touch the constraint
            return steps, [f"{d.field}: index {schema}.{name} implements constraint {existing.constraint}; "
                           "left alone (never adopted nor replaced)"], notes
        if _adoptable(d, existing, cat):
            return steps + [Step("adopt", d.object,
                                 f"adopt index {schema}.{name}: its definition equals the declared one "
                                 "(recorded as owned, no rebuild)",
                                 ownership.record(owner, "index", schema, name, d.hash, "adopted"),
                                 transactional=True)], [], notes
        if spec.adopt == "Replace":
            if _bound(existing):
                return steps, [_fk_conflict(d, existing, "adopt: Replace")], notes
            return steps + _replace_index_steps(d, owner, existing, "adopt: Replace"), [], notes
        uncompared = cat.uncompared_why(schema, name)
        if uncompared and existing.valid:  # never suggest rebuilding what may be identical
            return steps, [f"{d.field}: index {schema}.{name} exists, {reason}; its definition could not be "
                           f"compared with the declared one ({uncompared}); left alone, retried next time"], notes
        differs = "INVALID" if not existing.valid else "its definition differs from the declared one"
        return steps, [f"{d.field}: index {schema}.{name} exists, {reason} ({differs}); left alone. "
                       f"Set {d.field}.adopt: Replace to rebuild it"], notes
    if not existing.valid:
        return steps + [drop_index_step(d.object, owner, existing, "INVALID (failed or cancelled build)"),
                        *_create_index_steps(d, owner, "rebuild of an INVALID index")], [], notes
    drift = index_drift(d, existing)
    if drift and _bound(existing):
        return steps, [_fk_conflict(d, existing, drift)], notes
    if drift:
        return steps + _replace_index_steps(d, owner, existing, drift), [], notes
    return steps, [], notes


def sweepable(info: IndexInfo, owner: str) -> bool:
    """Recorded as ours and safe to sweep (undeclared or teardown): not being built by someone, and
    not a *valid* index bound only by an intent record (a stale intent must never adopt a DBA's
    index created later under that name). A valid index whose OID our build pinned on the intent
    (ownership.pin_build: a build that finished after the operator died) is ours."""
    return info.owned_by(owner) and info.building_pid is None \
        and not (info.record is not None and info.record.how == "building" and info.valid
                 and not info.record.pinned)
