"""Indexes on partitioned tables, without blocking writes (pure).

PostgreSQL 15 has no CREATE INDEX CONCURRENTLY on a partitioned table. The documented way instead:
`CREATE INDEX ... ON ONLY parent` (an INVALID parent index, instant: the parent holds no rows), then
`CREATE INDEX CONCURRENTLY` on each partition, then `ALTER INDEX parent ATTACH PARTITION child`; the
parent index becomes valid by itself once every partition has one attached. A partition added
later gets an index from PostgreSQL itself (CREATE TABLE ... PARTITION OF, ATTACH PARTITION); one
still missing (an interrupted build) is built and attached by the next reconcile. Each partition's
index is recorded as owned (ownership.py) right after its build, with an intent record before it.

A changed definition (or an attached partition index that is INVALID or was changed by hand) is
rebuilt the same way under the build name `<name>__new` (ON ONLY, CONCURRENTLY per partition,
attach), then swapped in by two renames in one short transaction and the old one dropped in
another (PostgreSQL 15 cannot drop a partitioned index CONCURRENTLY: a plain DROP INDEX, a brief
ACCESS EXCLUSIVE lock on the table and its partitions, under ddl.lockTimeout). Dropping a
partitioned index drops every index attached to it, so the rebuild is refused while one of them is
not recorded as this resource's (PostgreSQL attaches a DBA's matching index when a table is
attached as a partition), unless the spec says `adopt: Replace`. A partition's index alternates
between two names (`<partition>_<name>` and `<partition>_<name>_alt`): a rebuild builds under the
one the current index does not hold, so no index of a partition is ever renamed. A partitioned
index made by hand is adopted when the server deparses it as the declared one and it is valid;
`adopt: Replace` rebuilds a different one the same zero-downtime way.
"""

from __future__ import annotations

import dataclasses

from psycopg import sql

from .. import naming
from . import ddl, ownership
from .catalog import Catalog, IndexInfo
from .plan_guards import bound, fk_conflict
from .steps import Desired, DesiredIndex, Step, foreign_reason, index_drift

Found = tuple[list[Step], list[str], list[str]]  # (steps, conflicts, notes)


def partition_index_name(name: str, partition: str) -> str:
    """`<partition>_<index>`, kept within 63 bytes (a hash replaces what does not fit)."""
    full = f"{partition}_{name}"
    if len(full.encode()) <= naming.MAX_IDENTIFIER_BYTES:
        return full
    return f"{full[: naming.MAX_IDENTIFIER_BYTES - 9]}_{naming.short_hash(full, length=8)}"


def child_names(name: str, partition: str) -> tuple[str, str]:
    """The two names the index of declared index `name` on `partition` alternates between (neither
    looks like a temporary name: both are live, attached indexes in turn)."""
    return partition_index_name(name, partition), partition_index_name(f"{name}_alt", partition)


def observed_child_names(desired: Desired,
                         partitions: tuple[tuple[str, str, str, str, str], ...]) -> list[tuple[str, str]]:
    """The partition index names observation reads (as it reads a declared index's temporaries)."""
    names = []
    for d in desired.indexes:
        for table_schema, table, p_schema, partition, _ in partitions:
            if (table_schema, table) == (d.spec.schema_name, d.spec.table):
                names += [(p_schema, n) for n in child_names(d.spec.name, partition)]
    return sorted(set(names))


def _assert_ready(owner: str, schema: str, name: str) -> sql.Composed:
    """Fail unless `schema.name` is the index this resource recorded under that name (same OID) and
    is valid: the swap puts in place only the rebuild it made, once every partition is attached."""
    body = sql.SQL(
        "BEGIN IF NOT EXISTS (SELECT 1 FROM {records} r JOIN pg_catalog.pg_index i ON i.indexrelid = r.oid "
        "WHERE r.schema_name = {schema} AND r.name = {name} AND r.owner = {owner} AND i.indisvalid "
        "AND r.oid = pg_catalog.to_regclass({reg})) THEN "
        "RAISE EXCEPTION 'index % is not the valid rebuild this resource made: not swapped', {reg} "
        "USING ERRCODE = 'object_not_in_prerequisite_state'; END IF; END"
    ).format(records=ownership.RECORDS, schema=sql.Literal(schema), name=sql.Literal(name),
             owner=sql.Literal(owner), reg=sql.Literal(ddl.render(ddl.qualified(schema, name))))
    return sql.SQL("DO {}").format(sql.Literal(ddl.render(body)))


def _drop_step(d: DesiredIndex, owner: str, info: IndexInfo, why: str, children: list[tuple[str, str]],
               replace: bool = False) -> Step:
    """`replace`: the spec says adopt: Replace, so indexes attached that are not ours go too."""
    schema, name = info.schema, info.name
    forget = [ownership.forget(owner, s, n) for s, n in children]
    guard = () if replace else (ownership.assert_partitions_ours(owner, schema, name),)
    if info.table_kind == "p":  # no CONCURRENTLY for a partitioned index (its partitions' go with it)
        return Step("drop-index", d.object, f"drop partitioned index {schema}.{name} (with its partitions' "
                    f"indexes; a brief ACCESS EXCLUSIVE lock on the table, under lockTimeout): {why}",
                    (ownership.assert_oid(schema, name, info.oid), *guard, ddl.drop_partitioned_index(schema, name),
                     ownership.forget(owner, schema, name), *forget), transactional=True)
    return Step("drop-index", d.object, f"drop index {schema}.{name} CONCURRENTLY: {why}",
                (ownership.assert_oid(schema, name, info.oid), ddl.drop_index(schema, name),
                 ownership.forget(owner, schema, name)), transactional=False, lock_policy="index")


def _sweepable(info: IndexInfo, owner: str) -> bool:
    """Ours to drop: recorded (or an INVALID leftover of our intent), nobody building it."""
    record = info.record
    return info.owned_by(owner) and info.building_pid is None and record is not None \
        and not (record.how == "building" and info.valid and not record.pinned) and not bound(info)


def _build_child(d: DesiredIndex, owner: str, p_schema: str, partition: str, child: str, parent: str) -> list[Step]:
    spec = d.spec
    return [
        Step("intent", d.object, f"record the intent to build {p_schema}.{child} (what a crash leaves is ours)",
             (ownership.intent(owner, p_schema, child, p_schema, partition, d.hash),), transactional=True,
             cleanup=(ownership.forget_intent(owner, p_schema, child),)),
        # No cleanup once built: what a later failure leaves (a recorded, valid, unattached index) is
        # attached by the next reconcile instead of being built again.
        Step("create-index", d.object, f"build index {p_schema}.{child} on partition {partition} CONCURRENTLY",
             (ddl.create_index_on(spec, child, table=partition, schema=p_schema),), transactional=False,
             lock_policy="index", verify_index=(p_schema, child), cleanup_index=(p_schema, child),
             build_table=(p_schema, partition)),
        Step("record", d.object, f"record {p_schema}.{child} as owned by {owner}",
             ownership.record(owner, "index", p_schema, child, d.hash, "created"), transactional=True),
        _attach(d, p_schema, child, parent),
    ]


def _attach(d: DesiredIndex, p_schema: str, child: str, parent: str) -> Step:
    schema = d.spec.schema_name
    return Step("attach-index", d.object, f"attach {p_schema}.{child} to {schema}.{parent}",
                (ddl.attach_index(schema, parent, p_schema, child),), transactional=True)


def _child_steps(d: DesiredIndex, owner: str, cat: Catalog, parent: str) -> tuple[list[Step], list[str]]:
    """Build (or finish) an index for every partition that has none attached to `parent`."""
    spec = d.spec
    steps: list[Step] = []
    conflicts: list[str] = []
    attached = set(cat.attached_partitions(spec.schema_name, parent))
    for p_schema, partition, kind in cat.partitions_of(spec.schema_name, spec.table):
        if (p_schema, partition) in attached:
            steps += _orphans(d, owner, cat, p_schema, partition)
            continue
        if kind != "r":
            conflicts.append(f"{d.field}: partition {p_schema}.{partition} of {spec.table} is a "
                             f"{'partitioned table' if kind == 'p' else 'foreign table'}: not supported, its "
                             f"index is not built and {spec.schema_name}.{parent} stays INVALID")
            continue
        taken = []
        for child in child_names(spec.name, partition):
            info = cat.index(p_schema, child)
            if info is None:
                steps += _build_child(d, owner, p_schema, partition, child, parent)
                break
            ours = info.owned_by(owner) and info.table_schema == p_schema and info.table == partition
            if ours and not cat.is_attached_child(p_schema, child) and info.record is not None \
                    and info.valid and info.record.spec_hash == d.hash \
                    and (info.record.how == "created" or info.record.pinned):
                steps += [Step("record", d.object, f"record {p_schema}.{child} (built by an earlier run) as owned",
                               ownership.record(owner, "index", p_schema, child, d.hash, "created"),
                               transactional=True), _attach(d, p_schema, child, parent)]
                break
            if ours and not cat.is_attached_child(p_schema, child) and _sweepable(info, owner):
                steps.append(_drop_step(d, owner, info, "left over by an interrupted build", []))
                steps += _build_child(d, owner, p_schema, partition, child, parent)
                break
            current = cat.is_attached_child(p_schema, child)
            taken.append(f"{child} ({'the current index' if current else foreign_reason(info, owner)})")
        else:
            conflicts.append(f"{d.field}: cannot build the index of partition {p_schema}.{partition}: both names "
                             f"it may take are in use: {'; '.join(taken)}; left alone (drop or rename the one that "
                             "is not this resource's by hand)")
    return steps, conflicts


def _orphans(d: DesiredIndex, owner: str, cat: Catalog, p_schema: str, partition: str) -> list[Step]:
    """Drop our unattached index at a partition's other name: a build that outlived the operator
    (its backend went on after the client died) while the next reconcile built one elsewhere."""
    steps = []
    for child in child_names(d.spec.name, partition):
        info = cat.index(p_schema, child)
        if info is not None and not cat.is_attached_child(p_schema, child) and _sweepable(info, owner) \
                and (info.table_schema, info.table) == (p_schema, partition):
            steps.append(_drop_step(d, owner, info, "left over by an interrupted build (the partition has its "
                                    "index)", []))
    return steps


def _rebuild_reason(d: DesiredIndex, owner: str, cat: Catalog, existing: IndexInfo) -> str:
    """Why the partitioned index must be rebuilt, or "" (missing partition indexes are just added)."""
    drift = index_drift(d, existing)
    if drift:
        return drift
    for c_schema, child, p_schema, partition in cat.children(existing.schema, existing.name):
        info = cat.index(c_schema, child)
        if (c_schema, child) in cat.invalid_children:
            return f"its index {c_schema}.{child} on partition {p_schema}.{partition} is INVALID"
        if info is not None and info.owned_by(owner) and info.record is not None \
                and info.record.how == "created" and info.record.def_hash != info.def_hash:
            return f"its index {c_schema}.{child} on partition {p_schema}.{partition} was changed by hand"
    return ""


def _foreign_children(owner: str, cat: Catalog, existing: IndexInfo) -> list[str]:
    found = []
    for c_schema, child, p_schema, partition in cat.children(existing.schema, existing.name):
        info = cat.index(c_schema, child)
        if info is None or not info.owned_by(owner):
            found.append(f"{c_schema}.{child} on partition {p_schema}.{partition}")
    return found


def _parent_step(d: DesiredIndex, owner: str, name: str, why: str) -> Step:
    spec = d.spec
    schema = spec.schema_name
    return Step("create-index-parent", d.object,
                f"create index {schema}.{name} ON ONLY {spec.table}{why} (INVALID until every partition's index is "
                "attached; instant: a partitioned table holds no rows itself)",
                (ddl.create_index_on(spec, name, concurrently=False, only=True),
                 ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash)),
                 *ownership.record(owner, "index", schema, name, d.hash, "created")), transactional=True)


def _leftover(d: DesiredIndex, owner: str, cat: Catalog, declared: set[tuple[str, str]], name: str,
              keep: bool) -> tuple[list[Step], str]:
    """(drop of our leftover at `name` unless `keep`, or why the name is taken by something not ours)."""
    schema = d.spec.schema_name
    info = cat.index(schema, name)
    if info is None or (schema, name) in declared or keep:
        return [], ""
    if _sweepable(info, owner):
        children = [(s, c) for s, c, _, _ in cat.children(schema, name) if (i := cat.index(s, c)) is not None
                    and i.owned_by(owner)]
        foreign = [c for s, c, _, _ in cat.children(schema, name) if (s, c) not in children]
        if foreign:  # dropping it would drop them (a DBA's index attached since, with their partition)
            return [], f"index {schema}.{name} (indexes not this resource's are attached to it: {', '.join(foreign)})"
        return [_drop_step(d, owner, info, "left over by an interrupted rebuild", children)], ""
    return [], f"index {schema}.{name} ({bound(info) or foreign_reason(info, owner)})"


def _foreign_index(d: DesiredIndex, owner: str, cat: Catalog, existing: IndexInfo) -> Found | None:
    """An index under the declared name that is not ours: adopted when identical (as the server deparses
    it) and valid, rebuilt with `adopt: Replace` (None: go on with the rebuild), else left alone."""
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    reason = foreign_reason(existing, owner)
    if existing.record is not None or existing.building_pid is not None or existing.primary \
            or existing.constraint is not None:
        return [], [f"{d.field}: index {schema}.{name} exists, {reason}; left alone"], []
    expected = cat.expected_of(schema, name)
    if expected and existing.signature == expected and existing.valid and existing.ready \
            and (existing.table_schema, existing.table) == (schema, spec.table):
        # Its partitions' indexes are not recorded: a later rebuild asks for adopt: Replace (they go with it).
        return [Step("adopt", d.object, f"adopt partitioned index {schema}.{name}: its definition equals the "
                     "declared one and every partition has it (recorded as owned, no rebuild)",
                     ownership.record(owner, "index", schema, name, d.hash, "adopted"), transactional=True)], [], []
    if spec.adopt == "Replace":
        return None
    uncompared = cat.uncompared_why(schema, name)
    differs = "INVALID: a partition has no valid index attached" if not existing.valid else \
        f"its definition could not be compared ({uncompared})" if uncompared else \
        "its definition differs from the declared one"
    return [], [f"{d.field}: partitioned index {schema}.{name} exists, {reason} ({differs}); left alone. "
                f"Set {d.field}.adopt: Replace to rebuild it"], []


def partitioned_index_steps(d: DesiredIndex, owner: str, cat: Catalog, existing: IndexInfo | None,
                            declared: set[tuple[str, str]]) -> Found:
    """(steps, conflicts, notes) for a declared index whose table is partitioned."""
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    build, old = ddl.temp_name(name), ddl.old_name(name)
    why = ""
    if existing is not None and not existing.owned_by(owner):
        foreign = _foreign_index(d, owner, cat, existing)
        if foreign is not None:
            return foreign
        why = "adopt: Replace"
    elif existing is not None:
        why = _rebuild_reason(d, owner, cat, existing)
    pending = cat.index(schema, build)
    resume = bool(why) and pending is not None and pending.owned_by(owner) and pending.record is not None \
        and pending.record.how == "created" and pending.record.spec_hash == d.hash and pending.table_kind == "p" \
        and (pending.table_schema, pending.table) == (schema, spec.table)
    steps, notes = [], []
    taken: dict[str, str] = {}
    for leftover, keep in ((old, False), (build, resume)):
        found, problem = _leftover(d, owner, cat, declared, leftover, keep)
        steps += found
        if problem:
            notes.append(f"left alone: {problem}; never dropped")
            taken[leftover] = problem
    if existing is None or not why:
        found, conflicts = _child_steps(d, owner, cat, name)
        if existing is None:
            found = [_parent_step(d, owner, name, ""), *found]
        if any(s.kind == "attach-index" for s in found):  # an adopted index stays adopted (kept by a teardown)
            how: ownership.How = "adopted" if existing is not None and existing.record is not None \
                and existing.record.how == "adopted" else "created"
            found.append(Step("mark", d.object, f"record {schema}.{name} (valid once every partition is attached)",
                              (ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash)),
                               *ownership.record(owner, "index", schema, name, d.hash, how)),
                              transactional=True))
        return steps + found, conflicts, notes
    return _rebuild(d, owner, cat, existing, why, resume, taken, steps, notes)


def _rebuild(d: DesiredIndex, owner: str, cat: Catalog, existing: IndexInfo, why: str, resume: bool,
             taken: dict[str, str], steps: list[Step], notes: list[str]) -> Found:
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    build, old = ddl.temp_name(name), ddl.old_name(name)
    refuse = f"{d.field}: index {schema}.{name} on partitioned table {spec.table} must be rebuilt ({why}) but"
    if bound(existing):
        return steps, [fk_conflict(d, existing, why)], notes
    if taken:
        return steps, [f"{refuse} the name(s) it needs are taken: {'; '.join(taken.values())}; left alone (drop or "
                       "rename them by hand)"], notes
    foreign = _foreign_children(owner, cat, existing)
    if foreign and spec.adopt != "Replace":
        return steps, [f"{refuse} index(es) attached to it are not this resource's: {', '.join(foreign)} "
                       "(PostgreSQL attaches a matching index when a table becomes a partition, and creates one "
                       "for a partition created later); dropping the old index would drop them with it, so "
                       f"nothing is done. Set {d.field}.adopt: Replace to rebuild anyway (they are dropped with "
                       "the old index)"], notes
    found, conflicts = _child_steps(d, owner, cat, build) if resume else ([], [])
    if not resume:
        # A stale build parent of ours is dropped first (_leftover), with the indexes attached to it.
        gone = {(s, c) for s, c, _, _ in cat.children(schema, build)}
        fresh = dataclasses.replace(cat, indexes=tuple(i for i in cat.indexes if (i.schema, i.name) not in gone),
                                    attached=tuple(a for a in cat.attached if (a[0], a[1]) != (schema, build)))
        found, conflicts = _child_steps(d, owner, fresh, build)
        found.insert(0, _parent_step(d, owner, build, f" (rebuild of {name}: {why})"))
    if conflicts:
        return steps, conflicts, notes
    ours_children = [(s, c) for s, c, _, _ in cat.children(schema, name)
                     if (i := cat.index(s, c)) is not None and i.owned_by(owner)]
    swap = Step(
        "swap-index", d.object, f"swap {schema}.{build} in for {schema}.{name} (two renames, one short transaction)",
        (ownership.assert_oid(schema, name, existing.oid), _assert_ready(owner, schema, build),
         ddl.rename_index(schema, name, old), ddl.rename_index(schema, build, name),
         ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash)),
         *ownership.record(owner, "index", schema, old, "", "replaced"),
         *ownership.record(owner, "index", schema, name, d.hash, "created"),
         ownership.forget(owner, schema, build)), transactional=True)
    also = f" and {', '.join(foreign)} (not this resource's: adopt: Replace)" if foreign else ""
    renamed = dataclasses.replace(existing, name=old)  # same OID, under its new name
    drop = _drop_step(d, owner, renamed, f"replaced by the rebuilt {name}{also}", ours_children,
                      replace=spec.adopt == "Replace")
    return steps + found + [swap, drop], [], notes
