"""Observe the catalog and execute a Plan on a direct, autocommit connection.

Execution rules (DESIGN.md section 4):
* every step runs with `lock_timeout` and `statement_timeout` set for the session: the resource's
  lockTimeout for ordinary DDL, the operator's index policy for CONCURRENTLY builds and drops;
  a lock timeout or deadlock is retried with jittered exponential backoff;
* after every index build `pg_index.indisvalid` is checked; a build that failed or came out
  INVALID is dropped CONCURRENTLY (https://www.postgresql.org/docs/15/sql-createindex.html#SQL-CREATEINDEX-CONCURRENTLY);
* the steps of one object stop at its first failure, undo what they left behind, and the next
  object goes on: one outcome per object;
* error messages carry PostgreSQL's primary message and SQLSTATE only (never DETAIL, which can
  quote row data), and no connection parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import errors, sql

from ...sql import ownership
from ...sql.catalog import (
    BLOCKERS,
    BUILD_BLOCKERS,
    OPEN_TRANSACTIONS,
    RECORDS_TABLE_NAME,
    Catalog,
    SessionInfo,
    observe_params,
    observe_query,
    parse_catalog,
    session_from_row,
)
from ...sql.ddl import create_index, drop_index, qualified, render
from ...sql.plan import Desired, ExecutionPolicy, Plan, Step, StepOutcome, ViewCheck, observed_names
from ...sqlcheck import normalize_select

Connection = psycopg.Connection[Any]
Connect = Callable[[], Connection]
_RETRYABLE = (errors.LockNotAvailable, errors.DeadlockDetected)


class StepFailed(Exception):
    """A step could not complete; the message is safe for status and events."""


# --- observation ---------------------------------------------------------------------------------


# The operator's own sessions never inherit a database- or role-level statement_timeout or
# lock_timeout (ALTER DATABASE ... SET statement_timeout = 1 would otherwise lock it out of its
# own catalog reads): every transaction it runs sets both, locally.
OBSERVE_LOCK_TIMEOUT_MS = 5000
OBSERVE_STATEMENT_TIMEOUT_MS = 60000


def _pin_session(conn: Connection, lock_ms: int = OBSERVE_LOCK_TIMEOUT_MS,
                 statement_ms: int = OBSERVE_STATEMENT_TIMEOUT_MS) -> None:
    conn.execute("SELECT pg_catalog.set_config('lock_timeout', %s, true), "
                 "pg_catalog.set_config('statement_timeout', %s, true), "
                 "pg_catalog.set_config('idle_in_transaction_session_timeout', '0', true)",
                 [str(lock_ms), str(statement_ms)])


def observe(conn: Connection, desired: Desired) -> Catalog:
    """One READ ONLY snapshot of what `desired` needs to know (catalog.OBSERVE: declared names,
    their temporaries, this resource's recorded objects; nothing of anyone else's), plus the
    definitions the declared objects would have, for adoption (expected_signatures)."""
    with conn.transaction():
        # Never wait long: pg_get_viewdef locks the relations a view reads, so a declared table
        # held under ACCESS EXCLUSIVE (VACUUM FULL, ALTER TABLE) fails fast with a clear error.
        _pin_session(conn)
        conn.execute("SET TRANSACTION READ ONLY")
        # Pinned so that pg_get_indexdef/pg_get_viewdef are fully qualified (see ddl.mark).
        conn.execute("SET LOCAL search_path = pg_catalog")
        exists = conn.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", [RECORDS_TABLE_NAME]).fetchone()
        cur = conn.execute(observe_query(bool(exists and exists[0])),
                           observe_params(desired.owner, observed_names(desired)))
        row = cur.fetchone()
    if row is None:  # pragma: no cover - the statement always returns one row
        raise StepFailed("catalog observation returned nothing")
    catalog = parse_catalog(row[0])
    return dataclasses.replace(catalog, expected=expected_signatures(conn, desired, catalog))


def expected_signatures(conn: Connection, desired: Desired,
                        catalog: Catalog) -> tuple[tuple[tuple[str, str], str], ...]:
    """What each declared object found under its name but not ours would look like if the operator
    had made it, deparsed by this server: the index built on an empty temporary copy of its table's
    columns, the query as a temporary view. Rolled back: nothing is left, no data is read. An object
    the probe cannot reproduce (no TEMP privilege, a missing column) gets no signature and is never
    adopted."""
    indexes = [d for d in desired.indexes if (found_index := catalog.index(d.spec.schema_name, d.spec.name))
               is not None and not found_index.owned_by(desired.owner)]
    views = [d for d in desired.views if (found_view := catalog.view(d.spec.schema_name, d.spec.name))
             is not None and not found_view.owned_by(desired.owner)]
    found: list[tuple[tuple[str, str], str]] = []
    if not indexes and not views:
        return ()
    with conn.transaction():
        _pin_session(conn)
        saved = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()
        path = str(saved[0]) if saved else "\"$user\", public"
        for number, d in enumerate(indexes):
            table, name = f"mdb_probe_table_{number}", f"mdb_probe_index_{number}"
            with contextlib.suppress(psycopg.Error), conn.transaction():
                conn.execute(sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {})").format(
                    sql.Identifier(table), qualified(d.spec.schema_name, d.spec.table)))
                probe = d.spec.model_copy(update={"schema_name": "pg_temp", "table": table})
                conn.execute(create_index(probe, name, concurrently=False))  # an empty temporary table
                row = conn.execute("SELECT CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END || "
                                   "pg_catalog.substring(pg_catalog.pg_get_indexdef(i.indexrelid), ' USING .*$') "
                                   "FROM pg_catalog.pg_index i WHERE i.indexrelid = pg_catalog.to_regclass(%s)",
                                   [f"pg_temp.{name}"]).fetchone()
                if row and row[0]:
                    found.append(((d.spec.schema_name, d.spec.name), str(row[0])))
        for number, view in enumerate(views):
            name = f"mdb_probe_view_{number}"
            with contextlib.suppress(psycopg.Error), conn.transaction():
                conn.execute(sql.SQL("CREATE TEMPORARY VIEW {} AS {}").format(
                    sql.Identifier(name), sql.SQL(normalize_select(view.spec.query))))
                # Fully qualified, as OBSERVE reads the live view; the path is put back for the next
                # probe (a SET LOCAL would outlive this savepoint).
                row = conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true), "
                                   "pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to("
                                   "pg_catalog.pg_get_viewdef(pg_catalog.to_regclass(%s)), 'UTF8')), 'hex'), "
                                   "pg_catalog.set_config('search_path', %s, true)",
                                   [f"pg_temp.{name}", path]).fetchone()
                if row and row[1]:
                    found.append(((view.spec.schema_name, view.spec.name), str(row[1])))
        raise psycopg.Rollback()
    return tuple(sorted(found))


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
        cur = conn.execute(sql.SQL("SELECT * FROM ({}) AS mdb_view_check LIMIT 0").format(sql.SQL(text)))
        columns = [column.name for column in cur.description or ()]
        raise psycopg.Rollback()
    return columns  # Rollback ends the transaction block above without an error


# --- execution -----------------------------------------------------------------------------------


def describe_error(exc: BaseException) -> str:
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


def _backoff(policy: ExecutionPolicy, attempt: int, rng: random.Random) -> float:
    # Full jitter around an exponential base, so several operators never retry in lockstep.
    return float(policy.retry_base_seconds * (2**attempt) * rng.uniform(0.5, 1.5))


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
                self.sleep(_backoff(self.policy, attempt, self.rng))

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
        try:
            with connect() as other:
                while not stop.wait(0.2):
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
    """Create the ownership table (ownership.ENSURE) if missing; '' or why it could not be."""
    try:
        _set_timeouts(conn, policy.lock_timeout_seconds, policy.statement_timeout_seconds)
        with conn.transaction():
            for statement in ownership.ENSURE:
                conn.execute(statement)
    except psycopg.Error as exc:
        return f"the ownership table {RECORDS_TABLE_NAME} cannot be created ({describe_error(exc)}): nothing was run"
    return ""
