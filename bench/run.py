"""`python -m bench.run --quick|--full`: every scenario, three runs each, then REPORT.md and plots.

One command starts everything it measures on loopback (PostgreSQL 15, pgbouncer on the rendered
config, the KMock API emulator, the operator), loads the reference workload, applies the example
resource with `marketplacedb apply`, runs the scenarios in an order that keeps each one's
preconditions (the "before" home page needs the database as the operator finds it; the 2,000-client
test needs max_connections = 100), and writes bench/REPORT.md, bench/results.json, bench/plots/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import env, load, machine, plots, report
from .scenarios import home, indexes, operator_scale, pooling, refresh
from .scripts import Scripts

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    products: int
    base_pages: int  # home pages from the base tables without indexes, per run (seconds each at 2 M)
    indexed_pages: int
    view_pages: int  # single-client home pages through the views (and primary-key lookups), per run
    home_peak_seconds: int  # 1,160 home pages/s through pgbouncer
    peak_seconds: int  # 500 clients at 5,800 tx/s
    flat_seconds: int  # 500 clients flat out
    many_seconds: int  # 2,000 clients
    refresh_seconds: int  # the read load around one refresh (each mode has its own)
    build_seconds: int  # the write load around one index build
    lead_seconds: float  # load before the refresh/build starts
    checks: int  # skip-if-unchanged checks timed back to back
    forced: int  # forced refreshes per view per run (the cost of always refreshing)
    fleet: tuple[tuple[int, int], ...]  # (resources, runs) for scenario 6
    idle_resync_max: int  # scenario 6 measures the idle resync (a restart) up to this many resources
    peak_clients: int = pooling.PEAK_CLIENTS
    many_clients: int = pooling.MANY_CLIENTS
    runs: int = 3


QUICK = Scale("quick", products=100_000, base_pages=1, indexed_pages=5, view_pages=1000, home_peak_seconds=2,
              peak_seconds=1,
              flat_seconds=1, many_seconds=1, refresh_seconds=2, build_seconds=2, lead_seconds=0.5,
              checks=100, forced=1, fleet=((20, 3),), idle_resync_max=20, peak_clients=50, many_clients=200)
# Chosen for `make bench` <= 10 minutes (the previous full run took 19; its N = 1,000 phase alone
# took 9: 5 to Ready, 3 for an idle resync after a restart). The idle resync is measured at
# N = 100 (three runs), not at 1,000; the workload is 1 M products instead of 2 M (loading and the
# "before" pages take half as long); the runs are shorter. Three runs each, so the report shows
# the spread. Not yet verified by a full run on a quiet machine: the report prints each
# scenario's wall time, so the next full run shows where the minutes go.
FULL = Scale("full", products=1_000_000, base_pages=1, indexed_pages=5, view_pages=2000, home_peak_seconds=4,
             peak_seconds=3,
             flat_seconds=2, many_seconds=1, refresh_seconds=6, build_seconds=5, lead_seconds=1.0,
             checks=200, forced=1, fleet=((100, 3), (1000, 1)), idle_resync_max=1000)


class Log:
    """Progress on stderr, with the machine's load at each step. Each message's text before the
    first ":" names a segment of the load sampler (a scenario); when a segment ends, how busy the
    CPUs were during it, and how much of that came from outside the bench, is printed."""

    def __init__(self, sampler: load.LoadSampler | None = None) -> None:
        self.started = time.monotonic()
        self.loads: list[tuple[str, float]] = []
        self.sampler = sampler
        self.segment = ""
        self.segment_started = self.started
        self.durations: dict[str, float] = {}  # segment -> wall seconds

    def __call__(self, message: str) -> None:
        avg = os.getloadavg()[0]
        self.loads.append((message, avg))
        segment = message.split(":", 1)[0]
        if self.sampler is not None and segment != self.segment:
            self._print_segment()
            self.sampler.mark(segment)
            self.segment = segment
            self.segment_started = time.monotonic()
        print(f"[{time.monotonic() - self.started:6.1f}s load {avg:4.2f}] {message}", file=sys.stderr, flush=True)

    def _print_segment(self) -> None:
        if self.sampler is None or not self.segment:
            return
        spent = time.monotonic() - self.segment_started
        self.durations[self.segment] = self.durations.get(self.segment, 0.0) + spent
        seg = self.sampler.summary().get(self.segment)
        if seg:
            flag = "  ** LOADED FROM OUTSIDE **" if seg["loaded"] else ""
            print(f"{'':>20}  {spent:.0f} s; CPUs busy {seg['busy']:.0%} (bench {seg['bench']:.0%}, "
                  f"outside {seg['outside']:.0%}){flag}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._print_segment()
        self.sampler, self.segment = None, ""


def _runs(log: Log, label: str, count: int, once: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """`once(number)` for number 1..count."""
    results = []
    for number in range(1, count + 1):
        log(f"{label}: run {number}/{count}")
        results.append(once(number))
    return results


def run_workbench(scale: Scale, workdir: Path, log: Log) -> dict[str, Any]:
    """Scenarios 1 to 5 on one server with the reference workload."""
    log(f"PostgreSQL + workload ({scale.products:,} products)")
    bench = env.start(scale.products, workdir)
    try:
        scripts = Scripts(workdir / "scripts", scale.products)
        out: dict[str, Any] = {"timings": bench.timings}
        out["home_before"] = _runs(log, "1. home page before the operator", scale.runs,
                                   lambda _: home.before_operator(bench, scripts, scale.base_pages))
        log("marketplacedb apply -f examples/marketplacedb.yaml")
        out["apply"] = bench.apply_example()
        bench.start_pooler()
        out["home_after"] = _runs(log, "1. home page after", scale.runs, lambda _: home.after_operator(
            bench, scripts, indexed_pages=scale.indexed_pages, pages=scale.view_pages,
            peak_seconds=scale.home_peak_seconds))
        out["peak"] = _runs(log, f"2. {scale.peak_clients} clients", scale.runs, lambda _: pooling.peak(
            bench, scripts, seconds=scale.peak_seconds, flat_seconds=scale.flat_seconds, clients=scale.peak_clients))
        log("restart PostgreSQL with max_connections = 100 (and the pooler re-rendered for it)")
        bench.set_max_connections(100)
        out["many"] = _runs(log, f"2. {scale.many_clients:,} clients", scale.runs,
                            lambda _: pooling.many_clients(bench, scripts, seconds=scale.many_seconds,
                                                         clients=scale.many_clients))
        out["refresh"] = _runs(log, "3. refresh under reads", scale.runs, lambda n: refresh.under_reads(
            bench, scripts, seconds=scale.refresh_seconds, lead=scale.lead_seconds, number=n))
        out["skip"] = _runs(log, "4. skip-if-unchanged", scale.runs,
                            lambda _: refresh.skip_if_unchanged(bench, checks=scale.checks, forced=scale.forced))
        out["build"] = _runs(log, "5. index builds under writes", scale.runs, lambda n: indexes.under_writes(
            bench, scripts, seconds=scale.build_seconds, lead=scale.lead_seconds, number=n))
        out["pool_sizes"] = {k: v for k, v in bench.timings.items() if k.startswith("pool_size")}
        return out
    finally:
        bench.close()


def run_fleet(scale: Scale, workdir: Path, log: Log) -> dict[str, Any]:
    """Scenario 6 on its own server (a database per resource)."""
    log("6. fleet server and template database")
    fleet = operator_scale.Fleet(workdir / "fleet")
    try:
        out: dict[str, Any] = {}
        for count, runs in scale.fleet:
            timeout = 120 + count * 1.0
            out[str(count)] = _runs(log, f"6. operator with {count} resources", runs, lambda _, c=count, t=timeout:
                                    operator_scale.run_once(fleet, c, workdir / f"fleet-{c}-{time.monotonic_ns()}",
                                                            ready_timeout=t, idle_timeout=t,
                                                            idle_resync=c <= scale.idle_resync_max))
        out["database_create_seconds"] = fleet.create_seconds
        out["databases"] = len(fleet.tenants)
        return out
    finally:
        fleet.close()


def _raise_fd_limit() -> None:
    """2,000 clients need more than the usual 1,024 descriptors in pgbench and pgbouncer (children
    inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_true", help=f"{QUICK.products:,} products, N=20 (~2 minutes)")
    which.add_argument("--full", action="store_true", help=f"{FULL.products:,} products, N=100 and 1,000 (~10 min)")
    parser.add_argument("--out", type=Path, default=HERE, help="where REPORT.md, results.json, plots/ go")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    _raise_fd_limit()
    # SIGTERM (and SIGINT, which a background shell ignores) end the run through the `finally`
    # blocks, so that every server, process and temp dir (up to ~9 GB on /dev/shm) is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sampler = load.LoadSampler()
    log = Log(sampler)
    log(f"bench {scale.name}: describing the machine")
    facts = machine.describe()
    started = datetime.datetime.now(datetime.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="mdb-bench-"))
    try:
        with sampler:
            results: dict[str, Any] = {"scale": dataclasses.asdict(scale), "machine": facts,
                                       "started": started.isoformat(timespec="seconds")}
            results["workbench"] = run_workbench(scale, workdir, log)
            results["fleet"] = run_fleet(scale, workdir, log)
            log.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.monotonic() - log.started
    results["loads"] = log.loads
    results["load"] = sampler.summary()
    results["durations"] = log.durations
    facts["load_end"] = os.getloadavg()
    log("writing the report and plots")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_files = plots.draw(results, args.out / "plots")
    text = report.render(results, plot_files, command=f"make bench{'-quick' if args.quick else ''}")
    (args.out / "REPORT.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(report.compact(results), indent=1, default=str) + "\n")
    log(f"done in {results['seconds']:.0f} s: {args.out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
