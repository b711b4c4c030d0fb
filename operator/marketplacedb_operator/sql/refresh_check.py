"""The common refresh check in one round trip: a server-side function (pure builder, no I/O).

`marketplacedb.refresh_check_v3(...)` tries the view's advisory lock (busy: records the skip and
returns), runs the catalog check, and when every skip rule holds records the skip, unlocks and
returns: lock, check, record and unlock in one call. Otherwise it returns with the lock held and
the client decides (decide() in sql/refresh.py, the source of truth for reasons) and refreshes.
"""

from __future__ import annotations

from typing import Final

from psycopg import sql

from .. import naming
from . import refresh_cache, view_calls
from .refresh import LOCK_CLASS, STATE_COLUMNS, RefreshOptions, ViewTarget
from .refresh_guard import SIGNATURE
from .refresh_sql import BUSY, OBSERVE, RECORD, STATE, compose_record, qualified
from .refresh_stats import activity_sql

# Versioned: a new body gets a new name, so releases side by side never replace each other's
# (v2: reads BEGIN ATOMIC bodies, definitions and policies in the signature; v3: no skip while a
# session may hold unreported writes, sql/refresh_stats.py; older ones are left to their release).
CHECK_FUNCTION: Final = "refresh_check_v3"
# sha256 (first 16 hex digits) of check_function_ddl() for this name. The function is created only
# when missing, so a body changed under the same name would never reach a database that has the
# old one: tests/test_refresh_decide.py fails until the version above is raised with this value.
CHECK_FUNCTION_FINGERPRINT: Final = "738a2174420a4987"
CHECK: Final = sql.Identifier(naming.STATE_SCHEMA, CHECK_FUNCTION)
CHECK_SIGNATURE: Final = (
    "text, text, integer, timestamptz, double precision, boolean, boolean, text[], boolean, integer"
)

# Server-side, in one call: try the view's advisory lock (busy: record and return); observe; when
# every skip rule holds (the same rules as decide() in sql/refresh.py, tested side by side), record
# the skip, unlock and return. Otherwise return with the lock held: the client decides and refreshes.
_CHECK_BODY: Final = """\
DECLARE
  v_obs record;
  v_age double precision;
  v_rule text;
  v_done integer;
  v_unreported text[];
  v_fresh boolean := false;
BEGIN
  IF NOT pg_catalog.pg_try_advisory_lock({lock_class}, p_key) THEN
    {busy};
    RETURN QUERY SELECT false, false, NULL::double precision;
    RETURN;
  END IF;
  PERFORM pg_catalog.pg_stat_clear_snapshot();
  -- The call analysis from the state row while its key (catalog rows' versions) is unchanged,
  -- otherwise analysed again (sql/refresh_cache.py); the counters are read by the first.
  SELECT * INTO v_obs FROM ({observe_cached}) AS q;
  IF v_obs.s_analysis IS NULL OR v_obs.analysis_key_live IS DISTINCT FROM v_obs.s_analysis_key THEN
    SELECT * INTO v_obs FROM ({observe}) AS q;
    v_fresh := true;
  END IF;
  -- After the counters were read (sql/refresh_stats.py): the sessions that may hold unreported writes.
  SELECT q.unreported INTO v_unreported FROM ({activity}) AS q;
  v_age := extract(epoch FROM p_now - v_obs.last_success);
  IF v_obs.view_exists AND v_obs.owned AND v_obs.populated AND NOT p_force AND p_skip
     AND v_obs.last_success IS NOT NULL AND v_obs.counters IS NOT NULL AND v_obs.result IS DISTINCT FROM 'failed'
     AND v_obs.base_tables > 0 AND v_obs.untracked = 0
     AND pg_catalog.cardinality(v_obs.volatile_functions) = 0 AND pg_catalog.cardinality(v_obs.time_functions) = 0
     AND (pg_catalog.cardinality(v_obs.untracked_functions) = 0 OR pg_catalog.cardinality(p_depends) > 0)
     AND pg_catalog.cardinality(v_obs.missing_depends) = 0
     AND v_obs.own_unreported = 0 AND pg_catalog.cardinality(v_unreported) = 0
     AND v_age < p_max_staleness AND v_obs.counters = v_obs.s_counters AND v_obs.signature = v_obs.s_signature THEN
    v_rule := v_obs.rule;
    {skip};
    PERFORM pg_catalog.pg_advisory_unlock({lock_class}, p_key);
    RETURN QUERY SELECT true, true, v_age;
  ELSE
    RETURN QUERY SELECT true, false, NULL::double precision;
  END IF;
END"""

SKIP_REASON: Final = "no writes to the tracked tables since the last refresh"


def _alias(column: str) -> str:
    return f"s_{column}" if column in ("counters", "signature") else column


def check_function_ddl() -> sql.Composed:
    """CREATE FUNCTION for the check (SECURITY INVOKER: it runs with the caller's rights, and RLS)."""
    variables: dict[str, sql.Composable] = {
        "schema": sql.SQL("p_schema"), "name": sql.SQL("p_name"), "attempt": sql.SQL("p_now"),
        "success": sql.SQL("false"), "seconds": sql.SQL("NULL::double precision"), "rows": sql.SQL("NULL::bigint"),
        "counters": sql.SQL("NULL::numeric"), "signature": sql.SQL("NULL::text"),
        "reason": sql.Literal(SKIP_REASON), "error": sql.SQL("NULL::text"), "max_staleness": sql.SQL("p_max_staleness"),
        "rule": sql.SQL("v_rule"), "limit": sql.SQL("p_history"), "counters_at": sql.SQL("NULL::timestamptz"),
        "analysis": sql.SQL("NULL::jsonb"), "analysis_key": sql.SQL("NULL::text"),
    }
    busy_reason = sql.Literal("another refresh of this view holds its advisory lock")
    busy = compose_record(
        BUSY, {**variables, "outcome": sql.Literal("skipped-busy"), "reason": busy_reason}, " INTO v_done"
    )
    skip = compose_record(RECORD, {
        **variables, "outcome": sql.Literal("skipped-unchanged"),
        "analysis": sql.SQL("CASE WHEN v_fresh THEN v_obs.analysis_live END"),
        "analysis_key": sql.SQL("v_obs.analysis_key_live"),
    }, " INTO v_done")
    # The state columns come back as s_<name> where they clash with the observation's.
    state_columns = sql.SQL(", ").join([
        *(sql.SQL("{} AS {}").format(sql.Identifier("s", c), sql.Identifier(_alias(c))) for c in STATE_COLUMNS),
        sql.SQL("s.analysis AS s_analysis, s.analysis_key AS s_analysis_key"),
    ])
    fixed = {"schema": sql.SQL("p_schema"), "name": sql.SQL("p_name"), "depends": sql.SQL("p_depends"),
             "state": STATE, "signature": SIGNATURE, "state_columns": state_columns}
    observe = sql.SQL(OBSERVE).format(calls=view_calls.CALLS + sql.SQL(refresh_cache.LIVE),
                                      cache_columns=refresh_cache.columns(live=True), **fixed)
    observe_cached = sql.SQL(OBSERVE).format(
        calls=refresh_cache.cached_calls(STATE, sql.SQL("p_schema"), sql.SQL("p_name")),
        cache_columns=refresh_cache.columns(live=False), **fixed)
    body = sql.SQL(_CHECK_BODY).format(
        lock_class=sql.Literal(LOCK_CLASS), busy=busy, skip=skip, observe=observe, observe_cached=observe_cached,
        activity=activity_sql(sql.SQL("v_obs.counters_at")),
    ).as_string(None)
    return sql.SQL(
        "CREATE FUNCTION {}(p_schema text, p_name text, p_key integer, p_now timestamptz, "
        "p_max_staleness double precision, p_skip boolean, p_force boolean, p_depends text[], "
        "p_allow_volatile boolean, p_history integer) "
        "RETURNS TABLE (locked boolean, skipped boolean, age double precision) "
        "LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp SET jit = off "
        "SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off "
        "SET enable_seqscan = off AS {}"
    ).format(CHECK, sql.Literal(body))


def check_sql() -> sql.Composed:
    """The common case in one round trip; takes check_params()."""
    return sql.SQL(
        "SELECT locked, skipped, age FROM {}(%(schema)s, %(name)s, %(key)s, %(now)s, %(max_staleness)s, "
        "%(skip)s, %(force)s, %(depends)s::text[], %(allow_volatile)s, %(limit)s)"
    ).format(CHECK)


def check_sql_literal(params: dict[str, object]) -> sql.Composed:
    """check_sql() with check_params() as literals: sent in one message after the trust gate."""
    return sql.SQL(
        "SELECT locked, skipped, age FROM {}({}::text, {}::text, {}::integer, {}::timestamptz, "
        "{}::double precision, {}::boolean, {}::boolean, {}::text[], {}::boolean, {}::integer)"
    ).format(CHECK, *(sql.Literal(params[k]) for k in (
        "schema", "name", "key", "now", "max_staleness", "skip", "force", "depends", "allow_volatile", "limit")))


def check_params(target: ViewTarget, key: int, options: RefreshOptions, now: object, force: bool) -> dict[str, object]:
    return {
        "schema": target.schema, "name": target.name, "key": key, "now": now,
        "max_staleness": options.max_staleness, "skip": options.skip_if_unchanged, "force": force,
        "depends": qualified(target, options.depends_on), "allow_volatile": options.allow_volatile,
        "limit": options.history_limit,
    }
