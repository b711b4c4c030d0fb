"""bench/REPORT.md, sections 3 to 6 and the setup notes (sections 1 and 2: bench/report.py).
Every "why" sentence is computed from figures of the same run, or says the cause is unknown."""

from __future__ import annotations

import math
from typing import Any

from .report_kit import (
    UNKNOWN,
    Targets,
    against_expectation,
    load_line,
    loaded_note,
    med,
    num,
    run_rows,
    runs_header,
    table,
)


def refresh_section(results: dict[str, Any], targets: Targets, plot_files: dict[str, str]) -> list[str]:
    wb = results["workbench"]
    runs = wb["refresh"]
    lines = ["## 3. Refreshing the views under read load", "",
             "Home pages are read through the views at 1,160 pages/s (8 clients, pgbench `-R`) while both views "
             "are refreshed: *plain* is `REFRESH MATERIALIZED VIEW` (what a pg_cron job usually runs: an ACCESS "
             "EXCLUSIVE lock, readers wait), *concurrent* is the project's refresh (`run_refresh`, the code behind "
             "`marketplacedb refresh` and the CronJobs: advisory lock, `REFRESH ... CONCURRENTLY`, state table). "
             "Each runs under a read load of its own (the order alternates between runs). "
             "A read counts when it was in flight during the refresh; its latency includes time spent waiting. "
             "WAL is what the server wrote during the refresh (the readers write none).",
             ""]
    rows = run_rows(runs, [
        ("plain: refresh duration", "plain_refresh_s", "s"), ("plain: longest read", "plain_longest_ms", "ms"),
        ("plain: p99 read during refresh", "plain_p99_ms", "ms"),
        ("plain: seconds with no read completed", "plain_stall_seconds", ""),
        ("plain: longest gap between reads", "plain_longest_gap_ms", "ms"),
        ("plain: WAL written", "plain_wal_mib", "MiB"),
        ("concurrent: refresh duration", "concurrent_refresh_s", "s"),
        ("concurrent: longest read", "concurrent_longest_ms", "ms"),
        ("concurrent: p99 read during refresh", "concurrent_p99_ms", "ms"),
        ("concurrent: seconds with no read completed", "concurrent_stall_seconds", ""),
        ("concurrent: longest gap between reads", "concurrent_longest_gap_ms", "ms"),
        ("concurrent: WAL written", "concurrent_wal_mib", "MiB")])
    lines += table(runs_header("both views", runs), rows)
    lines += load_line(results, "3.")
    lines += against_expectation("a concurrent refresh should not hold readers longer than a plain one",
                                 med(runs, "plain_longest_ms"), med(runs, "concurrent_longest_ms"),
                                 "plain refresh, longest read", "concurrent refresh, longest read")
    if "refresh" in plot_files:
        lines += [f"![reads completed during a refresh]({plot_files['refresh']})", ""]
    stalls = sum(int(r.get("concurrent_stall_seconds") or 0) for r in runs)
    longest = med(runs, "concurrent_longest_ms")
    plain_longest = med(runs, "plain_longest_ms")
    targets.add("zero stall seconds and longest read <= 50 ms during a concurrent refresh",
                f"{stalls} stall seconds, longest read {num(longest, 'ms')}", stalls == 0 and longest <= 50,
                lambda: f"{stalls} second(s) without a completed read over the runs, longest read "
                        f"{num(longest, 'ms')} against {num(plain_longest, 'ms')} with a plain refresh in the same "
                        "runs. The readers' wait is not broken down by this run (lock, CPU or I/O): "
                        + UNKNOWN + loaded_note(results, "3."))
    outside = [f"run {i}: {mode}" for i, r in enumerate(runs, 1) for mode in ("plain", "concurrent")
               if r.get(f"{mode}_inside_load") is False]
    if outside:
        lines += ["Note: the read load ended before the refresh did in " + ", ".join(outside)
                  + "; those windows' stall figures include time with no load at all.", ""]
    return lines


def skip_section(results: dict[str, Any], targets: Targets) -> list[str]:
    wb = results["workbench"]
    runs = wb["skip"]
    lines = ["## 4. Skip-if-unchanged vs always refreshing", "",
             "An hour of the example's schedules (`*/5` for mv_hot_products, `*/10` for mv_category_counts) with no "
             "writes, run through the project's refresh with the clock advanced to each tick (maxStaleness 1 h is "
             "not reached). *Always refreshing* (pg_cron's behaviour: it has no notion of unchanged) would run every "
             "tick; its cost is the same number of refreshes times a forced refresh measured in the same run. "
             "A check: advisory lock, one catalog query comparing the base tables' write counters, a state-table "
             "update, unlock.", ""]
    rows = run_rows(runs, [
        ("scheduled runs in the hour", "period_runs", ""), ("refreshes with skip-if-unchanged", "period_refreshes", ""),
        ("skipped (unchanged)", "period_skipped", ""), ("time spent checking", "period_check_seconds", "s"),
        ("WAL written by the checks", "period_wal_kib", "KiB"),
        ("one check, p50", "check_p50_ms", "ms"), ("one check, p99", "check_p99_ms", "ms"),
        ("refreshes when always refreshing", "always_refreshes", ""),
        ("time spent refreshing (always)", "always_seconds", "s"),
        ("WAL written (always)", "always_wal_mib", "MiB")])
    lines += table(runs_header("one hour, no writes", runs), rows)
    lines += load_line(results, "4.")
    refreshes = sum(int(r.get("period_refreshes") or 0) for r in runs)
    check = med(runs, "check_p50_ms")
    floor = med(wb["home_after"], "floor_p50_ms")
    trips = check / floor if floor and not math.isnan(floor) else math.nan

    def why() -> str:
        text = f"{refreshes} refreshes; a check took {num(check, 'ms')} (p50)."
        if not math.isnan(trips):
            text += (f" That is {trips:.1f} times a primary-key round trip measured in this run "
                     f"({num(floor, 'ms')}, scenario 1): the check's cost is in line with its round trips "
                     "(advisory lock, catalog query, state record, unlock) from Python." if trips <= 6 else
                     f" That is {trips:.1f} times a primary-key round trip of this run ({num(floor, 'ms')}): more "
                     "than its four round trips explain. " + UNKNOWN)
        return text + loaded_note(results, "4.")

    targets.add("zero refreshes when nothing changed, a check <= 1 ms", f"{refreshes} refreshes, check p50 "
                f"{num(check, 'ms')}", refreshes == 0 and check <= 1, why)
    return lines


def build_section(results: dict[str, Any], targets: Targets) -> list[str]:
    wb = results["workbench"]
    runs = wb["build"]
    lines = ["## 5. Index builds under a write load", "",
             "Writes (a sale: `UPDATE seller_products SET sold_count = sold_count + 1`, 500/s, 8 clients) while an "
             "index on seller_products (price, id) is built: *plain* `CREATE INDEX` (a SHARE lock: writes wait for "
             "the whole build) vs the operator's executor (the code behind `marketplacedb apply`), which builds "
             "`CONCURRENTLY`. Each build runs under a write load of its own (the order alternates between runs); "
             "latency counts from each write's scheduled start.", ""]
    rows = run_rows(runs, [
        ("plain: build duration", "plain_build_s", "s"), ("plain: longest write", "plain_longest_ms", "ms"),
        ("plain: p99 write during the build", "plain_p99_ms", "ms"),
        ("plain: seconds with no write completed", "plain_stall_seconds", ""),
        ("concurrent: build duration", "concurrent_build_s", "s"),
        ("concurrent: longest write", "concurrent_longest_ms", "ms"),
        ("concurrent: p99 write during the build", "concurrent_p99_ms", "ms"),
        ("concurrent: seconds with no write completed", "concurrent_stall_seconds", "")])
    lines += table(runs_header("index build", runs), rows)
    lines += load_line(results, "5.")
    lines += against_expectation("a concurrent build should not hold writers longer than a plain one",
                                 med(runs, "plain_longest_ms"), med(runs, "concurrent_longest_ms"),
                                 "plain build, longest write", "concurrent build, longest write")
    return lines


def operator_section(results: dict[str, Any], targets: Targets, plot_files: dict[str, str]) -> list[str]:
    fleet = results["fleet"]
    lines = ["## 6. The operator: N resources", "",
             "Each resource is the example resource (5 indexes, 2 views, a pooler with 2 replicas, probes on 3 "
             "Deployments of its own) on **a database of its own** (the reference schema with 1,000 products, "
             "copied from a template) owned by a login role of its own: what a platform team's tenants look like. "
             "All databases live on one PostgreSQL because this is one machine. The operator is the real "
             "`marketplacedb run` process (with its defaults: resync 300 s, JSON logs) against the KMock API "
             "emulator in another process; resident memory is the operator process's own (VmRSS/VmHWM). KMock "
             "runs no controllers: a Deployment is stored with its replicas ready at once (the bench measures the "
             "operator, not pod start-up). All N resources are created at once, as a GitOps sync would.",
             "",
             "*Idle resync*: the operator is restarted and reconciles every resource once with nothing to do (the "
             "same level-based reconcile its 300 s timer runs; a restart makes all N happen now instead of over "
             "five minutes). API writes and DDL are counted on the API emulator and in PostgreSQL's log "
             "(`log_statement = ddl`).", ""]
    for count, runs in ((k, v) for k, v in fleet.items() if k.isdigit()):
        lines += [f"### N = {int(count):,}", ""]
        lines += table(runs_header(f"{int(count):,} resources", runs), run_rows(runs, [
            ("all Ready", "all_ready", ""), ("time until all Ready", "ready_all_s", "s"),
            ("time until half Ready", "ready_p50_s", "s"),
            ("reconciles until all Ready", "reconciles_until_ready", ""),
            ("first reconcile, p50", "reconcile_p50_ms", "ms"), ("first reconcile, p99", "reconcile_p99_ms", "ms"),
            ("API writes per resource (first reconcile)", "api_writes_per_resource", ""),
            ("DDL statements per resource", "ddl_per_resource", ""),
            ("resident memory before any resource", "rss_start_mib", "MiB"),
            ("resident memory, all Ready", "rss_ready_mib", "MiB"),
            ("peak resident memory", "rss_peak_mib", "MiB"),
            ("idle resync of all N: duration", "idle_pass_s", "s"),
            ("idle reconcile, p50", "idle_reconcile_p50_ms", "ms"),
            ("idle reconcile, p99", "idle_reconcile_p99_ms", "ms"),
            ("idle resync: API writes (all N)", "idle_api_writes", ""),
            ("idle resync: API reads per reconcile", "idle_api_reads_per_reconcile", ""),
            ("idle resync: DDL statements (all N)", "idle_ddl", ""),
            ("resident memory after the idle resync (restarted process)", "rss_after_resync_mib", "MiB")]))
        lines += load_line(results, f"6. operator with {count} ")
        writes = runs[0].get("writes_by_resource", {})
        if writes:
            lines += ["API writes of the first reconciles, by resource type (run 1): "
                      + ", ".join(f"{k} {v:,}" for k, v in sorted(writes.items())), ""]
        idle = runs[0].get("idle_writes_by_resource", {})
        if idle:
            lines += ["API writes during the idle resync, by resource type (run 1): "
                      + ", ".join(f"{k} {v:,}" for k, v in sorted(idle.items()))
                      + ". Writes to `marketplacedbs` itself (not `/status`) are not status updates by reconcile(); "
                      "they were not traced request by request in this run: " + UNKNOWN, ""]
    if "operator" in plot_files:
        lines += [f"![resources Ready over time]({plot_files['operator']})", ""]
    lines += [f"Creating the databases took {fleet.get('database_create_seconds', math.nan):.0f} s for "
              f"{fleet.get('databases', 0):,} databases (not part of any figure above).", ""]
    biggest = max((k for k in fleet if k.isdigit()), key=int, default=None)
    if biggest is not None:
        runs = fleet[biggest]
        rss = max(float(r.get("rss_peak_mib") or math.nan) for r in runs)
        # The idle resync is measured up to the scale's idle_resync_max: take the largest N that has it.
        idle_n = max((k for k in fleet if k.isdigit() and any(r.get("idle_resync", True) for r in fleet[k])),
                     key=int, default=biggest)
        ddl = sum(int(r.get("idle_ddl") or 0) for r in fleet[idle_n])
        idle_writes = sum(int(r.get("idle_api_writes") or 0) for r in fleet[idle_n])
        ready = all(r.get("all_ready") for r in runs)
        label = (f"{int(biggest):,} resources Ready, operator memory <= 150 MiB, zero DDL on idle resync "
                 f"(idle resync measured at N = {int(idle_n):,})")
        if int(biggest) < 1000:
            label += f" (quick: N = {int(biggest)})"
        base = min(float(r.get("rss_start_mib") or math.nan) for r in runs)
        per = (rss - base) / int(biggest) if int(biggest) else math.nan
        targets.add(label, f"Ready: {'yes' if ready else 'no'}, peak {num(rss, 'MiB')}, idle DDL {ddl}, "
                    f"idle writes {idle_writes}", ready and rss <= 150 and ddl == 0,
                    lambda: f"peak resident memory {num(rss, 'MiB')}: {num(base, 'MiB')} before any resource plus "
                            f"{num(per * 1024, 'KiB')} per resource in this run; idle DDL {ddl}; all Ready: {ready}. "
                            "What the per-resource memory holds was not profiled: " + UNKNOWN)
    return lines


def setup_notes(results: dict[str, Any]) -> list[str]:
    wb, scale, fleet = results["workbench"], results["scale"], results["fleet"]
    timings = wb.get("timings", {})
    return ["## How the servers were set up", "",
            "- PostgreSQL 15 started by the test harness (`tests/harness/postgres.py`) on 127.0.0.1: "
            "shared_buffers 512MB, max_wal_size 4GB, maintenance_work_mem 256MB, full_page_writes on, **fsync off** "
            "and synchronous_commit off (as in the tests: this VM's shared disk would otherwise dominate every write "
            "figure; WAL volumes are still measured). SCRAM authentication on TCP, as in production.",
            f"- Workload: {scale['products']:,} products loaded in {timings.get('load_seconds', math.nan):.0f} s, "
            f"then `VACUUM (ANALYZE)` ({timings.get('vacuum_seconds', math.nan):.0f} s, what autovacuum does on a "
            f"live database); `marketplacedb apply` took {timings.get('apply_seconds', math.nan):.1f} s "
            "(5 indexes CONCURRENTLY, 2 views populated, 3 database settings).",
            "- pgbouncer 1.18 (`tests/harness/pgbouncer.py`) runs the `pgbouncer.ini` and auth file rendered by "
            "`specs/pgbouncer.py` for the example (transaction mode, SCRAM with the server's own verifier), pool "
            "sized by `specs/pooler_sizing.py` from the server's real max_connections; only ports and paths differ.",
            "- pgbench 15 runs on the same CPUs as PostgreSQL and pgbouncer: every figure includes that "
            "contention, as a single-host setup would. The machine's load is sampled every 0.5 s through the "
            "run (`bench/load.py`) and printed beside each scenario.",
            "- Scenario 6 uses a second PostgreSQL whose data directory is on tmpfs (/dev/shm, when it has room), "
            "because CREATE DATABASE copies the template and checkpoints twice: here "
            f"{fleet.get('database_create_seconds', math.nan) / max(1, fleet.get('databases', 0) or 1):.2f} s per "
            "database.",
            ""]
