"""The skip check beside a primary-key lookup, in one run, on one session.

    .venv/bin/python -m bench.scenarios.refresh_check [--runs 500]

Starts a throwaway PostgreSQL 15 (the test harness's), loads the reference workload, creates the
example's views, refreshes once, then alternates N skip checks (`refresh_view`, as the CronJob
runs it: one round trip to the server-side check function) with N primary-key lookups. Prints
p50/p99 of each measured at the client, and the server's own execution time of each (EXPLAIN
ANALYZE), which a loaded machine disturbs less. Standalone: not part of `bench.run`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from typing import Any

import psycopg
from psycopg import sql

from marketplacedb_operator import workload
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh
from marketplacedb_operator.refresh import RefreshOptions, ViewTarget, lock_key, refresh_view
from marketplacedb_operator.sql import refresh_check

from .._harness import PostgresServer

VIEW = ViewTarget("public", "mv_hot_products")
OPTIONS = RefreshOptions(max_staleness=86400)
PK_LOOKUP = "SELECT name, price FROM ai_accounts WHERE id = 7"


def _ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


def _server_ms(conn: psycopg.Connection[Any], query: str, params: Any = None) -> float:
    rows = conn.execute(sql.SQL("EXPLAIN (ANALYZE, TIMING OFF) ") + sql.SQL(query), params).fetchall()  # type: ignore[arg-type]
    return next(float(r[0].split()[2]) for r in rows if r[0].startswith("Execution Time"))


def measure(conn: psycopg.Connection[Any], runs: int) -> dict[str, float]:
    db = PostgresRefresh(conn)
    conn.execute("SELECT pg_stat_force_next_flush()")  # the load's write counters, before the baseline
    time.sleep(1.0)
    now = datetime.datetime.now(datetime.UTC)
    assert refresh_view(db, VIEW, OPTIONS, now, force=True).ok
    checks, lookups, server_checks, server_lookups = [], [], [], []
    params = refresh_check.check_params(VIEW, lock_key(VIEW)[1], OPTIONS, now, False)
    check_query = refresh_check.check_sql().as_string(conn)
    for _ in range(runs):
        started = time.perf_counter()
        outcome = refresh_view(db, VIEW, OPTIONS, datetime.datetime.now(datetime.UTC))
        checks.append(time.perf_counter() - started)
        if outcome.outcome != "skipped-unchanged":
            raise RuntimeError(f"expected a skip, got {outcome.outcome}: {outcome.reason}")
        started = time.perf_counter()
        conn.execute(PK_LOOKUP).fetchone()
        lookups.append(time.perf_counter() - started)
    for _ in range(min(runs, 100)):
        server_checks.append(_server_ms(conn, check_query, params) / 1000)
        server_lookups.append(_server_ms(conn, PK_LOOKUP) / 1000)
    return {
        "check_p50_ms": _ms(checks, 50), "check_p99_ms": _ms(checks, 99),
        "pk_p50_ms": _ms(lookups, 50), "pk_p99_ms": _ms(lookups, 99),
        "check_server_p50_ms": _ms(server_checks, 50), "pk_server_p50_ms": _ms(server_lookups, 50),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    server = PostgresServer()
    try:
        server.start()
        server.execute("CREATE DATABASE bench_check")
        with psycopg.connect(server.dsn("bench_check"), autocommit=True) as conn:
            conn.execute(workload.schema_sql())
            conn.execute(workload.data_sql(products=2000))
            for name, query in workload.VIEW_QUERIES.items():
                view = sql.Identifier(name)
                conn.execute(sql.SQL("CREATE MATERIALIZED VIEW {} AS {}").format(view, sql.SQL(query)))  # type: ignore[arg-type]
                key = sql.SQL(", ").join(sql.Identifier(c) for c in workload.VIEW_UNIQUE_KEYS[name])
                conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(view, key))
            print(json.dumps(measure(conn, args.runs), indent=2))
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
