"""Scenario 4b: the one-round-trip skip check beside a primary-key lookup, on one session.

The check (`marketplacedb.refresh_check_v3`, called by `refresh_view` exactly as the CronJob runs
it: advisory lock, catalog check, skip record and unlock in one statement) and the floor, a
primary-key lookup of a random product, alternate on the same psycopg connection: the same
client library, the same socket, the same moment, so their ratio says how many round trips' worth
the check costs. The server's own execution time of each (EXPLAIN ANALYZE) is measured too: a
loaded machine disturbs it less than the client-side figure.

Part of every `bench.run`; also standalone on a throwaway server:

    .venv/bin/python -m bench.scenarios.refresh_check [--runs 500]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from typing import Any

import psycopg
from psycopg import sql

from marketplacedb_operator import workload
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh
from marketplacedb_operator.refresh import RefreshOptions, ViewTarget, lock_key, options_for, refresh_view
from marketplacedb_operator.sql import refresh_check

from .. import stats
from .._harness import PostgresServer
from ..env import Workbench

PK_LOOKUP = "SELECT id, name, price FROM seller_products WHERE id = %s"
SERVER_SAMPLES = 100  # EXPLAIN ANALYZE of each, after the client-side runs
FLUSH_SECONDS = 1.0  # pg_stat_force_next_flush() reaches the shared statistics within this


def _server_ms(conn: psycopg.Connection[Any], query: sql.Composable, params: Any = None) -> float:
    rows = conn.execute(sql.SQL("EXPLAIN (ANALYZE, TIMING OFF) ") + query, params).fetchall()
    return next(float(r[0].split()[2]) for r in rows if r[0].startswith("Execution Time"))


def measure(conn: psycopg.Connection[Any], view: ViewTarget, options: RefreshOptions, runs: int,
            products: int) -> dict[str, Any]:
    """`runs` checks (each must skip: nothing was written) alternating with `runs` lookups."""
    db = PostgresRefresh(conn)
    now = datetime.datetime.now(datetime.UTC)
    outcome = refresh_view(db, view, options, now, force=True)  # the baseline the checks compare with
    if not outcome.ok:
        raise RuntimeError(f"{view.qualified}: the baseline refresh failed: {outcome.reason}")
    conn.execute("SELECT pg_stat_force_next_flush()")  # the refresh's own counters, before the checks
    time.sleep(FLUSH_SECONDS)
    ids = random.Random(7).choices(range(1, workload.workload_size(products).seller_products + 1), k=runs)
    checks, lookups = [], []
    for product in ids:
        started = time.perf_counter()
        outcome = refresh_view(db, view, options, datetime.datetime.now(datetime.UTC))
        checks.append((time.perf_counter() - started) * 1000)
        if outcome.outcome != "skipped-unchanged":
            raise RuntimeError(f"expected a skip, got {outcome.outcome}: {outcome.reason}")
        started = time.perf_counter()
        conn.execute(PK_LOOKUP, [product]).fetchone()
        lookups.append((time.perf_counter() - started) * 1000)
    params = refresh_check.check_params(view, lock_key(view)[1], options, datetime.datetime.now(datetime.UTC), False)
    server_checks = [_server_ms(conn, refresh_check.check_sql(), params) for _ in range(SERVER_SAMPLES)]
    server_lookups = [_server_ms(conn, sql.SQL(PK_LOOKUP), [p]) for p in ids[:SERVER_SAMPLES]]
    p50, p99 = stats.percentile(checks, 50), stats.percentile(checks, 99)
    pk50, pk99 = stats.percentile(lookups, 50), stats.percentile(lookups, 99)
    return {
        "view": view.qualified, "check_runs": runs,
        "rt_check_p50_ms": p50, "rt_check_p99_ms": p99, "rt_pk_p50_ms": pk50, "rt_pk_p99_ms": pk99,
        "rt_ratio_p50": p50 / pk50 if pk50 else float("nan"), "rt_ratio_p99": p99 / pk99 if pk99 else float("nan"),
        "rt_check_server_p50_ms": stats.percentile(server_checks, 50),
        "rt_pk_server_p50_ms": stats.percentile(server_lookups, 50),
    }


def side_by_side(bench: Workbench, runs: int) -> dict[str, Any]:
    """One run in the workbench: the example's first view, with its own refresh policy, on a
    direct session of the owner (as a CronJob pod connects)."""
    view = bench.spec.materialized_views[0]
    with bench.connect() as conn:
        return measure(conn, ViewTarget(view.schema_name, view.name), options_for(view), runs, bench.products)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    server = PostgresServer()
    products = 2000
    try:
        server.start()
        server.execute("CREATE DATABASE bench_check")
        with psycopg.connect(server.dsn("bench_check"), autocommit=True) as conn:
            conn.execute(workload.schema_sql())
            conn.execute(workload.data_sql(products=products))
            for name, query in workload.VIEW_QUERIES.items():
                view = sql.Identifier(name)
                conn.execute(sql.SQL("CREATE MATERIALIZED VIEW {} AS {}").format(view, sql.SQL(query)))
                key = sql.SQL(", ").join(sql.Identifier(c) for c in workload.VIEW_UNIQUE_KEYS[name])
                conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(view, key))
            figures = measure(conn, ViewTarget("public", "mv_hot_products"), RefreshOptions(max_staleness=86400),
                              args.runs, products)
            print(json.dumps(figures, indent=2))
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
