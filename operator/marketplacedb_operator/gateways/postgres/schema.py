"""Observe the catalog and execute a Plan on a direct, autocommit connection.

Execution rules (docs/architecture.md, "PostgreSQL and PgBouncer facts" and "Ownership and trust"):
* the ownership table exists before the first step (ownership.ENSURE); nothing runs otherwise;
* every step runs with `lock_timeout` and `statement_timeout` set for the session: the resource's
  lockTimeout (index steps too, capped by the operator's index policy); a lock timeout or deadlock
  of ordinary DDL is retried with jittered exponential backoff;
* a CONCURRENTLY build first waits (backoff, within lockTimeout) for sessions that would stall its
  wait phases, and reports them instead of building in vain; a build is never retried in one
  apply (a retry is a whole new build);
* after every index build `pg_index.indisvalid` is checked; a build that failed or came out
  INVALID is dropped CONCURRENTLY (https://www.postgresql.org/docs/15/sql-createindex.html#SQL-CREATEINDEX-CONCURRENTLY);
* the steps of one object stop at its first failure, undo what they left behind, and the next
  object goes on: one outcome per object; a lost session ends the run with the outcomes so far;
* error messages carry PostgreSQL's primary message and SQLSTATE only (never DETAIL, which can
  quote row data), and no connection parameters; for the error classes whose primary message can
  quote a row value (a data exception such as 22P02 `invalid input syntax ... "tok_..."`, or a
  function's RAISE) only SQLSTATE and object names (redact.describe_db_error).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import errors, sql

from ... import backoff
from ...redact import describe_db_error
from ...sql import ownership, refresh_guard
from ...sql.catalog import (
    BLOCKERS,
    BUILD_BLOCKERS,
    OPEN_TRANSACTIONS,
    RECORDS_TABLE_NAME,
    SessionInfo,
    session_from_row,
)
from ...sql.ddl import drop_index, qualified, render
from ...sql.plan import ExecutionPolicy, Plan, Step, StepOutcome, ViewCheck
from ...sqlcheck import normalize_select
from .observe import ObservationFailed, expected_signatures, observe

Connection = psycopg.Connection[Any]
Connect = Callable[[], Connection]
_RETRYABLE = (errors.LockNotAvailable, errors.DeadlockDetected)


class StepFailed(Exception):
    """A step could not complete; the message is safe for status and events."""


__all__ = ["ObservationFailed", "StepFailed", "blocking_sessions", "check_view_columns", "describe_error",
           "ensure_records", "execute", "expected_signatures", "observe", "sessions_blocking"]


# --- observation ---------------------------------------------------------------------------------


def blocking_sessions(conn: Connection, min_age_seconds: float = 0.0) -> tuple[SessionInfo, ...]:
    """Sessions of this database holding a transaction open longer than `min_age_seconds`:
    what a CONCURRENTLY build or drop has to wait for."""
    rows = conn.execute(OPEN_TRANSACTIONS, {"min_age": min_age_seconds}).fetchall()
    return tuple(session_from_row(row) for row in rows)


def sessions_blocking(conn: Connection, pid: int) -> tuple[SessionInfo, ...]:
    """The sessions backend `pid` is waiting for right now (pg_blocking_pids), seen from `conn`."""
    return tuple(session_from_row(row) for row in conn.execute(BLOCKERS, {"pid": pid}).fetchall())


def check_view_columns(conn: Connection, query: str, timeout_seconds: float = 30.0) -> list[str]:
    """The columns `query` returns, asked of the server with LIMIT 0 in a READ ONLY transaction
    (nothing is read, nothing can be written), after the parser has checked it is one SELECT."""
    text = normalize_select(query)
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        conn.execute("SELECT pg_catalog.set_config('statement_timeout', %s, true)",
                     [str(max(1, round(timeout_seconds * 1000)))])
        # The one verbatim SQL text: a whole SELECT cannot be composed from Identifiers/Literals; it
        # is the parser's deparse of exactly one SELECT (normalize_select), run READ ONLY with LIMIT 0.
        cur = conn.execute(sql.SQL("SELECT * FROM ({}) AS mdb_view_check LIMIT 0").format(sql.SQL(text)))
        columns = [column.name for column in cur.description or ()]
        raise psycopg.Rollback()
    return columns  # Rollback ends the transaction block above without an error


# --- execution -----------------------------------------------------------------------------------


# SQLSTATE classes whose primary message names objects and conditions, never a row value:
# integrity (23: the values are in DETAIL), transaction rollback (40), syntax/access (42: names
# from the spec or the catalog), resources (53), object state (55: lock_not_available, and the
# operator's own refusals raised with object_not_in_prerequisite_state), operator intervention
# (57: statement/lock timeout). Everything else (22 data exceptions quote the offending value,
# P0 is whatever a function RAISEs, XX ...) is reported by SQLSTATE and object names only.
_PRIMARY_IS_SAFE = ("23", "40", "42", "53", "55", "57")


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error) and exc.sqlstate and not exc.sqlstate.startswith(_PRIMARY_IS_SAFE):
        return describe_db_error(exc)
    if isinstance(exc, psycopg.Error):
        primary = exc.diag.message_primary or type(exc).__name__
        return f"{primary} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else primary
    return str(exc)


def _set_timeouts(conn: Connection, lock_seconds: float, statement_seconds: float) -> None:
    conn.execute(
        "SELECT pg_catalog.set_config('lock_timeout', %s, false), "
        "pg_catalog.set_config('statement_timeout', %s, false)",
        [str(max(1, round(lock_seconds * 1000))), str(max(1, round(statement_seconds * 1000)))],
    )


def _lock_seconds(policy: ExecutionPolicy, step_policy: str) -> float:
    """Index steps honour the resource's lockTimeout too, capped by the operator's index policy."""
    if step_policy == "index":
        return min(policy.index_lock_timeout_seconds, policy.lock_timeout_seconds)
    return policy.lock_timeout_seconds


# A transaction open at least this long when a build would start is waited for (it would stall the
# build's wait phases); shorter ones come and go during the build.
BUILD_BLOCKER_MIN_AGE_SECONDS = 1.0


def _index_state(conn: Connection, schema: str, name: str) -> bool | None:
    """indisvalid of the index, or None when it does not exist."""
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_catalog.pg_index i WHERE i.indexrelid = pg_catalog.to_regclass(%s)",
        [render(qualified(schema, name))],
    ).fetchone()
    return None if row is None else bool(row[0])


class _Runner:
    def __init__(self, conn: Connection, policy: ExecutionPolicy, watch: Connect | None,
                 sleep: Callable[[float], None], rng: random.Random) -> None:
        self.conn, self.policy, self.watch, self.sleep, self.rng = conn, policy, watch, sleep, rng
        self.blockers: dict[int, SessionInfo] = {}
        self.attempts = 0
        self.cleanup_problem = ""  # an INVALID index that could not be dropped yet

    def statements(self, statements: Sequence[sql.Composed], transactional: bool, lock_policy: str,
                   cleanup_index: tuple[str, str] | None = None, retry: bool = True) -> None:
        """Run with timeouts; retry lock timeouts and deadlocks with jittered backoff (never a
        CONCURRENTLY build: a retry would build the whole index again; the next reconcile waits
        for its blockers first, see wait_for_build)."""
        for attempt in range(self.policy.retries + 1 if retry else 1):
            self.attempts += 1
            _set_timeouts(self.conn, _lock_seconds(self.policy, lock_policy), self.policy.statement_timeout_seconds)
            try:
                with self._watching(lock_policy == "index"):
                    if transactional:
                        with self.conn.transaction():
                            for statement in statements:
                                self.conn.execute(statement)
                    else:
                        for statement in statements:
                            self.conn.execute(statement)
                return
            except _RETRYABLE as exc:
                self._note_blockers()
                if cleanup_index:  # a timed-out CONCURRENTLY build leaves an INVALID index
                    problem = self.drop_if_invalid(*cleanup_index)
                    if problem:  # the same blocker holds the drop: retrying the build cannot succeed
                        self.cleanup_problem = problem
                        raise StepFailed(describe_error(exc)) from exc
                if not retry or attempt >= self.policy.retries:
                    raise
                self.sleep(backoff.delay(self.policy.retry_base_seconds, attempt, rng=self.rng))

    def wait_for_build(self, schema: str, table: str) -> None:
        """Before a CONCURRENTLY build: while sessions that would stall its wait phases are open
        (BUILD_BLOCKERS), wait with backoff, within the index lock timeout, instead of building;
        StepFailed (nothing built, nothing left behind) when they outlast it."""
        budget = _lock_seconds(self.policy, "index")
        waited, delay, seen = 0.0, 0.2, [""]
        min_age = min(BUILD_BLOCKER_MIN_AGE_SECONDS, budget / 2)
        while True:
            rows = self.conn.execute(BUILD_BLOCKERS, {"table": render(qualified(schema, table)),
                                                       "min_age": min_age, "seen": seen}).fetchall()
            blocking = [session_from_row(row[:6]) for row in rows if row[7]]
            unknown = [str(row[6]) for row in rows if not row[7] and str(row[1]).startswith("unknown")]
            for session in blocking:
                self.blockers[session.pid] = session
            if not blocking and not (unknown and seen == [""]):
                return
            if waited >= budget:
                raise StepFailed(
                    f"not built: {len(blocking)} session(s) would stall CREATE INDEX CONCURRENTLY on "
                    f"{schema}.{table} ({'; '.join(s.describe() for s in blocking)}); waited {waited:.1f}s "
                    "(lockTimeout, SQLSTATE 55P03), retried on the next reconcile")
            # Another role's transaction age is hidden without pg_read_all_stats: the same virtual
            # transaction still open one sample later counts as a blocker.
            seen = unknown or [""]
            pause = max(min(delay, budget - waited), min_age if unknown else 0.0)
            self.sleep(pause)
            waited += pause
            delay = min(delay * 2, 2.0)

    def drop_if_invalid(self, schema: str, name: str) -> str:
        """Drop the index CONCURRENTLY when it exists and is INVALID; '' or why it could not."""
        try:
            if _index_state(self.conn, schema, name) is False:
                self.statements([drop_index(schema, name)], transactional=False, lock_policy="index")
            return ""
        except psycopg.Error as exc:
            return f"INVALID index {schema}.{name} could not be dropped yet ({describe_error(exc)}): retried next time"

    def _note_blockers(self) -> None:
        with contextlib.suppress(psycopg.Error):
            for session in blocking_sessions(self.conn):
                self.blockers.setdefault(session.pid, session)

    @contextlib.contextmanager
    def _watching(self, enabled: bool) -> Iterator[None]:
        """While an index build waits, sample from a second connection who it waits for."""
        if not enabled or self.watch is None:
            yield
            return
        stop = threading.Event()
        pid = self.conn.info.backend_pid
        thread = threading.Thread(target=self._watch, args=(self.watch, pid, stop), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _watch(self, connect: Connect, pid: int, stop: threading.Event) -> None:
        pinned, ticks = False, 0
        try:
            with connect() as other:
                # Pin the build's index OID on its intent row (ownership.pin_build) as soon as the
                # build has created it: until then a crash leaves a build that may finish unowned.
                while not stop.wait(0.2 if pinned else 0.02):
                    if not pinned:
                        pinned = other.execute(ownership.pin_build(pid)).rowcount > 0
                        other.commit()
                    ticks += 1
                    if pinned or ticks % 10 == 0:
                        for session in sessions_blocking(other, pid):
                            self.blockers[session.pid] = session  # keep the latest (oldest age)
        except Exception:  # observation only: never fail a build because of it
            return


def _run_object(runner: _Runner, obj: str, steps: Sequence[Step]) -> StepOutcome:
    started = time.monotonic()
    done: list[Step] = []
    current: Step | None = None
    try:
        for current in steps:
            if current.check_view is not None:
                _check_view(runner.conn, current.check_view, runner.policy)
            if current.build_table is not None:
                runner.wait_for_build(*current.build_table)
            runner.statements(current.statements, current.transactional, current.lock_policy, current.cleanup_index,
                              retry=current.build_table is None)
            if current.verify_index is not None and _index_state(runner.conn, *current.verify_index) is not True:
                raise StepFailed(f"index {'.'.join(current.verify_index)} is not valid after the build")
            done.append(current)
    except (psycopg.Error, StepFailed) as exc:
        message = f"{current.description if current else obj}: {describe_error(exc)}"
        leftovers = _undo(runner, current, done, exc)
        return StepOutcome(obj, ok=False, executed=tuple(s.description for s in done),
                           message="; ".join([message, *leftovers]), blocking=tuple(runner.blockers.values()),
                           seconds=round(time.monotonic() - started, 3), attempts=runner.attempts)
    waited = "; ".join(s.describe() for s in runner.blockers.values())
    return StepOutcome(obj, ok=True, executed=tuple(s.description for s in done),
                       message=f"waited for {waited}" if waited else "",
                       blocking=tuple(runner.blockers.values()), seconds=round(time.monotonic() - started, 3),
                       attempts=runner.attempts)


def _undo(runner: _Runner, failed: Step | None, done: Sequence[Step], exc: BaseException) -> list[str]:
    """Leave nothing behind: the failed build's INVALID index, then earlier steps' cleanups."""
    problems = []
    if runner.conn.closed:
        return ["connection lost: leftovers are cleaned up on the next reconcile"]
    if runner.cleanup_problem:
        problems.append(runner.cleanup_problem)
    elif failed is not None and failed.cleanup_index and not isinstance(exc, errors.DuplicateTable):
        problems.append(runner.drop_if_invalid(*failed.cleanup_index))
    for step in reversed(done):
        for statement in step.cleanup:
            try:
                runner.statements([statement], transactional=False, lock_policy="index")
            except psycopg.Error as error:
                problems.append(f"cleanup `{render(statement)}` failed ({describe_error(error)}): retried next time")
    return [p for p in problems if p]


def _check_view(conn: Connection, check: ViewCheck, policy: ExecutionPolicy) -> None:
    try:
        columns = check_view_columns(conn, check.query, policy.statement_timeout_seconds)
    except psycopg.Error as exc:
        raise StepFailed(f"{check.field}.query: {describe_error(exc)}") from None
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise StepFailed(f"{check.field}.query: returns duplicate column names {duplicates}")
    missing = [k for k in check.unique_key if k not in columns]
    if missing:
        raise StepFailed(f"{check.field}.uniqueKey: {missing} not returned by the query (it returns {columns})")


def execute(conn: Connection, plan: Plan, policy: ExecutionPolicy, *, watch: Connect | None = None,
            sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> list[StepOutcome]:
    """Run `plan` on an autocommit connection; one outcome per object, in plan order.

    `watch`, when given, opens a second connection used only to report which sessions an index
    build is waiting for (pg_blocking_pids), while it waits.
    """
    if not conn.autocommit:
        raise ValueError("execute() needs an autocommit connection (CONCURRENTLY cannot run in a transaction)")
    original = conn.execute("SELECT pg_catalog.current_setting('lock_timeout'), "
                            "pg_catalog.current_setting('statement_timeout')").fetchone()
    # The view queries are resolved (and first run) by this session: never through a "$user"
    # schema another role planted (refresh_guard.SAFE_SEARCH_PATH).
    conn.execute(refresh_guard.safe_search_path_sql(local=False))
    outcomes: list[StepOutcome] = []
    jitter = rng or random.Random()
    try:
        problem = ensure_records(conn, policy) if plan.steps else ""
        for obj in plan.objects if not problem else ():
            steps = [s for s in plan.steps if s.object == obj]
            if conn.closed:
                outcomes.append(StepOutcome(obj, ok=False, message="connection lost before this object"))
                continue
            outcomes.append(_run_object(_Runner(conn, policy, watch, sleep, jitter), obj, steps))
    finally:
        if original is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_catalog.set_config('lock_timeout', %s, false), "
                             "pg_catalog.set_config('statement_timeout', %s, false)", list(original))
    if problem:
        return [StepOutcome(obj, ok=False, message=problem) for obj in plan.objects]
    return outcomes


def ensure_records(conn: Connection, policy: ExecutionPolicy) -> str:
    """Create the ownership table (ownership.ENSURE) if missing; '' or why it could not be (or cannot be
    trusted, ownership.TRUST)."""
    problem = ""
    try:
        _set_timeouts(conn, policy.lock_timeout_seconds, policy.statement_timeout_seconds)
        with conn.transaction():
            for statement in ownership.ENSURE:
                conn.execute(statement)
            # Checked again where it is created: a schema pre-created by another role is refused.
            trust = conn.execute(ownership.TRUST).fetchone()
            if trust is None or trust[1]:
                problem = ownership.distrust(list(trust[1]) if trust else ["unreadable"])
                raise psycopg.Rollback()
    except psycopg.Error as exc:
        return f"the ownership table {RECORDS_TABLE_NAME} cannot be created ({describe_error(exc)}): nothing was run"
    return problem
