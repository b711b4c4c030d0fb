"""The pure half of a materialized-view refresh: types, the decision, the schedule, the lock key.

Everything here is deterministic (no I/O, no clock, no environment): `decide()` takes what the
catalog said and the time, and says refresh (concurrently or not, and why) or skip (and why).
The SQL is `sql/refresh_sql.py`; the I/O half is `gateways/postgres/refresh.py`; the
orchestration (lock, decide, refresh, record) is `refresh.py`, shared by every scheduler.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import zoneinfo
from decimal import Decimal
from typing import Final, Literal

from croniter import croniter

from .. import naming
from ..api.v1alpha1 import MaterializedViewSpec
from ..durations import parse_duration
from .refresh_stats import unreported_reason

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
DEFAULT_HISTORY: Final = 20

STATE_COLUMNS: Final = (
    "view_schema", "view_name", "last_attempt", "last_success", "last_seconds", "row_count", "counters",
    "signature", "result", "reason", "error", "consecutive_failures", "max_staleness_seconds", "outcomes",
    "rule", "recent", "counters_at",
)


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
    depends_on: tuple[str, ...] = ()
    allow_volatile: bool = False
    history_limit: int = DEFAULT_HISTORY


def options_for(view: MaterializedViewSpec, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> RefreshOptions:
    policy = view.refresh
    if policy is None:
        return RefreshOptions(lock_timeout=lock_timeout, allow_volatile=view.allow_volatile_functions)
    return RefreshOptions(
        skip_if_unchanged=policy.skip_if_unchanged,
        max_staleness=parse_duration(policy.max_staleness),
        timeout=parse_duration(policy.timeout),
        lock_timeout=min(lock_timeout, parse_duration(policy.timeout)),
        depends_on=tuple(policy.depends_on),
        allow_volatile=view.allow_volatile_functions,
        history_limit=policy.history_limit,
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
    rule: str | None = None
    recent: tuple[str, ...] = ()
    # The server's time when the counters recorded at the last success were read (before that
    # refresh's REFRESH): a write committed later is in the counters or still unreported.
    counters_at: datetime.datetime | None = None

    @property
    def view(self) -> str:
        return self.name

    @property
    def key(self) -> tuple[str, str]:
        return self.schema, self.name


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    """One recorded run of a view (the history table keeps the last N per view)."""

    schema: str
    name: str
    attempt_at: datetime.datetime
    outcome: str
    reason: str | None
    seconds: float | None
    rows: int | None
    error: str | None


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
    volatile_functions: tuple[str, ...] = ()
    time_functions: tuple[str, ...] = ()
    untracked_functions: tuple[str, ...] = ()  # non-built-in or non-immutable: what they read is unknown
    missing_depends: tuple[str, ...] = ()  # declared dependsOn tables that do not exist
    state: RefreshState | None = None
    observed_at: datetime.datetime | None = None  # the server's time when the counters were read
    # Sessions that may hold write counts not reported to the statistics yet (sql/refresh_stats.py):
    # the counters prove nothing while one exists.
    unreported: tuple[str, ...] = ()


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


def ago(seconds: float) -> str:
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
    unsafe = _not_skippable(obs, options)
    if unsafe is not None:
        return unsafe
    age = (now - state.last_success).total_seconds()
    if age >= options.max_staleness:
        return f"maxStaleness passed (last success {ago(age)} ago)"
    if obs.counters != state.counters:
        return f"base tables written since the last refresh (counters {state.counters} -> {obs.counters})"
    if obs.signature != state.signature:
        return "base tables were rewritten or replaced (TRUNCATE, VACUUM FULL, new table)"
    if obs.unreported:
        return unreported_reason(obs.unreported)
    return None


def _not_skippable(obs: Observation, options: RefreshOptions) -> str | None:
    """Why unchanged base tables do not prove an unchanged view (erring on the side of refreshing)."""
    if obs.volatile_functions:
        return f"calls volatile function(s) {', '.join(obs.volatile_functions)}: always refreshed"
    if obs.time_functions:
        return (f"time-dependent ({', '.join(obs.time_functions)}): changes with no write, "
                "the schedule alone drives it")
    if obs.untracked_functions and not options.depends_on:
        return (f"calls function(s) {', '.join(obs.untracked_functions)} whose reads are not tracked "
                "(non-built-in or not immutable): always refreshed; declare refresh.dependsOn to skip")
    if obs.missing_depends:
        return f"dependsOn table(s) not found: {', '.join(obs.missing_depends)}: always refreshed"
    if obs.base_tables == 0 or obs.untracked:
        return "base tables cannot be tracked (none found, or foreign tables): always refreshed"
    return None


def rule_for(obs: Observation, options: RefreshOptions) -> str:
    """Which skip rule applies to this view and why, for status, `plan`-style output and history."""
    if not options.skip_if_unchanged:
        return "always refreshed: skipIfUnchanged is false"
    unsafe = _not_skippable(obs, options)
    if unsafe is not None:
        return unsafe
    declared = f"; dependsOn {', '.join(options.depends_on)}" if options.depends_on else ""
    functions = f" (functions {', '.join(obs.untracked_functions)} trusted through dependsOn)" \
        if obs.untracked_functions else ""
    return f"skipped when unchanged: write counters of {obs.base_tables} table(s) tracked{declared}{functions}"


def decide(obs: Observation, options: RefreshOptions, now: datetime.datetime, force: bool = False) -> Decision:
    """Refresh (concurrently when possible) or skip; every answer says why."""
    if not obs.exists:
        return Decision("fail", "materialized view does not exist")
    if not obs.owned:
        # https://www.postgresql.org/docs/15/sql-refreshmaterializedview.html
        return Decision("fail", "only the view's owner may refresh it (PostgreSQL 15)")
    if obs.volatile_functions and not options.allow_volatile:
        # Such a "SELECT" writes or acts at every refresh (setval, lo_*, pg_terminate_backend, ...).
        return Decision("fail", f"refused: the query calls volatile function(s) {', '.join(obs.volatile_functions)} "
                                "(set allowVolatileFunctions: true to accept; dangerous)")
    why = _why_refresh(obs, options, now, force)
    if why is None:
        assert obs.state is not None and obs.state.last_success is not None
        age = (now - obs.state.last_success).total_seconds()
        return Decision("skip", f"no writes to the tracked tables since the last refresh ({ago(age)} ago)")
    if not obs.populated:
        return Decision("refresh", why, False, "the view is not populated: the first refresh cannot be CONCURRENTLY")
    if obs.unique_index is None:
        return Decision(
            "refresh", why, False,
            "no usable unique index (CONCURRENTLY needs a valid unique index on plain columns without WHERE)",
        )
    return Decision("refresh", why, True)


def due(schedule: str | None, last_attempt: datetime.datetime | None, now: datetime.datetime,
        time_zone: str | None = None, every: float | None = None) -> bool:
    """True when the view's schedule fired after `last_attempt` (for the operator's own timer)."""
    return seconds_until_due(schedule, last_attempt, now, time_zone, every) <= 0


def seconds_until_due(schedule: str | None, last_attempt: datetime.datetime | None, now: datetime.datetime,
                      time_zone: str | None = None, every: float | None = None) -> float:
    """Seconds until the next run is due (<= 0: due now). `every` is a plain interval; a cron
    schedule is read in `time_zone` (IANA, default UTC, like the CronJob's `timeZone`), so
    "0 3 * * *" in Europe/Berlin fires at 03:00 Berlin time across DST changes."""
    if last_attempt is None:
        return 0.0
    if every is not None:
        return every - (_utc(now) - _utc(last_attempt)).total_seconds()
    if schedule is None:
        return float("inf")
    zone = zoneinfo.ZoneInfo(time_zone or "Etc/UTC")
    following: datetime.datetime = croniter(schedule, _utc(last_attempt).astimezone(zone)).get_next(datetime.datetime)
    return float((following - _utc(now)).total_seconds())


def _utc(moment: datetime.datetime) -> datetime.datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC)


def is_stale(state: RefreshState, now: datetime.datetime, max_staleness: float | None = None) -> bool:
    limit = max_staleness if max_staleness is not None else state.max_staleness
    if state.last_success is None:
        return True
    return limit is not None and (now - state.last_success).total_seconds() > limit



@dataclasses.dataclass(frozen=True)
class StateUpdate:
    """What one refresh attempt writes to its view's state row and history."""

    outcome: Outcome
    attempt_at: datetime.datetime
    reason: str
    max_staleness: float
    error: str | None = None
    seconds: float | None = None
    rows: int | None = None
    counters: Decimal | None = None
    signature: str | None = None
    rule: str | None = None
    history_limit: int = DEFAULT_HISTORY
    counters_at: datetime.datetime | None = None
