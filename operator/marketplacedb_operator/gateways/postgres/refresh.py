"""Refresh I/O on one PostgreSQL session: advisory lock, catalog check, REFRESH, state table.

`PostgresRefresh(conn)` implements the `RefreshDatabase` port of `refresh.py`. The connection
must be a direct, autocommit session (never through transaction pooling: session advisory locks
need a session) and should be dedicated to refreshes, since the advisory lock lives with the
session: if the process dies, PostgreSQL ends the session and the lock goes with it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import psycopg
from psycopg import errors

from ...sql import refresh as q
from . import scrub

# Errors meaning "the state table or its schema is not there yet".
_MISSING = (errors.UndefinedTable, errors.InvalidSchemaName)


def _error(exc: psycopg.Error) -> q.RefreshDatabaseError:
    """One scrubbed line with the SQLSTATE: enough to act on, no DETAIL rows, no secrets."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    state = getattr(exc, "sqlstate", None)
    message = scrub(f"{state}: {text}" if state else text)
    return q.RefreshDatabaseError(message, state)


class PostgresRefresh:
    """The refresh port over one psycopg connection (autocommit)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._ensured = False

    # --- state table ---------------------------------------------------------------------------

    def ensure_state_table(self) -> None:
        """Create the operator's schema and state table if missing (idempotent, serialized)."""
        try:
            with self.conn.transaction():
                self.conn.execute(q.ddl_lock_sql())
                for statement in q.state_table_ddl():
                    self.conn.execute(statement)
        except psycopg.Error as exc:
            raise _error(exc) from None
        self._ensured = True

    def _with_state_table(self, query: Any, params: Any = None) -> psycopg.Cursor[Any]:
        """Execute; when the state table is missing (first run), create it and retry once."""
        try:
            return self.conn.execute(query, params)
        except _MISSING:
            if self._ensured:
                raise
        self.ensure_state_table()
        return self.conn.execute(query, params)

    # --- lock ----------------------------------------------------------------------------------

    def try_lock(self, key: tuple[int, int]) -> bool:
        try:
            row = self.conn.execute(q.try_lock_sql(key)).fetchone()
        except psycopg.Error as exc:
            raise _error(exc) from None
        return bool(row and row[0])

    def unlock(self, key: tuple[int, int]) -> None:
        try:
            self.conn.execute(q.unlock_sql(key))
        except psycopg.Error:
            pass  # a broken session has lost its locks already

    # --- check ---------------------------------------------------------------------------------

    def observe(self, target: q.ViewTarget) -> q.Observation:
        """One round trip: clear the stats snapshot and read view, base tables, counters, state."""
        try:
            cursor = self._with_state_table(q.observe_sql(target))
            cursor.nextset()  # the first result is pg_stat_clear_snapshot()'s
            row = cursor.fetchone()
        except psycopg.Error as exc:
            raise _error(exc) from None
        if row is None:  # pragma: no cover - the query always returns one row
            raise q.RefreshDatabaseError("catalog check returned no row")
        return q.observation_from_row(tuple(row))

    # --- refresh and record --------------------------------------------------------------------

    def refresh(self, target: q.ViewTarget, concurrently: bool, options: q.RefreshOptions,
                update: q.StateUpdate) -> q.StateUpdate:
        """REFRESH under SET LOCAL timeouts and record success in the same transaction.

        Success is recorded atomically with the refresh: the state row says "refreshed" exactly
        when the new rows are committed. On any error the transaction rolls back, so the view
        keeps its previous rows. Returns the update as recorded (with seconds and rows).
        """
        try:
            with self.conn.transaction():
                for statement in q.timeouts_sql(options):
                    self.conn.execute(statement)
                started = time.perf_counter()
                self.conn.execute(q.refresh_sql(target, concurrently))
                row = self.conn.execute(q.count_sql(target)).fetchone()
                seconds = time.perf_counter() - started
                done = dataclasses.replace(update, seconds=seconds, rows=int(row[0]) if row else 0)
                # observe() ran first on this session, so the state table exists.
                self.conn.execute(q.record_sql(), q.record_params(target, done))
        except psycopg.Error as exc:
            raise _error(exc) from None
        return done

    def record(self, target: q.ViewTarget, update: q.StateUpdate) -> None:
        try:
            self._with_state_table(q.record_sql(), q.record_params(target, update))
        except psycopg.Error as exc:
            raise _error(exc) from None

    def record_busy(self, target: q.ViewTarget) -> None:
        params = {"schema": target.schema, "name": target.name, "outcome": "skipped-busy"}
        try:
            self._with_state_table(q.record_busy_sql(), params)
        except psycopg.Error as exc:
            raise _error(exc) from None


def read_refresh_states(conn: psycopg.Connection[Any]) -> list[q.RefreshState]:
    """Every view's refresh state (empty when no refresh ever ran in this database)."""
    try:
        rows = conn.execute(q.read_states_sql()).fetchall()
    except _MISSING:
        return []
    return [q.state_from_row(tuple(row)) for row in rows]
