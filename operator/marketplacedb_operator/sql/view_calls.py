"""What a view's query calls and reads, as the server resolved it (pure builders, no I/O).

The parser (querydeps.py) sees names as written; only the server knows which function a name,
an operator, a cast or an overload resolves to, and how the function is declared. So the query is
stored as a view (the declared view itself when it exists as planned, otherwise a temporary view
in a rolled-back transaction: resolved, never executed) and its rewrite rule is read: every
function, operator, aggregate, window function and cast it calls (`:funcid`-style oids in
pg_rewrite's node tree; pg_depend does not record pinned built-ins), recursively through the plain
views it reads, with each function's `provolatile`.

The rule applied, erring on the side of refusing and refreshing:
* any called function declared VOLATILE (`provolatile = 'v'`), built-in or not, whatever schema or
  overload, refuses the view (no DDL at all) unless `allowVolatileFunctions: true`;
* a non-built-in function, or a built-in one that is not IMMUTABLE, turns skip-if-unchanged off
  unless `refresh.dependsOn` declares the tables whose writes count: what it reads is unknown;
* the body of an SQL-standard function (`BEGIN ATOMIC ... END`, stored parsed) is read like the
  query, recursively; any other body (a quoted SQL string, plpgsql, C) is not: a function declared
  STABLE or IMMUTABLE is trusted to be what it says (PostgreSQL itself refuses INSERT/UPDATE/DELETE
  in such a function, but not a call of `setval()` or `pg_terminate_backend()` inside it). Not seen
  either: row-level security policies and domain CHECK constraints the query triggers, and type
  input functions of its constants. The refresh-time check (sql/refresh_sql.py) reads only what
  the view's stored rules call, with their declared volatility.

`guard()` repeats the volatility check inside the transaction that creates the view, between
CREATE ... WITH NO DATA and the first REFRESH: a function made VOLATILE after the plan was
computed fails that transaction (nothing is left) instead of running.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from psycopg import sql

from ..api.v1alpha1 import MaterializedViewSpec
from .ddl import render

# FirstNormalObjectId: objects below it come with the server (initdb), the rest was created later.
FIRST_NORMAL_OID: Final = 16384


@dataclasses.dataclass(frozen=True)
class ViewCalls:
    """One view query's calls and base tables (names qualified unless in pg_catalog)."""

    volatile: tuple[str, ...] = ()  # provolatile = 'v': refused unless allowVolatileFunctions
    untracked: tuple[str, ...] = ()  # "public.price_of(integer) (stable)": what they read is unknown
    time: tuple[str, ...] = ()  # now(), current_date, ...: the result moves with the clock
    tables: tuple[str, ...] = ()  # base relations with write counters
    foreign: tuple[str, ...] = ()  # foreign tables: no write counters


# {view}: a text literal naming the view (regclass input). One row; see the module docstring.
_ANALYZE: Final = r"""WITH RECURSIVE
deps (oid, depth) AS (
  SELECT pg_catalog.to_regclass({view})::pg_catalog.oid, 0
  UNION
  SELECT d.refobjid, deps.depth + 1
  FROM deps
  JOIN pg_catalog.pg_class AS dc ON dc.oid = deps.oid
  JOIN pg_catalog.pg_rewrite AS r ON r.ev_class = deps.oid
  JOIN pg_catalog.pg_depend AS d
    ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
   AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> r.ev_class
  WHERE (deps.depth = 0 OR dc.relkind = 'v') AND deps.depth < 32
),
rules AS (
  SELECT DISTINCT r.ev_action::text AS action FROM deps
  JOIN pg_catalog.pg_class AS dc ON dc.oid = deps.oid
  JOIN pg_catalog.pg_rewrite AS r ON r.ev_class = deps.oid
  WHERE deps.depth = 0 OR dc.relkind = 'v'
),
calls AS (
  SELECT m[1] AS oid, m[2] AS svf FROM rules CROSS JOIN LATERAL pg_catalog.regexp_matches(rules.action,
    ':(?:funcid|opfuncid|aggfnoid|winfnoid) (\d+)|\{{SQLVALUEFUNCTION :op ([0-8]) ', 'g') AS m
),
called (oid, depth) AS (
  SELECT calls.oid::pg_catalog.oid, 0 FROM calls WHERE calls.oid IS NOT NULL
  UNION
  -- Into the bodies of SQL-standard functions (BEGIN ATOMIC: stored parsed, like a rule).
  SELECT m[1]::pg_catalog.oid, called.depth + 1 FROM called
  JOIN pg_catalog.pg_proc AS p ON p.oid = called.oid
  CROSS JOIN LATERAL pg_catalog.regexp_matches(p.prosqlbody::text,
    ':(?:funcid|opfuncid|aggfnoid|winfnoid) (\d+)', 'g') AS m
  WHERE p.prosqlbody IS NOT NULL AND called.depth < 16
),
fn AS (
  SELECT DISTINCT
    CASE WHEN n.nspname = 'pg_catalog' THEN '' ELSE pg_catalog.quote_ident(n.nspname) || '.' END
      || pg_catalog.quote_ident(p.proname) || '(' || pg_catalog.oidvectortypes(p.proargtypes) || ')' AS name,
    p.provolatile AS volatility, p.oid < {first_normal} AS builtin,
    n.nspname = 'pg_catalog' AND (p.proname IN ('now', 'clock_timestamp', 'statement_timestamp',
      'transaction_timestamp', 'timeofday') OR (p.proname = 'age' AND p.pronargs = 1)) AS clock
  FROM (SELECT DISTINCT called.oid FROM called) AS c
  JOIN pg_catalog.pg_proc AS p ON p.oid = c.oid
  JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
),
base AS (
  SELECT DISTINCT n.nspname || '.' || c.relname AS name, c.relkind FROM deps
  JOIN pg_catalog.pg_class AS c ON c.oid = deps.oid
  JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
  WHERE deps.depth > 0 AND c.relkind IN ('r', 'p', 'm', 'f', 't')
)
SELECT
  ARRAY(SELECT name FROM fn WHERE volatility = 'v' ORDER BY 1) AS volatile,
  ARRAY(SELECT name || CASE volatility WHEN 's' THEN ' (stable)' ELSE ' (immutable, not built-in)' END
        FROM fn WHERE volatility <> 'v' AND NOT clock AND (NOT builtin OR volatility <> 'i') ORDER BY 1) AS untracked,
  ARRAY(SELECT name FROM fn WHERE clock UNION
        SELECT (ARRAY['current_date', 'current_time', 'current_time', 'current_timestamp', 'current_timestamp',
                      'localtime', 'localtime', 'localtimestamp', 'localtimestamp'])[calls.svf::int + 1]
        FROM calls WHERE calls.svf IS NOT NULL ORDER BY 1) AS time,
  ARRAY(SELECT name FROM base WHERE relkind <> 'f' ORDER BY 1) AS tables,
  ARRAY(SELECT name FROM base WHERE relkind = 'f' ORDER BY 1) AS foreign"""


def analyze_sql(schema: str, name: str) -> sql.Composed:
    """The analysis of the view (or temporary probe view, schema pg_temp) `schema.name`."""
    view = sql.Literal(render(sql.Identifier(schema, name)))
    return sql.SQL(_ANALYZE).format(view=view, first_normal=sql.Literal(FIRST_NORMAL_OID))


def calls_from_row(row: tuple[object, ...]) -> ViewCalls:
    def names(value: object) -> tuple[str, ...]:
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    return ViewCalls(*(names(value) for value in row[:5]))


def guard(schema: str, name: str, field: str) -> sql.Composed:
    """Fail the creating transaction when the stored query calls a VOLATILE function (re-checked
    between CREATE ... WITH NO DATA and the REFRESH that first runs it)."""
    message = sql.Literal(f"refused: {field}.query calls volatile function(s) %; nothing was created "
                          f"(set {field}.allowVolatileFunctions: true to accept; dangerous)")
    body = sql.SQL(
        "DECLARE v text[]; BEGIN SELECT a.volatile INTO v FROM ({analyze}) AS a; "
        "IF pg_catalog.cardinality(v) > 0 THEN RAISE EXCEPTION {message}, pg_catalog.array_to_string(v, ', ') "
        "USING ERRCODE = 'object_not_in_prerequisite_state'; END IF; END"
    ).format(analyze=analyze_sql(schema, name), message=message)
    return sql.SQL("DO {}").format(sql.Literal(render(body)))


def refusal(view: MaterializedViewSpec, field: str, calls: ViewCalls | None) -> str | None:
    """The plan's refusal of a view whose query calls a volatile function (None: not refused)."""
    if calls is None or not calls.volatile or view.allow_volatile_functions:
        return None
    return (f"{field}.query: refused: calls volatile function(s) {', '.join(calls.volatile)} (they would run, "
            "and write or act, when the view is created and at every refresh); nothing is created. Set "
            f"{field}.allowVolatileFunctions: true to accept (dangerous)")


def skip_rule(view: MaterializedViewSpec, calls: ViewCalls | None, why_unknown: str | None = None) -> str:
    """Which skip rule applies to the view and why, in the order refresh's decide() applies them."""
    policy = view.refresh
    depends = tuple(policy.depends_on) if policy else ()
    if policy is not None and not policy.skip_if_unchanged:
        return "skip-if-unchanged: off (refresh.skipIfUnchanged: false): always refreshed"
    if calls is None:
        why = why_unknown or "unknown"
        return f"skip-if-unchanged: decided at each refresh (the query could not be analyzed: {why})"
    if calls.volatile:
        state = "allowed by allowVolatileFunctions" if view.allow_volatile_functions else "refused"
        return f"skip-if-unchanged: off: calls volatile function(s) {', '.join(calls.volatile)} ({state})"
    if calls.time:
        return f"skip-if-unchanged: off: time-dependent ({', '.join(calls.time)}): the schedule alone drives it"
    if calls.untracked and not depends:
        return (f"skip-if-unchanged: off: calls function(s) {', '.join(calls.untracked)} whose reads are not "
                "tracked (declare refresh.dependsOn)")
    if calls.foreign:
        return f"skip-if-unchanged: off: reads foreign table(s) {', '.join(calls.foreign)} (no write counters)"
    if not calls.tables and not depends:
        return "skip-if-unchanged: off: reads no table (nothing to track)"
    tables = f"tables: {', '.join(calls.tables)}" if calls.tables else "no table read directly"
    if depends:
        trusted = f", trusted for {', '.join(calls.untracked)}" if calls.untracked else ""
        return f"skip-if-unchanged: on ({tables}; dependsOn declared: {', '.join(depends)}{trusted})"
    return f"skip-if-unchanged: on ({tables})"
