"""Helpers shared by the refresh tests on a real PostgreSQL 15 (tests/test_refresh_*_pg.py): one
connection, statement, plan-and-apply, refresh and staleness helper each, instead of a copy per file.

Where the files differed, the difference is a parameter that each caller states, never a default
that changed what a test exercises:
- `run(..., flush=True)` asks the server to report the statements' write counts at once
  (pg_stat_force_next_flush). test_refresh_redteam3_pg.py and test_refresh_deps_pg.py write that
  way; the others leave the counts to PostgreSQL's own flush rules, which several of them are about
  (a write whose counts are not reported yet must not make a refresh skip).
- `wait_for_lock_wait(..., dsn=...)` names the probing session when it must not be the owner's.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from harness.postgres import FreshDatabase, PostgresServer, new_database
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh
from marketplacedb_operator.refresh import RefreshOptions, ViewTarget, refresh_view
from marketplacedb_operator.sql import report
from marketplacedb_operator.sql.plan import ExecutionPolicy, desired_state, plan

OWNER = "default/shop"
FAST = ExecutionPolicy(lock_timeout_seconds=2.0, statement_timeout_seconds=60.0, index_lock_timeout_seconds=10.0,
                       retries=1, retry_base_seconds=0.05)
OPTIONS = RefreshOptions(skip_if_unchanged=True, max_staleness=3600, timeout=60, lock_timeout=5)
JOIN = "SELECT p.id, x.price FROM products AS p JOIN prices AS x ON x.product_id = p.id"
# Two tables the views read; no statistics flush asked for (the counts follow PostgreSQL's rules).
SHOP_TABLES = """
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE prices (product_id int PRIMARY KEY, price numeric NOT NULL);
INSERT INTO products SELECT g, 'p' || g FROM generate_series(1, 20) AS g;
INSERT INTO prices SELECT g, g * 10 FROM generate_series(1, 20) AS g;
"""


def connect(db: Any, dsn: str | None = None) -> psycopg.Connection[Any]:
    """An autocommit session as the database's owner (or as `dsn`)."""
    return psycopg.connect(dsn or db.dsn, autocommit=True)


def run(db: Any, *statements: str | sql.SQL | sql.Composed, dsn: str | None = None, flush: bool = False) -> None:
    """The statements in one session; with `flush`, its write counts are reported when it goes idle."""
    with connect(db, dsn) as conn:
        for statement in statements:
            conn.execute(statement)
        if flush:
            conn.execute("SELECT pg_stat_force_next_flush()")


def rows(db: Any, query: str | sql.SQL | sql.Composed, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connect(db) as conn:
        return conn.execute(query, params).fetchall()


def spec(*views: dict[str, Any]) -> MarketplaceDBSpec:
    return MarketplaceDBSpec.model_validate({
        "database": {"host": "h", "dbname": "d", "credentialsSecretRef": {"name": "s"}},
        "materializedViews": list(views),
    })


def view(name: str, query: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "query": query, "uniqueKey": ["id"], **extra}


def apply(db: Any, *views: dict[str, Any]) -> tuple[Any, Any, Any]:
    """plan + execute as the operator does; (plan, outcomes, statuses)."""
    desired = desired_state(spec(*views), OWNER)
    with connect(db) as conn:
        observed = gateway.observe(conn, desired)
        the_plan = plan(desired, observed)
        outcomes = gateway.execute(conn, the_plan, FAST)
    return the_plan, outcomes, report.view_statuses(desired, observed)


def created(db: Any, *views: dict[str, Any]) -> Any:
    """apply() whose every outcome is ok (the views exist); the views' statuses."""
    _, outcomes, statuses = apply(db, *views)
    assert all(o.ok for o in outcomes), outcomes
    return statuses


def refresh(db: Any, name: str, options: RefreshOptions = OPTIONS, force: bool = False, *,
            now: datetime.datetime | None = None) -> Any:
    """One refresh of public.`name` in a session of its own, at `now` (the clock when not given)."""
    with connect(db) as conn:
        return refresh_view(PostgresRefresh(conn), ViewTarget("public", name), options,
                            now or datetime.datetime.now(datetime.UTC), force=force)


def stale(db: Any, name: str, query: str) -> bool:
    """The view's rows differ from what its query returns now."""
    stored = rows(db, sql.SQL("SELECT * FROM {}").format(sql.Identifier(name)))
    return sorted(stored) != sorted(rows(db, query))


def side_effects(db: Any) -> tuple[Any, ...]:
    """What a `touch()`-like function moves: (audit rows, s_ids.last_value, s_ids.is_called)."""
    return rows(db, "SELECT (SELECT count(*) FROM audit), last_value, is_called FROM s_ids")[0]


def wait_for_lock_wait(db: Any, key: int, dsn: str | None = None) -> None:
    """Until a session waits for advisory lock `key` (no clock involved); the probe session ends."""
    with connect(db, dsn) as probe:
        for _ in range(600):
            if probe.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s "
                             "AND NOT granted", [key]).fetchone() == (1,):
                return
            probe.execute("SELECT pg_sleep(0.05)")
    raise AssertionError("the writer never reached its lock")


@contextlib.contextmanager
def own_server(**options: Any) -> Iterator[FreshDatabase]:
    """A PostgreSQL server of the test's own (one it may crash, or configured otherwise: `options`
    go to PostgresServer) with one fresh database; removed afterwards."""
    server = PostgresServer(**options)
    try:
        server.start()
        yield new_database(server)
    finally:
        server.cleanup()
