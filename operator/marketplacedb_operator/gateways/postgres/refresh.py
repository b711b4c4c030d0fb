"""Refresh I/O on one PostgreSQL session: the check, advisory lock, REFRESH, state and history.

`PostgresRefresh(conn)` implements the `RefreshDatabase` port of `refresh.py`. The connection
must be a direct, autocommit session (never through transaction pooling: session advisory locks
need a session) and should be dedicated to refreshes, since the advisory lock lives with the
session: if the process dies, PostgreSQL ends the session and the lock goes with it.

Errors are reported as SQLSTATE, condition name and object names only: PostgreSQL's primary
message can quote row values (`invalid input syntax for type integer: "tok_..."`), so no server
text ever leaves this module.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import psycopg
from psycopg import errors, sql

from ... import naming
from ...sql import refresh as q
from ...sql import refresh_check as c
from ...sql import refresh_guard as g
from ...sql import refresh_rows as r
from ...sql import refresh_sql as s
from ...sql import view_calls as vc
from ...sql.catalog import Catalog
from ...sql.steps import Desired, view_drift
from ...sqlcheck import normalize_select

# Errors meaning "the operator's schema, a table or the check function is not there (yet)".
_MISSING = (errors.UndefinedTable, errors.InvalidSchemaName, errors.UndefinedFunction)


def describe_error(exc: psycopg.Error) -> str:
    """`SQLSTATE condition (object names)`: what to act on, never the server's message text."""
    state = getattr(exc, "sqlstate", None)
    condition = _condition_name(type(exc))
    diag = getattr(exc, "diag", None)
    objects = []
    if diag is not None:
        table = ".".join(p for p in (diag.schema_name, diag.table_name) if p)
        for label, value in (("table", table), ("column", diag.column_name),
                             ("constraint", diag.constraint_name), ("type", diag.datatype_name)):
            if value:
                objects.append(f"{label} {value}")
    text = f"{state} {condition}" if state else condition
    return f"{text} ({', '.join(objects)})" if objects else text


def _condition_name(kind: type) -> str:
    # psycopg's class per SQLSTATE is named after the condition: UniqueViolation -> unique_violation.
    name = kind.__name__
    if kind.__module__ != errors.__name__ or name in ("Error", "DatabaseError", "OperationalError"):
        return "database_error" if name != "OperationalError" else "connection_error"
    return "".join(f"_{ch.lower()}" if ch.isupper() else ch for ch in name).lstrip("_")


_TRUSTED_TABLES = (naming.STATE_TABLE, s.HISTORY_TABLE)


def _observation(cursor: psycopg.Cursor[Any]) -> q.Observation:
    """The results of s.observe_sql(): pg_stat_clear_snapshot()'s, the catalog row, the sessions."""
    cursor.nextset()
    row = cursor.fetchone()
    cursor.nextset()
    sessions = cursor.fetchone()
    if row is None or sessions is None:  # pragma: no cover - the queries always return one row
        raise q.RefreshDatabaseError("catalog check returned no row")
    return r.observation_from_row(tuple(row), sessions[0])


def _error(exc: psycopg.Error) -> q.RefreshDatabaseError:
    return q.RefreshDatabaseError(describe_error(exc), getattr(exc, "sqlstate", None))


class PostgresRefresh:
    """The refresh port over one psycopg connection (autocommit)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._ensured = False
        self._trusted = False

    def _trust(self) -> None:
        """Once per session, before anything of the operator's schema is called or read: refuse a
        schema, table or function another role planted (g.TRUST). What passed stays trusted: only
        its (trusted) owners can replace it."""
        if self._trusted:
            return
        try:
            row = self.conn.execute(g.trust_sql(_TRUSTED_TABLES, c.CHECK_FUNCTION)).fetchone()
        except psycopg.Error as exc:
            raise _error(exc) from None
        if row is None or row[0]:
            raise q.RefreshDatabaseError(g.distrust(list(row[0]) if row else ["unreadable"]))
        self._trusted = True

    # --- the operator's schema -----------------------------------------------------------------

    def ensure_state_table(self) -> None:
        """Create what is missing of the schema, tables and check function (idempotent, serialized).

        Nothing that exists is recreated or dropped; a role without CREATE on the schema can use
        what another role created (grants to PUBLIC, row-level security per view owner).
        """
        objects = [*s.schema_objects(), ("function", c.CHECK_FUNCTION, [c.check_function_ddl()])]
        creating = ""
        self._trusted = False  # what exists is kept: it is checked again below
        self._trust()
        try:
            with self.conn.transaction():
                self.conn.execute(s.ddl_lock_sql())
                for kind, name, statements in objects:
                    signature = c.CHECK_SIGNATURE if kind == "function" else ""
                    row = self.conn.execute(s.exists_sql(kind, name, signature)).fetchone()
                    if row and row[0]:
                        continue
                    creating = kind
                    for statement in statements:
                        self.conn.execute(statement)
                for statement in s.upgrade_state_table():
                    try:
                        with self.conn.transaction():  # a savepoint: only the table's owner may ALTER
                            self.conn.execute(statement)
                    except errors.InsufficientPrivilege:
                        pass
        except errors.InsufficientPrivilege as exc:
            # Our own words (never the server's): which grant creating the operator's schema needs.
            where = "database" if creating == "schema" else f"schema {naming.STATE_SCHEMA}"
            raise q.RefreshDatabaseError(
                f"{describe_error(exc)}: permission denied for {where} (CREATE on it is needed to create the "
                f"operator's {creating or 'objects'} in schema {naming.STATE_SCHEMA})", exc.sqlstate
            ) from None
        except psycopg.Error as exc:
            raise _error(exc) from None
        self._ensured = True

    def _with_state_table(self, query: Any, params: Any = None) -> psycopg.Cursor[Any]:
        """Execute; when the schema's objects are missing (first run), create them and retry once."""
        self._trust()
        try:
            return self.conn.execute(query, params)
        except _MISSING:
            if self._ensured:
                raise
        except errors.UndefinedColumn:  # a state table from an older release
            if self._ensured:
                raise
        self.ensure_state_table()
        return self.conn.execute(query, params)

    # --- the one-round-trip check --------------------------------------------------------------

    def check(self, target: q.ViewTarget, key: tuple[int, int], options: q.RefreshOptions, now: Any,
              force: bool) -> tuple[bool, bool, float | None]:
        """(locked, skipped, age): lock, catalog check, skip record and unlock in one call."""
        # One message, no parameters (simple query protocol): the trust gate, then the call; the
        # call is never planned when the gate fails.
        params = c.check_params(target, key[1], options, now, force)
        message = sql.SQL("{}; {}").format(g.trust_gate_sql(_TRUSTED_TABLES, c.CHECK_FUNCTION),
                                           c.check_sql_literal(params))
        try:
            try:
                cursor = self.conn.execute(message)
            except (*_MISSING, errors.UndefinedColumn):
                self.ensure_state_table()
                cursor = self.conn.execute(message)
            except errors.InvalidTextRepresentation:
                self._trusted = False
                self._trust()  # raises, naming what cannot be trusted
                raise
            cursor.nextset()
            row = cursor.fetchone()
        except psycopg.Error as exc:
            raise _error(exc) from None
        if row is None:  # pragma: no cover - the function always returns one row
            raise q.RefreshDatabaseError("check returned no row")
        return bool(row[0]), bool(row[1]), row[2]

    # --- lock ----------------------------------------------------------------------------------

    def try_lock(self, key: tuple[int, int]) -> bool:
        try:
            row = self.conn.execute(s.try_lock_sql(key)).fetchone()
        except psycopg.Error as exc:
            raise _error(exc) from None
        return bool(row and row[0])

    def unlock(self, key: tuple[int, int]) -> None:
        try:
            self.conn.execute(s.unlock_sql(key))
        except psycopg.Error:
            pass  # a broken session has lost its locks already

    # --- check ---------------------------------------------------------------------------------

    def observe(self, target: q.ViewTarget, depends_on: tuple[str, ...] = ()) -> q.Observation:
        """One round trip: clear the stats snapshot and read view, base tables, functions, state."""
        try:
            return _observation(self._with_state_table(s.observe_sql(target, depends_on)))
        except psycopg.Error as exc:
            raise _error(exc) from None

    # --- refresh and record --------------------------------------------------------------------

    def refresh(self, target: q.ViewTarget, concurrently: bool, options: q.RefreshOptions,
                update: q.StateUpdate, previous_rows: int | None = None) -> q.StateUpdate:
        """REFRESH under SET LOCAL timeouts and record success in the same transaction.

        Success is recorded atomically with the refresh: the state row says "refreshed" exactly
        when the new rows are committed. On any error the transaction rolls back, so the view
        keeps its previous rows. Returns the update as recorded (with seconds and rows).
        """
        try:
            with self.conn.transaction():
                for statement in s.timeouts_sql(options):
                    self.conn.execute(statement)
                self.conn.execute(g.safe_search_path_sql(local=True))
                self._lock_reads_and_recheck(target, options)
                before = self._counts(target)
                started = time.perf_counter()
                self.conn.execute(s.refresh_sql(target, concurrently))
                seconds = time.perf_counter() - started
                done = dataclasses.replace(update, seconds=seconds, rows=self._rows_after(
                    target, concurrently, previous_rows, before))
                # The catalog check ran first on this session, so the tables exist.
                self.conn.execute(s.record_sql(), s.record_params(target, done))
        except psycopg.Error as exc:
            raise _error(exc) from None
        return done

    def _lock_reads_and_recheck(self, target: q.ViewTarget, options: q.RefreshOptions) -> None:
        """In the refresh's transaction: ACCESS SHARE on what the view reads (through plain views,
        recursively, by LOCK itself), then the volatile check again. A view replaced after the
        check (or while this waited for its lock) is seen here, and the REFRESH does not run it."""
        view = s.regclass(target.schema, target.name)
        locked: set[tuple[str, str]] = set()
        for _ in range(8):  # a replaced view may read new relations: lock those too, re-read
            reads = {(str(r[0]), str(r[1])) for r in self.conn.execute(g.reads_sql(view)).fetchall()}
            if reads <= locked:
                break
            self.conn.execute(g.lock_sql(sorted(reads - locked)))
            locked |= reads
        observed = _observation(self.conn.execute(s.observe_sql(target, options.depends_on)))
        if observed.volatile_functions and not options.allow_volatile:
            raise q.RefreshDatabaseError(
                f"refused: the query calls volatile function(s) {', '.join(observed.volatile_functions)} "
                "(changed since the check; set allowVolatileFunctions: true to accept; dangerous)")

    def _counts(self, target: q.ViewTarget) -> tuple[int, int, float]:
        row = self.conn.execute(s.rows_after_sql(target)).fetchone()
        inserted, deleted, reltuples = row or (0, 0, -1)
        return int(inserted or 0), int(deleted or 0), float(reltuples if reltuples is not None else -1)

    def _rows_after(self, target: q.ViewTarget, concurrently: bool, previous: int | None,
                    before: tuple[int, int, float]) -> int | None:
        """No rescan of the view: CONCURRENTLY applies a diff, whose inserts and deletes the
        backend's counters hold (read before and after: they also carry earlier transactions'
        unflushed counts), exact given the count recorded at the last success; a plain refresh
        rebuilds the indexes, which set reltuples to the exact count. Otherwise the planner's
        estimate (reltuples; None when never estimated)."""
        inserted, deleted, reltuples = self._counts(target)
        if concurrently and previous is not None:
            return max(0, previous + (inserted - before[0]) - (deleted - before[1]))
        return int(reltuples) if reltuples >= 0 else None

    def record(self, target: q.ViewTarget, update: q.StateUpdate) -> None:
        try:
            self._with_state_table(s.record_sql(), s.record_params(target, update))
        except psycopg.Error as exc:
            raise _error(exc) from None

    def record_busy(self, target: q.ViewTarget, update: q.StateUpdate) -> None:
        try:
            self._with_state_table(s.record_busy_sql(), s.record_params(target, update))
        except psycopg.Error as exc:
            raise _error(exc) from None


# The analysis is a catalog query whose recursive CTEs' estimates pass jit_above_cost: compiling
# it would take far longer (~250 ms) than running it. For the analysis' transaction only.
_NO_JIT = "pg_catalog.set_config('jit', 'off', true)"


def analyze_query(conn: psycopg.Connection[Any], query: str) -> vc.ViewCalls:
    """What a view query would call and read, before the view exists (sql/view_calls.py).

    Stored as a temporary view in a transaction that is always rolled back (resolved by the
    server, never executed; needs only TEMP, like the adoption probe). The query goes through the
    parser again (one plain SELECT, or SqlCheckError), as api validation does.
    """
    text = normalize_select(query)
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT " + _NO_JIT)
            return _analyze_probe(conn, text, "mdb_probe_calls")
    except psycopg.Error as exc:
        raise _error(exc) from None


def _analyze_probe(conn: psycopg.Connection[Any], query: str, name: str) -> vc.ViewCalls:
    conn.execute(sql.SQL("CREATE TEMPORARY VIEW {} AS {}").format(sql.Identifier(name), sql.SQL(query)))
    return _analyze(conn, "pg_temp", name)


def _analyze(conn: psycopg.Connection[Any], schema: str, name: str) -> vc.ViewCalls:
    row = conn.execute(vc.analyze_sql(schema, name)).fetchone()
    if row is None:  # pragma: no cover - the query always returns one row
        raise q.RefreshDatabaseError("analysis returned no row")
    return vc.calls_from_row(tuple(row))


Analyses = tuple[tuple[tuple[tuple[str, str], vc.ViewCalls], ...], tuple[tuple[tuple[str, str], str], ...]]


def analyze_views(conn: psycopg.Connection[Any], desired: Desired, catalog: Catalog) -> Analyses:
    """(calls, unanalyzed) of every declared view, for plan and status.

    A view that exists as planned (ours, no drift) is read as it is; every other one (to be
    created, adopted or rebuilt) is probed as a temporary view in a rolled-back transaction, each
    in its own savepoint: a query that cannot be resolved (a missing table, no TEMP privilege) is
    reported with SQLSTATE and condition only. The view's DDL re-checks anyway (view_calls.guard).
    """
    calls: list[tuple[tuple[str, str], vc.ViewCalls]] = []
    failed: list[tuple[tuple[str, str], str]] = []
    if not desired.views:
        return (), ()
    with conn.transaction(force_rollback=True):
        # A probe waits at most 1s for a table's lock (a migration holding it): left unanalyzed,
        # the view's creating transaction still re-checks (view_calls.guard).
        conn.execute("SELECT pg_catalog.set_config('lock_timeout', '1000', true), "
                     "pg_catalog.set_config('statement_timeout', '60000', true), " + _NO_JIT)
        for number, d in enumerate(desired.views):
            key = (d.spec.schema_name, d.spec.name)
            existing = catalog.view(*key)
            try:
                with conn.transaction():
                    if existing is not None and existing.owned_by(desired.owner) and not view_drift(d, existing):
                        found = _analyze(conn, *key)
                    else:
                        found = _analyze_probe(conn, normalize_select(d.spec.query), f"mdb_probe_calls_{number}")
                calls.append((key, found))
            except psycopg.Error as exc:
                failed.append((key, describe_error(exc)))
    return tuple(calls), tuple(failed)


def read_refresh_states(conn: psycopg.Connection[Any]) -> list[q.RefreshState]:
    """Every view's refresh state (empty when no refresh ever ran in this database).

    RefreshDatabaseError (SQLSTATE only) when the state exists but cannot be read (privileges).
    """
    try:
        rows = conn.execute(s.read_states_sql()).fetchall()
    except _MISSING:
        return []
    except errors.UndefinedColumn:  # an older release's table, not upgraded yet: read what it has
        return []
    except psycopg.Error as exc:
        raise _error(exc) from None
    return [r.state_from_row(tuple(row)) for row in rows]


def read_history(conn: psycopg.Connection[Any], view: str | None = None) -> list[q.HistoryEntry]:
    """The recorded runs, newest first per view (empty when none was ever recorded)."""
    try:
        rows = conn.execute(s.read_history_sql(view), {"view": view} if view else None).fetchall()
    except _MISSING:
        return []
    except psycopg.Error as exc:
        raise _error(exc) from None
    return [r.history_from_row(tuple(row)) for row in rows]
