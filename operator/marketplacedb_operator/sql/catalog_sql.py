"""The SQL that observes the catalog (text only; catalog.py parses what it returns).

Every function is schema-qualified; parameters are bound, names of declared objects never spliced.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from psycopg import sql

from .. import naming
from .ddl import MARKER_PREFIX

# Server-wide settings reported as advice (never changed), plus a few that explain them.
ADVISED_SETTINGS = ("max_connections", "shared_buffers", "effective_cache_size", "work_mem",
                    "maintenance_work_mem", "server_version_num")

_EXCLUDED_SCHEMAS = ("pg_catalog", "information_schema", naming.STATE_SCHEMA)


# Observation: one SELECT, one JSON row, scoped ("neighbours are not our business",
# docs/architecture.md#ownership-and-trust):
# only relations named in %(schemas)s/%(names)s (declared names and their temporaries), the objects
# this resource recorded as its own, and the indexes on declared materialized views are read; no
# definition of anything else is ever deparsed, so no lock of an undeclared object is waited for.
# {records} is the ownership table, or an empty stand-in before it exists (ownership.py).
OBSERVE = sql.SQL("""\
WITH rec AS ({records}),
wanted AS (
  SELECT n.oid AS nsp, w.name
  FROM ROWS FROM (pg_catalog.unnest(%(schemas)s::text[]), pg_catalog.unnest(%(names)s::text[])) AS w(schema, name)
  JOIN pg_catalog.pg_namespace n ON n.nspname = w.schema
),
picked AS (
  SELECT c.oid FROM pg_catalog.pg_class c JOIN wanted w ON c.relnamespace = w.nsp AND c.relname = w.name
  UNION SELECT c.oid FROM pg_catalog.pg_class c JOIN rec ON rec.oid = c.oid WHERE rec.owner = %(owner)s
  UNION SELECT i.indexrelid FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class v ON v.oid = i.indrelid
        JOIN wanted w ON v.relnamespace = w.nsp AND v.relname = w.name WHERE v.relkind = 'm'
),
rels AS (
  SELECT c.oid, n.nspname, c.relname, c.relkind, c.xmin
  FROM picked p JOIN pg_catalog.pg_class c ON c.oid = p.oid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname <> ALL (%(excluded)s::text[]) AND n.nspname !~ '^pg_(toast|temp)'
),
-- The record that makes a live relation someone's: same name and kind, and the recorded OID, or
-- an intent whose build may have made it (younger catalog row, same table). Bound by an intent
-- alone (pinned false), only an INVALID index is swept as ours; a valid one is either a build that
-- finished after the operator died (completed only when identical to the declared index:
-- plan_indexes._finished_build) or someone's, made after a stale intent, and left alone.
owned AS (
  SELECT r.oid AS rel, rec.owner, rec.how, rec.spec_hash, rec.def_hash, rec.oid IS NOT NULL AS pinned
  FROM rels r JOIN rec ON rec.schema_name = r.nspname AND rec.name = r.relname
   AND rec.kind = CASE WHEN r.relkind IN ('i', 'I') THEN 'index' WHEN r.relkind = 'm' THEN 'view' END
  WHERE rec.oid = r.oid
     OR (rec.oid IS NULL AND rec.how = 'building'
         AND pg_catalog.age(r.xmin) <= pg_catalog.age(rec.xmin)
         AND EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indexrelid = r.oid
                      AND i.indrelid = rec.table_oid))
)
SELECT pg_catalog.json_build_object(
  'database', pg_catalog.current_database(),
  'user', current_user,
  'records', (SELECT pg_catalog.to_regclass(%(records_table)s) IS NOT NULL),
  'indexes', (SELECT coalesce(pg_catalog.json_agg(x ORDER BY x.schema, x.name), '[]') FROM (
      SELECT r.nspname AS schema, r.relname AS name, r.oid, t.nspname AS table_schema, tc.relname AS "table",
             tc.relkind::text AS table_kind, x.definition,
             pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(x.definition, 'UTF8')), 'hex') AS def_hash,
             CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END
               || pg_catalog.substring(x.definition, ' USING .*$') AS signature,
             i.indisvalid AS valid, i.indisready AS ready, i.indisunique AS "unique",
             i.indisprimary AS "primary", i.indpred IS NOT NULL AS partial,
             i.indexprs IS NOT NULL AS expressions,
             i.indisclustered AS clustered, r_c.reltablespace <> 0 AS in_tablespace,
             pg_catalog.obj_description(i.indexrelid, 'pg_class') AS comment,
             (SELECT coalesce(pg_catalog.json_agg(a.attname ORDER BY k.ord), '[]')
                FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
               WHERE k.ord <= i.indnkeyatts) AS key_columns,
             (SELECT pg_catalog.json_build_object('owner', o.owner, 'how', o.how, 'spec_hash', o.spec_hash,
                                                  'def_hash', o.def_hash, 'pinned', o.pinned)
                FROM owned o WHERE o.rel = r.oid LIMIT 1) AS record,
             -- Someone's CREATE INDEX CONCURRENTLY still running: its progress row (visible with
             -- pg_read_all_stats), else a session (perhaps autovacuum: then we just wait) holding
             -- the table's ShareUpdateExclusiveLock while the index is not valid yet (pg_locks is
             -- visible to every role). Never touched.
             CASE WHEN NOT i.indisvalid THEN coalesce(
               (SELECT pg_catalog.min(p.pid) FROM pg_catalog.pg_stat_progress_create_index p
                 WHERE p.index_relid = r.oid AND p.pid <> pg_catalog.pg_backend_pid()),
               (SELECT pg_catalog.min(l.pid) FROM pg_catalog.pg_locks l
                 WHERE l.locktype = 'relation' AND l.relation = i.indrelid AND l.granted
                   AND l.mode = 'ShareUpdateExclusiveLock' AND l.pid <> pg_catalog.pg_backend_pid()))
             END AS building_pid,
             (SELECT coalesce(pg_catalog.json_agg(cn.conname || ' on ' || cs.nspname || '.' || ct.relname
                                                  ORDER BY cn.conname), '[]')
                FROM pg_catalog.pg_constraint cn JOIN pg_catalog.pg_class ct ON ct.oid = cn.conrelid
                JOIN pg_catalog.pg_namespace cs ON cs.oid = ct.relnamespace
               WHERE cn.conindid = r.oid AND cn.contype = 'f') AS foreign_keys,
             (SELECT pg_catalog.min(cn.conname) FROM pg_catalog.pg_constraint cn
               WHERE cn.conindid = r.oid AND cn.conrelid = i.indrelid AND cn.contype IN ('p', 'u', 'x'))
               AS "constraint"
      FROM rels r
      JOIN pg_catalog.pg_index i ON i.indexrelid = r.oid
      JOIN pg_catalog.pg_class r_c ON r_c.oid = r.oid
      JOIN pg_catalog.pg_class tc ON tc.oid = i.indrelid
      JOIN pg_catalog.pg_namespace t ON t.oid = tc.relnamespace
      CROSS JOIN LATERAL (SELECT pg_catalog.pg_get_indexdef(r.oid) AS definition) x) x),
  'views', (SELECT coalesce(pg_catalog.json_agg(x ORDER BY x.schema, x.name), '[]') FROM (
      SELECT r.nspname AS schema, r.relname AS name, r.oid, x.definition,
             pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(x.definition, 'UTF8')), 'hex') AS def_hash,
             c.relispopulated AS populated,
             pg_catalog.pg_get_userbyid(c.relowner) AS owner,
             pg_catalog.obj_description(r.oid, 'pg_class') AS comment,
             coalesce(pg_catalog.array_to_json(c.reloptions), '[]') AS reloptions,
             -- What a swap cannot carry over (plan_views refuses it): a tablespace, extended
             -- statistics, per-column statistics targets and options.
             c.reltablespace <> 0 AS in_tablespace,
             (SELECT coalesce(pg_catalog.json_agg(se.stxname ORDER BY se.stxname), '[]')
                FROM pg_catalog.pg_statistic_ext se WHERE se.stxrelid = r.oid) AS statistics,
             (SELECT coalesce(pg_catalog.json_agg(a.attname ORDER BY a.attnum), '[]')
                FROM pg_catalog.pg_attribute a WHERE a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
                 AND (a.attstattarget <> -1 OR a.attoptions IS NOT NULL)) AS column_options,
             -- The grantees the operator's default privileges give every new table it creates here:
             -- revoked from a swapped-in view, whose ACL must be exactly the old one's.
             (SELECT coalesce(pg_catalog.json_agg(DISTINCT
                        CASE WHEN g.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(g.grantee) END), '[]')
                FROM pg_catalog.pg_default_acl da CROSS JOIN LATERAL pg_catalog.aclexplode(da.defaclacl) g
               WHERE da.defaclrole = (SELECT u.oid FROM pg_catalog.pg_roles u WHERE u.rolname = current_user)
                 AND da.defaclobjtype = 'r' AND da.defaclnamespace IN (0, c.relnamespace)
                 AND g.grantee <> da.defaclrole) AS default_grantees,
             (SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_object(
                        'grantee', CASE WHEN g.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(g.grantee) END,
                        'privilege', g.privilege_type, 'grantable', g.is_grantable)
                      ORDER BY g.grantee, g.privilege_type), '[]')
                FROM pg_catalog.aclexplode(c.relacl) g WHERE g.grantee <> c.relowner) AS grants,
             (SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_object(
                        'column', a.attname,
                        'grantee', CASE WHEN g.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(g.grantee) END,
                        'privilege', g.privilege_type, 'grantable', g.is_grantable)
                      ORDER BY a.attnum, g.grantee, g.privilege_type), '[]')
                FROM pg_catalog.pg_attribute a CROSS JOIN LATERAL pg_catalog.aclexplode(a.attacl) g
               WHERE a.attrelid = r.oid AND a.attnum > 0 AND a.attacl IS NOT NULL) AS column_grants,
             (SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_array(a.attname, d.description)
                      ORDER BY a.attnum), '[]')
                FROM pg_catalog.pg_description d JOIN pg_catalog.pg_attribute a
                  ON a.attrelid = d.objoid AND a.attnum = d.objsubid
               WHERE d.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objoid = r.oid
                 AND d.objsubid > 0) AS column_comments,
             (SELECT pg_catalog.json_build_object('owner', o.owner, 'how', o.how, 'spec_hash', o.spec_hash,
                                                  'def_hash', o.def_hash, 'pinned', o.pinned)
                FROM owned o WHERE o.rel = r.oid LIMIT 1) AS record,
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
      CROSS JOIN LATERAL (SELECT pg_catalog.pg_get_viewdef(r.oid) AS definition) x
      WHERE r.relkind = 'm') x),
  'relations', (SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_array(r.nspname, r.relname, r.relkind)
                  ORDER BY r.nspname, r.relname), '[]')
                FROM rels r WHERE r.relkind NOT IN ('i', 'I', 'm')),
  -- Relations whose comment carries this resource's marker but which it did not record: a copied
  -- (LIKE ... INCLUDING ALL) or forged comment, or an object from before ownership records.
  -- Names only, from catalog rows: reported, never touched.
  'marked', (SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_array(n.nspname, c.relname, c.relkind)
                ORDER BY n.nspname, c.relname), '[]')
             FROM pg_catalog.pg_description d
             JOIN pg_catalog.pg_class c ON d.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                        AND d.objoid = c.oid AND d.objsubid = 0
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE pg_catalog.starts_with(d.description, %(marker)s)
               AND n.nspname <> ALL (%(excluded)s::text[])
               AND NOT EXISTS (SELECT 1 FROM rec WHERE rec.oid = c.oid AND rec.owner = %(owner)s)),
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

_RECORDS_TABLE = sql.SQL(
    "SELECT r.owner, r.kind, r.schema_name, r.name, r.oid, r.table_oid, r.spec_hash, r.def_hash, r.how, r.xmin "
    "FROM {} r").format(sql.Identifier(naming.STATE_SCHEMA, "owned_objects"))
_NO_RECORDS = sql.SQL(
    "SELECT NULL::text AS owner, NULL::text AS kind, NULL::text AS schema_name, NULL::text AS name, "
    "NULL::oid AS oid, NULL::oid AS table_oid, NULL::text AS spec_hash, NULL::text AS def_hash, "
    "NULL::text AS how, NULL::xid AS xmin WHERE false")
RECORDS_TABLE_NAME = f"{naming.STATE_SCHEMA}.owned_objects"


def observe_query(records_exist: bool) -> sql.Composed:
    return OBSERVE.format(records=_RECORDS_TABLE if records_exist else _NO_RECORDS)


def observe_params(owner: str, names: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Parameters of OBSERVE for `owner`, reading the relations named `names` ((schema, name) pairs)."""
    wanted = sorted(set(names))
    return {"excluded": list(_EXCLUDED_SCHEMAS), "advised": list(ADVISED_SETTINGS), "owner": owner,
            "schemas": [s for s, _ in wanted], "names": [n for _, n in wanted],
            "marker": f"{MARKER_PREFIX}{owner};", "records_table": RECORDS_TABLE_NAME}


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


# Before a CONCURRENTLY build: the sessions that would stall its wait phases (a transaction holding
# a lock on the table, or any snapshot older than the build's, in this database), open longer than
# min_age. Without pg_read_all_stats another role's transaction age and snapshot are hidden: such a
# session counts when it holds a lock on the table and the same virtual transaction is still open
# in the next sample (%(seen)s); a hidden snapshot alone is found by the build itself (it times out
# at lockTimeout, once, and leaves nothing): grant pg_read_all_stats to the operator's role.
BUILD_BLOCKERS = sql.SQL("""\
WITH s AS (
  SELECT a.pid, a.state, a.usename, a.application_name, a.xact_start, a.backend_xmin, a.query,
         (SELECT l.virtualxid FROM pg_catalog.pg_locks l
           WHERE l.pid = a.pid AND l.locktype = 'virtualxid' AND l.granted LIMIT 1) AS vxid,
         EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE l.pid = a.pid AND l.locktype = 'relation'
                  AND l.relation = pg_catalog.to_regclass(%(table)s) AND l.granted) AS on_table
  FROM pg_catalog.pg_stat_activity a
  WHERE a.datname = pg_catalog.current_database() AND a.pid <> pg_catalog.pg_backend_pid()
    -- another role's backend_type is hidden too; autovacuum workers have no user name
    AND (a.backend_type = 'client backend' OR (a.backend_type IS NULL AND a.usename IS NOT NULL))
)
SELECT s.pid, coalesce(s.state, 'unknown (grant pg_read_all_stats to see it)'), s.usename, s.application_name,
       coalesce(pg_catalog.round(extract(epoch FROM pg_catalog.clock_timestamp() - s.xact_start)::numeric, 3), 0),
       CASE WHEN s.state IS NULL THEN '' ELSE
         pg_catalog.upper(pg_catalog.split_part(pg_catalog.ltrim(s.query), ' ', 1)) END,
       s.vxid,
       (s.xact_start IS NOT NULL AND s.xact_start < pg_catalog.clock_timestamp()
                                   - pg_catalog.make_interval(secs => %(min_age)s)
        AND (s.backend_xmin IS NOT NULL OR s.on_table))
       OR (s.state IS NULL AND s.on_table AND s.vxid = ANY (%(seen)s::text[])) AS blocking
FROM s
WHERE s.vxid IS NOT NULL AND (s.xact_start IS NOT NULL OR s.state IS NULL AND s.on_table)
ORDER BY s.pid""")
