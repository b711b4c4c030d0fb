"""Scenario 2: many clients, directly vs through pgbouncer on the config the operator renders.

At the design's peak (5,800 queries/s from 500 clients, open loop with pgbench -R, the
marketplace's query mix of bench/scripts.py), then flat out (no rate: throughput). Then 2,000
clients against a server with PostgreSQL's default max_connections = 100: directly, at most
100 - superuser_reserved_connections sessions exist; through the pooler, every client is served.
"""

from __future__ import annotations

from typing import Any

import psycopg

from .. import pgbench
from ..env import Workbench
from ..scripts import Scripts

PEAK_RATE = 5800
PEAK_CLIENTS = 500
MANY_CLIENTS = 2000


def _summary(result: pgbench.Result, prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}_p50_ms": result.p(50), f"{prefix}_p99_ms": result.p(99), f"{prefix}_max_ms": result.max_ms,
        f"{prefix}_tps": result.tps, f"{prefix}_processed": result.processed,
        f"{prefix}_failed": result.failed + result.aborted_clients + (0 if result.exit_code == 0 else 1),
        f"{prefix}_error": result.error,
    }


def peak(bench: Workbench, scripts: Scripts, *, seconds: float, flat_seconds: float,
         clients: int = PEAK_CLIENTS) -> dict[str, Any]:
    """One run at 500 clients: at 5,800 tx/s, then flat out, direct and pooled side by side."""
    mix = scripts.mix()
    result: dict[str, Any] = {"clients": clients, "rate": PEAK_RATE}
    latencies: dict[str, list[float]] = {}
    bench.start_pooler()  # a fresh pooler holds no server connections: direct clients get every slot
    for where, target in (("direct", bench.direct()), ("pooled", bench.pooled())):
        rated = pgbench.run(f"peak-{where}", target, mix, clients=clients, rate=PEAK_RATE, seconds=seconds)
        result |= _summary(rated, f"{where}_rate")
        latencies[where] = rated.latencies_ms
        flat = pgbench.run(f"flat-{where}", target, mix, clients=clients, seconds=flat_seconds)
        result |= _summary(flat, f"{where}_flat")
    result["p99_ratio"] = result["direct_rate_p99_ms"] / result["pooled_rate_p99_ms"]
    result["flat_ratio"] = result["pooled_flat_tps"] / result["direct_flat_tps"]
    result["latencies"] = latencies
    return result


def direct_sessions_possible(bench: Workbench, attempts: int) -> int:
    """How many direct sessions the server admits before "too many clients" (bounded)."""
    opened: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(attempts):
            try:
                opened.append(bench.connect())
            except psycopg.OperationalError:
                break
        return len(opened)
    finally:
        for conn in opened:
            conn.close()


def many_clients(bench: Workbench, scripts: Scripts, *, seconds: float, clients: int = MANY_CLIENTS) -> dict[str, Any]:
    """2,000 clients, max_connections = 100: direct vs pooled (the server must be restarted first)."""
    mix = scripts.mix()
    bench.start_pooler()  # no idle server connections left from the previous run
    admitted = direct_sessions_possible(bench, 200)
    direct = pgbench.run("many-direct", bench.direct(), mix, clients=clients, seconds=seconds, timeout=300)
    pooled = pgbench.run("many-pooled", bench.pooled(), mix, clients=clients, seconds=seconds, timeout=300)
    with bench.superuser() as conn:
        row = conn.execute("SELECT current_setting('max_connections')::int").fetchone()
    return {
        "clients": clients,
        "max_connections": row[0] if row else None,
        "direct_sessions_admitted": admitted,
        **_summary(direct, "many_direct"), "many_direct_ok": direct.ok,
        **_summary(pooled, "many_pooled"), "many_pooled_ok": pooled.ok,
    }
