"""What a session must settle before it runs a view's query or the operator's refresh objects:
a search_path nobody else can plant a name in, trusted owners of the operator's schema, and the
relations a REFRESH reads locked before its last check. Pure builders (psycopg.sql, no I/O).
"""

from __future__ import annotations

from typing import Final

from psycopg import sql

from .. import naming
from .view_calls import FIRST_NORMAL_OID

# The session's own search_path minus the schema "$user" resolves to when another role owns it:
# on PostgreSQL 15 CREATE on `public` is no longer granted to PUBLIC, but any role with CREATE on
# the database can create the schema named after the operator's role, which "$user" searches
# first. A name resolved there would run with the operator's rights (at plan, creation and, for a
# function body kept as a SQL string, at every REFRESH: PostgreSQL 15 runs REFRESH with the
# session's search_path). pg_temp goes last explicitly so a temporary object never shadows
# (pg_catalog stays first unless the role lists it later on purpose). Every call is qualified:
# the path being cleaned is the one in force. {local}: transaction-local (true) or session (false).
SAFE_SEARCH_PATH: Final = """\
SELECT pg_catalog.set_config('search_path', pg_catalog.concat_ws(', ', (
  SELECT pg_catalog.string_agg(pg_catalog.quote_ident(s.n), ', ' ORDER BY s.o)
  FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) WITH ORDINALITY AS s (n, o)
  JOIN pg_catalog.pg_namespace AS ns ON ns.nspname = s.n
  WHERE s.n OPERATOR(pg_catalog.<>) CURRENT_USER OR pg_catalog.pg_has_role(ns.nspowner, 'MEMBER')
), 'pg_temp'), {local})"""


def safe_search_path_sql(local: bool) -> sql.Composed:
    return sql.SQL(SAFE_SEARCH_PATH).format(local=sql.Literal(local))


# The operator's schema, the tables and the function a refresh uses are trusted when owned by this
# role (or a role it is a member of), the database's owner (who already owns `public`, searched by
# every session) or a superuser. Anything else could have been planted by another role with CREATE
# on the database: the check function runs with the caller's rights, a table's owner can add
# triggers and policies, a schema's owner can replace what is in it. Looked up by name (indexed:
# this runs before every check). The problems, empty when all can be trusted (no role names).
_TRUST: Final = """\
WITH s AS (SELECT n.oid, n.nspowner FROM pg_catalog.pg_namespace AS n WHERE n.nspname = {schema}),
owned (what, owner) AS (
  SELECT 'schema ' || {schema}, s.nspowner FROM s
  UNION ALL SELECT 'table ' || c.relname, c.relowner FROM pg_catalog.pg_class AS c JOIN s ON c.relnamespace = s.oid
    WHERE c.relname = ANY ({tables})
  UNION ALL SELECT 'function ' || p.proname, p.proowner FROM pg_catalog.pg_proc AS p JOIN s ON p.pronamespace = s.oid
    WHERE p.proname = {function}
)
SELECT ARRAY(SELECT DISTINCT o.what FROM owned AS o
  WHERE NOT pg_catalog.pg_has_role(o.owner, 'MEMBER')
    AND o.owner <> (SELECT d.datdba FROM pg_catalog.pg_database AS d
                    WHERE d.datname = pg_catalog.current_database())
    AND NOT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.oid = o.owner), false)
  ORDER BY 1) AS problems"""


def trust_sql(tables: tuple[str, ...], function: str) -> sql.Composed:
    return sql.SQL(_TRUST).format(schema=sql.Literal(naming.STATE_SCHEMA), tables=sql.Literal(list(tables)),
                                  function=sql.Literal(function))


def trust_gate_sql(tables: tuple[str, ...], function: str) -> sql.Composed:
    """The trust check as the first statement of a message whose next statement calls the check
    function: it fails (22P02, a cast of the problems) when anything cannot be trusted, and the
    statements after it in the message are then never parsed, planned or run (a planted IMMUTABLE
    function would run at plan time). The caller asks trust_sql() what was wrong."""
    return sql.SQL("SELECT CASE WHEN pg_catalog.cardinality(t.problems) = 0 THEN 0 "
                   "ELSE pg_catalog.array_to_string(t.problems, ',')::integer END FROM ({}) AS t").format(
        trust_sql(tables, function))


def distrust(problems: list[str]) -> str:
    return (f"the operator's schema {naming.STATE_SCHEMA} cannot be trusted (owned by a role that is neither "
            f"this role, the database owner nor a superuser: {', '.join(problems)}): nothing of it was called; "
            "a DBA must drop or fix it")


# The relations the view's rule reads (not the view itself), to lock ACCESS SHARE in the refresh's
# transaction before the last check: LOCK on a plain view locks what it reads, recursively, so a
# CREATE OR REPLACE VIEW waits for the refresh (or the refresh for it, then sees the new rule).
# LOCK needs table-level SELECT: a relation read through column grants only is left unlocked.
READS: Final = """\
SELECT DISTINCT n.nspname, c.relname
FROM pg_catalog.pg_rewrite AS r
JOIN pg_catalog.pg_depend AS d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
 AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> r.ev_class
JOIN pg_catalog.pg_class AS c ON c.oid = d.refobjid AND c.relkind IN ('r', 'p', 'v')
 AND pg_catalog.has_table_privilege(c.oid, 'SELECT')
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE r.ev_class = pg_catalog.to_regclass({view})
ORDER BY 1, 2"""


def reads_sql(view: sql.Literal) -> sql.Composed:
    return sql.SQL(READS).format(view=view)


def lock_sql(relations: list[tuple[str, str]]) -> sql.Composed:
    """ACCESS SHARE on the (schema, name) pairs READS returned (LOCK takes tables and views only:
    a materialized view read is not replaced by CREATE OR REPLACE)."""
    return sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
        sql.SQL(", ").join(sql.Identifier(schema, name) for schema, name in relations)
    )


# Built-in functions that read a text search configuration (or a dictionary) at run time, besides
# those taking a regconfig/regdictionary argument: the one-argument forms read
# default_text_search_config. A call of one puts the text search catalogs into the signature.
TEXT_SEARCH_DEFAULT: Final = ("to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery",
                              "websearch_to_tsquery", "ts_headline", "json_to_tsvector", "jsonb_to_tsvector",
                              "get_current_ts_config", "ts_debug")

# The observation's signature column (part of refresh_sql.OBSERVE: `t` the view, `deps` every relation
# walked (root: the view), `base`, `rule_rows` and `fn` its CTEs). Recorded at each refresh; a different
# value means the rows may differ without a counted write, so the check refreshes. Catalog reads
# only (no node tree): row versions (xmin) and a few columns.
_SIGNATURE: Final = """\
  -- What the rows depend on besides writes: the base tables' storage and row security (policies),
  -- the rules of the view and the plain views it reads (row versions: CREATE OR REPLACE VIEW writes a
  -- new one), the called functions' definitions, and
  -- the statistics' reset time (a reset sets the counters back: equal sums prove nothing then), and
  -- the server's start time (crash recovery discards every counter with no reset time: a clean
  -- restart keeps them and costs one refresh).
  pg_catalog.md5(t.oid::text || '/' || coalesce((SELECT pg_catalog.string_agg(
            base.oid::text || ':' || coalesce(pg_catalog.pg_relation_filenode(base.oid), 0)::text || ':'
            || c.relrowsecurity::text || c.relforcerowsecurity::text || coalesce((SELECT pg_catalog.string_agg(
              pg_catalog.concat_ws(' ', pl.polname, pl.polcmd, pl.polpermissive, pl.polroles, pl.polqual,
                                   pl.polwithcheck), ';' ORDER BY pl.polname)
              FROM pg_catalog.pg_policy AS pl WHERE pl.polrelid = base.oid), ''), ','
            ORDER BY base.oid) FROM base JOIN pg_catalog.pg_class AS c ON c.oid = base.oid), '')
    || '/' || coalesce((SELECT pg_catalog.string_agg(r.oid::text || ':' || r.xmin::text, ',' ORDER BY r.oid)
                        FROM rule_rows JOIN pg_catalog.pg_rewrite AS r ON r.oid = rule_rows.oid), '')
    || '/' || coalesce((SELECT pg_catalog.string_agg(fn.definition, ',' ORDER BY fn.oid) FROM fn), '')
    || '/' || coalesce(pg_catalog.pg_stat_get_db_stat_reset_time(
                         (SELECT d.oid FROM pg_catalog.pg_database AS d
                          WHERE d.datname = pg_catalog.current_database()))::text, '')
    || '/' || pg_catalog.pg_postmaster_start_time()::text
{rights}
{text_search}) AS signature,"""

# Whose rights each relation is read with decides what row security lets through: REFRESH runs as
# the view's owner; a plain view reads with its owner's rights, or with security_invoker (a
# reloption) with its reader's; a table's owner bypasses its policies unless FORCE; a superuser or
# BYPASSRLS role bypasses all; a policy applies to the members of its roles. So, per walked relation:
# its owner, reloptions, the owner's rolsuper/rolbypassrls, and for an RLS-enabled table which of the
# walked relations' owners are members of each policy's roles (one pass; the policy part runs only
# for RLS-enabled tables).
RIGHTS: Final = """\
    || '/' || coalesce((SELECT pg_catalog.string_agg(c.oid::text || ':' || c.relowner::text || ':'
        || coalesce(c.reloptions::text, '') || ':' || (SELECT ro.rolsuper::text || ro.rolbypassrls::text
                                                       FROM pg_catalog.pg_roles AS ro WHERE ro.oid = c.relowner)
        || CASE WHEN c.relrowsecurity THEN coalesce((SELECT pg_catalog.string_agg(
                 pl.oid::text || ':' || o.relowner::text || ':'
                 || pg_catalog.pg_has_role(o.relowner, pr.role, 'USAGE')::text, ';'
                 ORDER BY pl.oid, o.relowner, pr.role)
               FROM pg_catalog.pg_policy AS pl CROSS JOIN LATERAL pg_catalog.unnest(pl.polroles) AS pr (role)
               CROSS JOIN (SELECT DISTINCT oc.relowner FROM deps
                           JOIN pg_catalog.pg_class AS oc ON oc.oid = deps.oid) AS o
               WHERE pl.polrelid = c.oid AND pr.role <> 0), '') ELSE '' END, ',' ORDER BY c.oid)
      FROM (SELECT DISTINCT deps.oid FROM deps) AS w JOIN pg_catalog.pg_class AS c ON c.oid = w.oid), '')"""

# What a text search function returns is read from the catalog at run time: ALTER TEXT SEARCH
# CONFIGURATION ... ALTER/DROP MAPPING and ALTER TEXT SEARCH DICTIONARY change every document with
# no write to a table (to_tsvector(regconfig, text) is IMMUTABLE). When the view calls one: the write
# counters of pg_ts_config, pg_ts_config_map and pg_ts_dict (any configuration: it may come from a
# column), read like a base table's (a DDL session's unreported counts are held back by the same
# session rules, sql/refresh_stats.py; 9 calls instead of reading ~600 mapping rows' versions), and
# default_text_search_config. Dictionary files on disk (synonyms, stop words) are not seen.
TEXT_SEARCH: Final = """\
    || '/' || CASE WHEN EXISTS (SELECT 1 FROM fn JOIN pg_catalog.pg_proc AS p ON p.oid = fn.oid
                                WHERE p.proargtypes::pg_catalog.oid[] && '{{3734,3769}}'::pg_catalog.oid[]
                                   OR (p.oid < {first_normal} AND p.proname = ANY ({default_users})))
      THEN pg_catalog.current_setting('default_text_search_config') || (SELECT pg_catalog.string_agg(
             (pg_catalog.pg_stat_get_tuples_inserted(x.oid) + pg_catalog.pg_stat_get_tuples_updated(x.oid)
              + pg_catalog.pg_stat_get_tuples_deleted(x.oid))::text, ':' ORDER BY x.oid)
           FROM pg_catalog.unnest('{{pg_catalog.pg_ts_config,pg_catalog.pg_ts_config_map,pg_catalog.pg_ts_dict}}'
                                  ::pg_catalog.regclass[]) AS x (oid))
      ELSE '' END"""


_USERS: Final = sql.SQL("ARRAY[{}]::pg_catalog.name[]").format(
    sql.SQL(", ").join(map(sql.Literal, TEXT_SEARCH_DEFAULT)))
_TEXT_SEARCH: Final = sql.SQL(TEXT_SEARCH).format(default_users=_USERS, first_normal=sql.Literal(FIRST_NORMAL_OID))
SIGNATURE: Final = sql.SQL(_SIGNATURE).format(rights=sql.SQL(RIGHTS), text_search=_TEXT_SEARCH)
