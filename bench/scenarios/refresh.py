"""Scenarios 3 and 4: refreshing the views under read load, and not refreshing them at all.

3. Plain `REFRESH MATERIALIZED VIEW` (what a pg_cron job usually runs) vs the project's refresh
   (`run_refresh`: advisory lock, `REFRESH ... CONCURRENTLY`, state table), both views, while
   home pages are read at the design's peak rate: refresh duration, longest read, seconds in which
   no read completed, WAL written.
4. Skip-if-unchanged: an hour of the example's schedules (*/5 and */10) with no writes, through
   the project's refresh with the clock advanced per tick; and what refreshing every time (pg_cron's
   behaviour) would cost, from forced refreshes measured in the same run.
"""

from __future__ import annotations

import datetime
import functools
import time
from typing import Any

from psycopg import sql

from marketplacedb_operator.api.v1alpha1 import MaterializedViewSpec
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh
from marketplacedb_operator.refresh import RefreshOutcome, run_refresh

from .. import pgbench, stats
from ..env import Workbench
from ..scripts import Scripts
from .background import Background, wal_bytes, wal_lsn, window_figures

READ_RATE = 1160  # home pages per second, the design's peak
READ_CLIENTS = 8


def _views(bench: Workbench) -> list[MaterializedViewSpec]:
    return list(bench.spec.materialized_views)


def project_refresh(bench: Workbench, view: MaterializedViewSpec, *, force: bool,
                    now: datetime.datetime | None = None) -> RefreshOutcome:
    """One refresh exactly as the CronJob runs it (`marketplacedb refresh` calls the same code)."""
    with bench.connect() as conn:
        return run_refresh(PostgresRefresh(conn), view, now or datetime.datetime.now(datetime.UTC), force)


def _plain(bench: Workbench, views: list[MaterializedViewSpec]) -> None:
    with bench.connect() as conn:
        for view in views:
            conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}.{}").format(
                sql.Identifier(view.schema_name), sql.Identifier(view.name)))


def _concurrent(bench: Workbench, views: list[MaterializedViewSpec]) -> None:
    for view in views:
        outcome = project_refresh(bench, view, force=True)
        if outcome.outcome != "refreshed":
            raise RuntimeError(f"{view.name}: expected a concurrent refresh, got {outcome.outcome}: {outcome.reason}")


def under_reads(bench: Workbench, scripts: Scripts, *, seconds: float, lead: float, number: int = 1) -> dict[str, Any]:
    """One run: each mode under a read load of its own (a plain refresh leaves a backlog of
    delayed reads that would spill into the next window), refresh starting `lead` s in; the order
    alternates between runs."""
    views = _views(bench)
    modes = [("plain", _plain), ("concurrent", _concurrent)]
    if number % 2 == 0:
        modes.reverse()
    result: dict[str, Any] = {"order": "/".join(mode for mode, _ in modes), "timelines": {}}
    for mode, action in modes:
        load = Background(functools.partial(pgbench.run, f"reads-{mode}", bench.direct(), scripts.one("home_views"),
                                            clients=READ_CLIENTS, rate=READ_RATE, seconds=seconds))
        time.sleep(lead)
        with bench.superuser() as conn:
            lsn = wal_lsn(conn)
            start = time.time()
            action(bench, views)
            end = time.time()
            wal = wal_bytes(conn, lsn)
        reads = load.join()
        result |= {f"{mode}_refresh_s": end - start, f"{mode}_wal_mib": wal / 2**20,
                   f"{mode}_inside_load": bool(reads.completions) and end < max(reads.completions)}
        result |= window_figures(reads, start, end, mode)
        result["timelines"][mode] = {"completions": reads.completions, "start": start, "end": end,
                                     "origin": min(reads.starts, default=start)}
    return result


def skip_if_unchanged(bench: Workbench, *, forced: int) -> dict[str, Any]:
    """One run of scenario 4 (see the module docstring). The cost of one check beside a
    primary-key lookup is scenario 4b (bench/scenarios/refresh_check.py)."""
    views = _views(bench)
    base = datetime.datetime.now(datetime.UTC)
    forced_seconds: dict[str, list[float]] = {v.name: [] for v in views}
    forced_wal: dict[str, list[int]] = {v.name: [] for v in views}
    with bench.superuser() as conn:
        for view in views:
            for _ in range(forced):  # also records the counters the checks compare with
                lsn = wal_lsn(conn)
                outcome = project_refresh(bench, view, force=True, now=base)
                forced_seconds[view.name].append(outcome.seconds)
                forced_wal[view.name].append(wal_bytes(conn, lsn))
        lsn = wal_lsn(conn)
    # This session ended before the period: a session active since the last refresh and idle for
    # less than ~12 s may hold unreported writes, and the check would refresh (sql/refresh_stats.py).
    time.sleep(1.2)  # statistics are flushed at most once a second: let the refresh's own reach pg_stat
    outcomes: list[RefreshOutcome] = []
    hour = {v.name: _ticks_per_hour(v) for v in views}
    for view in views:
        step = datetime.timedelta(hours=1) / hour[view.name]
        for tick in range(1, hour[view.name] + 1):
            outcomes.append(project_refresh(bench, view, force=False, now=base + tick * step - _EPSILON))
    with bench.superuser() as conn:
        period_wal = wal_bytes(conn, lsn)
    refreshes = sum(1 for o in outcomes if o.outcome.startswith("refreshed"))
    always_seconds = sum(hour[n] * stats.median(s) for n, s in forced_seconds.items())
    always_wal = sum(hour[n] * stats.median(w) for n, w in forced_wal.items())
    return {
        "period_runs": len(outcomes),
        "period_refreshes": refreshes,
        "period_skipped": sum(1 for o in outcomes if o.outcome == "skipped-unchanged"),
        "period_check_seconds": sum(o.seconds for o in outcomes),
        "period_wal_kib": period_wal / 1024,
        "always_refreshes": sum(hour.values()),
        "always_seconds": always_seconds,
        "always_wal_mib": always_wal / 2**20,
        "refresh_s": {n: stats.median(s) for n, s in forced_seconds.items()},
    }


_EPSILON = datetime.timedelta(seconds=1)  # each tick a moment before the hour: within maxStaleness


def _ticks_per_hour(view: MaterializedViewSpec) -> int:
    """Runs per hour of the view's schedule: `*/N * * * *` gives 60/N; anything else hourly."""
    schedule = (view.refresh.schedule if view.refresh else None) or "@hourly"
    minute = schedule.split()[0] if len(schedule.split()) == 5 else ""
    if minute.startswith("*/") and minute[2:].isdigit():
        return 60 // int(minute[2:])
    return 1
