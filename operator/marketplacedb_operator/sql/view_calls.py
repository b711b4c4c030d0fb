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
  overload, refuses the view (no DDL at all) unless `allowVolatileFunctions: true`; so do the
  STABLE built-ins that run a relation's query chosen at run time (`table_to_xml`,
  `schema_to_xml`, `database_to_xml` and their variants: RUNS_RELATIONS);
* a non-built-in function, or a built-in one that is not IMMUTABLE, turns skip-if-unchanged off
  unless `refresh.dependsOn` declares the tables whose writes count: what it reads is unknown;
* "called" includes what runs without a :funcid in the rule (CALLS): default argument expressions,
  an aggregate's support functions, CHECK constraints of domains coerced to, row-level security
  policies of the base tables, and the output/input functions of I/O conversions (`status::text`:
  enum_out is STABLE; `'now'::text::timestamptz` reads the clock);
* the body of an SQL-standard function (`BEGIN ATOMIC ... END`, stored parsed) is read like the
  query, recursively; any other body (a quoted SQL string, plpgsql, C) is not: a function declared
  STABLE or IMMUTABLE is trusted to be what it says (PostgreSQL itself refuses INSERT/UPDATE/DELETE
  in such a function, but not a call of `setval()` or `pg_terminate_backend()` inside it).
  The refresh-time check (sql/refresh_sql.py OBSERVE) reads CALLS too (its result cached while
  the analysed catalog rows are unchanged: sql/refresh_cache.py).

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


# Built-ins declared STABLE that run `SELECT * FROM` a relation (or every relation of a schema or
# database) chosen at run time: whatever that relation's query calls runs too, unseen by any
# catalog walk. Refused like VOLATILE functions (validation in querydeps.py and here).
RUNS_RELATIONS: Final = tuple(
    f"{scope}_to_{suffix}" for scope in ("table", "schema", "database")
    for suffix in ("xml", "xmlschema", "xml_and_xmlschema")
)

# Input functions that read the clock for 'now', 'today', 'tomorrow', 'yesterday': a text value
# converted at run time (an I/O conversion, CoerceViaIO) is time-dependent.
CLOCK_INPUTS: Final = ("timestamptz_in", "timestamp_in", "date_in", "time_in", "timetz_in")

# What the stored node trees call, shared by the plan's analysis (_ANALYZE) and meant for the
# refresh-time check (sql/refresh_sql.py OBSERVE): needs CTEs `rules (action)` (the rules' node
# trees) and `base (oid, ...)` (base relations), defines `trees`, `fn` (name, volatility, builtin,
# volatile, clock, untracked, oid, definition: an md5 of what a function runs, for a change
# signature; NULL oid for the pseudo entries) and `svf` (name). Node trees walked, recursively,
# with no depth bound (a bound that stops silently reports less than the view calls: a clock read
# or setval() 17 functions down): UNION discards a row equal to any row already produced, and the
# rows are catalog rows (a function's body, a domain's constraints, a type's I/O function), so the
# walk ends after each is read once, cycles (functions replaced to call each other) included:
# * the rules, and the row-level security policies (USING) of base tables with RLS enabled (a
#   policy reading another relation is reported untracked: writes there change the view);
# * every called function's SQL-standard body (BEGIN ATOMIC) and default argument expressions
#   (inserted into the call at planning, i.e. at every refresh); an aggregate's support functions
#   (pg_aggregate: CREATE AGGREGATE records the aggregate IMMUTABLE whatever they are);
# * the CHECK constraints of domains coerced to (CoerceToDomain, or an I/O conversion to a domain),
#   down the domain's base domains;
# * I/O conversions (`status::text`, `p::text`: CoerceViaIO, no :funcid in the tree) call the
#   argument type's output function and the result type's input function; an argument whose type
#   the tree's text does not show (a nested conversion) is reported as undetermined (untracked).
CALLS: Final = sql.SQL(r"""trees (kind, oid, tree) AS (
  SELECT 'r', 0::pg_catalog.oid, rules.action FROM rules
  UNION ALL
  SELECT 'p', pol.oid, pol.polqual::text FROM base
  JOIN pg_catalog.pg_class AS bc ON bc.oid = base.oid AND bc.relrowsecurity
  JOIN pg_catalog.pg_policy AS pol ON pol.polrelid = base.oid AND pol.polqual IS NOT NULL
  UNION
  SELECT x.kind, x.oid, x.tree FROM trees CROSS JOIN LATERAL (
    SELECT 'f', p.oid, pg_catalog.concat_ws(' ', p.prosqlbody::text, p.proargdefaults::text,
      (SELECT ':funcid ' || pg_catalog.concat_ws(' :funcid ', a.aggtransfn::pg_catalog.oid,
         NULLIF(a.aggfinalfn::pg_catalog.oid, 0), NULLIF(a.aggcombinefn::pg_catalog.oid, 0),
         NULLIF(a.aggserialfn::pg_catalog.oid, 0), NULLIF(a.aggdeserialfn::pg_catalog.oid, 0),
         NULLIF(a.aggmtransfn::pg_catalog.oid, 0), NULLIF(a.aggminvtransfn::pg_catalog.oid, 0),
         NULLIF(a.aggmfinalfn::pg_catalog.oid, 0))
       FROM pg_catalog.pg_aggregate AS a WHERE a.aggfnoid = p.oid::pg_catalog.regproc))
    FROM pg_catalog.regexp_matches(trees.tree,
      ':(?:funcid|opfuncid|aggfnoid|winfnoid|hashfuncid|negfuncid|startInRangeFunc|endInRangeFunc) (\d+)', 'g') AS m
    JOIN pg_catalog.pg_proc AS p ON p.oid = m[1]::pg_catalog.oid
    UNION ALL
    SELECT 'd', t.oid, pg_catalog.concat_ws(' ', (SELECT pg_catalog.string_agg(k.conbin::text, ' ')
        FROM pg_catalog.pg_constraint AS k WHERE k.contypid = t.oid AND k.conbin IS NOT NULL),
      (SELECT ':domain ' || b.oid FROM pg_catalog.pg_type AS b WHERE b.oid = t.typbasetype AND b.typtype = 'd'))
    FROM pg_catalog.regexp_matches(trees.tree,
      ':resulttype (\d+) :resulttypmod -?\d+ :resultcollid \d+ :coercionformat|:domain (\d+)', 'g') AS m
    JOIN pg_catalog.pg_type AS t ON t.oid = COALESCE(m[1], m[2])::pg_catalog.oid AND t.typtype = 'd'
    UNION ALL
    SELECT CASE WHEN t.oid IS NULL THEN 'u' ELSE 's' END, 0::pg_catalog.oid,
      ':funcid ' || t.typoutput::pg_catalog.oid
    FROM pg_catalog.regexp_matches(trees.tree, '\{{COERCEVIAIO :arg \{{\w+ ([^{{}}]*)', 'g') AS m
    LEFT JOIN pg_catalog.pg_type AS t ON t.oid = pg_catalog.substring(m[1],
      ':(?:vartype|consttype|funcresulttype|opresulttype|paramtype|typeId|array_typeid|aggtype|wintype|casetype|'
      'coalescetype|minmaxtype|row_typeid|type) (\d+)')::pg_catalog.oid
    UNION ALL
    SELECT 's', 0::pg_catalog.oid, ':funcid ' || t.typinput::pg_catalog.oid
      || CASE WHEN t.typtype = 'd' THEN ' :domain ' || t.oid ELSE '' END
    FROM pg_catalog.regexp_matches(trees.tree, ':resulttype (\d+) :resultcollid \d+ :coerceformat', 'g') AS m
    JOIN pg_catalog.pg_type AS t ON t.oid = m[1]::pg_catalog.oid
  ) AS x (kind, oid, tree)
),
fn AS (
  SELECT DISTINCT
    CASE WHEN n.nspname = 'pg_catalog' THEN '' ELSE pg_catalog.quote_ident(n.nspname) || '.' END
      || pg_catalog.quote_ident(p.proname) || '(' || pg_catalog.oidvectortypes(p.proargtypes) || ')' AS name,
    p.provolatile AS volatility, p.oid < {first_normal} AS builtin,
    p.provolatile = 'v' OR (p.oid < {first_normal} AND p.proname = ANY ({refused})) AS volatile,
    n.nspname = 'pg_catalog' AND (p.proname IN ('now', 'clock_timestamp', 'statement_timestamp',
      'transaction_timestamp', 'timeofday') OR (p.proname = 'age' AND p.pronargs = 1)
      OR p.proname = ANY ({clock_inputs})) AS clock,
    p.oid >= {first_normal} OR p.provolatile <> 'i' AS untracked,
    p.oid, pg_catalog.md5(p.prosrc || '/' || COALESCE(p.prosqlbody::text, '') || '/' || p.provolatile::text
      || '/' || COALESCE(p.proconfig::text, '') || '/' || COALESCE(p.proargdefaults::text, '')
      -- whose rights a SECURITY DEFINER body reads with (row security): ALTER FUNCTION ... OWNER TO
      || '/' || p.prosecdef::text || '/' || p.proowner::text) AS definition
  FROM (SELECT DISTINCT trees.oid FROM trees WHERE trees.kind = 'f') AS c
  JOIN pg_catalog.pg_proc AS p ON p.oid = c.oid
  JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
  UNION
  SELECT 'an I/O conversion (::text-style cast) of an expression of undetermined type', 'x', true, false, false, true,
    NULL, NULL
  FROM trees WHERE trees.kind = 'u'
  UNION
  -- A policy reading another relation (a sublink): writes there change the view, untracked.
  SELECT 'row-level security policy ' || pg_catalog.quote_ident(pol.polname) || ' on '
    || pol.polrelid::pg_catalog.regclass::text || ' (reads other relations)', 'x', true, false, false, true,
    NULL, NULL
  FROM trees JOIN pg_catalog.pg_policy AS pol ON pol.oid = trees.oid
  WHERE trees.kind = 'p' AND trees.tree LIKE '%{{RANGETBLENTRY%'
),
svf AS (
  SELECT DISTINCT (ARRAY['current_date', 'current_time', 'current_time', 'current_timestamp', 'current_timestamp',
    'localtime', 'localtime', 'localtimestamp', 'localtimestamp'])[m[1]::int + 1] AS name
  FROM trees CROSS JOIN LATERAL pg_catalog.regexp_matches(trees.tree, '\{{SQLVALUEFUNCTION :op ([0-8]) ', 'g') AS m
)""").format(
    first_normal=sql.Literal(FIRST_NORMAL_OID),
    refused=sql.SQL("ARRAY[{}]::pg_catalog.name[]").format(sql.SQL(", ").join(map(sql.Literal, RUNS_RELATIONS))),
    clock_inputs=sql.SQL("ARRAY[{}]::pg_catalog.name[]").format(sql.SQL(", ").join(map(sql.Literal, CLOCK_INPUTS))),
)

# {view}: a text literal naming the view (regclass input). One row; see the module docstring.
# Sequences read in FROM count as relations without write counters (nextval() elsewhere moves
# last_value with no table write), like foreign tables. Plain views are walked with no depth bound
# (UNION ends the walk: view dependencies cannot form a cycle).
_ANALYZE: Final = r"""WITH RECURSIVE
deps (oid, root) AS (
  SELECT pg_catalog.to_regclass({view})::pg_catalog.oid, true
  UNION
  SELECT d.refobjid, false
  FROM deps
  JOIN pg_catalog.pg_class AS dc ON dc.oid = deps.oid
  JOIN pg_catalog.pg_rewrite AS r ON r.ev_class = deps.oid
  JOIN pg_catalog.pg_depend AS d
    ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
   AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> r.ev_class
  WHERE deps.root OR dc.relkind = 'v'
),
rules AS (
  SELECT DISTINCT r.ev_action::text AS action FROM deps
  JOIN pg_catalog.pg_class AS dc ON dc.oid = deps.oid
  JOIN pg_catalog.pg_rewrite AS r ON r.ev_class = deps.oid
  WHERE deps.root OR dc.relkind = 'v'
),
base AS (
  SELECT DISTINCT c.oid, n.nspname || '.' || c.relname AS name, c.relkind FROM deps
  JOIN pg_catalog.pg_class AS c ON c.oid = deps.oid
  JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
  WHERE NOT deps.root AND c.relkind IN ('r', 'p', 'm', 'f', 't', 'S')
),
{calls}
SELECT
  ARRAY(SELECT name FROM fn WHERE volatile ORDER BY 1) AS volatile,
  ARRAY(SELECT name || CASE volatility WHEN 's' THEN ' (stable)' WHEN 'x' THEN '' ELSE ' (immutable, not built-in)' END
        FROM fn WHERE untracked AND NOT volatile AND NOT clock ORDER BY 1) AS untracked,
  ARRAY(SELECT name FROM fn WHERE clock UNION SELECT name FROM svf ORDER BY 1) AS time,
  ARRAY(SELECT name FROM base WHERE relkind NOT IN ('f', 'S') ORDER BY 1) AS tables,
  ARRAY(SELECT name || CASE relkind WHEN 'S' THEN ' (sequence)' ELSE '' END
        FROM base WHERE relkind IN ('f', 'S') ORDER BY 1) AS foreign"""


def analyze_sql(schema: str, name: str) -> sql.Composed:
    """The analysis of the view (or temporary probe view, schema pg_temp) `schema.name`."""
    view = sql.Literal(render(sql.Identifier(schema, name)))
    return sql.SQL(_ANALYZE).format(view=view, calls=CALLS)


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
        # jit off for the analysis only (a catalog query: compiling costs more than running it).
        "DECLARE v text[]; v_jit text := pg_catalog.current_setting('jit'); "
        "BEGIN PERFORM pg_catalog.set_config('jit', 'off', true); SELECT a.volatile INTO v FROM ({analyze}) AS a; "
        "PERFORM pg_catalog.set_config('jit', v_jit, true); "
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
