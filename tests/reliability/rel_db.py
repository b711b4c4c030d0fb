"""Database side of the reliability suite: canary writers, an activity sampler, a DDL-attempt counter,
blocking sessions, and the invariants checked after every fault.

Everything here is synchronous psycopg run in threads of its own (the test's event loop must keep
serving the Kubernetes emulator).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any

import psycopg
from psycopg import sql

OPERATOR_APP = "marketplacedb-operator"  # ports.APPLICATION_NAME: what the operator's sessions carry
CANARY_USER = -424242  # search_history.user_id of the canary rows (an indexed table)

SETUP_SQL = """
CREATE EXTENSION IF NOT EXISTS amcheck;
CREATE SCHEMA reltest;
CREATE TABLE reltest.canary (id bigint PRIMARY KEY, written_at timestamptz NOT NULL DEFAULT now());
-- Counts DDL *attempts* (nextval is not rolled back with a failed statement): the spin bound.
CREATE SEQUENCE reltest.ddl_attempts;
CREATE FUNCTION reltest.count_ddl() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER
  SET search_path = pg_catalog AS $$ BEGIN PERFORM nextval('reltest.ddl_attempts'); END $$;
CREATE EVENT TRIGGER reltest_count_ddl ON ddl_command_start EXECUTE FUNCTION reltest.count_ddl();
GRANT USAGE ON SCHEMA reltest TO PUBLIC;
GRANT ALL ON reltest.canary TO PUBLIC;
"""


def prepare(superuser_dsn: str) -> None:
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        conn.execute(SETUP_SQL)


def ddl_attempts(superuser_dsn: str) -> int:
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT last_value, is_called FROM reltest.ddl_attempts").fetchone()
    assert row is not None
    return int(row[0]) if row[1] else 0


class CanaryWriter:
    """Writes rows throughout a fault and remembers those whose COMMIT was acknowledged.

    Two targets: a table of its own, and search_history, a table the operator builds an index on
    (so a build CONCURRENTLY runs beside the writes). A failed write (database down, connection
    reset) is simply retried on a new connection: only acknowledged rows count.
    """

    def __init__(self, dsn: str, interval: float = 0.01) -> None:
        self.dsn, self.interval = dsn, interval
        self.acked: list[int] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary-writer", daemon=True)
        self._next = 1

    def __enter__(self) -> CanaryWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=False, connect_timeout=2,
                                           application_name="reliability-canary")
                n = self._next
                with conn.transaction():
                    conn.execute("INSERT INTO reltest.canary (id) VALUES (%s)", [n])
                    conn.execute("INSERT INTO search_history (user_id, query) VALUES (%s, %s)",
                                 [CANARY_USER, f"canary-{n}"])
                self.acked.append(n)
                self._next += 1
            except psycopg.Error:
                self.errors += 1
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                self._stop.wait(0.1)
                continue
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def lost(self, superuser_dsn: str) -> dict[str, list[int]]:
        """Acknowledged rows missing from either table (both must be empty)."""
        acked = list(self.acked)  # before reading: rows acknowledged later are not in our snapshot
        with psycopg.connect(superuser_dsn, autocommit=True) as conn:
            canary = {r[0] for r in conn.execute("SELECT id FROM reltest.canary")}
            history = {int(r[0].split("-")[1]) for r in conn.execute(
                "SELECT query FROM search_history WHERE user_id = %s", [CANARY_USER])}
        return {"reltest.canary": [n for n in acked if n not in canary],
                "search_history": [n for n in acked if n not in history]}


class ActivitySampler:
    """Samples pg_stat_activity every few ms: the most REFRESHes of one view ever running at once."""

    def __init__(self, superuser_dsn: str, dbname: str, period: float = 0.01) -> None:
        self.dsn, self.dbname, self.period = superuser_dsn, dbname, period
        self.max_concurrent_refresh = 0
        self.samples = 0
        self.refresh_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="activity-sampler", daemon=True)

    def __enter__(self) -> ActivitySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        query = ("SELECT lower(query) FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                 "AND query ILIKE 'REFRESH MATERIALIZED VIEW%%' AND pid <> pg_backend_pid()")
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                rows = [r[0] for r in conn.execute(query, [self.dbname])]
            except psycopg.Error:
                conn = None
                self._stop.wait(0.1)
                continue
            self.samples += 1
            per_view: dict[str, int] = {}
            for text in rows:
                view = text.replace("concurrently", "").split("view", 1)[1].split()[0]
                per_view[view] = per_view.get(view, 0) + 1
            if per_view:
                self.refresh_seen += 1
                self.max_concurrent_refresh = max(self.max_concurrent_refresh, *per_view.values())
            self._stop.wait(self.period)
        if conn is not None:
            conn.close()


class Blocker:
    """A session of the test's own holding something the operator will need (closed on exit)."""

    def __init__(self, dsn: str, *statements: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=False, application_name="reliability-blocker")
        for statement in statements:
            self.conn.execute(statement)  # type: ignore[arg-type]
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        self.pid = int(row[0])

    def release(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.rollback()
        self.conn.close()


def operator_sessions(superuser_dsn: str, dbname: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, state, left(query, 80), now() - backend_start FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = %s", [OPERATOR_APP, dbname]).fetchall()


def statements_running(superuser_dsn: str, dbname: str, like: str, *, waiting: bool = False) -> list[int]:
    """Pids of operator sessions running a statement matching `like` (optionally: waiting on a lock)."""
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = %s AND state = 'active' "
            "AND query ILIKE %s AND (NOT %s OR wait_event_type = 'Lock')",
            [OPERATOR_APP, dbname, like, waiting]).fetchall()
    return [int(r[0]) for r in rows]


def terminate_operator_sessions(superuser_dsn: str, dbname: str) -> int:
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
            [OPERATOR_APP, dbname]).fetchall()
    return len(rows)


@dataclasses.dataclass(frozen=True)
class Declared:
    indexes: tuple[str, ...]
    views: tuple[str, ...]


def database_problems(superuser_dsn: str, dbname: str, declared: Declared, *, operator_gone: bool = False
                      ) -> list[str]:
    """Every database invariant that does not hold (empty when all hold)."""
    problems: list[str] = []
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        invalid = conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE NOT i.indisvalid AND c.relnamespace = 'public'::regnamespace").fetchall()
        problems += [f"INVALID index {r[0]}" for r in invalid]
        leftovers = conn.execute(
            "SELECT relname FROM pg_class WHERE relname LIKE '%\\_\\_new%' OR relname LIKE '%\\_\\_old%'").fetchall()
        problems += [f"leftover temporary object {r[0]}" for r in leftovers]
        indexes = dict(conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relnamespace = 'public'::regnamespace").fetchall())
        # amcheck on PostgreSQL 15 verifies b-trees only (the example's GIN indexes: validity only),
        # and not a partitioned index itself: each of its partitions' indexes instead.
        btrees = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' "
            "AND c.relkind = 'i' AND c.relnamespace = 'public'::regnamespace").fetchall()}
        for name in declared.indexes:
            if indexes.get(name) is not True:
                problems.append(f"declared index {name}: {'missing' if name not in indexes else 'not valid'}")
                continue
            parts = [r[0] for r in conn.execute("SELECT h.inhrelid::regclass::text FROM pg_inherits h "
                                                "WHERE h.inhparent = %s::regclass", [name]).fetchall()]
            for checked in [name, *parts]:
                if checked not in btrees:
                    continue
                # amcheck: the b-tree is structurally sound and every heap row is in it (no row was
                # missed by a build CONCURRENTLY that ran beside the canary writes).
                try:
                    conn.execute("SELECT bt_index_check(%s::regclass, true)", [checked])
                except psycopg.Error as exc:
                    problems.append(f"amcheck {checked}: {exc.diag.message_primary}")
        views = dict(conn.execute("SELECT matviewname, ispopulated FROM pg_matviews "
                                  "WHERE schemaname = 'public'").fetchall())
        for name in declared.views:
            if views.get(name) is not True:
                problems.append(f"declared view {name}: {'missing' if name not in views else 'not populated'}")
        if operator_gone:
            sessions = conn.execute("SELECT pid, state, left(query, 60) FROM pg_stat_activity "
                                    "WHERE application_name = %s AND datname = %s", [OPERATOR_APP, dbname]).fetchall()
            problems += [f"operator session left: {s}" for s in sessions]
        # Locks: no operator session holds one once it is gone; nobody holds an advisory lock
        # (a refresh lock surviving its refresh would skip every later refresh as "busy").
        locks = conn.execute(
            "SELECT l.locktype, l.pid, a.application_name FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE a.datname = %s AND l.granted "
            "AND (l.locktype = 'advisory' OR (%s AND a.application_name = %s))",
            [dbname, operator_gone, OPERATOR_APP]).fetchall()
        problems += [f"lock left: {lock}" for lock in locks]
    return problems


def wait_until(check: Any, timeout: float, period: float = 0.2) -> Any:
    """Blocking poll (for use inside asyncio.to_thread only)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(period)


def quote(name: str) -> str:
    return sql.Identifier(name).as_string(None)
