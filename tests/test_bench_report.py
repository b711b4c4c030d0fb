"""The benchmark report is computed from its figures: synthetic figures in, sentences checked.

bench/report.py turns one run's results into REPORT.md. No server here: the figures are made up
so that each branch is taken on purpose (a machine loaded from outside, a pooled tail worse than
direct, a run over its time limit, a check slower than the target), and the text must follow the
numbers: the loaded marks appear exactly when the outside share is over the threshold, and every
explanation quotes the figures it is computed from.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import report, run
from bench.load import OUTSIDE_THRESHOLD

SEGMENTS = ("1. home page after", "2. 500 clients", "2. 2,000 clients", "3. refresh under reads",
            "4. skip-if-unchanged", "4b. refresh check beside a primary-key lookup", "5. index builds under writes",
            "6. operator with 100 resources")


def _load(outside: float) -> dict[str, Any]:
    bench = 0.5
    return {"samples": 20, "busy": bench + outside, "bench": bench, "outside": outside, "outside_max": outside + 0.05,
            "loadavg_max": 2.0, "bench_cpu_seconds": 10.0, "loaded": outside > OUTSIDE_THRESHOLD}


def figures(*, outside: float = 0.05, direct99: float = 20.0, pooled99: float = 10.0, bouncer_wait: float = 0.02,
            pk_peak99: float = 0.9, peak99: float = 1.5, check50: float = 0.4, pk50: float = 0.1,
            check_server: float = 0.05, pk_server: float = 0.02, seconds: float = 500.0,
            fleet_writes: int = 0) -> dict[str, Any]:
    """One run's results, three runs per scenario, every figure the report reads."""
    three = range(3)
    wb: dict[str, Any] = {
        "timings": {"load_seconds": 16.0, "vacuum_seconds": 1.0, "apply_seconds": 20.0},
        "home_before": [{"base_p50_ms": 5000.0 + i, "base_p99_ms": 5000.0 + i} for i in three],
        "home_after": [{"indexed_p50_ms": 600.0, "indexed_p99_ms": 650.0, "views_p50_ms": 0.5, "views_p99_ms": 1.0,
                        "floor_p50_ms": 0.05, "floor_pooled_p50_ms": 0.1, "peak_p50_ms": 0.8, "peak_p99_ms": peak99,
                        "peak_max_ms": 9.0, "peak_tps": 1160.0, "peak_failed": 0, "pk_peak_p50_ms": 0.3,
                        "pk_peak_p99_ms": pk_peak99, "peak_over_pk_p99": peak99 / pk_peak99,
                        "bouncer_peak_cpu": 0.1, "bouncer_peak_wait": bouncer_wait} for _ in three],
        "peak": [{"clients": 500, "direct_flat_tps": 10000.0, "pooled_flat_tps": 9000.0, "flat_ratio": 0.9,
                  "rate": 6000, "direct_rate_p50_ms": 1.0, "direct_rate_p99_ms": direct99, "direct_rate_tps": 6000.0,
                  "direct_rate_failed": 0, "pooled_rate_p50_ms": 1.2, "pooled_rate_p99_ms": pooled99,
                  "pooled_rate_tps": 6000.0, "pooled_rate_failed": 0, "p99_ratio": direct99 / pooled99,
                  "p50_ratio": 1 / 1.2, "bouncer_rate_cpu": 0.1, "bouncer_rate_wait": bouncer_wait,
                  "direct_flat_backend_rss_mib": 3000.0, "pooled_flat_backend_rss_mib": 1000.0,
                  "memory_ratio": 3.0} for _ in three],
        "many": [{"clients": 2000, "many_pooled_fraction": 0.9, "many_pooled_failed": 0, "many_pooled_ok": True}
                 for _ in three],
        "refresh": [{"plain_longest_ms": 1500.0, "concurrent_longest_ms": 30.0, "concurrent_stall_seconds": 0}
                    for _ in three],
        "skip": [{"period_runs": 18, "period_refreshes": 0, "period_skipped": 18} for _ in three],
        "check": [{"view": "public.mv_hot_products", "check_runs": 500, "rt_check_p50_ms": check50,
                   "rt_check_p99_ms": check50 * 2, "rt_pk_p50_ms": pk50, "rt_pk_p99_ms": pk50 * 2,
                   "rt_ratio_p50": check50 / pk50, "rt_ratio_p99": check50 / pk50,
                   "rt_check_server_p50_ms": check_server, "rt_pk_server_p50_ms": pk_server} for _ in three],
        "build": [{"plain_longest_ms": 1700.0, "concurrent_longest_ms": 12.0} for _ in three],
        "pool_sizes": {"pool_size_at_600": 144, "pool_size_at_100": 24},
    }
    fleet_run = {"all_ready": True, "rss_start_mib": 60.0, "rss_peak_mib": 100.0, "idle_ddl": 0,
                 "idle_api_writes": fleet_writes, "idle_resync": True,
                 "idle_writes_by_resource": {"marketplacedbs/status": fleet_writes} if fleet_writes else {}}
    durations = dict.fromkeys(SEGMENTS, 30.0)
    return {
        "scale": {"name": "full", "products": 1_000_000, "runs": 3, "base_pages": 1, "indexed_pages": 5,
                  "view_pages": 2000},
        "machine": {"nproc": 2, "cpu": "test", "memory_gib": 8, "kernel": "k", "postgresql": "15", "pgbench": "15",
                    "pgbouncer": "1.18", "python": "3.11", "busy_before_start": 0.01, "load_start": [0.1, 0.1, 0.1],
                    "load_end": [0.2, 0.2, 0.2]},
        "started": "2026-11-30T00:00:00+00:00", "seconds": seconds, "loads": [["x", 0.5]],
        "example": {"indexes": 7, "non_btree": 2, "views": 2, "settings": 3, "extensions": ["pg_trgm"], "probes": 3,
                    "pooler_replicas": 2},
        "workbench": wb,
        "fleet": {"100": [dict(fleet_run) for _ in three], "database_create_seconds": 3.0, "databases": 100},
        "load": {label: _load(outside) for label in SEGMENTS},
        "durations": durations,
        "budget": {"segments": dict.fromkeys(SEGMENTS, 40.0), "reserved": {"search": 25.0},
                   "limit_seconds": run.LIMIT_SECONDS["full"]},
    }


def render(results: dict[str, Any]) -> str:
    return report.render(results, {}, command="make bench")


def target_row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("| ") and start in line)


def test_a_quiet_run_is_not_marked_loaded() -> None:
    text = render(figures(outside=0.05))
    assert "loaded from outside" not in text.lower()
    assert "| **yes** |" not in text


def test_a_run_loaded_from_outside_is_marked_in_the_report() -> None:
    """Issue 19: a run whose load from outside exceeds the threshold is marked, per scenario and as a whole."""
    text = render(figures(outside=OUTSIDE_THRESHOLD + 0.2))
    assert f"**This run was loaded from outside** in {len(SEGMENTS)} of {len(SEGMENTS)} scenarios" in text
    assert text.count("**Loaded from outside**") >= 6  # the sentence under each scenario's table
    assert "45% / 50%" in text  # outside mean / max in the time table


def test_pooled_worse_than_direct_is_flagged_with_pgbouncers_wait_and_the_trace() -> None:
    text = render(figures(direct99=10.5, pooled99=40.5, bouncer_wait=0.42))
    assert "**Contradicts the expected direction**: through pgbouncer the p99 is 40.5 ms, worse than direct (10.5 ms)" \
        in text
    assert "waiting for a CPU 42% of the time" in text
    assert f"]({report.TRACE})" in text
    assert "**no**" in target_row(text, "(a) at 60% of direct throughput")
    assert "flagged" not in render(figures(direct99=40.0, pooled99=10.0))


def test_home_tail_explanation_follows_the_lookup_on_the_same_path() -> None:
    slow_path = render(figures(peak99=9.9, pk_peak99=4.5))
    assert "already has a p99 of 4.50 ms (> 2 ms): the path" in slow_path
    assert "2.2x" in target_row(slow_path, "(d) home page p99")
    heavy_queries = render(figures(peak99=3.0, pk_peak99=0.5))
    assert "takes 6.0x that: beyond its two round trips, the queries' own work adds about 4.0 lookups' worth" \
        in heavy_queries
    assert "the path (client, pgbouncer, server) sets the tail" not in heavy_queries


def test_the_check_is_reported_against_the_floor_of_the_same_run() -> None:
    """Issue 16: the one-round-trip check's p50/p99 beside a primary-key lookup, as a ratio, in the targets."""
    quick = render(figures(check50=0.4, pk50=0.1))
    assert "yes" in target_row(quick, "one-round-trip refresh check p50 <= 1 ms")
    assert "p50 4.0x the lookup's 0.100 ms" in target_row(quick, "the check against the floor")
    assert "four round trips" not in quick and "a check <= 1 ms" not in quick
    slow = render(figures(check50=2.5, pk50=0.25, check_server=1.5, pk_server=0.02))
    assert "**no**" in target_row(slow, "one-round-trip refresh check p50 <= 1 ms")
    assert "a check takes 2.50 ms at p50, 10.0x a primary-key lookup on the same session (0.250 ms); the server " \
        "executes it in 1.50 ms: most of the check is the server's work" in slow


def test_the_run_time_is_a_target_and_its_overruns_are_named() -> None:
    results = figures(seconds=700.0)
    results["durations"]["2. 500 clients"] = 95.0
    text = render(results)
    assert "**no**" in target_row(text, "`make bench` within 10 minutes")
    assert "700 s against 600 s. Over their budget: 2. 500 clients by 55 s." in text
    assert "yes" in target_row(render(figures(seconds=500.0)), "`make bench` within 10 minutes")
    assert "| search | not run | 25 s (reserved) |" in text


def test_writes_after_a_restart_miss_the_operator_target() -> None:
    """Issue 14: zero API writes after a restart is part of the target, not only zero DDL (writes of
    a run without a trace of each write count as spurious)."""
    text = render(figures(fleet_writes=3))
    assert "**no**" in target_row(text, "no spurious API write and zero DDL after a restart")
    assert "after the restart 9 API writes (9 spurious) and 0 DDL statements (marketplacedbs/status 3 in run 1)" in text
    assert "yes" in target_row(render(figures()), "no spurious API write and zero DDL after a restart")


def test_no_explanation_written_for_another_run_remains() -> None:
    text = render(figures())
    for stale in ("5,800 tx/s", "10x better", "(5 indexes", "2.10 ms", "four round trips"):
        assert stale not in text
    assert "7 indexes (2 of them not b-tree), 2 views" in text


def test_the_fleet_run_renders_on_its_own() -> None:
    results = figures()
    del results["workbench"]
    results["fleet"] = {"1000": results["fleet"]["100"][:1], "database_create_seconds": 60.0, "databases": 1000}
    results["budget"]["limit_seconds"] = None
    text = report.render(results, {}, command="make bench-fleet")
    assert text.startswith("# Benchmark: the operator at N = 1,000 resources")
    assert "yes" in target_row(text, "1,000 resources Ready")


def test_the_full_runs_budget_leaves_a_margin_under_ten_minutes() -> None:
    """The design, not a timing: every segment `make bench` logs has a budget, and all of them with
    the time reserved for scenarios being added stay at or under 90% of the 10-minute limit."""
    labels = run.segments(run.FULL)
    assert set(run.BUDGET["full"]) == set(labels.values())
    total = sum(run.BUDGET["full"].values()) + sum(run.RESERVED["full"].values())
    assert total <= 0.9 * run.LIMIT_SECONDS["full"], total


def test_the_targets_show_how_stable_each_figure_was_across_the_runs() -> None:
    """Issue 19: say how stable the figures are: the spread of the three runs beside each median."""
    results = figures()
    for value, run_figures in zip((3.0, 4.0, 5.0), results["workbench"]["check"], strict=True):
        run_figures["rt_ratio_p50"] = value
    row = target_row(render(results), "the check against the floor")
    assert "p50 4.0x" in row and "| 50% |" in row  # (5 - 3) / 4


def test_a_check_cheaper_than_a_lookup_and_pooled_memory_above_direct_are_flagged() -> None:
    results = figures(check50=0.15, pk50=0.25)
    for run_figures in results["workbench"]["peak"]:
        run_figures["pooled_flat_backend_rss_mib"] = 3500.5
    text = render(results)
    assert "**Contradicts the expected direction** (a check is a round trip plus server work: it should not be " \
        "cheaper than a lookup): lookup p50 0.250 ms is worse than check p50 0.150 ms." in text
    assert "(fewer server connections should take less server memory): pooled, sum of RSS 3,500 MiB is worse than " \
        "direct, sum of RSS 3,000 MiB" in text
    assert "Contradicts" not in render(figures())


def test_a_failed_direct_run_is_not_read_as_a_side_by_side_comparison() -> None:
    """A full run's direct rated runs failed at connection time in 2 of 3 runs (the pooled run had
    left its server connections open); the target read the one that worked as "yes"."""
    results = figures(direct99=300.0, pooled99=3.0)
    for broken in results["workbench"]["peak"][0], results["workbench"]["peak"][2]:
        broken.update({"direct_rate_p99_ms": math.nan, "direct_rate_p50_ms": math.nan, "direct_rate_failed": 1,
                    "direct_rate_error": "pgbench: error: ... remaining connection slots are reserved",
                    "p99_ratio": math.nan})
    row = target_row(render(results), "(a) at 60% of direct throughput")
    assert "the direct run failed in 2 of 3 runs" in row and "**no**" in row, row
    assert "yes" in target_row(render(figures(direct99=300.0, pooled99=3.0)), "(a) at 60% of direct throughput")
