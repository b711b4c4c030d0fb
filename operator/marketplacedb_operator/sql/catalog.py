"""A snapshot of what the database holds, as frozen dataclasses, and the SQL that observes it.

One statement (`OBSERVE`) returns everything as one JSON document: indexes with their validity,
materialized views with their privileges and dependants, per-database settings, the server-wide
settings we advise on and the sessions holding a transaction open. The gateway runs it in a READ
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

from psycopg import sql

from .. import naming
from .ddl import Marker, parse_marker

# Server-wide settings reported as advice (never changed), plus a few that explain them.
ADVISED_SETTINGS = ("max_connections", "shared_buffers", "effective_cache_size", "work_mem",
                    "maintenance_work_mem", "server_version_num")

_EXCLUDED_SCHEMAS = ("pg_catalog", "information_schema", naming.STATE_SCHEMA)

# Observation: one SELECT, one JSON row. Parameters: excluded schemas, advised settings.
OBSERVE = sql.SQL("""\
WITH rels AS (
  SELECT c.oid, n.nspname, c.relname, c.relkind
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname <> ALL (%(excluded)s::text[]) AND n.nspname !~ '^pg_(toast|temp)'
)
SELECT pg_catalog.json_build_object(
  'database', pg_catalog.current_database(),
  'user', current_user,
  'indexes', (SELECT coalesce(pg_catalog.json_agg(x ORDER BY x.schema, x.name), '[]') FROM (
      SELECT r.nspname AS schema, r.relname AS name, t.nspname AS table_schema, t.relname AS "table",
             t.relkind::text AS table_kind,
             pg_catalog.pg_get_indexdef(i.indexrelid) AS definition,
             pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
               pg_catalog.pg_get_indexdef(i.indexrelid), 'UTF8')), 'hex') AS def_hash,
             i.indisvalid AS valid, i.indisready AS ready, i.indisunique AS "unique",
             i.indisprimary AS "primary", i.indpred IS NOT NULL AS partial,
             i.indexprs IS NOT NULL AS expressions,
             pg_catalog.obj_description(i.indexrelid, 'pg_class') AS comment,
             (SELECT coalesce(pg_catalog.json_agg(a.attname ORDER BY k.ord), '[]')
                FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
               WHERE k.ord <= i.indnkeyatts) AS key_columns
      FROM pg_catalog.pg_index i
      JOIN rels r ON r.oid = i.indexrelid
      JOIN rels t ON t.oid = i.indrelid) x),
  'views', (SELECT coalesce(pg_catalog.json_agg(x ORDER BY x.schema, x.name), '[]') FROM (
      SELECT r.nspname AS schema, r.relname AS name,
             pg_catalog.pg_get_viewdef(r.oid) AS definition,
             pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
               pg_catalog.pg_get_viewdef(r.oid), 'UTF8')), 'hex') AS def_hash,
             m.ispopulated AS populated,
             pg_catalog.pg_get_userbyid(c.relowner) AS owner,
             pg_catalog.obj_description(r.oid, 'pg_class') AS comment,
             (SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_object(
                        'grantee', CASE WHEN g.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(g.grantee) END,
                        'privilege', g.privilege_type, 'grantable', g.is_grantable)
                      ORDER BY g.grantee, g.privilege_type), '[]')
                FROM pg_catalog.aclexplode(c.relacl) g WHERE g.grantee <> c.relowner) AS grants,
             (SELECT coalesce(pg_catalog.json_agg(DISTINCT dn.nspname || '.' || dc.relname), '[]')
                FROM pg_catalog.pg_depend d
                JOIN pg_catalog.pg_rewrite w ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                                             AND w.oid = d.objid
                JOIN pg_catalog.pg_class dc ON dc.oid = w.ev_class
                JOIN pg_catalog.pg_namespace dn ON dn.oid = dc.relnamespace
               WHERE d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = r.oid
                 AND w.ev_class <> r.oid) AS dependents
      FROM rels r
      JOIN pg_catalog.pg_class c ON c.oid = r.oid
      JOIN pg_catalog.pg_matviews m ON m.schemaname = r.nspname AND m.matviewname = r.relname
      WHERE r.relkind = 'm') x),
  'relations', (SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_array(r.nspname, r.relname, r.relkind)
                  ORDER BY r.nspname, r.relname), '[]')
                FROM rels r WHERE r.relkind NOT IN ('i', 'I', 'm')),
  'settings', (SELECT coalesce(pg_catalog.array_to_json(s.setconfig), '[]')
                 FROM pg_catalog.pg_db_role_setting s
                 JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
                WHERE d.datname = pg_catalog.current_database() AND s.setrole = 0),
  'server', (SELECT pg_catalog.json_object_agg(s.name, pg_catalog.current_setting(s.name))
               FROM pg_catalog.pg_settings s WHERE s.name = ANY (%(advised)s::text[])),
  'sessions', (SELECT coalesce(pg_catalog.json_agg(x ORDER BY x.age_seconds DESC, x.pid), '[]') FROM (
      SELECT a.pid, a.state, a.usename AS "user", a.application_name,
             pg_catalog.round(extract(epoch FROM pg_catalog.clock_timestamp() - a.xact_start)::numeric, 3)
               AS age_seconds,
             pg_catalog.upper(pg_catalog.split_part(pg_catalog.ltrim(a.query), ' ', 1)) AS verb
      FROM pg_catalog.pg_stat_activity a
      WHERE a.datname = pg_catalog.current_database() AND a.pid <> pg_catalog.pg_backend_pid()
        AND a.backend_type = 'client backend' AND a.xact_start IS NOT NULL) x)
) AS catalog""")


def observe_params() -> dict[str, Any]:
    return {"excluded": list(_EXCLUDED_SCHEMAS), "advised": list(ADVISED_SETTINGS)}


# Sessions that block a given backend (the one running an index build), seen from another session.
BLOCKERS = sql.SQL("""\
SELECT a.pid, coalesce(a.state, 'unknown (grant pg_read_all_stats to see it)'), a.usename, a.application_name,
       pg_catalog.round(extract(epoch FROM pg_catalog.clock_timestamp() - a.xact_start)::numeric, 3),
       CASE WHEN a.state IS NULL THEN '' ELSE
         pg_catalog.upper(pg_catalog.split_part(pg_catalog.ltrim(a.query), ' ', 1)) END
FROM pg_catalog.pg_stat_activity a
WHERE a.pid = ANY (pg_catalog.pg_blocking_pids(%(pid)s))
ORDER BY a.pid""")

# Sessions with a transaction open longer than min_age: what a CONCURRENTLY build waits for.
OPEN_TRANSACTIONS = sql.SQL("""\
SELECT a.pid, coalesce(a.state, 'unknown (grant pg_read_all_stats to see it)'), a.usename, a.application_name,
       pg_catalog.round(extract(epoch FROM pg_catalog.clock_timestamp() - a.xact_start)::numeric, 3),
       CASE WHEN a.state IS NULL THEN '' ELSE
         pg_catalog.upper(pg_catalog.split_part(pg_catalog.ltrim(a.query), ' ', 1)) END
FROM pg_catalog.pg_stat_activity a
WHERE a.datname = pg_catalog.current_database() AND a.pid <> pg_catalog.pg_backend_pid()
  AND a.backend_type = 'client backend' AND a.xact_start IS NOT NULL
  AND a.xact_start < pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => %(min_age)s)
ORDER BY a.xact_start, a.pid""")


@dataclasses.dataclass(frozen=True)
class IndexInfo:
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

    @property
    def marker(self) -> Marker | None:
        return parse_marker(self.comment)


@dataclasses.dataclass(frozen=True)
class Grant:
    grantee: str | None  # None is PUBLIC
    privilege: str
    grantable: bool


@dataclasses.dataclass(frozen=True)
class ViewInfo:
    schema: str
    name: str
    definition: str
    def_hash: str
    populated: bool
    owner: str
    comment: str | None
    grants: tuple[Grant, ...]
    dependents: tuple[str, ...]

    @property
    def marker(self) -> Marker | None:
        return parse_marker(self.comment)


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

    def index(self, schema: str, name: str) -> IndexInfo | None:
        return next((i for i in self.indexes if i.schema == schema and i.name == name), None)

    def view(self, schema: str, name: str) -> ViewInfo | None:
        return next((v for v in self.views if v.schema == schema and v.name == name), None)

    def other_relation(self, schema: str, name: str) -> str | None:
        """The relkind of a table, view, sequence... of that name (anything not an index or matview)."""
        return next((kind for s, n, kind in self.relations if s == schema and n == name), None)

    def indexes_on(self, schema: str, table: str) -> tuple[IndexInfo, ...]:
        return tuple(i for i in self.indexes if i.table_schema == schema and i.table == table)

    @property
    def settings(self) -> Mapping[str, str]:
        return dict(self.database_settings)

    @property
    def server(self) -> Mapping[str, str]:
        return dict(self.server_settings)


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
            key_columns=tuple(i["key_columns"] or ()),
        )
        for i in document.get("indexes") or ()
    )
    views = tuple(
        ViewInfo(
            schema=v["schema"], name=v["name"], definition=v["definition"], def_hash=v["def_hash"],
            populated=bool(v["populated"]), owner=v["owner"], comment=v["comment"],
            grants=tuple(Grant(g["grantee"], g["privilege"], bool(g["grantable"])) for g in v["grants"] or ()),
            dependents=tuple(sorted(v["dependents"] or ())),
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
    )
