"""The ownership record: which database objects are this operator's, by identity (pure builders).

A row of `marketplacedb.owned_objects` (the operator's own schema, naming.STATE_SCHEMA) says that
the object `schema.name` of `kind`, whose OID is `oid`, was created (or adopted) by the resource
`owner`. An object is a resource's only while the live object at that name has the recorded OID:
a comment can be copied (`CREATE TABLE ... (LIKE ... INCLUDING ALL)`) or written by anyone owning
the object, an OID cannot. The COMMENT marker (ddl.mark) stays, for humans only.

Rows are written in the same transaction as the rename or creation they describe, so a crash
leaves either the old truth or the new one. The one step that cannot be transactional, CREATE
INDEX CONCURRENTLY, is preceded by an *intent* row (`how = 'building'`, no OID yet): an index at
that temporary name, on the recorded table, whose catalog row is younger than the intent row
(`age(pg_class.xmin) <= age(intent.xmin)`) was made by that build: it is ours to drop. Anything
older (someone's `__new` made before we planned) is not.

Every statement qualifies the table and the functions it calls, and the definition hash is taken
with search_path pinned to pg_catalog (transaction-local), as catalog.OBSERVE does.
"""

from __future__ import annotations

from typing import Literal

from psycopg import sql

from .. import naming
from .ddl import qualified, render

TABLE = "owned_objects"
RECORDS = sql.Identifier(naming.STATE_SCHEMA, TABLE)
Kind = Literal["index", "view"]
How = Literal["created", "adopted", "building", "replaced"]

ENSURE: tuple[sql.Composed, ...] = (
    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(naming.STATE_SCHEMA)),
    sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ("
        "schema_name text NOT NULL, name text NOT NULL, "
        "kind text NOT NULL CHECK (kind IN ('index', 'view')), "
        "owner text NOT NULL, oid oid, table_oid oid, "
        "spec_hash text NOT NULL DEFAULT '', def_hash text NOT NULL DEFAULT '', "
        "how text NOT NULL CHECK (how IN ('created', 'adopted', 'building', 'replaced')), "
        "recorded_at timestamptz NOT NULL DEFAULT pg_catalog.now(), "
        "PRIMARY KEY (schema_name, name))"
    ).format(RECORDS),
)


def _regclass(schema: str, name: str) -> sql.Composed:
    return sql.SQL("pg_catalog.to_regclass({})").format(sql.Literal(render(qualified(schema, name))))


_PIN_PATH = sql.Composed([sql.SQL("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true)")])

# A row may be overwritten when it is ours, an intent, or stale (its OID no longer names a live
# object of that name): never another resource's record of a live object.
_OVERWRITE = sql.SQL(
    "WHERE r.owner = excluded.owner OR r.oid IS NULL OR NOT EXISTS ("
    "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = r.oid AND c.relname = r.name AND n.nspname = r.schema_name)"
)


def record(owner: str, kind: Kind, schema: str, name: str, spec_hash: str, how: How) -> tuple[sql.Composed, ...]:
    """Record the live object `schema.name` (its OID and definition hash) as `owner`'s.

    Two statements; run them last in a transaction (the first pins search_path until commit).
    """
    getter = sql.SQL("pg_catalog.pg_get_indexdef" if kind == "index" else "pg_catalog.pg_get_viewdef")
    table = sql.SQL("(SELECT i.indrelid FROM pg_catalog.pg_index i WHERE i.indexrelid = c.oid)") \
        if kind == "index" else sql.SQL("NULL::oid")
    insert = sql.SQL(
        "INSERT INTO {records} AS r (schema_name, name, kind, owner, oid, table_oid, spec_hash, def_hash, how) "
        "SELECT {schema}, {name}, {kind}, {owner}, c.oid, {table}, {spec_hash}, "
        "pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to({getter}(c.oid), 'UTF8')), 'hex'), {how} "
        "FROM pg_catalog.pg_class c WHERE c.oid = {regclass} "
        "ON CONFLICT (schema_name, name) DO UPDATE SET kind = excluded.kind, owner = excluded.owner, "
        "oid = excluded.oid, table_oid = excluded.table_oid, spec_hash = excluded.spec_hash, "
        "def_hash = excluded.def_hash, how = excluded.how, recorded_at = pg_catalog.now() {overwrite}"
    ).format(records=RECORDS, schema=sql.Literal(schema), name=sql.Literal(name), kind=sql.Literal(kind),
             owner=sql.Literal(owner), table=table, spec_hash=sql.Literal(spec_hash), getter=getter,
             how=sql.Literal(how), regclass=_regclass(schema, name), overwrite=_OVERWRITE)
    return (_PIN_PATH, insert)


# An intent never overwrites the record of a live object, not even this resource's own (a declared
# index named like another declared index's temporary name must not lose its record).
_OVERWRITE_INTENT = sql.SQL(
    "WHERE r.oid IS NULL OR NOT EXISTS ("
    "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = r.oid AND c.relname = r.name AND n.nspname = r.schema_name)"
)


def intent(owner: str, schema: str, name: str, table_schema: str, table: str, spec_hash: str) -> sql.Composed:
    """Before CREATE INDEX CONCURRENTLY builds `schema.name`: what an interrupted build leaves is ours
    (only an INVALID index: see catalog_sql.OBSERVE)."""
    return sql.SQL(
        "INSERT INTO {records} AS r (schema_name, name, kind, owner, oid, table_oid, spec_hash, how) "
        "VALUES ({schema}, {name}, 'index', {owner}, NULL, {table}::pg_catalog.oid, {spec_hash}, 'building') "
        "ON CONFLICT (schema_name, name) DO UPDATE SET owner = excluded.owner, oid = NULL, "
        "table_oid = excluded.table_oid, spec_hash = excluded.spec_hash, def_hash = '', how = 'building', "
        "recorded_at = pg_catalog.now() {overwrite}"
    ).format(records=RECORDS, schema=sql.Literal(schema), name=sql.Literal(name), owner=sql.Literal(owner),
             table=_regclass(table_schema, table), spec_hash=sql.Literal(spec_hash), overwrite=_OVERWRITE_INTENT)


def pin_build(pid: int) -> sql.Composed:
    """While backend `pid` runs CREATE INDEX CONCURRENTLY: record the OID of the index it builds on
    the intent row of that name. The build's own progress row names the index, so the OID proves the
    index is the one our build made: a valid index left at the temporary name by a build that
    finished after the operator died is then ours (to sweep and rebuild), while a DBA's index put at
    that name later, under a stale intent, never is."""
    return sql.SQL(
        "UPDATE {records} AS r SET oid = p.index_relid "
        "FROM pg_catalog.pg_stat_progress_create_index p "
        "JOIN pg_catalog.pg_class c ON c.oid = p.index_relid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE p.pid = {pid} AND p.index_relid <> 0 AND r.schema_name = n.nspname AND r.name = c.relname "
        "AND r.kind = 'index' AND r.how = 'building' AND r.oid IS NULL AND r.table_oid = p.relid"
    ).format(records=RECORDS, pid=sql.Literal(pid))


def assert_partitions_ours(owner: str, schema: str, name: str) -> sql.Composed:
    """Fail unless every index attached to the partitioned index `schema.name` is recorded as
    `owner`'s (by OID), checked under the table's ACCESS EXCLUSIVE lock (which the DROP takes
    anyway and which ATTACH PARTITION waits for). DROP INDEX on a partitioned index drops every
    index attached to it; PostgreSQL attaches a DBA's matching index when their table becomes a
    partition, possibly after the plan (a rebuild's drop comes hours of builds later)."""
    body = sql.SQL(
        "DECLARE parent pg_catalog.regclass := pg_catalog.to_regclass({reg}); foreign_child text; BEGIN "
        "IF parent IS NULL THEN RETURN; END IF; "
        "EXECUTE pg_catalog.format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', "
        "(SELECT i.indrelid::pg_catalog.regclass FROM pg_catalog.pg_index i WHERE i.indexrelid = parent)); "
        "SELECT pg_catalog.string_agg(h.inhrelid::pg_catalog.regclass::text, ', ') INTO foreign_child "
        "FROM pg_catalog.pg_inherits h WHERE h.inhparent = parent AND NOT EXISTS ("
        "SELECT 1 FROM {records} r WHERE r.oid = h.inhrelid AND r.owner = {owner}); "
        "IF foreign_child IS NOT NULL THEN RAISE EXCEPTION "
        "'partitioned index % has indexes attached that are not this resource''s (%): left alone', "
        "{reg}, foreign_child USING ERRCODE = 'object_not_in_prerequisite_state'; END IF; END"
    ).format(reg=sql.Literal(render(qualified(schema, name))), records=RECORDS, owner=sql.Literal(owner))
    return sql.SQL("DO {}").format(sql.Literal(render(body)))


def forget(owner: str, schema: str, name: str) -> sql.Composed:
    """Delete `owner`'s row for `schema.name` (after the object was dropped, or a build undone)."""
    return sql.SQL("DELETE FROM {} WHERE schema_name = {} AND name = {} AND owner = {}").format(
        RECORDS, sql.Literal(schema), sql.Literal(name), sql.Literal(owner))


def forget_intent(owner: str, schema: str, name: str) -> sql.Composed:
    """After a build failed and left nothing at `schema.name`: delete `owner`'s intent row, so that no
    stale intent is left to bind an index someone creates there later."""
    return sql.SQL(
        "DELETE FROM {} WHERE schema_name = {} AND name = {} AND owner = {} AND how = 'building' "
        "AND oid IS NULL AND {} IS NULL").format(
        RECORDS, sql.Literal(schema), sql.Literal(name), sql.Literal(owner), _regclass(schema, name))


def forget_stale(owner: str) -> sql.Composed:
    """End of a teardown: delete `owner`'s rows of adopted objects (kept, released) and those that
    no longer name a live object; a created object that could not be dropped stays recorded."""
    return sql.SQL(
        "DELETE FROM {} AS r WHERE r.owner = {} AND (r.how = 'adopted' OR NOT EXISTS ("
        "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = r.oid AND c.relname = r.name AND n.nspname = r.schema_name))"
    ).format(RECORDS, sql.Literal(owner))


# Why the ownership table cannot be trusted (empty: it can). The records decide what is dropped, so
# only the operator's role (or a role it is a member of) may own the schema and the table, no other
# role may write to it, and nothing may act on its writes or filter its reads (triggers, rules, row
# security). Read from the catalog by name (no USAGE on the schema needed). The table missing is fine
# (ENSURE creates it); its schema, when it exists, must already be ours.
TRUST = sql.SQL("""\
WITH s AS (SELECT n.oid, n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = {schema}),
t AS (SELECT c.oid, c.relowner, c.relkind, c.relacl, c.relrowsecurity
      FROM pg_catalog.pg_class c JOIN s ON c.relnamespace = s.oid WHERE c.relname = {table})
SELECT (SELECT count(*) FROM t) > 0, pg_catalog.array_remove(ARRAY[
  (SELECT 'its schema is owned by another role' FROM s WHERE NOT pg_catalog.pg_has_role(s.nspowner, 'MEMBER')),
  (SELECT 'it is owned by another role' FROM t WHERE NOT pg_catalog.pg_has_role(t.relowner, 'MEMBER')),
  (SELECT 'it is not an ordinary table' FROM t WHERE t.relkind <> 'r'),
  (SELECT 'another role may write to it (INSERT, UPDATE, DELETE, TRUNCATE or TRIGGER granted)' FROM t
    WHERE EXISTS (SELECT 1 FROM pg_catalog.aclexplode(t.relacl) g WHERE g.grantee <> t.relowner
                  AND g.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'TRIGGER'))
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a CROSS JOIN LATERAL pg_catalog.aclexplode(a.attacl) g
                  WHERE a.attrelid = t.oid AND g.grantee <> t.relowner
                    AND g.privilege_type IN ('INSERT', 'UPDATE'))),
  (SELECT 'it has triggers' FROM t WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = t.oid)),
  (SELECT 'it has rules' FROM t WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite w WHERE w.ev_class = t.oid)),
  (SELECT 'it has row security policies' FROM t WHERE t.relrowsecurity
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid = t.oid))
], NULL)""").format(schema=sql.Literal(naming.STATE_SCHEMA), table=sql.Literal(TABLE))


def distrust(problems: list[str]) -> str:
    """The refusal for a non-empty TRUST answer (no role names: they are user names)."""
    return (f"the ownership table {naming.STATE_SCHEMA}.{TABLE} cannot be trusted ({'; '.join(problems)}): "
            "nothing is planned or run. Only the operator's role may own and write it (one operator role per "
            "database, see README Limits); a DBA must drop or fix it")


def assert_oid(schema: str, name: str, oid: int) -> sql.Composed:
    """Fail unless `schema.name` is still the object with `oid`: a drop or rename planned against
    one object never lands on another that took its name since the plan."""
    body = sql.SQL(
        "BEGIN IF pg_catalog.to_regclass({reg}) IS DISTINCT FROM {oid}::pg_catalog.oid::pg_catalog.regclass THEN "
        "RAISE EXCEPTION 'object % is not the one planned for (changed since the plan): left alone', {reg} "
        "USING ERRCODE = 'object_not_in_prerequisite_state'; END IF; END"
    ).format(reg=sql.Literal(render(qualified(schema, name))), oid=sql.Literal(oid))
    return sql.SQL("DO {}").format(sql.Literal(render(body)))
