"""A snapshot of what the database holds, as frozen dataclasses, and the SQL that observes it.

One statement (`OBSERVE`) returns everything as one JSON document, scoped to the declared names,
their temporaries and the objects this resource recorded as its own (ownership.py): indexes with
their validity and ownership record, materialized views with their privileges, options, comments
and dependants, per-database settings, the server-wide settings we advise on and the sessions
holding a transaction open. The gateway runs it in a READ
ONLY transaction with search_path pinned to pg_catalog (pipelined: one network round trip), so
`pg_get_indexdef`/`pg_get_viewdef` are fully qualified and their hashes match the ones the marker
DO block wrote (see ddl.mark).

The refresh helper's own schema (`marketplacedb`) and the system schemas are never observed, so
nothing the planner decides can touch them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .catalog_sql import (
    ADVISED_SETTINGS,
    BLOCKERS,
    BUILD_BLOCKERS,
    OBSERVE,
    OPEN_TRANSACTIONS,
    RECORDS_TABLE_NAME,
    observe_params,
    observe_query,
)
from .ddl import Marker, parse_marker
from .settings_check import GucFacts
from .view_calls import ViewCalls

__all__ = ["ADVISED_SETTINGS", "BLOCKERS", "BUILD_BLOCKERS", "OBSERVE", "OPEN_TRANSACTIONS", "RECORDS_TABLE_NAME",
           "ATTACHED", "EXTENSIONS", "NO_DEFAULT_OPCLASS", "PARTITIONS",
           "Catalog", "Grant", "IndexInfo", "Record", "SessionInfo", "ViewInfo", "observe_params", "observe_query",
           "parse_catalog", "session_from_row"]


@dataclasses.dataclass(frozen=True)
class Record:
    """The ownership record bound to a live object (its OID matched; see ownership.py)."""

    owner: str
    how: str  # created, adopted, building (an interrupted build of ours), replaced
    spec_hash: str
    def_hash: str
    # The record names the object's OID. Only read for how == 'building': False is an intent that
    # binds an INVALID leftover by age and table alone (see catalog_sql.OBSERVE).
    pinned: bool = False


def _record(value: Mapping[str, Any] | None) -> Record | None:
    if not value:
        return None
    return Record(str(value["owner"]), str(value["how"]), str(value["spec_hash"] or ""), str(value["def_hash"] or ""),
                  bool(value.get("pinned")))


class _Recorded:
    """What indexes and views share: a comment (maybe with our marker) and an ownership record."""

    comment: str | None
    record: Record | None

    @property
    def marker(self) -> Marker | None:
        """The COMMENT marker: for humans only, it proves nothing (see ownership.py)."""
        return parse_marker(self.comment)

    def owned_by(self, owner: str) -> bool:
        return self.record is not None and self.record.owner == owner


@dataclasses.dataclass(frozen=True)
class IndexInfo(_Recorded):
    schema: str
    name: str
    table_schema: str
    table: str
    table_kind: str
    definition: str
    def_hash: str
    valid: bool
    ready: bool
    unique: bool
    primary: bool
    partial: bool
    expressions: bool
    comment: str | None
    key_columns: tuple[str, ...]
    oid: int = 0
    signature: str = ""  # [UNIQUE ]USING ...: the definition without names, compared for adoption
    record: Record | None = None
    building_pid: int | None = None  # another session's CREATE INDEX in progress
    foreign_keys: tuple[str, ...] = ()  # foreign key constraints that depend on this (unique) index
    constraint: str | None = None  # the primary key, unique or exclusion constraint it implements
    clustered: bool = False  # CLUSTER ON mark
    in_tablespace: bool = False  # not in the database's default tablespace


@dataclasses.dataclass(frozen=True)
class Grant:
    grantee: str | None  # None is PUBLIC
    privilege: str
    grantable: bool
    column: str | None = None  # a column privilege


@dataclasses.dataclass(frozen=True)
class ViewInfo(_Recorded):
    schema: str
    name: str
    definition: str
    def_hash: str
    populated: bool
    owner: str
    comment: str | None
    grants: tuple[Grant, ...]
    dependents: tuple[str, ...]
    oid: int = 0
    record: Record | None = None
    column_grants: tuple[Grant, ...] = ()
    reloptions: tuple[str, ...] = ()
    column_comments: tuple[tuple[str, str], ...] = ()
    in_tablespace: bool = False
    statistics: tuple[str, ...] = ()  # extended statistics objects on the view
    column_options: tuple[str, ...] = ()  # columns with a statistics target or attribute options
    default_grantees: tuple[str | None, ...] = ()  # what the operator's default privileges grant to


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """A session holding a transaction open (what CONCURRENTLY waits for). No query text: it may hold data."""

    pid: int
    state: str
    user: str
    application_name: str
    age_seconds: float
    verb: str

    def describe(self) -> str:
        what = f"{self.state or 'unknown'}, {self.verb or '-'}"
        return f"pid {self.pid} ({what}, transaction open {self.age_seconds:.1f}s)"


@dataclasses.dataclass(frozen=True)
class Catalog:
    database: str
    user: str
    indexes: tuple[IndexInfo, ...] = ()
    views: tuple[ViewInfo, ...] = ()
    relations: tuple[tuple[str, str, str], ...] = ()  # (schema, name, relkind) of everything else
    database_settings: tuple[tuple[str, str], ...] = ()
    server_settings: tuple[tuple[str, str], ...] = ()
    sessions: tuple[SessionInfo, ...] = ()
    marked: tuple[tuple[str, str, str], ...] = ()  # (schema, name, relkind): our marker, not our record
    records: bool = False  # the ownership table exists
    # What the declared objects would look like, asked of the server (gateway.expected_signatures):
    # {(schema, name): signature} for indexes, {(schema, name): sha256 of pg_get_viewdef} for views.
    expected: tuple[tuple[tuple[str, str], str], ...] = ()
    # Declared objects that could not be compared at all (the probe failed): {(schema, name): why}.
    uncompared: tuple[tuple[tuple[str, str], str], ...] = ()
    # Installed extensions, and those this role may create here (gateway: EXTENSIONS below).
    extensions: tuple[str, ...] = ()
    creatable_extensions: tuple[str, ...] = ()
    # Partitions of declared partitioned tables: (table schema, table, partition schema, partition, relkind),
    # and partition indexes attached to declared or owned indexes: (schema, index, child schema, child
    # index, partition schema, partition). Read by gateway.observe (PARTITIONS, ATTACHED below).
    partitions: tuple[tuple[str, str, str, str, str], ...] = ()
    attached: tuple[tuple[str, str, str, str, str, str], ...] = ()
    invalid_children: tuple[tuple[str, str], ...] = ()  # (schema, name) of attached partition indexes not valid
    # Key columns of declared gin/gist indexes without an opclass whose type has no default operator
    # class for that method (yet): (schema, table, column, method, type). Gateway: NO_DEFAULT_OPCLASS.
    no_default_opclass: tuple[tuple[str, str, str, str, str], ...] = ()
    # pg_settings rows of the declared database settings (gateway: settings_check.GUC_FACTS); None when
    # not read (a catalog built by hand), and then the plan does not confirm values against the server.
    gucs: tuple[GucFacts, ...] | None = None
    # What each declared view's query calls and reads, as the server resolved it (sql/view_calls.py,
    # gateway refresh.analyze_views), and why a query could not be analyzed: {(schema, name): ...}.
    calls: tuple[tuple[tuple[str, str], ViewCalls], ...] = ()
    unanalyzed: tuple[tuple[tuple[str, str], str], ...] = ()

    def calls_of(self, schema: str, name: str) -> ViewCalls | None:
        return next((value for key, value in self.calls if key == (schema, name)), None)

    def unanalyzed_why(self, schema: str, name: str) -> str | None:
        return next((value for key, value in self.unanalyzed if key == (schema, name)), None)

    def partitions_of(self, schema: str, table: str) -> tuple[tuple[str, str, str], ...]:
        return tuple((ps, p, k) for s, t, ps, p, k in self.partitions if (s, t) == (schema, table))

    def attached_partitions(self, schema: str, index: str) -> tuple[tuple[str, str], ...]:
        return tuple((ps, p) for s, i, _, _, ps, p in self.attached if (s, i) == (schema, index))

    def children(self, schema: str, index: str) -> tuple[tuple[str, str, str, str], ...]:
        """(child schema, child index, partition schema, partition) attached to `schema.index`."""
        return tuple((cs, c, ps, p) for s, i, cs, c, ps, p in self.attached if (s, i) == (schema, index))

    def is_attached_child(self, schema: str, name: str) -> bool:
        return any((cs, c) == (schema, name) for _, _, cs, c, _, _ in self.attached)

    def index(self, schema: str, name: str) -> IndexInfo | None:
        return next((i for i in self.indexes if i.schema == schema and i.name == name), None)

    def view(self, schema: str, name: str) -> ViewInfo | None:
        return next((v for v in self.views if v.schema == schema and v.name == name), None)

    def other_relation(self, schema: str, name: str) -> str | None:
        """The relkind of a table, view, sequence... of that name (anything not an index or matview)."""
        return next((kind for s, n, kind in self.relations if s == schema and n == name), None)

    def indexes_on(self, schema: str, table: str) -> tuple[IndexInfo, ...]:
        return tuple(i for i in self.indexes if i.table_schema == schema and i.table == table)

    def expected_of(self, schema: str, name: str) -> str | None:
        return next((value for key, value in self.expected if key == (schema, name)), None)

    def uncompared_why(self, schema: str, name: str) -> str | None:
        return next((value for key, value in self.uncompared if key == (schema, name)), None)

    @property
    def settings(self) -> Mapping[str, str]:
        return dict(self.database_settings)

    @property
    def server(self) -> Mapping[str, str]:
        return dict(self.server_settings)

    @property
    def guc_facts(self) -> Mapping[str, GucFacts] | None:
        return None if self.gucs is None else {g.name: g for g in self.gucs}


# Installed extensions, and the available ones this role may create: a superuser any, otherwise a
# trusted one (PostgreSQL 13+) given CREATE on the database. Read in the observation's transaction.
EXTENSIONS = """
SELECT (SELECT coalesce(pg_catalog.array_agg(e.extname::text ORDER BY e.extname), '{}')
          FROM pg_catalog.pg_extension e),
       (SELECT coalesce(pg_catalog.array_agg(DISTINCT a.name::text), '{}')
          FROM pg_catalog.pg_available_extension_versions a
         WHERE a.version = (SELECT d.default_version FROM pg_catalog.pg_available_extensions d WHERE d.name = a.name)
           AND ((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
                OR (a.trusted AND pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE'))))
"""


# Plain key columns of declared gin/gist indexes without an opclass whose type (a domain's base type)
# has no default operator class for the method: CREATE INDEX would fail with "data type ... has no
# default operator class for access method ...". A default class matches the type itself, a type it
# is binary-coercible to (varchar -> text) or a polymorphic family (arrays, enums, ranges). Only
# the declared tables' columns are read.
NO_DEFAULT_OPCLASS = """
SELECT w.schema, w.tbl, w.col, w.method, CASE WHEN t.typtype = 'e' THEN 'anyenum' ELSE t.typname::text END
  FROM ROWS FROM (pg_catalog.unnest(%(schemas)s::text[]), pg_catalog.unnest(%(tables)s::text[]),
                  pg_catalog.unnest(%(columns)s::text[]), pg_catalog.unnest(%(methods)s::text[]))
       AS w(schema, tbl, col, method)
  JOIN pg_catalog.pg_namespace n ON n.nspname = w.schema
  JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.tbl
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = w.col AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_catalog.pg_type t0 ON t0.oid = a.atttypid
  JOIN pg_catalog.pg_type t ON t.oid = CASE WHEN t0.typtype = 'd' THEN t0.typbasetype ELSE t0.oid END
  JOIN pg_catalog.pg_am am ON am.amname = w.method
 WHERE NOT EXISTS (
   SELECT 1 FROM pg_catalog.pg_opclass oc
    WHERE oc.opcmethod = am.oid AND oc.opcdefault
      AND (oc.opcintype = t.oid
           OR EXISTS (SELECT 1 FROM pg_catalog.pg_cast k WHERE k.castsource = t.oid
                       AND k.casttarget = oc.opcintype AND k.castmethod = 'b')
           OR (oc.opcintype = 'pg_catalog.anyarray'::pg_catalog.regtype AND t.typcategory = 'A')
           OR (oc.opcintype = 'pg_catalog.anyenum'::pg_catalog.regtype AND t.typtype = 'e')
           OR (oc.opcintype = 'pg_catalog.anyrange'::pg_catalog.regtype AND t.typtype = 'r')
           OR (oc.opcintype = 'pg_catalog.anymultirange'::pg_catalog.regtype AND t.typtype = 'm')))
 ORDER BY 1, 2, 3, 4
"""


PARTITIONS = """
SELECT pn.nspname::text, p.relname::text, cn.nspname::text, c.relname::text, c.relkind::text
  FROM pg_catalog.pg_class p JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
  JOIN pg_catalog.pg_inherits h ON h.inhparent = p.oid
  JOIN pg_catalog.pg_class c ON c.oid = h.inhrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
 WHERE p.relkind = 'p' AND (pn.nspname::text, p.relname::text) IN
       (SELECT * FROM ROWS FROM (pg_catalog.unnest(%(schemas)s::text[]), pg_catalog.unnest(%(names)s::text[])))
 ORDER BY 1, 2, 3, 4
"""

# Children of declared partitioned indexes and of indexes recorded as this resource's (by OID).
ATTACHED = """
SELECT pn.nspname::text, pc.relname::text, cn.nspname::text, cc.relname::text, tn.nspname::text, t.relname::text,
       x.indisvalid
  FROM pg_catalog.pg_inherits h
  JOIN pg_catalog.pg_class pc ON pc.oid = h.inhparent AND pc.relkind = 'I'
  JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
  JOIN pg_catalog.pg_class cc ON cc.oid = h.inhrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace
  JOIN pg_catalog.pg_index x ON x.indexrelid = cc.oid
  JOIN pg_catalog.pg_class t ON t.oid = x.indrelid JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
 WHERE (pn.nspname::text, pc.relname::text) IN
       (SELECT * FROM ROWS FROM (pg_catalog.unnest(%(schemas)s::text[]), pg_catalog.unnest(%(names)s::text[])))
    OR pc.oid = ANY(%(owned)s::pg_catalog.oid[])
 ORDER BY 1, 2, 3, 4
"""


def session_from_row(row: tuple[Any, ...]) -> SessionInfo:
    pid, state, user, app, age, verb = row
    return SessionInfo(pid=int(pid), state=str(state or ""), user=str(user or ""), application_name=str(app or ""),
                       age_seconds=float(age or 0.0), verb=str(verb or ""))


def parse_catalog(document: Mapping[str, Any]) -> Catalog:
    """The Catalog from OBSERVE's JSON document."""
    indexes = tuple(
        IndexInfo(
            schema=i["schema"], name=i["name"], table_schema=i["table_schema"], table=i["table"],
            table_kind=i["table_kind"], definition=i["definition"], def_hash=i["def_hash"],
            valid=bool(i["valid"]), ready=bool(i["ready"]), unique=bool(i["unique"]), primary=bool(i["primary"]),
            partial=bool(i["partial"]), expressions=bool(i["expressions"]), comment=i["comment"],
            key_columns=tuple(i["key_columns"] or ()), oid=int(i["oid"]), signature=str(i["signature"] or ""),
            record=_record(i["record"]), building_pid=i["building_pid"],
            foreign_keys=tuple(i["foreign_keys"] or ()), constraint=i.get("constraint"),
            clustered=bool(i.get("clustered")), in_tablespace=bool(i.get("in_tablespace")),
        )
        for i in document.get("indexes") or ()
    )
    views = tuple(
        ViewInfo(
            schema=v["schema"], name=v["name"], definition=v["definition"], def_hash=v["def_hash"],
            populated=bool(v["populated"]), owner=v["owner"], comment=v["comment"],
            grants=tuple(Grant(g["grantee"], g["privilege"], bool(g["grantable"])) for g in v["grants"] or ()),
            dependents=tuple(sorted(v["dependents"] or ())), oid=int(v["oid"]), record=_record(v["record"]),
            column_grants=tuple(Grant(g["grantee"], g["privilege"], bool(g["grantable"]), g["column"])
                                for g in v["column_grants"] or ()),
            reloptions=tuple(str(o) for o in v["reloptions"] or ()),
            column_comments=tuple((str(c), str(t)) for c, t in v["column_comments"] or ()),
            in_tablespace=bool(v.get("in_tablespace")), statistics=tuple(v.get("statistics") or ()),
            column_options=tuple(v.get("column_options") or ()),
            default_grantees=tuple(v.get("default_grantees") or ()),
        )
        for v in document.get("views") or ()
    )
    settings = []
    for item in document.get("settings") or ():
        name, _, value = str(item).partition("=")
        settings.append((name, value))
    sessions = tuple(
        SessionInfo(pid=int(s["pid"]), state=str(s["state"] or ""), user=str(s["user"] or ""),
                    application_name=str(s["application_name"] or ""), age_seconds=float(s["age_seconds"] or 0),
                    verb=str(s["verb"] or ""))
        for s in document.get("sessions") or ()
    )
    return Catalog(
        database=str(document["database"]),
        user=str(document["user"]),
        indexes=indexes,
        views=views,
        relations=tuple((str(s), str(n), str(k)) for s, n, k in document.get("relations") or ()),
        database_settings=tuple(sorted(settings)),
        server_settings=tuple(sorted((str(k), str(v)) for k, v in (document.get("server") or {}).items())),
        sessions=sessions,
        marked=tuple((str(s), str(n), str(k)) for s, n, k in document.get("marked") or ()),
        records=bool(document.get("records")),
    )
