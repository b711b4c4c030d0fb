"""pgbench, the PostgreSQL project's own load generator, driven from Python.

Why pgbench: it is what PostgreSQL people measure with, it is written in C (the client costs
little of the 2 cores), it throttles open-loop with `-R` (a late transaction is measured from
when it *should* have started, so queueing shows in the latency) and it logs every transaction
(`-l`), from which we take exact percentiles and completion timelines.
https://www.postgresql.org/docs/15/pgbench.html

The password goes through PGPASSWORD, never the command line. Every run is bounded by `-T` or
`-t` and by a subprocess timeout.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import stats
from ._harness import pg_bindir


@dataclasses.dataclass(frozen=True)
class Target:
    """Where pgbench connects (PostgreSQL directly, or pgbouncer)."""

    host: str
    port: int
    dbname: str
    user: str
    password: str = dataclasses.field(repr=False)
    path: str = "direct"  # "direct" or "pooled": each has its own connection cost (CONNECT below)


@dataclasses.dataclass
class Result:
    """One pgbench run: per-transaction latencies (ms) and completion times (epoch seconds)."""

    label: str
    clients: int
    rate: float | None
    seconds: float
    processed: int
    failed: int
    aborted_clients: int
    tps: float
    exit_code: int
    latencies_ms: list[float]
    completions: list[float]
    starts: list[float]
    scripts: list[int]
    error: str = ""
    connect_seconds: float = float("nan")  # pgbench's "initial connection time" (all clients)

    def p(self, q: float) -> float:
        return stats.percentile(self.latencies_ms, q)

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.aborted_clients == 0


def binary() -> str:
    return str(pg_bindir() / "pgbench")


def write_scripts(directory: Path, scripts: Mapping[str, str]) -> dict[str, Path]:
    paths = {}
    for name, text in scripts.items():
        path = directory / f"{name}.sql"
        path.write_text(text)
        paths[name] = path
    return paths


# pgbench's -T clock starts before the clients connect (measured: 500 clients with -T 1 processed
# nothing), and a SCRAM login costs a PBKDF2 (4,096 rounds) on the client plus, directly, a backend
# fork: 12 ms per client on this machine when loaded, a few ms when quiet. The run is stretched by
# an allowance for connecting, and only the `seconds` after a short warm-up are measured (from the
# log). The allowance is calibrated per path from the connection time pgbench itself reported on
# the previous run (with a margin): a fixed 10 ms per client wasted ~15 s per 2,000-client run on a
# quiet machine. Too short an allowance only shortens the measured window (figures stay right:
# tps is computed over the window that was measured; `seconds` in the result says how long).
CONNECT_SECONDS_PER_CLIENT = 0.010  # before the first run on a path has been measured
CONNECT_MARGIN = 1.5
CONNECT_BOUNDS = (0.002, 0.025)  # per client
WARMUP_SECONDS = 0.3
_connect_cost: dict[str, float] = {}  # path -> measured seconds per client


# pgbench (15) reads its clock once per pass of a client's state machine (advanceConnectionState's
# cached `now`). A transaction whose results were all in when pgbench looked (it was descheduled
# right after sending, as on a loaded machine, and the server answered meanwhile) ends in the pass
# it began in: logged with a latency of 0 us. A meta-command clears that clock (executeMetaCommand),
# so every script runs with one appended: a transaction's end is read after its last result.
CLOCK_READ = "\n\\set mdb_clock_read 0\n"


def connect_allowance(path: str, clients: int) -> float:
    """Seconds to add to -T for `clients` to connect on `path` (direct or pooled)."""
    per_client = _connect_cost.get(path, CONNECT_SECONDS_PER_CLIENT / CONNECT_MARGIN) * CONNECT_MARGIN
    low, high = CONNECT_BOUNDS
    return clients * min(high, max(low, per_client))


def _learn_connect_cost(path: str, clients: int, seconds: float) -> None:
    if clients >= 20 and seconds == seconds and seconds > 0:  # small runs say little per client
        _connect_cost[path] = seconds / clients


def run(label: str, target: Target, scripts: Sequence[tuple[Path, int]], *, clients: int, seconds: float | None = None,
        transactions: int | None = None, rate: float | None = None, threads: int | None = None,
        connect_each: bool = False, timeout: float | None = None, protocol: str = "simple") -> Result:
    """Run pgbench once; `scripts` are (file, weight) pairs. Exactly one of seconds/transactions.

    With `seconds`, the figures cover `seconds` of steady state: pgbench runs longer by the
    connection allowance and the warm-up, and only transactions scheduled inside the window count
    (tps too is computed over that window)."""
    if (seconds is None) == (transactions is None):
        raise ValueError("pass exactly one of seconds or transactions")
    total = None if seconds is None else seconds + WARMUP_SECONDS + connect_allowance(target.path, clients)
    with tempfile.TemporaryDirectory(prefix="mdb-pgbench-") as tmp:
        prefix = str(Path(tmp) / "log")
        args = [binary(), "-n", "-h", target.host, "-p", str(target.port), "-U", target.user,
                "-c", str(clients), "-j", str(threads or min(clients, 2)), "-M", protocol,
                "-l", "--log-prefix", prefix, "--failures-detailed"]
        args += ["-T", str(math.ceil(total))] if total is not None else ["-t", str(transactions)]
        if rate is not None:
            args += ["-R", str(rate)]
        if connect_each:
            args.append("-C")
        for number, (path, weight) in enumerate(scripts):
            timed = Path(tmp) / f"script-{number}.sql"
            timed.write_text(path.read_text() + CLOCK_READ)
            args += ["-f", f"{timed}@{weight}"]
        args.append(target.dbname)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGPASSWORD"] = target.password
        env["PGCONNECT_TIMEOUT"] = "30"
        limit = timeout if timeout is not None else (total or 60) * 3 + 60
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=limit, cwd=tmp)
        latencies, completions, starts, script_ids = _read_logs(Path(tmp))
    result = _result(label, clients, rate, seconds or 0.0, proc, latencies, completions, starts, script_ids)
    if proc.returncode == 0:
        _learn_connect_cost(target.path, clients, result.connect_seconds)
    return steady(result, seconds) if seconds is not None else result


def steady(result: Result, seconds: float) -> Result:
    """Keep the transactions that started in [first start + warm-up, + seconds]; tps over that window."""
    if not result.starts:
        return result
    begin = min(result.starts) + WARMUP_SECONDS
    end = begin + seconds
    keep = [i for i, start in enumerate(result.starts) if begin <= start < end]
    window = min(end, max(result.completions)) - begin
    return dataclasses.replace(
        result, latencies_ms=[result.latencies_ms[i] for i in keep], completions=[result.completions[i] for i in keep],
        starts=[result.starts[i] for i in keep], scripts=[result.scripts[i] for i in keep],
        tps=len(keep) / window if window > 0 else 0.0, seconds=window)


def _read_logs(directory: Path) -> tuple[list[float], list[float], list[float], list[int]]:
    """Parse `-l` logs: client_id tx_no time script_no time_epoch time_us [schedule_lag]."""
    latencies: list[float] = []
    completions: list[float] = []
    starts: list[float] = []
    scripts: list[int] = []
    for path in sorted(directory.glob("log*")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 6 or not parts[2].isdigit():
                continue  # skipped or failed transactions carry a word instead of a time
            micros = int(parts[2])
            done = int(parts[4]) + int(parts[5]) / 1e6
            latencies.append(micros / 1000)
            completions.append(done)
            starts.append(done - micros / 1e6)
            scripts.append(int(parts[3]))
    return latencies, completions, starts, scripts


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def _result(label: str, clients: int, rate: float | None, seconds: float, proc: subprocess.CompletedProcess[str],
            latencies: list[float], completions: list[float], starts: list[float], scripts: list[int]) -> Result:
    out = proc.stdout + proc.stderr
    processed = _number(r"number of transactions actually processed: (\d+)", out)
    failed = _number(r"number of failed transactions: (\d+)", out) or 0
    tps = _number(r"tps = ([0-9.]+) \(without initial connection time\)", out) or 0.0
    connect_ms = _number(r"initial connection time = ([0-9.]+) ms", out)
    aborted = len(set(re.findall(r"client (\d+) aborted", out)))
    error = ""
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower() or "fatal" in ln.lower()]
        error = (lines[0] if lines else proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")[:300]
    return Result(label=label, clients=clients, rate=rate, seconds=seconds,
                  processed=int(processed) if processed is not None else len(latencies), failed=int(failed),
                  aborted_clients=aborted, tps=tps, exit_code=proc.returncode, latencies_ms=latencies,
                  completions=completions, starts=starts, scripts=scripts, error=error,
                  connect_seconds=connect_ms / 1000 if connect_ms is not None else float("nan"))
