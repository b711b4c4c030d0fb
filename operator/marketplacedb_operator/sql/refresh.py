"""The pure half of a materialized-view refresh: types, the decision, the SQL, the lock key.

Everything here is deterministic (no I/O, no clock, no environment): `decide()` takes what the
catalog said and the time, and says refresh (concurrently or not, and why) or skip (and why).
The I/O half is `gateways/postgres/refresh.py`; the orchestration (lock, decide, refresh,
record) is `refresh.py`, shared by the CronJob entrypoint and the operator's own timer.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from decimal import Decimal
from typing import Final, Literal

from croniter import croniter
from psycopg import sql

from .. import naming
from ..api.v1alpha1 import MaterializedViewSpec
from ..durations import parse_duration

Outcome = Literal["refreshed", "refreshed-plain", "skipped-busy", "skipped-unchanged", "failed"]
OUTCOMES: Final[tuple[Outcome, ...]] = (
    "refreshed",
    "refreshed-plain",
    "skipped-busy",
    "skipped-unchanged",
    "failed",
)
SUCCESS_OUTCOMES: Final = frozenset({"refreshed", "refreshed-plain"})

# Advisory locks are keyed (int4, int4): a fixed class id for this operator ("MDB1") plus a stable
# hash of the qualified view name, so every process (CronJob pod, operator, a human's CLI) takes
# the same lock for the same view, and other applications' advisory locks (other class ids) never
# collide with ours. https://www.postgresql.org/docs/15/functions-admin.html#FUNCTIONS-ADVISORY-LOCKS
LOCK_CLASS: Final = 0x4D444231
# Serializes the creation of the state table between processes (a transaction-level lock).
DDL_LOCK: Final = (LOCK_CLASS + 1, 0)

# Used when a view declares no refresh policy (refreshed only on demand).
DEFAULT_MAX_STALENESS: Final = 3600.0
DEFAULT_TIMEOUT: Final = 300.0
DEFAULT_LOCK_TIMEOUT: Final = 5.0


class RefreshDatabaseError(Exception):
    """A database error during a refresh step; the message is scrubbed (no secret, one line)."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@dataclasses.dataclass(frozen=True)
class ViewTarget:
    """A materialized view by qualified name."""

    schema: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclasses.dataclass(frozen=True)
class RefreshOptions:
    """The policy of one refresh, in seconds (from the spec or from CLI flags)."""

    skip_if_unchanged: bool = True
    max_staleness: float = DEFAULT_MAX_STALENESS
    timeout: float = DEFAULT_TIMEOUT
    # A plain refresh takes an ACCESS EXCLUSIVE lock: waiting for it behind a long reader would
    # queue every later reader behind us, so give up quickly instead and retry next time.
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT


def options_for(view: MaterializedViewSpec, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> RefreshOptions:
    policy = view.refresh
    if policy is None:
        return RefreshOptions(lock_timeout=lock_timeout)
    return RefreshOptions(
        skip_if_unchanged=policy.skip_if_unchanged,
        max_staleness=parse_duration(policy.max_staleness),
        timeout=parse_duration(policy.timeout),
        lock_timeout=min(lock_timeout, parse_duration(policy.timeout)),
    )


@dataclasses.dataclass(frozen=True)
class RefreshState:
    """One row of the state table: what the last refreshes of a view did."""

    schema: str
    name: str
    last_attempt: datetime.datetime | None = None
    last_success: datetime.datetime | None = None
    last_seconds: float | None = None
    rows: int | None = None
    counters: Decimal | None = None
    signature: str | None = None
    result: str | None = None
    reason: str | None = None
    error: str | None = None
    consecutive_failures: int = 0
    max_staleness: float | None = None
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def view(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one catalog round trip said about a view, its base tables and its last refresh."""

    exists: bool
    populated: bool = False
    owned: bool = True
    unique_index: str | None = None
    base_tables: int = 0
    untracked: int = 0  # base relations without write counters (foreign tables)
    counters: Decimal = Decimal(0)
    signature: str | None = None
    state: RefreshState | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Literal["refresh", "skip", "fail"]
    reason: str
    concurrently: bool = False
    plain_reason: str = ""


def lock_key(target: ViewTarget) -> tuple[int, int]:
    """(class id, signed 32-bit hash of "schema.name"): the same in every process and release."""
    digest = hashlib.sha256(target.qualified.encode()).digest()
    return LOCK_CLASS, int.from_bytes(digest[:4], "big", signed=True)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _why_refresh(obs: Observation, options: RefreshOptions, now: datetime.datetime, force: bool) -> str | None:
    """Why this view must be refreshed now, or None when it may be skipped."""
    state = obs.state
    if force:
        return f"requested ({naming.ANN_REFRESH_NOW} or --force)"
    if not options.skip_if_unchanged:
        return "skipIfUnchanged is false"
    if not obs.populated:
        return "view is not populated"
    if state is None or state.last_success is None or state.counters is None:
        return "no successful refresh recorded"
    if state.result == "failed":
        return "the last refresh failed"
    if obs.base_tables == 0 or obs.untracked:
        return "base tables cannot be tracked (none found, or foreign tables): always refreshed"
    age = (now - state.last_success).total_seconds()
    if age >= options.max_staleness:
        return f"maxStaleness passed (last success {_ago(age)} ago)"
    if obs.counters != state.counters:
        return f"base tables written since the last refresh (counters {state.counters} -> {obs.counters})"
    if obs.signature != state.signature:
        return "base tables were rewritten or replaced (TRUNCATE, VACUUM FULL, new table)"
    return None


def decide(obs: Observation, options: RefreshOptions, now: datetime.datetime, force: bool = False) -> Decision:
    """Refresh (concurrently when possible) or skip; every answer says why."""
    if not obs.exists:
        return Decision("fail", "materialized view does not exist")
    if not obs.owned:
        # https://www.postgresql.org/docs/15/sql-refreshmaterializedview.html
        return Decision("fail", "only the view's owner may refresh it (PostgreSQL 15)")
    why = _why_refresh(obs, options, now, force)
    if why is None:
        assert obs.state is not None and obs.state.last_success is not None
        age = (now - obs.state.last_success).total_seconds()
        return Decision("skip", f"no writes to the base tables since the last refresh ({_ago(age)} ago)")
    if not obs.populated:
        return Decision("refresh", why, False, "the view is not populated: the first refresh cannot be CONCURRENTLY")
    if obs.unique_index is None:
        return Decision(
            "refresh", why, False,
            "no usable unique index (CONCURRENTLY needs a valid unique index on plain columns without WHERE)",
        )
    return Decision("refresh", why, True)


def due(schedule: str, last_attempt: datetime.datetime | None, now: datetime.datetime) -> bool:
    """True when a cron `schedule` fired after `last_attempt` (for the operator's own timer).

    Schedules are read in UTC, as the CronJobs' `timeZone: Etc/UTC`: timestamps read from the
    database come in the session's TimeZone, so aware values are converted first (naive = UTC).
    """
    if last_attempt is None:
        return True
    following: datetime.datetime = croniter(schedule, _utc(last_attempt)).get_next(datetime.datetime)
    return following <= _utc(now)


def _utc(moment: datetime.datetime) -> datetime.datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC)


def is_stale(state: RefreshState, now: datetime.datetime, max_staleness: float | None = None) -> bool:
    limit = max_staleness if max_staleness is not None else state.max_staleness
    if state.last_success is None:
        return True
    return limit is not None and (now - state.last_success).total_seconds() > limit


# --- SQL --------------------------------------------------------------------------------------

STATE: Final = sql.Identifier(naming.STATE_SCHEMA, naming.STATE_TABLE)

STATE_COLUMNS: Final = (
    "view_schema", "view_name", "last_attempt", "last_success", "last_seconds", "row_count", "counters",
    "signature", "result", "reason", "error", "consecutive_failures", "max_staleness_seconds", "outcomes",
)


def state_table_ddl() -> list[sql.Composed]:
    """The state table, shared by CronJob runs, the operator and metrics: one row per view."""
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(naming.STATE_SCHEMA)),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            "view_schema text NOT NULL, "
            "view_name text NOT NULL, "
            "last_attempt timestamptz, "
            "last_success timestamptz, "
            "last_seconds double precision, "
            "row_count bigint, "
            "counters numeric, "
            "signature text, "
            "result text, "
            "reason text, "
            "error text, "
            "consecutive_failures integer NOT NULL DEFAULT 0, "
            "max_staleness_seconds double precision, "
            "outcomes jsonb NOT NULL DEFAULT '{{}}'::jsonb, "
            "PRIMARY KEY (view_schema, view_name))"
        ).format(STATE),
        sql.SQL("COMMENT ON TABLE {} IS {}").format(
            STATE, sql.Literal(f"Materialized-view refresh state, written by {naming.APP_NAME}.")
        ),
    ]


def ddl_lock_sql() -> sql.Composed:
    return sql.SQL("SELECT pg_advisory_xact_lock({}, {})").format(sql.Literal(DDL_LOCK[0]), sql.Literal(DDL_LOCK[1]))


def try_lock_sql(key: tuple[int, int]) -> sql.Composed:
    return sql.SQL("SELECT pg_try_advisory_lock({}, {})").format(sql.Literal(key[0]), sql.Literal(key[1]))


def unlock_sql(key: tuple[int, int]) -> sql.Composed:
    return sql.SQL("SELECT pg_advisory_unlock({}, {})").format(sql.Literal(key[0]), sql.Literal(key[1]))


def refresh_sql(target: ViewTarget, concurrently: bool) -> sql.Composed:
    keyword = sql.SQL("CONCURRENTLY ") if concurrently else sql.SQL("")
    return sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(keyword, sql.Identifier(target.schema, target.name))


def count_sql(target: ViewTarget) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(target.schema, target.name))


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

# The view, its base relations (through pg_rewrite/pg_depend, recursively through plain views and
# down to inheritance children and partitions, whose counters are kept per leaf), their write
# counters and storage signature, the usable unique index, and the last recorded state: one query.
_OBSERVE: Final = """\
WITH RECURSIVE
target AS (
  SELECT c.oid, c.relispopulated, pg_catalog.pg_has_role(c.relowner, 'USAGE') AS owned
  FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
  WHERE n.nspname = {schema} AND c.relname = {name} AND c.relkind = 'm'
),
deps (oid, depth) AS (
  SELECT oid, 0 FROM target
  UNION
  SELECT x.oid, deps.depth + 1
  FROM deps
  JOIN pg_catalog.pg_class AS dc ON dc.oid = deps.oid
  CROSS JOIN LATERAL (
    SELECT d.refobjid FROM pg_catalog.pg_rewrite AS r
    JOIN pg_catalog.pg_depend AS d
      ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> r.ev_class
    WHERE r.ev_class = deps.oid AND (deps.depth = 0 OR dc.relkind = 'v')
    UNION
    SELECT i.inhrelid FROM pg_catalog.pg_inherits AS i
    WHERE i.inhparent = deps.oid AND dc.relkind IN ('r', 'p')
  ) AS x (oid)
  WHERE deps.depth < 32
),
base AS (
  SELECT DISTINCT c.oid, c.relkind FROM deps JOIN pg_catalog.pg_class AS c ON c.oid = deps.oid
  WHERE deps.depth > 0 AND c.relkind IN ('r', 'p', 'm', 'f', 't')
)
SELECT t.oid IS NOT NULL, coalesce(t.relispopulated, false), coalesce(t.owned, false),
  (SELECT i.indexrelid::pg_catalog.regclass::text FROM pg_catalog.pg_index AS i
    WHERE i.indrelid = t.oid AND i.indisunique AND i.indisvalid AND i.indimmediate
      AND i.indpred IS NULL AND i.indexprs IS NULL AND NOT (0 = ANY (i.indkey::int2[]))
    ORDER BY i.indexrelid LIMIT 1),
  (SELECT count(*) FROM base),
  (SELECT count(*) FROM base WHERE base.relkind = 'f'),
  (SELECT coalesce(sum(pg_catalog.pg_stat_get_tuples_inserted(base.oid)
                     + pg_catalog.pg_stat_get_tuples_updated(base.oid)
                     + pg_catalog.pg_stat_get_tuples_deleted(base.oid)), 0) FROM base),
  (SELECT pg_catalog.md5(pg_catalog.string_agg(
            base.oid::text || ':' || coalesce(pg_catalog.pg_relation_filenode(base.oid), 0)::text, ','
            ORDER BY base.oid)) FROM base),
  {state_columns}
FROM (SELECT 1) AS one
LEFT JOIN target AS t ON true
LEFT JOIN {state} AS s ON s.view_schema = {schema} AND s.view_name = {name}"""

OBSERVE_FIXED_COLUMNS: Final = 8


def observe_sql(target: ViewTarget) -> sql.Composed:
    """The skip check's single round trip: clear the stats snapshot, then one catalog query."""
    query = sql.SQL(_OBSERVE).format(
        schema=sql.Literal(target.schema),
        name=sql.Literal(target.name),
        state=STATE,
        state_columns=sql.SQL(", ").join(sql.Identifier("s", c) for c in STATE_COLUMNS),
    )
    # Two statements, one message: sent without parameters, psycopg uses the simple query protocol.
    return sql.SQL("{}; {}").format(CLEAR_STATS_SNAPSHOT, query)


def read_states_sql() -> sql.Composed:
    return sql.SQL("SELECT {} FROM {} ORDER BY view_schema, view_name").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in STATE_COLUMNS), STATE
    )


@dataclasses.dataclass(frozen=True)
class StateUpdate:
    """What one refresh attempt writes to its view's state row."""

    outcome: Outcome
    attempt_at: datetime.datetime
    reason: str
    max_staleness: float
    error: str | None = None
    seconds: float | None = None
    rows: int | None = None
    counters: Decimal | None = None
    signature: str | None = None


def _bump_outcome() -> sql.Composed:
    # outcomes is a jsonb map outcome -> count: the operator exports it as counters.
    return sql.SQL(
        "{s}.outcomes || pg_catalog.jsonb_build_object(%(outcome)s::text, "
        "coalesce(({s}.outcomes ->> %(outcome)s::text)::bigint, 0) + 1)"
    ).format(s=STATE)


def record_sql() -> sql.Composed:
    """Upsert one attempt (success fields kept when the attempt did not succeed); takes params."""
    success = sql.SQL("%(success)s")
    keep = [
        sql.SQL("{c} = CASE WHEN {ok} THEN EXCLUDED.{c} ELSE {s}.{c} END").format(
            c=sql.Identifier(c), ok=success, s=STATE
        )
        for c in ("last_success", "last_seconds", "row_count", "counters", "signature")
    ]
    return sql.SQL(
        "INSERT INTO {s} (view_schema, view_name, last_attempt, last_success, last_seconds, row_count, counters, "
        "signature, result, reason, error, consecutive_failures, max_staleness_seconds, outcomes) "
        "VALUES (%(schema)s, %(name)s, %(attempt)s, CASE WHEN {ok} THEN %(attempt)s END, %(seconds)s, %(rows)s, "
        "%(counters)s, %(signature)s, %(outcome)s, %(reason)s, %(error)s, "
        "CASE WHEN %(outcome)s = 'failed' THEN 1 ELSE 0 END, %(max_staleness)s, "
        "pg_catalog.jsonb_build_object(%(outcome)s::text, 1)) "
        "ON CONFLICT (view_schema, view_name) DO UPDATE SET "
        "last_attempt = EXCLUDED.last_attempt, {keep}, result = EXCLUDED.result, reason = EXCLUDED.reason, "
        "error = EXCLUDED.error, "
        "consecutive_failures = CASE WHEN %(outcome)s = 'failed' THEN {s}.consecutive_failures + 1 ELSE 0 END, "
        "max_staleness_seconds = EXCLUDED.max_staleness_seconds, outcomes = {bump}"
    ).format(s=STATE, ok=success, keep=sql.SQL(", ").join(keep), bump=_bump_outcome())


def record_params(target: ViewTarget, update: StateUpdate) -> dict[str, object]:
    return {
        "schema": target.schema,
        "name": target.name,
        "attempt": update.attempt_at,
        "success": update.outcome in SUCCESS_OUTCOMES,
        "seconds": update.seconds,
        "rows": update.rows,
        "counters": update.counters,
        "signature": update.signature,
        "outcome": update.outcome,
        "reason": update.reason,
        "error": update.error,
        "max_staleness": update.max_staleness,
    }


def record_busy_sql() -> sql.Composed:
    """A busy skip only counts: the lock holder owns the row's other fields."""
    return sql.SQL(
        "INSERT INTO {s} (view_schema, view_name, outcomes) "
        "VALUES (%(schema)s, %(name)s, pg_catalog.jsonb_build_object(%(outcome)s::text, 1)) "
        "ON CONFLICT (view_schema, view_name) DO UPDATE SET outcomes = {bump}"
    ).format(s=STATE, bump=_bump_outcome())


def state_from_row(row: tuple[object, ...]) -> RefreshState:
    """A RefreshState from the STATE_COLUMNS of a row (in that order)."""
    values = dict(zip(STATE_COLUMNS, row, strict=True))
    outcomes = values["outcomes"] if isinstance(values["outcomes"], dict) else {}
    return RefreshState(
        schema=str(values["view_schema"]),
        name=str(values["view_name"]),
        last_attempt=values["last_attempt"],  # type: ignore[arg-type]
        last_success=values["last_success"],  # type: ignore[arg-type]
        last_seconds=values["last_seconds"],  # type: ignore[arg-type]
        rows=values["row_count"],  # type: ignore[arg-type]
        counters=values["counters"],  # type: ignore[arg-type]
        signature=values["signature"],  # type: ignore[arg-type]
        result=values["result"],  # type: ignore[arg-type]
        reason=values["reason"],  # type: ignore[arg-type]
        error=values["error"],  # type: ignore[arg-type]
        consecutive_failures=int(values["consecutive_failures"] or 0),  # type: ignore[call-overload]
        max_staleness=values["max_staleness_seconds"],  # type: ignore[arg-type]
        outcomes={str(k): int(v) for k, v in outcomes.items()},
    )


def observation_from_row(row: tuple[object, ...]) -> Observation:
    fixed, rest = row[:OBSERVE_FIXED_COLUMNS], row[OBSERVE_FIXED_COLUMNS:]
    exists, populated, owned, index, base, untracked, counters, signature = fixed
    state = state_from_row(rest) if rest[0] is not None else None
    return Observation(
        exists=bool(exists),
        populated=bool(populated),
        owned=bool(owned),
        unique_index=str(index) if index is not None else None,
        base_tables=int(base),  # type: ignore[call-overload]
        untracked=int(untracked),  # type: ignore[call-overload]
        counters=Decimal(str(counters)),
        signature=str(signature) if signature is not None else None,
        state=state,
    )
