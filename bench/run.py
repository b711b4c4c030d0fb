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
from .scenarios import home, indexes, operator_scale, pooling, refresh, refresh_check, search
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
    check_runs: int  # scenario 4b: checks and primary-key lookups, alternating, per run
    forced: int  # forced refreshes per view per run (the cost of always refreshing)
    fleet: tuple[tuple[int, int], ...]  # (resources, runs) for scenario 6
    idle_resync_max: int  # scenario 6 measures the idle resync (a restart) up to this many resources
    peak_clients: int = pooling.PEAK_CLIENTS
    many_clients: int = pooling.MANY_CLIENTS
    runs: int = 3


QUICK = Scale("quick", products=100_000, base_pages=1, indexed_pages=5, view_pages=1000, home_peak_seconds=2,
              peak_seconds=1, flat_seconds=1, many_seconds=1, refresh_seconds=2, build_seconds=2, lead_seconds=0.5,
              check_runs=200, forced=1, fleet=((20, 3),), idle_resync_max=20, peak_clients=50, many_clients=200)
# `make bench` must take at most 10 minutes on this 2-core machine when it is quiet. The previous
# full run took 19 (2 M products; N = 1,000 alone took 9: 1 to create the databases, 5 to Ready, 3
# for the idle resync after a restart). N = 1,000 cannot fit beside the rest, so it has a run of
# its own (FLEET, `make bench-fleet`). Here: 1 M products (loading, "before" pages and index builds
# take half as long as at 2 M), windows just long enough for the event they measure (a refresh or
# build of ~1-2 s at 1 M starts 0.5 s into a 4 s window), three runs each so the report shows the
# spread. BUDGET is the design: seconds per segment of the log, estimated from the per-scenario
# times of quick runs, the phases of the last full run and the code (pgbench -T = window + warm-up
# + the calibrated connection allowance, see bench/pgbench.py). The runner prints each segment's
# wall time beside its budget, and the report compares them.
FULL = Scale("full", products=1_000_000, base_pages=1, indexed_pages=5, view_pages=2000, home_peak_seconds=3,
             peak_seconds=3, flat_seconds=2, many_seconds=1, refresh_seconds=4, build_seconds=4, lead_seconds=0.5,
             check_runs=500, forced=1, fleet=((100, 3),), idle_resync_max=100)
# `make bench-fleet`: scenario 6 alone at N = 1,000, once (create until all Ready, restart, idle
# resync: the writes after a restart and the peak memory of issue 14). 29 minutes measured on a
# loaded machine (the restarted operator runs under tracemalloc for the memory profile).
FLEET = dataclasses.replace(FULL, name="fleet", fleet=((1000, 1),), idle_resync_max=1000)



def segments(scale: Scale) -> dict[str, str]:
    """The log's segment labels (its text before ":"), by key: the budget and the runner share them."""
    return {
        "describe": f"bench {scale.name}", "setup": f"PostgreSQL + workload ({scale.products:,} products)",
        "before": "1. home page before the operator", "apply": "marketplacedb apply -f examples/marketplacedb.yaml",
        "after": "1. home page after", "peak": f"2. {scale.peak_clients:,} clients",
        "restart": "restart PostgreSQL with max_connections = 100 (and the pooler re-rendered for it)",
        "many": f"2. {scale.many_clients:,} clients", "refresh": "3. refresh under reads",
        "skip": "4. skip-if-unchanged", "check": "4b. refresh check beside a primary-key lookup",
        "build": "5. index builds under writes", "fleet": "6. fleet server and template database",
        "search": "7. product search without/with the trigram index",
        **{f"fleet {count}": f"6. operator with {count:,} resources" for count, _ in scale.fleet},
    }


FULL_BUDGET = {  # seconds per segment of `make bench` on a quiet machine
    "describe": 3,
    "setup": 25,
    "before": 20,  # 3 x one base page (~6 s at 1 M)
    "apply": 25,  # 7 indexes (2 GIN) and 2 views at 1 M
    "after": 42,  # 3 x (5 indexed pages ~3 s, 3 x 2,000 single-client round trips, 2 x 4 s at 1,160/s)
    "peak": 90,  # 3 x 4 pgbench runs of 500 clients (2-3 s + connecting: 4-12 ms per client measured)
    "restart": 3,
    "many": 55,  # 3 x (best direct, 2,000 direct refused, 2,000 pooled: 1 s + connecting)
    "refresh": 33,  # 3 x 2 modes x 5 s
    "skip": 12,  # 3 x (2 forced refreshes, 1.2 s for statistics, 18 checks)
    "check": 9,  # 3 x (a refresh, 1 s for statistics, 2 x 500 round trips, 2 x 100 EXPLAIN ANALYZE)
    "build": 36,  # 3 x 2 modes x (5 s + the cleanup apply)
    "search": 25,  # 3 x (2 s without the index, the CONCURRENTLY build ~4 s at 1 M, 1 s with it)
    "fleet": 3,
    "fleet 100": 150,  # 3 x (~9 s of set-up and restarts, ~30 s to Ready at 0.3 s per resource, ~10 s idle resync)
}
BUDGET: dict[str, dict[str, float]] = {  # scale -> segment label -> seconds
    "full": {segments(FULL)[key]: seconds for key, seconds in FULL_BUDGET.items()},
}
# Time kept free for scenarios other helpers are adding (not run yet: no segment in the log). When
# one is registered, give it a key in segments() and move its seconds from here to FULL_BUDGET.
RESERVED: dict[str, dict[str, float]] = {"full": {}}
LIMIT_SECONDS = {"full": 600.0}  # issue 19: `make bench` at most 10 minutes (no limit for the others)


class Log:
    """Progress on stderr, with the machine's load at each step. Each message's text before the
    first ":" names a segment of the load sampler (a scenario); when a segment ends, how busy the
    CPUs were during it, and how much of that came from outside the bench, is printed."""

    def __init__(self, sampler: load.LoadSampler | None = None, budget: dict[str, float] | None = None) -> None:
        self.started = time.monotonic()
        self.budget = budget or {}
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
        budget = self.budget.get(self.segment)
        planned = f" (budget {budget:.0f} s{', OVER' if spent > budget else ''})" if budget is not None else ""
        text = f"{'':>20}  {self.segment}: {spent:.0f} s{planned}"
        if seg:
            flag = "  ** LOADED FROM OUTSIDE **" if seg["loaded"] else ""
            text += (f"; CPUs busy {seg['busy']:.0%} (bench {seg['bench']:.0%}, outside {seg['outside']:.0%})"
                     f"{flag}")
        print(text, file=sys.stderr, flush=True)

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
    seg = segments(scale)
    log(seg["setup"])
    bench = env.start(scale.products, workdir)
    try:
        scripts = Scripts(workdir / "scripts", scale.products)
        out: dict[str, Any] = {"timings": bench.timings}
        out["home_before"] = _runs(log, seg["before"], scale.runs,
                                   lambda _: home.before_operator(bench, scripts, scale.base_pages))
        out["search"] = _runs(log, seg["search"], scale.runs,
                              lambda _: search.product_search(bench, workdir / "search"))
        log(seg["apply"])
        out["apply"] = bench.apply_example()
        bench.start_pooler()
        out["home_after"] = _runs(log, seg["after"], scale.runs, lambda _: home.after_operator(
            bench, scripts, indexed_pages=scale.indexed_pages, pages=scale.view_pages,
            peak_seconds=scale.home_peak_seconds))
        out["peak"] = _runs(log, seg["peak"], scale.runs, lambda _: pooling.peak(
            bench, scripts, seconds=scale.peak_seconds, flat_seconds=scale.flat_seconds, clients=scale.peak_clients))
        log(seg["restart"])
        bench.set_max_connections(100)
        out["many"] = _runs(log, seg["many"], scale.runs,
                            lambda _: pooling.many_clients(bench, scripts, seconds=scale.many_seconds,
                                                         clients=scale.many_clients))
        out["refresh"] = _runs(log, seg["refresh"], scale.runs, lambda n: refresh.under_reads(
            bench, scripts, seconds=scale.refresh_seconds, lead=scale.lead_seconds, number=n))
        out["skip"] = _runs(log, seg["skip"], scale.runs,
                            lambda _: refresh.skip_if_unchanged(bench, forced=scale.forced))
        # Right after 4 (nothing written since its refreshes): every check must skip.
        out["check"] = _runs(log, seg["check"], scale.runs,
                             lambda _: refresh_check.side_by_side(bench, scale.check_runs))
        out["build"] = _runs(log, seg["build"], scale.runs, lambda n: indexes.under_writes(
            bench, scripts, seconds=scale.build_seconds, lead=scale.lead_seconds, number=n))
        out["pool_sizes"] = {k: v for k, v in bench.timings.items() if k.startswith("pool_size")}
        return out
    finally:
        bench.close()


def run_fleet(scale: Scale, workdir: Path, log: Log) -> dict[str, Any]:
    """Scenario 6 on its own server (a database per resource)."""
    seg = segments(scale)
    log(seg["fleet"])
    fleet = operator_scale.Fleet(workdir / "fleet")
    try:
        out: dict[str, Any] = {}
        for count, runs in scale.fleet:
            timeout = 120 + count * 1.0
            def once(_: int, c: int = count, t: float = timeout) -> dict[str, Any]:
                return operator_scale.run_once(fleet, c, workdir / f"fleet-{c}-{time.monotonic_ns()}",
                                               ready_timeout=t, idle_timeout=t, idle_resync=c <= scale.idle_resync_max,
                                               trace_restart=scale.name == "fleet")

            out[str(count)] = _runs(log, seg[f"fleet {count}"], runs, once)
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
    which.add_argument("--quick", action="store_true", help=f"{QUICK.products:,} products, N=20 (~3.5 min)")
    which.add_argument("--full", action="store_true", help=f"{FULL.products:,} products, N=100 (<= 10 min)")
    which.add_argument("--fleet", action="store_true", help="scenario 6 alone at N=1,000, once (~30 min)")
    parser.add_argument("--out", type=Path, default=HERE, help="where REPORT.md, results.json, plots/ go")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FLEET if args.fleet else FULL
    command = {"quick": "make bench-quick", "full": "make bench", "fleet": "make bench-fleet"}[scale.name]
    _raise_fd_limit()
    # SIGTERM (and SIGINT, which a background shell ignores) end the run through the `finally`
    # blocks, so that every server, process and temp dir (up to ~9 GB on /dev/shm) is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sampler = load.LoadSampler()
    budget = BUDGET.get(scale.name, {})
    log = Log(sampler, budget)
    log(f"{segments(scale)['describe']}: describing the machine")
    facts = machine.describe()
    started = datetime.datetime.now(datetime.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="mdb-bench-"))
    try:
        with sampler:
            results: dict[str, Any] = {"scale": dataclasses.asdict(scale), "machine": facts,
                                       "started": started.isoformat(timespec="seconds"),
                                       "example": env.example_facts(env.example_body())}
            if scale.name != "fleet":
                results["workbench"] = run_workbench(scale, workdir, log)
            results["fleet"] = run_fleet(scale, workdir, log)
            log.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.monotonic() - log.started
    results["loads"] = log.loads
    results["load"] = sampler.summary()
    results["durations"] = log.durations
    results["budget"] = {"segments": budget, "reserved": RESERVED.get(scale.name, {}),
                         "limit_seconds": LIMIT_SECONDS.get(scale.name)}
    facts["load_end"] = os.getloadavg()
    log("writing the report and plots")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "REPORT-fleet" if scale.name == "fleet" else "REPORT"
    plot_files = plots.draw(results, args.out / "plots")
    text = report.render(results, plot_files, command=command)
    (args.out / f"{name}.md").write_text(text)
    data = "results-fleet.json" if scale.name == "fleet" else "results.json"
    (args.out / data).write_text(json.dumps(report.compact(results), indent=1, default=str) + "\n")
    total, limit = time.monotonic() - log.started, LIMIT_SECONDS.get(scale.name)
    verdict = f" (limit {limit:.0f} s{', OVER' if total > limit else ''})" if limit else ""
    print(f"done in {total:.0f} s{verdict}: {args.out / (name + '.md')}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
