"""The SQL half of a refresh: the operator's schema (state, history, the check function), the catalog
check, the record and the REFRESH itself. Pure builders: psycopg.sql only, no I/O.

Every statement here is composed from constant templates, identifiers and literals; the server-side
check function's body is one such composition, rendered once and sent as a literal.
"""

from __future__ import annotations

from typing import Final

from psycopg import sql

from .. import naming
from . import refresh_cache, view_calls
from .ddl import qualified as qualified_name
from .ddl import render
from .refresh import DDL_LOCK, STATE_COLUMNS, RefreshOptions, StateUpdate, ViewTarget
from .refresh_guard import SIGNATURE
from .refresh_stats import activity_sql

SCHEMA: Final = sql.Identifier(naming.STATE_SCHEMA)
STATE: Final = sql.Identifier(naming.STATE_SCHEMA, naming.STATE_TABLE)
HISTORY_TABLE: Final = "refresh_history"
HISTORY: Final = sql.Identifier(naming.STATE_SCHEMA, HISTORY_TABLE)
RECENT: Final = 5  # outcomes kept in the state row for status (newest first)

HISTORY_COLUMNS: Final = ("attempt_at", "outcome", "reason", "seconds", "row_count", "error")

# A row may be written only by a role that may refresh the view (its owner or a member), or while
# no relation of that name exists (a "does not exist" failure); everyone may read. So several roles
# share one schema, and none can forge another's state (a forged success could make a view skip).
_MAY_WRITE: Final = """\
NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
            WHERE n.nspname = view_schema AND c.relname = view_name)
OR EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
           WHERE n.nspname = view_schema AND c.relname = view_name
             AND pg_catalog.pg_has_role(c.relowner, 'USAGE'))"""


def _shared_table(table: sql.Identifier, columns: str) -> list[sql.Composed]:
    return [
        sql.SQL("CREATE TABLE {} ({})").format(table, sql.SQL(columns)),
        sql.SQL("COMMENT ON TABLE {} IS {}").format(
            table, sql.Literal(f"Materialized-view refreshes, written by {naming.APP_NAME}.")
        ),
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO PUBLIC").format(table),
        sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table),
        sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(table),
        sql.SQL("CREATE POLICY readers ON {} FOR SELECT USING (true)").format(table),
        sql.SQL("CREATE POLICY refreshers ON {} FOR ALL USING ({w}) WITH CHECK ({w})").format(
            table, w=sql.SQL(_MAY_WRITE)
        ),
    ]


_STATE_DEFINITION: Final = (
    "view_schema text NOT NULL, view_name text NOT NULL, last_attempt timestamptz, last_success timestamptz, "
    "last_seconds double precision, row_count bigint, counters numeric, signature text, result text, reason text, "
    "error text, consecutive_failures integer NOT NULL DEFAULT 0, max_staleness_seconds double precision, "
    "outcomes jsonb NOT NULL DEFAULT '{}'::jsonb, rule text, recent jsonb NOT NULL DEFAULT '[]'::jsonb, "
    "counters_at timestamptz, analysis jsonb, analysis_key text, PRIMARY KEY (view_schema, view_name)"
)
_HISTORY_DEFINITION: Final = (
    "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, view_schema text NOT NULL, view_name text NOT NULL, "
    "attempt_at timestamptz NOT NULL, outcome text NOT NULL, reason text, seconds double precision, "
    "row_count bigint, error text"
)


def schema_objects() -> list[tuple[str, str, list[sql.Composed]]]:
    """(kind, name, statements creating it): each created only when missing, so a role without
    CREATE on the schema can still use what another role created. Never dropped here."""
    return [
        ("schema", naming.STATE_SCHEMA, [
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(SCHEMA),
            sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(SCHEMA),
        ]),
        ("table", naming.STATE_TABLE, _shared_table(STATE, _STATE_DEFINITION)),
        ("table", HISTORY_TABLE, [
            *_shared_table(HISTORY, _HISTORY_DEFINITION),
            sql.SQL("CREATE INDEX ON {} (view_schema, view_name, id)").format(HISTORY),
        ]),
    ]


def upgrade_state_table() -> list[sql.Composed]:
    """Columns added since the first release (a table created by an older operator)."""
    return [
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS rule text").format(STATE),
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS recent jsonb NOT NULL DEFAULT '[]'::jsonb").format(STATE),
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS counters_at timestamptz").format(STATE),
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS analysis jsonb").format(STATE),
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS analysis_key text").format(STATE),
    ]


def regclass(schema: str, name: str) -> sql.Literal:
    """A relation's name as regclass input: the identifiers quoted by psycopg, then passed as a value."""
    return sql.Literal(render(qualified_name(schema, name)))


def exists_sql(kind: str, name: str, signature: str = "") -> sql.Composed:
    if kind == "schema":
        query = "SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname = {name}"
    elif kind == "table":
        query = "SELECT count(*) FROM pg_catalog.pg_class WHERE oid = pg_catalog.to_regclass({qualified})"
    else:
        query = "SELECT count(*) FROM pg_catalog.pg_proc WHERE oid = pg_catalog.to_regprocedure({signature})"
    return sql.SQL(query).format(
        name=sql.Literal(name),
        qualified=regclass(naming.STATE_SCHEMA, name),
        # regprocedure input: the quoted name, then the argument types (constants of this module).
        signature=sql.Literal(render(qualified_name(naming.STATE_SCHEMA, name)) + f"({signature})"),
    )


def ddl_lock_sql() -> sql.Composed:
    return sql.SQL("SELECT pg_catalog.pg_advisory_xact_lock({}, {})").format(
        sql.Literal(DDL_LOCK[0]), sql.Literal(DDL_LOCK[1])
    )


def try_lock_sql(key: tuple[int, int]) -> sql.Composed:
    return sql.SQL("SELECT pg_catalog.pg_try_advisory_lock({}, {})").format(sql.Literal(key[0]), sql.Literal(key[1]))


def unlock_sql(key: tuple[int, int]) -> sql.Composed:
    return sql.SQL("SELECT pg_catalog.pg_advisory_unlock({}, {})").format(sql.Literal(key[0]), sql.Literal(key[1]))


def refresh_sql(target: ViewTarget, concurrently: bool) -> sql.Composed:
    keyword = sql.SQL("CONCURRENTLY ") if concurrently else sql.SQL("")
    return sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(keyword, sql.Identifier(target.schema, target.name))


def create_probe_view_sql(target: ViewTarget, query: str) -> sql.Composed:
    """A view WITH NO DATA: the server resolves the (parser-checked) query without running it."""
    return sql.SQL("CREATE MATERIALIZED VIEW {} AS {} WITH NO DATA").format(
        sql.Identifier(target.schema, target.name), sql.SQL(query)
    )


def rows_after_sql(target: ViewTarget) -> sql.Composed:
    """The row count after REFRESH, without scanning the view, in the refresh's transaction.

    This transaction's own insert/delete counters of the view (pg_stat_get_xact_*: exact, and
    visible before commit) give the CONCURRENTLY diff; a plain REFRESH rebuilds the view's indexes,
    which sets pg_class.reltuples to the exact count. The caller picks (see PostgresRefresh).
    """
    oid = sql.SQL("pg_catalog.to_regclass({})").format(regclass(target.schema, target.name))
    return sql.SQL(
        "SELECT pg_catalog.pg_stat_get_xact_tuples_inserted({o}), pg_catalog.pg_stat_get_xact_tuples_deleted({o}), "
        "(SELECT reltuples FROM pg_catalog.pg_class WHERE oid = {o})"
    ).format(o=oid)


def timeouts_sql(options: RefreshOptions) -> list[sql.Composed]:
    """SET LOCAL: the limits end with the refresh's transaction, not with the session."""
    return [
        sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(f"{max(1, round(options.timeout * 1000))}ms")),
        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{max(1, round(options.lock_timeout * 1000))}ms")),
    ]


# Statistics are flushed by the writing backends asynchronously (PostgreSQL 15: at most once a
# second while busy, within ~10s once idle), and a reader caches them per transaction
# (stats_fetch_consistency): clear the snapshot first so we see what has been flushed.
# https://www.postgresql.org/docs/15/monitoring-stats.html#MONITORING-STATS-VIEWS
CLEAR_STATS_SNAPSHOT: Final = sql.SQL("SELECT pg_catalog.pg_stat_clear_snapshot()")

# The view; its base relations (pg_rewrite/pg_depend, recursively through plain views, down to
# inheritance children and partitions, plus the declared dependsOn tables), their write counters
# and storage signature; the functions its stored rules call (function, operator, aggregate and
# window calls in pg_rewrite's node tree: pg_depend does not record built-ins, which are pinned)
# classified volatile / clock / untracked (non-built-in, or not immutable); the CURRENT_DATE-style
# values in the rules; the usable unique index; the recorded state.
OBSERVE: Final = """\
WITH RECURSIVE
target AS (
  SELECT c.oid, c.relispopulated, pg_catalog.pg_has_role(c.relowner, 'USAGE') AS owned
  FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
  WHERE n.nspname = {schema} AND c.relname = {name} AND c.relkind = 'm'
),
declared AS (
  SELECT d.name, pg_catalog.to_regclass(d.name) AS oid FROM pg_catalog.unnest({depends}::text[]) AS d (name)
),
deps (oid, root) AS (
  SELECT oid, true FROM target
  UNION
  SELECT declared.oid, false FROM declared WHERE declared.oid IS NOT NULL
  UNION
  SELECT x.oid, false
  FROM deps
  JOIN pg_catalog.pg_class AS dc ON dc.oid = deps.oid
  CROSS JOIN LATERAL (
    SELECT d.refobjid FROM pg_catalog.pg_rewrite AS r
    JOIN pg_catalog.pg_depend AS d
      ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> r.ev_class
    WHERE r.ev_class = deps.oid AND (deps.root OR dc.relkind = 'v')
    UNION
    SELECT i.inhrelid FROM pg_catalog.pg_inherits AS i
    WHERE i.inhparent = deps.oid AND dc.relkind IN ('r', 'p')
  ) AS x (oid)
),
base AS (
  SELECT DISTINCT c.oid, c.relkind FROM deps JOIN pg_catalog.pg_class AS c ON c.oid = deps.oid
  WHERE NOT deps.root AND c.relkind IN ('r', 'p', 'm', 'f', 't', 'S')
),
rule_rows AS (
  SELECT DISTINCT r.oid FROM deps
  JOIN pg_catalog.pg_class AS dc ON dc.oid = deps.oid
  JOIN pg_catalog.pg_rewrite AS r ON r.ev_class = deps.oid
  WHERE deps.root OR dc.relkind = 'v'
),
-- The node trees (large: read only by the call analysis, not when the check's cache is used).
rules AS (
  SELECT r.oid, r.ev_action::text AS action FROM rule_rows JOIN pg_catalog.pg_rewrite AS r ON r.oid = rule_rows.oid
),
{calls}
SELECT t.oid IS NOT NULL AS view_exists, coalesce(t.relispopulated, false) AS populated,
  coalesce(t.owned, false) AS owned,
  (SELECT i.indexrelid::pg_catalog.regclass::text FROM pg_catalog.pg_index AS i
    WHERE i.indrelid = t.oid AND i.indisunique AND i.indisvalid AND i.indimmediate
      AND i.indpred IS NULL AND i.indexprs IS NULL AND NOT (0 = ANY (i.indkey::int2[]))
    ORDER BY i.indexrelid LIMIT 1) AS unique_index,
  (SELECT count(*) FROM base) AS base_tables,
  (SELECT count(*) FROM base WHERE base.relkind IN ('f', 'S')) AS untracked,
  (SELECT coalesce(sum(pg_catalog.pg_stat_get_tuples_inserted(base.oid)
                     + pg_catalog.pg_stat_get_tuples_updated(base.oid)
                     + pg_catalog.pg_stat_get_tuples_deleted(base.oid)), 0) FROM base) AS counters,
{signature}
  ARRAY(SELECT DISTINCT name FROM fn WHERE volatile ORDER BY name) AS volatile_functions,
  ARRAY(SELECT name FROM fn WHERE clock UNION SELECT name FROM svf ORDER BY 1) AS time_functions,
  ARRAY(SELECT DISTINCT name FROM fn WHERE untracked AND NOT clock AND NOT volatile ORDER BY name)
    AS untracked_functions,
  ARRAY(SELECT declared.name FROM declared WHERE declared.oid IS NULL ORDER BY 1) AS missing_depends,
  pg_catalog.statement_timestamp() AS observed_at,
  (SELECT coalesce(sum(pg_catalog.pg_stat_get_xact_tuples_inserted(base.oid)
                     + pg_catalog.pg_stat_get_xact_tuples_updated(base.oid)
                     + pg_catalog.pg_stat_get_xact_tuples_deleted(base.oid)), 0) FROM base) AS own_unreported,
  {cache_columns}
  {state_columns}
FROM (SELECT 1) AS one
LEFT JOIN target AS t ON true
LEFT JOIN {state} AS s ON s.view_schema = {schema} AND s.view_name = {name}"""

def _observe(schema: sql.Composable, name: sql.Composable, depends: sql.Composable) -> sql.Composed:
    return sql.SQL(OBSERVE).format(
        schema=schema, name=name, depends=depends, state=STATE, signature=SIGNATURE,
        calls=view_calls.CALLS + sql.SQL(refresh_cache.LIVE), cache_columns=refresh_cache.columns(live=True),
        state_columns=sql.SQL(", ").join(sql.Identifier("s", c) for c in STATE_COLUMNS),
    )


def qualified(target: ViewTarget, depends_on: tuple[str, ...]) -> list[str]:
    """dependsOn names resolved in the view's schema when unqualified, never through search_path
    (the check function runs with search_path = pg_catalog)."""
    return [name if "." in name else f"{render(sql.Identifier(target.schema))}.{name}" for name in depends_on]


def observe_sql(target: ViewTarget, depends_on: tuple[str, ...] = ()) -> sql.Composed:
    """The catalog check: clear the stats snapshot, one catalog query, then the sessions that may
    hold unreported writes (read after the counters: sql/refresh_stats.py), in one message."""
    depends = sql.Literal(qualified(target, depends_on))
    query = _observe(sql.Literal(target.schema), sql.Literal(target.name), depends)
    since = sql.SQL("(SELECT s.counters_at FROM {} AS s WHERE s.view_schema = {} AND s.view_name = {})").format(
        STATE, sql.Literal(target.schema), sql.Literal(target.name))
    # Three statements, one message: sent without parameters, psycopg uses the simple query protocol.
    # jit off for this message's implicit transaction: a catalog query gains nothing from JIT, and
    # the recursive CTEs' estimates pass jit_above_cost (compiling took ~250 ms per check).
    return sql.SQL("{}, pg_catalog.set_config('jit', 'off', true); {}; {}").format(
        CLEAR_STATS_SNAPSHOT, query, activity_sql(since))


def read_states_sql() -> sql.Composed:
    return sql.SQL("SELECT {} FROM {} ORDER BY view_schema, view_name").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in STATE_COLUMNS), STATE
    )


def read_history_sql(view: str | None) -> sql.Composed:
    """The recorded runs, newest first (of one view, or of all); takes %(view)s when view is given."""
    where = sql.SQL("WHERE view_name = %(view)s ") if view else sql.SQL("")
    return sql.SQL("SELECT view_schema, view_name, {} FROM {} {}ORDER BY view_schema, view_name, id DESC").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in HISTORY_COLUMNS), HISTORY, where
    )


# --- recording an attempt ----------------------------------------------------------------------

# Placeholders: {schema} {name} {attempt} {success} {seconds} {rows} {counters} {signature}
# {outcome} {reason} {error} {max_staleness} {rule} {limit} {counters_at} {analysis} {analysis_key};
# filled with %(..)s client-side, or with the check function's variables server-side. One statement:
# state row, history row, retention.
RECORD: Final = """\
WITH state AS (
  INSERT INTO {state} AS s (view_schema, view_name, last_attempt, last_success, last_seconds, row_count, counters,
    signature, result, reason, error, consecutive_failures, max_staleness_seconds, outcomes, rule, recent,
    counters_at, analysis, analysis_key)
  VALUES ({schema}, {name}, {attempt}, CASE WHEN {success} THEN {attempt} END, {seconds}, {rows}, {counters},
    {signature}, {outcome}, {reason}, {error}, CASE WHEN {outcome} = 'failed' THEN 1 ELSE 0 END, {max_staleness},
    pg_catalog.jsonb_build_object({outcome}::text, 1), {rule}, pg_catalog.jsonb_build_array({outcome}::text),
    {counters_at}, {analysis}, {analysis_key})
  ON CONFLICT (view_schema, view_name) DO UPDATE SET
    last_attempt = EXCLUDED.last_attempt,
    last_success = CASE WHEN {success} THEN EXCLUDED.last_success ELSE s.last_success END,
    last_seconds = CASE WHEN {success} THEN EXCLUDED.last_seconds ELSE s.last_seconds END,
    row_count = CASE WHEN {success} THEN EXCLUDED.row_count ELSE s.row_count END,
    counters = CASE WHEN {success} THEN EXCLUDED.counters ELSE s.counters END,
    signature = CASE WHEN {success} THEN EXCLUDED.signature ELSE s.signature END,
    counters_at = CASE WHEN {success} THEN EXCLUDED.counters_at ELSE s.counters_at END,
    analysis = CASE WHEN EXCLUDED.analysis IS NULL THEN s.analysis ELSE EXCLUDED.analysis END,
    analysis_key = CASE WHEN EXCLUDED.analysis IS NULL THEN s.analysis_key ELSE EXCLUDED.analysis_key END,
    result = EXCLUDED.result, reason = EXCLUDED.reason, error = EXCLUDED.error,
    consecutive_failures = CASE WHEN {outcome} = 'failed' THEN s.consecutive_failures + 1 ELSE 0 END,
    max_staleness_seconds = EXCLUDED.max_staleness_seconds,
    outcomes = s.outcomes || pg_catalog.jsonb_build_object({outcome}::text,
      coalesce((s.outcomes ->> {outcome}::text)::bigint, 0) + 1),
    rule = coalesce(EXCLUDED.rule, s.rule),
    recent = pg_catalog.jsonb_path_query_array(EXCLUDED.recent || s.recent, '$[0 to {last}]')
  RETURNING 1
), {history_cte}
SELECT 1{into}"""

BUSY: Final = """\
WITH state AS (
  INSERT INTO {state} AS s (view_schema, view_name, outcomes, recent)
  VALUES ({schema}, {name}, pg_catalog.jsonb_build_object({outcome}::text, 1),
    pg_catalog.jsonb_build_array({outcome}::text))
  ON CONFLICT (view_schema, view_name) DO UPDATE SET
    outcomes = s.outcomes || pg_catalog.jsonb_build_object({outcome}::text,
      coalesce((s.outcomes ->> {outcome}::text)::bigint, 0) + 1),
    recent = pg_catalog.jsonb_path_query_array(EXCLUDED.recent || s.recent, '$[0 to {last}]')
  RETURNING 1
), {history_cte}
SELECT 1{into}"""

# The DELETE sees the table as it was before this statement: keeping limit - 1 older rows plus
# the one inserted here leaves exactly `limit`.
_HISTORY_CTE: Final = """\
history AS (
  INSERT INTO {history} (view_schema, view_name, attempt_at, outcome, reason, seconds, row_count, error)
  VALUES ({schema}, {name}, {attempt}, {outcome}, {reason}, {seconds}, {rows}, {error})
  RETURNING 1
), retention AS (
  DELETE FROM {history} WHERE id IN (
    SELECT h.id FROM {history} AS h WHERE h.view_schema = {schema} AND h.view_name = {name}
    ORDER BY h.id DESC OFFSET GREATEST({limit}, 1) - 1)
  RETURNING 1
)"""

_RECORD_FIELDS: Final = ("schema", "name", "attempt", "success", "seconds", "rows", "counters", "signature",
                         "outcome", "reason", "error", "max_staleness", "rule", "limit", "counters_at",
                         "analysis", "analysis_key")
_TYPES: Final = {"schema": "text", "name": "text", "attempt": "timestamptz", "success": "boolean",
                 "seconds": "double precision", "rows": "bigint", "counters": "numeric", "signature": "text",
                 "outcome": "text", "reason": "text", "error": "text", "max_staleness": "double precision",
                 "rule": "text", "limit": "integer", "counters_at": "timestamptz",
                 "analysis": "jsonb", "analysis_key": "text"}


def compose_record(template: str, values: dict[str, sql.Composable], into: str = "") -> sql.Composed:
    history = sql.SQL(_HISTORY_CTE).format(history=HISTORY, **values)
    return sql.SQL(template).format(
        state=STATE, history_cte=history, last=sql.SQL(str(RECENT - 1)), into=sql.SQL(into), **values
    )


def _params() -> dict[str, sql.Composable]:
    # Typed placeholders: the same parameter appears in several places with one type.
    return {k: sql.SQL("{}::{}").format(sql.Placeholder(k), sql.SQL(_TYPES[k])) for k in _RECORD_FIELDS}


def record_sql() -> sql.Composed:
    """Upsert one attempt, append it to the history and trim the history; takes record_params()."""
    return compose_record(RECORD, _params())


def record_busy_sql() -> sql.Composed:
    """A busy skip counts and is kept in the history: the lock holder owns the row's other fields."""
    return compose_record(BUSY, _params())


def record_params(target: ViewTarget, update: StateUpdate) -> dict[str, object]:
    return {
        "schema": target.schema, "name": target.name, "attempt": update.attempt_at,
        "success": update.outcome in ("refreshed", "refreshed-plain"), "seconds": update.seconds,
        "rows": update.rows, "counters": update.counters, "signature": update.signature,
        "outcome": update.outcome, "reason": update.reason, "error": update.error,
        "max_staleness": update.max_staleness, "rule": update.rule, "limit": update.history_limit,
        "counters_at": update.counters_at, "analysis": None, "analysis_key": None,
    }
