"""Scenario 1: the home page (the BFF's two queries) from the base tables vs through the views.

Three pages are measured with one client each (latency, not throughput): from the base tables
before the operator (only primary keys, the state it finds), from the base tables with the
operator's indexes, and from its materialized views. The round-trip floor is a primary-key
lookup. Then the views at the design's peak, 1,160 home pages/s, through the rendered pgbouncer,
and primary-key lookups at the same rate through the same path (what the path itself costs).
"""

from __future__ import annotations

from typing import Any

from .. import load, pgbench
from ..env import Workbench
from ..scripts import Scripts

PEAK_PAGES_PER_SECOND = 1160  # 10 M requests/day at the design's peak
PEAK_CLIENTS = 50


def _page(result: pgbench.Result, prefix: str) -> dict[str, Any]:
    return {f"{prefix}_p50_ms": result.p(50), f"{prefix}_p99_ms": result.p(99), f"{prefix}_pages": result.processed}


def before_operator(bench: Workbench, scripts: Scripts, pages: int) -> dict[str, Any]:
    """The page as the BFF computes it before the operator: base tables, primary keys only."""
    result = pgbench.run("home-base", bench.direct(), scripts.one("home_base"), clients=1, transactions=pages,
                         timeout=3600)
    return _page(result, "base") | {"base_latencies": result.latencies_ms}


def after_operator(bench: Workbench, scripts: Scripts, *, indexed_pages: int, pages: int,
                   peak_seconds: float) -> dict[str, Any]:
    """`pages` home pages through the views (and as many primary-key lookups for the floor), one
    client; then `peak_seconds` at 1,160 pages/s through pgbouncer."""
    direct, pooled = bench.direct(), bench.pooled()
    indexed = pgbench.run("home-indexed", direct, scripts.one("home_base"), clients=1, transactions=indexed_pages,
                          timeout=3600)
    views = pgbench.run("home-views", direct, scripts.one("home_views"), clients=1, transactions=pages)
    floor = pgbench.run("pk", direct, scripts.one("pk"), clients=1, transactions=pages)
    floor_pooled = pgbench.run("pk-pooled", pooled, scripts.one("pk"), clients=1, transactions=pages)
    pid = bench.bouncer.pid if bench.bouncer is not None else 0
    with load.CpuShare(pid) as share:  # pgbouncer's CPU use and CPU wait, both runs together
        peak = pgbench.run("home-views-peak", pooled, scripts.one("home_views"), clients=PEAK_CLIENTS,
                           rate=PEAK_PAGES_PER_SECOND, seconds=peak_seconds)
        # The same rate, clients and path with the cheapest useful query: what the path itself costs.
        pk_peak = pgbench.run("pk-pooled-peak", pooled, scripts.one("pk"), clients=PEAK_CLIENTS,
                              rate=PEAK_PAGES_PER_SECOND, seconds=peak_seconds)
    result: dict[str, Any] = {}
    result |= _page(indexed, "indexed") | _page(views, "views")
    result |= {"floor_p50_ms": floor.p(50), "floor_p99_ms": floor.p(99),
               "floor_pooled_p50_ms": floor_pooled.p(50), "floor_pooled_p99_ms": floor_pooled.p(99)}
    result |= {"peak_p50_ms": peak.p(50), "peak_p99_ms": peak.p(99), "peak_max_ms": peak.max_ms,
               "peak_tps": peak.tps, "peak_failed": peak.failed + peak.aborted_clients,
               "peak_ok": peak.ok, "pk_peak_p50_ms": pk_peak.p(50), "pk_peak_p99_ms": pk_peak.p(99),
               "pk_peak_failed": pk_peak.failed + pk_peak.aborted_clients}
    result["peak_over_pk_p99"] = result["peak_p99_ms"] / result["pk_peak_p99_ms"]
    result |= share.facts("bouncer_peak")
    result |= {"indexed_latencies": indexed.latencies_ms, "views_latencies": views.latencies_ms,
               "peak_latencies": peak.latencies_ms}
    return result
