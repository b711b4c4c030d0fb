"""DDL for indexes, materialized views and database settings, as `psycopg.sql.Composed`.

Pure builders: no connection, no clock. Every name goes through `sql.Identifier` and every value
through `sql.Literal`; the only raw SQL text taken from a spec is a view query or an index
predicate, and both are the deparsed output of PostgreSQL's own parser (`sqlcheck`), re-checked
here so that a spec built without validation cannot smuggle a second statement in.

Marker, written with `COMMENT ON` on every object the operator creates, for humans only:

    marketplacedb.io/owner=<namespace>/<name>;hash=<sha256 of desired definition>;def=<sha256 of live definition>

It proves nothing (a comment is copied by `LIKE ... INCLUDING ALL` and writable by any owner):
ownership and drift are decided by the ownership record (ownership.py), which names the object's
OID and keeps the same two hashes. `def` is the sha256 of `pg_get_indexdef` / `pg_get_viewdef`
taken by the server (search_path pinned to pg_catalog so the text is fully qualified).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from psycopg import sql

from .. import naming
from ..api.v1alpha1 import IndexSpec, MaterializedViewSpec
from ..sqlcheck import normalize_expression, normalize_predicate, normalize_select

MARKER_PREFIX = f"{naming.GROUP}/owner="
ObjectKind = Literal["INDEX", "MATERIALIZED VIEW"]

# Table privileges that GRANT accepts on a materialized view, by aclexplode()'s privilege_type.
# Only names from this table ever become SQL keywords.
PRIVILEGES = {
    "SELECT": sql.SQL("SELECT"),
    "INSERT": sql.SQL("INSERT"),
    "UPDATE": sql.SQL("UPDATE"),
    "DELETE": sql.SQL("DELETE"),
    "TRUNCATE": sql.SQL("TRUNCATE"),
    "REFERENCES": sql.SQL("REFERENCES"),
    "TRIGGER": sql.SQL("TRIGGER"),
}


def render(query: sql.Composable) -> str:
    """The exact text psycopg sends; psycopg >= 3.2 renders Composed without a connection.

    Without a connection, literals are quoted in the `E'...'` form when they hold a backslash,
    which means the same thing whatever `standard_conforming_strings` is set to on the server.
    """
    return query.as_string(None)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def qualified(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


# --- names --------------------------------------------------------------------------------------


def temp_name(name: str) -> str:
    """Where a replacement is built before the swap."""
    return naming.temp_object_name(name, "new")


def old_name(name: str) -> str:
    """Where a replaced index waits for its DROP INDEX CONCURRENTLY."""
    return naming.temp_object_name(name, "old")


def view_key_name(view: str) -> str:
    """The unique index REFRESH MATERIALIZED VIEW CONCURRENTLY needs."""
    return naming.temp_object_name(view, "key")


# --- marker ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Marker:
    owner: str
    spec_hash: str
    def_hash: str


def marker_prefix(owner: str, spec_hash: str) -> str:
    """The marker up to `def=`; the server appends the hash of the live definition."""
    return f"{MARKER_PREFIX}{owner};hash={spec_hash};def="


def parse_marker(comment: str | None) -> Marker | None:
    """The marker in an object's comment, or None when the comment is not ours."""
    if not comment or not comment.startswith(MARKER_PREFIX):
        return None
    fields: dict[str, str] = {}
    for part in comment[len(naming.GROUP) + 1 :].split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    if not fields.get("owner"):
        return None
    return Marker(owner=fields["owner"], spec_hash=fields.get("hash", ""), def_hash=fields.get("def", ""))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def index_hash(spec: IndexSpec) -> str:
    """sha256 of the normalized desired definition (the name is the identity, not the definition)."""
    where = normalize_predicate(spec.where) if spec.where else None
    return sha256(_canonical({
        "schema": spec.schema_name,
        "table": spec.table,
        "columns": [[c.name, c.order, c.nulls] for c in spec.columns],
        "include": list(spec.include),
        "where": where,
        "unique": spec.unique,
        **_index_extras(spec),
    }))


def _index_extras(spec: IndexSpec) -> dict[str, Any]:
    """What issue 18 added, only when not the default: the hash of a plain btree index (and with it
    every existing ownership record) is unchanged, so upgrading rebuilds nothing."""
    extras: dict[str, Any] = {}
    if spec.method != "btree":
        extras["method"] = spec.method
    if any(c.expression is not None or c.opclass is not None for c in spec.columns):
        extras["keys"] = [[c.name, c.expression, c.opclass] for c in spec.columns]
    storage = _storage(spec)
    if storage:
        extras["storage"] = storage
    return extras


def _storage(spec: IndexSpec) -> dict[str, int | bool]:
    if spec.storage is None:
        return {}
    return {k: v for k, v in spec.storage.model_dump(exclude_none=True).items()}


def view_hash(spec: MaterializedViewSpec) -> str:
    """sha256 of the normalized query and unique key (refresh policy is not part of the DDL)."""
    return sha256(_canonical({
        "schema": spec.schema_name,
        "query": normalize_select(spec.query),
        "uniqueKey": list(spec.unique_key),
    }))


def mark(kind: ObjectKind, schema: str, name: str, prefix: str) -> sql.Composed:
    """COMMENT ON the object with `prefix` + sha256 of its live definition, computed by the server.

    A DO block so that the plan holds the exact SQL before the object exists. The body is passed as
    an ordinary quoted literal (never dollar-quoted) so that no identifier can end it early.
    search_path is pinned to pg_catalog for the definition (and restored) so the text is fully
    qualified: the same text the catalog observation hashes.
    """
    getter = "pg_get_indexdef" if kind == "INDEX" else "pg_get_viewdef"
    reg = sql.Literal(render(qualified(schema, name)))
    body = sql.SQL(
        "DECLARE old_path text := pg_catalog.current_setting('search_path'); "
        "BEGIN PERFORM pg_catalog.set_config('search_path', 'pg_catalog', true); "
        "EXECUTE pg_catalog.format('COMMENT ON {kind} %s IS %L', {reg}::pg_catalog.regclass, "
        "{prefix} || pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to("
        "pg_catalog.{getter}({reg}::pg_catalog.regclass), 'UTF8')), 'hex')); "
        "PERFORM pg_catalog.set_config('search_path', old_path, true); END"
    ).format(kind=sql.SQL(kind), reg=reg, prefix=sql.Literal(prefix), getter=sql.SQL(getter))
    return sql.SQL("DO {}").format(sql.Literal(render(body)))


# --- indexes -------------------------------------------------------------------------------------


# Only names from these tables ever become SQL keywords.
METHODS = {m: sql.SQL(m) for m in ("btree", "hash", "gin", "gist", "brin")}
STORAGE_PARAMETERS = {p: sql.SQL(p) for p in ("fillfactor", "pages_per_range", "fastupdate")}


def _key_column(column: Any) -> sql.Composed:
    if column.expression is not None:
        # Parser-verified, deparsed scalar expression (sqlcheck.normalize_expression), parenthesized
        # as CREATE INDEX requires for anything but a bare function call.
        key: sql.Composable = sql.SQL("({})").format(sql.SQL(normalize_expression(column.expression)))
    else:
        key = sql.Identifier(column.name)
    parts: list[sql.Composable] = [key]
    if column.opclass is not None:
        parts.append(sql.Identifier(column.opclass))
    if column.order == "desc":
        parts.append(sql.SQL("DESC"))
    if column.nulls is not None:
        parts.append(sql.SQL("NULLS FIRST" if column.nulls == "first" else "NULLS LAST"))
    return sql.SQL(" ").join(parts)


def create_index(spec: IndexSpec, name: str | None = None, *, concurrently: bool = True) -> sql.Composed:
    """CREATE [UNIQUE] INDEX CONCURRENTLY: never blocks writes; cannot run in a transaction.
    (Not concurrently only for the adoption probe, on an empty temporary table.)"""
    return create_index_on(spec, name or spec.name, concurrently=concurrently)


def create_index_on(spec: IndexSpec, name: str, *, concurrently: bool = True, only: bool = False,
                    table: str | None = None, schema: str | None = None) -> sql.Composed:
    """CREATE INDEX for `spec` under `name`: on `table` (a partition) instead of the declared one,
    or ON ONLY the (partitioned) table: an INVALID parent index that the partitions' attach."""
    query = sql.SQL("CREATE {unique}INDEX {how}{name} ON {only}{table} USING {method} ({columns})").format(
        unique=sql.SQL("UNIQUE " if spec.unique else ""), how=sql.SQL("CONCURRENTLY " if concurrently else ""),
        name=sql.Identifier(name), only=sql.SQL("ONLY " if only else ""),
        table=qualified(schema or spec.schema_name, table or spec.table),
        method=METHODS[spec.method],
        columns=sql.SQL(", ").join(_key_column(c) for c in spec.columns),
    )
    if spec.include:
        query = sql.SQL("{} INCLUDE ({})").format(query, sql.SQL(", ").join(map(sql.Identifier, spec.include)))
    storage = _storage(spec)
    if storage:
        query = sql.SQL("{} WITH ({})").format(query, sql.SQL(", ").join(
            sql.SQL("{} = {}").format(STORAGE_PARAMETERS[k], sql.Literal(("on" if v else "off")
                                                                           if isinstance(v, bool) else int(v)))
            for k, v in sorted(storage.items())))
    if spec.where:
        # Parser-verified, deparsed expression (one boolean expression, no subquery).
        query = sql.SQL("{} WHERE {}").format(query, sql.SQL(normalize_predicate(spec.where)))
    return query


def attach_index(schema: str, parent: str, child_schema: str, child: str) -> sql.Composed:
    """Attach a partition's index to the partitioned index (valid once every partition has one)."""
    return sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
        qualified(schema, parent), qualified(child_schema, child))


def drop_partitioned_index(schema: str, name: str) -> sql.Composed:
    """PostgreSQL 15 cannot DROP INDEX CONCURRENTLY a partitioned index: a plain DROP (it takes the
    table's ACCESS EXCLUSIVE lock briefly, under the DDL lock_timeout) drops its partitions' too."""
    return sql.SQL("DROP INDEX IF EXISTS {}").format(qualified(schema, name))


def drop_index(schema: str, name: str) -> sql.Composed:
    """DROP INDEX CONCURRENTLY: waits for readers instead of blocking them."""
    return sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(qualified(schema, name))


def rename_index(schema: str, old: str, new: str) -> sql.Composed:
    # PostgreSQL 12+ renames an index under ShareUpdateExclusiveLock: writes go on.
    return sql.SQL("ALTER INDEX {} RENAME TO {}").format(qualified(schema, old), sql.Identifier(new))


# --- materialized views ----------------------------------------------------------------------------


def create_view(schema: str, name: str, query: str, *, with_data: bool = True) -> sql.Composed:
    """CREATE MATERIALIZED VIEW ... WITH DATA (populated, so REFRESH CONCURRENTLY works at once), or
    WITH NO DATA: stored and resolved, never run (the planner populates it after a check)."""
    # The query is the parser's deparsed text of exactly one SELECT (sqlcheck.normalize_select).
    return sql.SQL("CREATE MATERIALIZED VIEW {} AS {} {}").format(
        qualified(schema, name), sql.SQL(normalize_select(query)), sql.SQL("WITH DATA" if with_data else "WITH NO DATA")
    )


def create_view_index(schema: str, view: str, index: str, key: Sequence[str], *, concurrently: bool) -> sql.Composed:
    """The unique index on plain columns, no WHERE: what REFRESH ... CONCURRENTLY requires."""
    return sql.SQL("CREATE UNIQUE INDEX {how}{index} ON {view} USING btree ({columns})").format(
        how=sql.SQL("CONCURRENTLY " if concurrently else ""),
        index=sql.Identifier(index),
        view=qualified(schema, view),
        columns=sql.SQL(", ").join(map(sql.Identifier, key)),
    )


def drop_view(schema: str, name: str) -> sql.Composed:
    # RESTRICT (the default): a view something else depends on is never dropped from under it.
    return sql.SQL("DROP MATERIALIZED VIEW IF EXISTS {}").format(qualified(schema, name))


def rename_view(schema: str, old: str, new: str) -> sql.Composed:
    return sql.SQL("ALTER MATERIALIZED VIEW {} RENAME TO {}").format(qualified(schema, old), sql.Identifier(new))


def refresh_view(schema: str, name: str) -> sql.Composed:
    """Populate an unpopulated view (the first refresh cannot be CONCURRENTLY)."""
    return sql.SQL("REFRESH MATERIALIZED VIEW {}").format(qualified(schema, name))


def grant(privilege: str, schema: str, name: str, grantee: str | None, grantable: bool) -> sql.Composed:
    """Re-create one privilege of a replaced view on its successor (a swap would lose it)."""
    keyword = PRIVILEGES[privilege]
    query = sql.SQL("GRANT {} ON {} TO {}").format(
        keyword, qualified(schema, name), sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee)
    )
    return sql.SQL("{} WITH GRANT OPTION").format(query) if grantable else query


# --- database settings ------------------------------------------------------------------------------


def set_database(database: str, name: str, value: str) -> sql.Composed:
    """ALTER DATABASE ... SET: applies to new sessions; existing ones keep their value."""
    return sql.SQL("ALTER DATABASE {} SET {} = {}").format(
        sql.Identifier(database), sql.Identifier(name), sql.Literal(value)
    )


def reset_database(database: str, name: str) -> sql.Composed:
    return sql.SQL("ALTER DATABASE {} RESET {}").format(sql.Identifier(database), sql.Identifier(name))


# --- carrying a replaced view's properties over (plan_views.py) -------------------------------------

_RELOPTION = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?)=(.*)$", re.DOTALL)


def index_like(schema: str, table: str, name: str, signature: str) -> sql.Composed:
    """Re-create an index of a replaced view on its successor, from the server's own deparsed
    definition (`[UNIQUE ]USING ...`, as catalog.OBSERVE reads it), inside the build transaction."""
    unique, _, rest = signature.partition("USING ")
    if not rest or unique.strip() not in ("", "UNIQUE"):
        raise ValueError(f"unexpected index definition for {name}")
    return sql.SQL("CREATE {unique}INDEX {name} ON {table} USING {rest}").format(
        unique=sql.SQL("UNIQUE " if unique.strip() else ""), name=sql.Identifier(name),
        table=qualified(schema, table), rest=sql.SQL(rest))


def set_view_owner(schema: str, name: str, role: str) -> sql.Composed:
    return sql.SQL("ALTER MATERIALIZED VIEW {} OWNER TO {}").format(qualified(schema, name), sql.Identifier(role))


def grant_column(privilege: str, schema: str, name: str, column: str, grantee: str | None,
                 grantable: bool) -> sql.Composed:
    query = sql.SQL("GRANT {} ({}) ON {} TO {}").format(
        PRIVILEGES[privilege], sql.Identifier(column), qualified(schema, name),
        sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee))
    return sql.SQL("{} WITH GRANT OPTION").format(query) if grantable else query


def set_reloptions(schema: str, name: str, options: Sequence[str]) -> sql.Composed:
    """ALTER MATERIALIZED VIEW ... SET (k = 'v', ...) from pg_class.reloptions ("k=v" items)."""
    items = []
    for option in options:
        match = _RELOPTION.match(option)
        if match is None:
            raise ValueError(f"unexpected storage parameter on {name}")
        items.append(sql.SQL("{} = {}").format(sql.SQL(match.group(1)), sql.Literal(match.group(2))))
    return sql.SQL("ALTER MATERIALIZED VIEW {} SET ({})").format(qualified(schema, name), sql.SQL(", ").join(items))


def comment_view(schema: str, name: str, text: str) -> sql.Composed:
    return sql.SQL("COMMENT ON MATERIALIZED VIEW {} IS {}").format(qualified(schema, name), sql.Literal(text))


def comment_index(schema: str, name: str, text: str) -> sql.Composed:
    return sql.SQL("COMMENT ON INDEX {} IS {}").format(qualified(schema, name), sql.Literal(text))


def revoke_all(schema: str, name: str, grantee: str | None) -> sql.Composed:
    """Undo what the creating role's default privileges granted on a new relation."""
    return sql.SQL("REVOKE ALL ON {} FROM {}").format(
        qualified(schema, name), sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee))


def comment_column(schema: str, name: str, column: str, text: str) -> sql.Composed:
    return sql.SQL("COMMENT ON COLUMN {} IS {}").format(sql.Identifier(schema, name, column), sql.Literal(text))
