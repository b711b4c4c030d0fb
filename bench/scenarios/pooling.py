"""Scenario 2: many clients, directly vs through pgbouncer on the config the operator renders.

500 clients of the marketplace's query mix (bench/scripts.py), first flat out (no rate: each
path's throughput, and the server's backend memory at its peak), then both paths at 60% of the
direct path's flat-out throughput (open loop with pgbench -R: below saturation, so latency is
service time plus ordinary queueing, not an ever-growing backlog). Then 2,000 clients against a
server with PostgreSQL's default max_connections = 100: directly, at most 100 -
superuser_reserved_connections sessions exist; through the pooler, every client is served.

pgbouncer is one single-threaded process sharing the CPUs with PostgreSQL and pgbench: its CPU
use and the time it spent runnable but waiting for a CPU (/proc/PID/schedstat) are recorded for
every pooled run, so a pooled tail worse than direct can be told apart from a config problem.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg

from .. import load, pgbench
from ..env import Workbench
from ..scripts import Scripts

UTILISATION = 0.6  # of the direct path's flat-out throughput: the rate of the latency comparison
PEAK_CLIENTS = 500
MANY_CLIENTS = 2000


def _summary(result: pgbench.Result, prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}_p50_ms": result.p(50), f"{prefix}_p99_ms": result.p(99), f"{prefix}_max_ms": result.max_ms,
        f"{prefix}_tps": result.tps, f"{prefix}_processed": result.processed,
        f"{prefix}_failed": result.failed + result.aborted_clients + (0 if result.exit_code == 0 else 1),
        f"{prefix}_error": result.error,
        # The window measured: shorter than asked when connecting overran pgbench's allowance.
        f"{prefix}_window_s": result.seconds, f"{prefix}_connect_s": result.connect_seconds,
    }


def _bouncer_share(bench: Workbench, where: str) -> Any:
    """CPU use and CPU wait of pgbouncer during a pooled run (nothing for a direct one)."""
    if where != "pooled" or bench.bouncer is None:
        return contextlib.nullcontext(None)
    return load.CpuShare(bench.bouncer.pid)


def peak(bench: Workbench, scripts: Scripts, *, seconds: float, flat_seconds: float,
         clients: int = PEAK_CLIENTS) -> dict[str, Any]:
    """One run at `clients` clients: flat out (throughput, backend memory), then both paths at
    UTILISATION x the direct flat-out throughput (latency), direct and pooled side by side."""
    mix = scripts.mix()
    result: dict[str, Any] = {"clients": clients}
    latencies: dict[str, list[float]] = {}
    bench.start_pooler()  # a fresh pooler holds no server connections: direct clients get every slot
    for where, target in (("direct", bench.direct()), ("pooled", bench.pooled())):
        with load.MemoryPeak(bench.pg.datadir) as memory, _bouncer_share(bench, where) as share:
            flat = pgbench.run(f"flat-{where}", target, mix, clients=clients, seconds=flat_seconds)
        result |= _summary(flat, f"{where}_flat")
        result |= {f"{where}_flat_backend_{k}": v for k, v in memory.peak.items()}
        if share is not None:
            result |= share.facts("bouncer_flat")
    rate = max(1, round(UTILISATION * result["direct_flat_tps"]))
    result["rate"] = rate
    # The pooled flat run left pgbouncer's server connections open (server_idle_timeout): with them,
    # 500 direct clients found the slots taken ("remaining connection slots are reserved") and the
    # direct rated run failed in 2 of 3 runs of a full bench. A fresh pooler again, as above.
    bench.start_pooler()
    for where, target in (("direct", bench.direct()), ("pooled", bench.pooled())):
        with _bouncer_share(bench, where) as share:
            rated = pgbench.run(f"rated-{where}", target, mix, clients=clients, rate=rate, seconds=seconds)
        result |= _summary(rated, f"{where}_rate")
        latencies[where] = rated.latencies_ms
        if share is not None:
            result |= share.facts("bouncer_rate")
    result["p99_ratio"] = result["direct_rate_p99_ms"] / result["pooled_rate_p99_ms"]
    result["p50_ratio"] = result["direct_rate_p50_ms"] / result["pooled_rate_p50_ms"]
    result["flat_ratio"] = result["pooled_flat_tps"] / result["direct_flat_tps"]
    result["memory_ratio"] = result["direct_flat_backend_rss_mib"] / result["pooled_flat_backend_rss_mib"]
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
    """2,000 clients, max_connections = 100: direct vs pooled (the server must be restarted first).
    The best the direct path can do on this server is measured too: flat out with as many clients
    as it admits (less 2, left for this bench's own sessions)."""
    mix = scripts.mix()
    bench.start_pooler()  # no idle server connections left from the previous run
    admitted = direct_sessions_possible(bench, 200)
    best = pgbench.run("many-direct-best", bench.direct(), mix, clients=max(1, admitted - 2), seconds=seconds,
                       timeout=300)
    direct = pgbench.run("many-direct", bench.direct(), mix, clients=clients, seconds=seconds, timeout=300)
    pooled = pgbench.run("many-pooled", bench.pooled(), mix, clients=clients, seconds=seconds, timeout=300)
    with bench.superuser() as conn:
        row = conn.execute("SELECT current_setting('max_connections')::int").fetchone()
    return {
        "clients": clients,
        "max_connections": row[0] if row else None,
        "direct_sessions_admitted": admitted,
        **_summary(best, "many_best_direct"), "many_best_direct_clients": max(1, admitted - 2),
        **_summary(direct, "many_direct"), "many_direct_ok": direct.ok,
        **_summary(pooled, "many_pooled"), "many_pooled_ok": pooled.ok,
        "many_pooled_fraction": pooled.tps / best.tps if best.tps else float("nan"),
    }
