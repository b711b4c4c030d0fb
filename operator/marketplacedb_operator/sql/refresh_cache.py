"""The refresh check's cached call analysis (pure builders, no I/O).

Most of the check's server time is the call analysis (view_calls.CALLS: regular expressions over
the rules' node trees, recursively through function bodies). Its result depends only on catalog
rows: the rules of the view and of the plain views it reads (pg_rewrite), the policies of its
RLS-enabled base tables (pg_policy), the called functions (pg_proc, and pg_aggregate for
aggregates) and the domains coerced to (pg_type, pg_constraint). So the check function stores the
result in the view's state row with a key, and reuses it only while the key computed live from
the same rows is equal:

* the key covers (oid, xmin) of every such row: any UPDATE of a catalog row writes a new row
  version with the updating transaction's xmin (CREATE OR REPLACE VIEW/FUNCTION/AGGREGATE, ALTER
  FUNCTION, ALTER POLICY), and a dropped row is missing from the key;
* rows that could newly appear are looked up live: the rules of the relations the (live)
  dependency walk finds, every policy of an RLS-enabled base table, every constraint of a domain
  in the set; a new function or domain can only be reached through a changed rule, policy,
  function (body, defaults, aggregate support functions) or domain constraint, each in the key;
* the type I/O functions of `::text`-style conversions are fixed for an existing type (ALTER TYPE
  cannot change INPUT/OUTPUT), and the types come from the (keyed) trees.

A stale analysis is therefore never used; on a changed key the check analyses again. What the
client reads (`observe`, decide()) is always the live analysis; only the server-side skip uses
the cache. Tested per kind in tests/test_refresh_cache_pg.py.
"""

from __future__ import annotations

from typing import Final

from psycopg import sql

# After view_calls.CALLS (trees, fn, svf): the sets the key covers, from the live trees.
LIVE: Final = """,
analysed AS (
  SELECT ARRAY(SELECT DISTINCT fn.oid FROM fn WHERE fn.oid IS NOT NULL ORDER BY 1) AS procs,
    ARRAY(SELECT DISTINCT trees.oid FROM trees WHERE trees.kind = 'd' ORDER BY 1) AS domains
)"""

# Instead of view_calls.CALLS: fn, svf and the sets from the stored analysis (empty when none).
CACHED: Final = """cached AS (
  SELECT c.analysis FROM {state} AS c WHERE c.view_schema = {schema} AND c.view_name = {name}
),
fn AS (
  SELECT f.name, f.volatility, f.builtin, f."volatile", f.clock, f.untracked, f."oid", f.definition
  FROM cached CROSS JOIN LATERAL pg_catalog.jsonb_to_recordset(cached.analysis -> 'fn') AS f (
    name text, volatility text, builtin boolean, "volatile" boolean, clock boolean, untracked boolean,
    "oid" pg_catalog.oid, definition text)
),
svf AS (
  SELECT v.name FROM cached
  CROSS JOIN LATERAL pg_catalog.jsonb_array_elements_text(cached.analysis -> 'svf') AS v (name)
),
analysed AS (
  SELECT ARRAY(SELECT e::pg_catalog.oid FROM cached
               CROSS JOIN LATERAL pg_catalog.jsonb_array_elements_text(cached.analysis -> 'procs') AS e) AS procs,
    ARRAY(SELECT e::pg_catalog.oid FROM cached
          CROSS JOIN LATERAL pg_catalog.jsonb_array_elements_text(cached.analysis -> 'domains') AS e) AS domains
)"""

# The key, from live catalog rows (needs CTEs rule_rows, base, analysed).
KEY: Final = """pg_catalog.md5(
    coalesce((SELECT pg_catalog.string_agg(r.oid::text || ':' || r.xmin::text, ',' ORDER BY r.oid)
              FROM rule_rows JOIN pg_catalog.pg_rewrite AS r ON r.oid = rule_rows.oid), '')
    || '/' || coalesce((SELECT pg_catalog.string_agg(p.oid::text || ':' || p.xmin::text || ':'
                                                     || coalesce(a.xmin::text, ''), ',' ORDER BY p.oid)
              FROM analysed CROSS JOIN LATERAL pg_catalog.unnest(analysed.procs) AS u (oid)
              JOIN pg_catalog.pg_proc AS p ON p.oid = u.oid
              LEFT JOIN pg_catalog.pg_aggregate AS a ON a.aggfnoid = p.oid::pg_catalog.regproc), '')
    || '/' || (SELECT pg_catalog.cardinality(analysed.procs)::text FROM analysed)
    || '/' || coalesce((SELECT pg_catalog.string_agg(pol.oid::text || ':' || pol.xmin::text, ',' ORDER BY pol.oid)
              FROM base JOIN pg_catalog.pg_class AS bc ON bc.oid = base.oid AND bc.relrowsecurity
              JOIN pg_catalog.pg_policy AS pol ON pol.polrelid = base.oid), '')
    || '/' || coalesce((SELECT pg_catalog.string_agg(t.oid::text || ':' || t.xmin::text || ':' || coalesce(
                (SELECT pg_catalog.string_agg(k.oid::text || ':' || k.xmin::text, ';' ORDER BY k.oid)
                 FROM pg_catalog.pg_constraint AS k WHERE k.contypid = t.oid), ''), ',' ORDER BY t.oid)
              FROM analysed CROSS JOIN LATERAL pg_catalog.unnest(analysed.domains) AS u (oid)
              JOIN pg_catalog.pg_type AS t ON t.oid = u.oid), '')
    || '/' || (SELECT pg_catalog.cardinality(analysed.domains)::text FROM analysed))"""

# What is stored (from the live analysis).
ANALYSIS: Final = """pg_catalog.jsonb_build_object(
    'fn', (SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('name', fn.name,
      'volatility', fn.volatility::text, 'builtin', fn.builtin, 'volatile', fn.volatile, 'clock', fn.clock,
      'untracked', fn.untracked, 'oid', fn.oid, 'definition', fn.definition)), '[]'::jsonb) FROM fn),
    'svf', (SELECT coalesce(pg_catalog.jsonb_agg(svf.name), '[]'::jsonb) FROM svf),
    'procs', (SELECT pg_catalog.to_jsonb(analysed.procs::text[]) FROM analysed),
    'domains', (SELECT pg_catalog.to_jsonb(analysed.domains::text[]) FROM analysed))"""


def columns(live: bool) -> sql.Composed:
    """The key and the analysis to store (NULL when read from the cache), as OBSERVE columns."""
    analysis = sql.SQL(ANALYSIS) if live else sql.SQL("NULL::jsonb")
    return sql.SQL("{} AS analysis_key_live, {} AS analysis_live,").format(sql.SQL(KEY), analysis)


def cached_calls(state: sql.Composable, schema: sql.Composable, name: sql.Composable) -> sql.Composed:
    return sql.SQL(CACHED).format(state=state, schema=schema, name=name)
