"""Planning of materialized views (pure): create, adopt, repair, and the lossless swap.

A changed view is rebuilt under a temporary name in one transaction (invisible to everyone else
until it commits) with everything the old view had that the spec does not mention: every index
on it (the server's own deparsed definition, re-created on the new view under a temporary name),
table and column privileges, storage parameters, the view and column comments, and the owner.
Then one short transaction (under lockTimeout) checks the old view is still the planned OID,
drops it, renames the new view and its indexes into place and moves the ownership records. A view
other views depend on is not swapped: that is a Conflict (DROP would need CASCADE).
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

from .. import naming
from . import ddl, ownership, view_calls
from .catalog import Catalog, IndexInfo, ViewInfo
from .steps import DesiredView, Step, ViewCheck, foreign_reason, relkind, view_drift


def drop_view_step(obj: str, owner: str, view: ViewInfo, why: str) -> Step:
    return Step("drop-view", obj, f"drop materialized view {view.schema}.{view.name}: {why}",
                (ownership.assert_oid(view.schema, view.name, view.oid), ddl.drop_view(view.schema, view.name),
                 ownership.forget(owner, view.schema, view.name)), transactional=True)


def view_key(view: ViewInfo, cat: Catalog, key: Sequence[str]) -> IndexInfo | None:
    """An index on the view usable by REFRESH ... CONCURRENTLY (ours by name first, any other next)."""
    usable = [i for i in cat.indexes_on(view.schema, view.name)
              if i.valid and i.unique and not i.partial and not i.expressions and i.key_columns == tuple(key)]
    usable.sort(key=lambda i: i.name != ddl.view_key_name(view.name))
    return usable[0] if usable else None


def _create_statements(d: DesiredView, owner: str, name: str) -> list[sql.Composed]:
    spec = d.spec
    schema = spec.schema_name
    return [
        # Stored WITH NO DATA (resolved, not run), checked for volatile functions, then populated:
        # a function made VOLATILE since the plan fails this transaction before it runs (view_calls.py).
        ddl.create_view(schema, name, spec.query, with_data=False),
        *_guard(d, schema, name),
        ddl.refresh_view(schema, name),
        # Inside the creating transaction the view is invisible to everyone else: a plain
        # CREATE INDEX is atomic with it (no INVALID leftover possible) and blocks nobody.
        ddl.create_view_index(schema, name, ddl.view_key_name(name), spec.unique_key, concurrently=False),
    ]


def _guard(d: DesiredView, schema: str, name: str) -> list[sql.Composed]:
    return [] if d.spec.allow_volatile_functions else [view_calls.guard(schema, name, d.field)]


def _record_view(owner: str, d: DesiredView, name: str, how: ownership.How) -> list[sql.Composed]:
    schema = d.spec.schema_name
    return [*ownership.record(owner, "view", schema, name, d.hash, how),
            *ownership.record(owner, "index", schema, ddl.view_key_name(name), "", "created")]


def _carried(existing: ViewInfo, cat: Catalog) -> list[IndexInfo]:
    """Indexes of the old view re-created on the new one: every one but `<view>__key`, the unique
    index the new view is built with."""
    return [i for i in cat.indexes_on(existing.schema, existing.name) if i.name != ddl.view_key_name(existing.name)]


def _would_lose(existing: ViewInfo, cat: Catalog) -> list[str]:
    """What the swap cannot carry over to the new view: reported as a Conflict instead."""
    lost = ["its tablespace"] if existing.in_tablespace else []
    if existing.statistics:
        lost.append(f"extended statistics {', '.join(existing.statistics)}")
    if existing.column_options:
        lost.append(f"statistics targets or options of column(s) {', '.join(existing.column_options)}")
    indexes = cat.indexes_on(existing.schema, existing.name)
    lost += [f"the tablespace of index {i.name}" for i in indexes if i.in_tablespace]
    lost += [f"the CLUSTER ON mark of index {i.name}" for i in indexes if i.clustered]
    return lost


def _swap_steps(d: DesiredView, owner: str, cat: Catalog, existing: ViewInfo, why: str,
                check: ViewCheck) -> tuple[list[Step], list[str]]:
    spec = d.spec
    schema, name, tmp = spec.schema_name, spec.name, ddl.temp_name(spec.name)
    if existing.dependents:
        return [], [f"{d.field}: {schema}.{name} must be rebuilt ({why}) but {', '.join(existing.dependents)} "
                    "depend on it: not swapped, left as it is (drop or change the dependent views first)"]
    carried = _carried(existing, cat)
    lost = _would_lose(existing, cat)
    if lost:
        return [], [f"{d.field}: {schema}.{name} must be rebuilt ({why}) but the swap would lose {'; '.join(lost)}: "
                    "not swapped, left as it is (remove them by hand, or rebuild the view by hand)"]
    build = _create_statements(d, owner, tmp)
    renames = []
    for index in carried:
        build.append(ddl.index_like(schema, tmp, naming.temp_object_name(index.name, "new"), index.signature))
        if index.comment:
            build.append(ddl.comment_index(schema, naming.temp_object_name(index.name, "new"), index.comment))
        renames.append(ddl.rename_index(schema, naming.temp_object_name(index.name, "new"), index.name))
    # The new view's privileges are exactly the old one's: first undo the default privileges.
    build += [ddl.revoke_all(schema, tmp, grantee) for grantee in existing.default_grantees]
    build += [ddl.grant(g.privilege, schema, tmp, g.grantee, g.grantable) for g in existing.grants
              if g.privilege in ddl.PRIVILEGES]
    build += [ddl.grant_column(g.privilege, schema, tmp, g.column, g.grantee, g.grantable)
              for g in existing.column_grants if g.privilege in ddl.PRIVILEGES and g.column]
    if existing.reloptions:
        build.append(ddl.set_reloptions(schema, tmp, existing.reloptions))
    if existing.comment and existing.marker is None:
        build.append(ddl.comment_view(schema, tmp, existing.comment))  # a human's comment is kept as is
    else:
        build.append(ddl.mark("MATERIALIZED VIEW", schema, tmp, ddl.marker_prefix(owner, d.hash)))
    build += [ddl.comment_column(schema, tmp, column, text) for column, text in existing.column_comments]
    if existing.owner != cat.user:
        build.append(ddl.set_view_owner(schema, tmp, existing.owner))
    build += ownership.record(owner, "view", schema, tmp, d.hash, "created")
    what = f"{len(carried)} index(es), {len(existing.grants) + len(existing.column_grants)} privilege(s)"
    swap = [ownership.assert_oid(schema, name, existing.oid), ddl.drop_view(schema, name),
            ddl.rename_view(schema, tmp, name),
            ddl.rename_index(schema, ddl.view_key_name(tmp), ddl.view_key_name(name)), *renames,
            *_record_view(owner, d, name, "created")]
    for index in carried:
        if index.owned_by(owner) and index.record is not None:
            how: ownership.How = "adopted" if index.record.how == "adopted" else "created"
            swap += ownership.record(owner, "index", schema, index.name, index.record.spec_hash, how)
    swap.append(ownership.forget(owner, schema, tmp))
    return [
        Step("create-view", d.object,
             f"build {schema}.{tmp} ({why}): populated, with {what}, options, comments and owner of {name}",
             tuple(build), transactional=True, check_view=check,
             cleanup=(ddl.drop_view(schema, tmp), ownership.forget(owner, schema, tmp))),
        Step("swap-view", d.object, f"swap {schema}.{tmp} in for {schema}.{name} (one short transaction)",
             tuple(swap), transactional=True),
    ], []


def _key_steps(d: DesiredView, owner: str, cat: Catalog, existing: ViewInfo) -> list[Step]:
    """Build the unique index REFRESH ... CONCURRENTLY needs when the view has none usable."""
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    if view_key(existing, cat, spec.unique_key) is not None:
        return []
    key_name = ddl.view_key_name(name)
    taken = cat.index(schema, key_name)
    first = []
    if taken is not None:
        if not taken.owned_by(owner) or taken.building_pid is not None:
            return []  # someone else's index under that name: never dropped (the status says no unique index)
        first.append(Step("drop-index", d.object, f"drop index {schema}.{key_name} CONCURRENTLY: not the unique "
                          "index the view needs", (ownership.assert_oid(schema, key_name, taken.oid),
                                                   ddl.drop_index(schema, key_name),
                                                   ownership.forget(owner, schema, key_name)),
                          transactional=False, lock_policy="index"))
    return first + [
        Step("intent", d.object, f"record the intent to build {schema}.{key_name}",
             (ownership.intent(owner, schema, key_name, schema, name, ""),), transactional=True,
             cleanup=(ownership.forget_intent(owner, schema, key_name),)),
        Step("create-index", d.object, f"build unique index {schema}.{key_name} on {name} CONCURRENTLY",
             (ddl.create_view_index(schema, name, key_name, spec.unique_key, concurrently=True),),
             transactional=False, lock_policy="index", verify_index=(schema, key_name),
             cleanup_index=(schema, key_name), build_table=(schema, name)),
        Step("mark", d.object, f"record {schema}.{key_name} as owned by {owner}",
             ownership.record(owner, "index", schema, key_name, "", "created"), transactional=True),
    ]


def view_steps(d: DesiredView, owner: str, cat: Catalog,
               declared: set[tuple[str, str]]) -> tuple[list[Step], list[str], list[str]]:
    """(steps, conflicts, notes) for one declared materialized view; none of its DDL when its query
    calls a volatile function (the server's resolution of it, view_calls.py) and the view does not
    opt in: refused before anything runs."""
    steps, conflicts, notes = _view_steps(d, owner, cat, declared)
    refused = view_calls.refusal(d.spec, d.field, cat.calls_of(d.spec.schema_name, d.spec.name))
    if refused and any(s.kind in ("create-view", "adopt", "refresh-view") for s in steps):
        return [], [refused], notes
    return steps, conflicts, notes


def _view_steps(d: DesiredView, owner: str, cat: Catalog,
                declared: set[tuple[str, str]]) -> tuple[list[Step], list[str], list[str]]:
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    check = ViewCheck(spec.query, tuple(spec.unique_key), d.field)
    steps: list[Step] = []
    notes: list[str] = []
    tmp = ddl.temp_name(name)
    leftover = cat.view(schema, tmp)
    if leftover and (schema, tmp) not in declared:
        if leftover.owned_by(owner):
            steps.append(drop_view_step(d.object, owner, leftover, "left over by an interrupted swap"))
        else:
            notes.append(f"left alone: materialized view {schema}.{tmp} ({foreign_reason(leftover, owner)}); "
                         "never dropped")
    other = cat.other_relation(schema, name) or ("i" if cat.index(schema, name) else None)
    if other:
        return [], [f"{d.field}: {schema}.{name} already exists as a {relkind(other)}; left alone"], notes
    existing = cat.view(schema, name)
    key_name = ddl.view_key_name(name if existing is None else tmp)
    taken = cat.index(schema, key_name)
    if taken is not None and (taken.table_schema, taken.table) != (schema, name if existing is None else tmp) \
            and (existing is None or view_drift(d, existing) or not existing.owned_by(owner)):
        notes.append(f"left alone: index {schema}.{key_name} on {taken.table} ({foreign_reason(taken, owner)}); "
                     "never dropped")
        if existing is None or existing.owned_by(owner) or spec.adopt == "Replace":
            return steps, [f"{d.field}: cannot build {schema}.{name}: the name {key_name} of its unique index is "
                           "taken by an index that is not this operator's; left alone (rename it by hand)"], notes
    if existing is None:
        steps.append(Step(
            "create-view", d.object,
            f"create materialized view {schema}.{name} with its unique index ({', '.join(spec.unique_key)}), "
            "populated, in one transaction",
            (*_create_statements(d, owner, name),
             ddl.mark("MATERIALIZED VIEW", schema, name, ddl.marker_prefix(owner, d.hash)),
             *_record_view(owner, d, name, "created")),
            transactional=True, check_view=check,
        ))
        return steps, [], notes
    temp_taken = leftover is not None and not leftover.owned_by(owner)
    if not existing.owned_by(owner):
        reason = foreign_reason(existing, owner)
        if existing.record is not None:
            return steps, [f"{d.field}: materialized view {schema}.{name} exists, {reason}; left alone"], notes
        expected = cat.expected_of(schema, name)
        if expected and expected == existing.def_hash:
            steps.append(Step("adopt", d.object,
                              f"adopt materialized view {schema}.{name}: its query equals the declared one "
                              "(recorded as owned, no rebuild)",
                              ownership.record(owner, "view", schema, name, d.hash, "adopted"), transactional=True))
            return steps + _repairs(d, owner, cat, existing), [], notes
        if spec.adopt == "Replace" and not temp_taken:
            found, conflicts = _swap_steps(d, owner, cat, existing, "adopt: Replace", check)
            return steps + found, conflicts, notes
        uncompared = cat.uncompared_why(schema, name)
        if uncompared:  # never suggest rebuilding what may be identical
            return steps, [f"{d.field}: materialized view {schema}.{name} exists, {reason}; its query could not "
                           f"be compared with the declared one ({uncompared}); left alone, retried next time"], notes
        return steps, [f"{d.field}: materialized view {schema}.{name} exists, {reason} (its query differs from "
                       f"the declared one); left alone. Set {d.field}.adopt: Replace to rebuild it"], notes
    drift = view_drift(d, existing)
    if drift:
        if temp_taken:
            return steps, [f"{d.field}: cannot rebuild {schema}.{name}: the temporary name {tmp} is taken by a "
                           "view that is not this operator's; left alone"], notes
        found, conflicts = _swap_steps(d, owner, cat, existing, drift, check)
        return steps + found, conflicts, notes
    return steps + _repairs(d, owner, cat, existing), [], notes


def _repairs(d: DesiredView, owner: str, cat: Catalog, existing: ViewInfo) -> list[Step]:
    schema, name = d.spec.schema_name, d.spec.name
    steps = _key_steps(d, owner, cat, existing)
    if not existing.populated:
        steps.append(Step("refresh-view", d.object, f"populate {schema}.{name} (it holds no data)",
                          (ddl.refresh_view(schema, name),), transactional=True))
    return steps
