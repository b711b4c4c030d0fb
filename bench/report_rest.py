"""bench/REPORT.md, sections 3 to 6 and the setup notes (sections 1 and 2: bench/report.py).
Every "why" sentence is computed from figures of the same run, or says the cause is unknown."""

from __future__ import annotations

import math
from typing import Any

from .report_fleet import memory_lines, restart_lines, restart_rows
from .report_kit import (
    UNKNOWN,
    Targets,
    against_expectation,
    col,
    load_line,
    loaded_note,
    med,
    num,
    ratio,
    run_rows,
    runs_header,
    table,
)
from .scenarios.indexes import WRITE_CLIENTS, WRITE_RATE
from .scenarios.refresh import READ_CLIENTS, READ_RATE


def refresh_section(results: dict[str, Any], targets: Targets, plot_files: dict[str, str]) -> list[str]:
    wb = results["workbench"]
    runs = wb["refresh"]
    lines = ["## 3. Refreshing the views under read load", "",
             f"Home pages are read through the views at {READ_RATE:,} pages/s ({READ_CLIENTS} clients, pgbench `-R`) "
             "while both views "
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
             "Each run checks in one round trip (`marketplacedb.refresh_check_v3`: advisory lock, catalog check, "
             "skip record and unlock in one statement); its cost is 4b below.", ""]
    rows = run_rows(runs, [
        ("scheduled runs in the hour", "period_runs", ""), ("refreshes with skip-if-unchanged", "period_refreshes", ""),
        ("skipped (unchanged)", "period_skipped", ""), ("time spent checking", "period_check_seconds", "s"),
        ("WAL written by the checks", "period_wal_kib", "KiB"),
        ("refreshes when always refreshing", "always_refreshes", ""),
        ("time spent refreshing (always)", "always_seconds", "s"),
        ("WAL written (always)", "always_wal_mib", "MiB")])
    lines += table(runs_header("one hour, no writes", runs), rows)
    lines += load_line(results, "4.")
    refreshes = sum(int(r.get("period_refreshes") or 0) for r in runs)
    targets.add("zero refreshes when nothing changed", f"{refreshes} refreshes in {len(runs)} simulated hours",
                refreshes == 0, lambda: f"{refreshes} refreshes where the tables were not written: the outcomes' "
                "reasons are in results.json. " + UNKNOWN, issue="")
    return lines + check_section(results, targets)


def check_section(results: dict[str, Any], targets: Targets) -> list[str]:
    """4b: the one-round-trip check against the floor, measured side by side (issue 16)."""
    runs = results["workbench"].get("check", [])
    if not runs:
        return []
    count = runs[0].get("check_runs", 0)
    lines = ["### 4b. The check beside a primary-key lookup", "",
             f"{count:,} checks of `{runs[0].get('view', '?')}` (each skipped: nothing was written), alternating "
             f"with {count:,} primary-key lookups of random products, on one direct session of the owner (psycopg, "
             "as a CronJob pod connects): the same client, socket and moment, so the ratio is how many round "
             "trips' worth a check costs. *Server* is the execution time PostgreSQL itself reports (EXPLAIN "
             "ANALYZE, 100 of each), without the round trip.", ""]
    lines += table(runs_header("check vs floor", runs), run_rows(runs, [
        ("check p50", "rt_check_p50_ms", "ms"), ("check p99", "rt_check_p99_ms", "ms"),
        ("primary-key lookup p50", "rt_pk_p50_ms", "ms"), ("primary-key lookup p99", "rt_pk_p99_ms", "ms"),
        ("**check / lookup, p50**", "rt_ratio_p50", ""), ("check / lookup, p99", "rt_ratio_p99", ""),
        ("check, server execution p50", "rt_check_server_p50_ms", "ms"),
        ("lookup, server execution p50", "rt_pk_server_p50_ms", "ms")]))
    lines += load_line(results, "4b.")
    lines += against_expectation("a check is a round trip plus server work: it should not be cheaper than a lookup",
                                 med(runs, "rt_check_p50_ms"), med(runs, "rt_pk_p50_ms"), "check p50", "lookup p50")
    p50, p99, pk50 = med(runs, "rt_check_p50_ms"), med(runs, "rt_check_p99_ms"), med(runs, "rt_pk_p50_ms")
    r50, server = med(runs, "rt_ratio_p50"), med(runs, "rt_check_server_p50_ms")
    pk_server = med(runs, "rt_pk_server_p50_ms")
    targets.add("one-round-trip refresh check p50 <= 1 ms", f"p50 {num(p50, 'ms')}, p99 {num(p99, 'ms')}",
                p50 <= 1, lambda: why_check(p50, pk50, r50, server, pk_server) + loaded_note(results, "4b."),
                issue="#16", values=col(runs, "rt_check_p50_ms"))
    targets.add("the check against the floor (a primary-key lookup, same session, side by side)",
                f"p50 {ratio(r50)} the lookup's {num(pk50, 'ms')}, p99 {ratio(med(runs, 'rt_ratio_p99'))}", None,
                lambda: ("explained under *one-round-trip refresh check* above." if p50 > 1 else
                         why_check(p50, pk50, r50, server, pk_server) + loaded_note(results, "4b.")), issue="#16",
                values=col(runs, "rt_ratio_p50"))
    return lines


def why_check(p50: float, pk50: float, r50: float, server: float, pk_server: float) -> str:
    """Where a check's time goes: the server's execution vs the round trip, from the same run."""
    if any(math.isnan(v) for v in (p50, pk50, server)):
        return UNKNOWN
    trip = pk50 - (pk_server if not math.isnan(pk_server) else 0.0)  # a round trip without the lookup's work
    text = (f"a check takes {num(p50, 'ms')} at p50, {r50:.1f}x a primary-key lookup on the same session "
            f"({num(pk50, 'ms')}); the server executes it in {num(server, 'ms')}")
    if server >= 0.5 * p50:
        return text + ": most of the check is the server's work (the catalog check and the skip record), not " \
                      "round trips."
    return (text + f" and a bare round trip costs about {num(trip, 'ms')} (the lookup less its execution). The "
            f"remaining {num(max(0.0, p50 - server - trip), 'ms')} is outside both (the client's code, the larger "
            "reply): which of them is not established by this run's figures.")


SALE = "`UPDATE seller_products SET sold_count = sold_count + 1`"  # bench/scripts.py "sale", as described


def build_section(results: dict[str, Any], targets: Targets) -> list[str]:
    wb = results["workbench"]
    runs = wb["build"]
    lines = ["## 5. Index builds under a write load", "",
             f"Writes (a sale: {SALE}, {WRITE_RATE}/s, {WRITE_CLIENTS} clients) while an "
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


def describe_example(results: dict[str, Any]) -> str:
    """"7 indexes (2 of them GIN), 2 views, ..." from the example the run applied."""
    ex = results.get("example", {})
    if not ex:
        return "the example resource"
    other = f" ({ex['non_btree']} of them not b-tree)" if ex.get("non_btree") else ""
    return (f"{ex['indexes']} indexes{other}, {ex['views']} views, a pooler with {ex.get('pooler_replicas') or '?'} "
            f"replicas, probes on {ex['probes']} Deployments")


def operator_section(results: dict[str, Any], targets: Targets, plot_files: dict[str, str]) -> list[str]:
    fleet = results["fleet"]
    lines = ["## 6. The operator: N resources", "",
             f"Each resource is the example resource ({describe_example(results)} of its own) on **a database of "
             "its own** (the reference schema with 1,000 products, "
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
    if "workbench" in results:
        lines += ["N = 1,000 does not fit in this run's time limit: `make bench-fleet` measures it once, in a run "
                  "of its own ([REPORT-fleet.md](REPORT-fleet.md), when it has been run).", ""]
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
            *restart_rows(),
            ("idle resync: API reads per reconcile", "idle_api_reads_per_reconcile", ""),
            ("idle resync: DDL statements (all N)", "idle_ddl", ""),
            ("resident memory after the idle resync (restarted process; inflated by tracemalloc when profiled)",
             "rss_after_resync_mib", "MiB")]))
        lines += load_line(results, f"6. operator with {int(count):,} ")
        writes = runs[0].get("writes_by_resource", {})
        if writes:
            lines += ["API writes of the first reconciles, by resource type (run 1): "
                      + ", ".join(f"{k} {v:,}" for k, v in sorted(writes.items())), ""]
        idle = runs[0].get("idle_writes_by_resource", {})
        if idle:
            own = (" Writes to `marketplacedbs` itself (not `/status`) are not status updates by reconcile()."
                   if "marketplacedbs" in idle else "")
            lines += ["API writes during the idle resync, by resource type (run 1): "
                      + ", ".join(f"{k} {v:,}" for k, v in sorted(idle.items())) + "." + own, ""]
        lines += restart_lines(runs)
        if runs and runs[0].get("idle_memory_profile"):
            lines += memory_lines(runs, int(count))
    for name in ("operator", "operator-fleet"):
        if name in plot_files:
            lines += [f"![resources Ready over time]({plot_files[name]})", ""]
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
        # Older results have no trace: every write counts as spurious there.
        spurious = sum(int(r.get("idle_writes_spurious", r.get("idle_api_writes")) or 0) for r in fleet[idle_n])
        ready = all(r.get("all_ready") for r in runs)
        label = (f"{int(biggest):,} resources Ready, operator memory <= 150 MiB, no spurious API write "
                 f"and zero DDL after a restart (idle resync measured at N = {int(idle_n):,})")
        if int(biggest) < 1000:
            label += " (issue 14 asks for N = 1,000: `make bench-fleet`)"
        base = min(float(r.get("rss_start_mib") or math.nan) for r in runs)
        per = (rss - base) / int(biggest) if int(biggest) else math.nan

        def why() -> str:
            text = (f"all Ready: {'yes' if ready else 'no'}; peak resident memory {num(rss, 'MiB')}: "
                    f"{num(base, 'MiB')} before any resource plus {num(per * 1024, 'KiB')} per resource in this run "
                    "(where it goes: the section above); after the restart "
                    f"{idle_writes} API writes ({spurious} spurious) and {ddl} DDL statements")
            by_kind = fleet[idle_n][0].get("idle_writes_by_resource", {}) if fleet[idle_n] else {}
            if idle_writes and by_kind:
                text += " (" + ", ".join(f"{k} {v:,}" for k, v in sorted(by_kind.items())) + " in run 1)"
            return text + "."

        targets.add(label, f"Ready: {'yes' if ready else 'no'}, peak {num(rss, 'MiB')}, after restart: "
                    f"{idle_writes} writes ({spurious} spurious), {ddl} DDL",
                    ready and rss <= 150 and ddl == 0 and spurious == 0, why,
                    issue="#14")
    return lines


def _applied(results: dict[str, Any]) -> str:
    ex = results.get("example", {})
    if not ex:
        return "the example resource"
    extensions = f", extensions {', '.join(ex['extensions'])}" if ex.get("extensions") else ""
    return (f"{ex['indexes']} indexes CONCURRENTLY, {ex['views']} views populated, {ex['settings']} database "
            f"settings{extensions}")


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
            f"({_applied(results)}).",
            "- pgbouncer 1.18 (`tests/harness/pgbouncer.py`) runs the `pgbouncer.ini` and auth file rendered by "
            "`specs/pgbouncer.py` for the example (transaction mode, SCRAM with the server's own verifier), pool "
            "sized by `specs/pooler_sizing.py` from the server's real max_connections; only ports and paths differ.",
            "- pgbench 15 runs on the same CPUs as PostgreSQL and pgbouncer: every figure includes that "
            "contention, as a single-host setup would. The machine's load is sampled every 0.5 s through the "
            "run (`bench/load.py`) and printed beside each scenario. A transaction's latency is read after its "
            "last result (every script ends with a `\\set`: pgbench 15 otherwise logs a transaction answered "
            "before it looked, as on a loaded machine, with 0 us).",
            "- Scenario 6 uses a second PostgreSQL whose data directory is on tmpfs (/dev/shm, when it has room), "
            "because CREATE DATABASE copies the template and checkpoints twice: here "
            f"{fleet.get('database_create_seconds', math.nan) / max(1, fleet.get('databases', 0) or 1):.2f} s per "
            "database.",
            ""]
