"""How busy the machine was, and who made it busy: sampled through the whole run.

The bench shares its 2 CPUs with whatever else runs (other test suites on a shared machine). A
figure measured while something outside the bench used a third of the CPU is not the same figure:
the report prints, beside each scenario, how busy all CPUs were, how much of that was the bench's
own processes (this Python process and its children: pgbench, pgbouncer, the operator; and each
PostgreSQL server it started, with its backends) and how much came from outside. A scenario whose
outside share exceeds OUTSIDE_THRESHOLD is marked in the report.

Also here: per-process facts the pooling scenario reads from /proc (resident memory of a server's
backends, and how long a process waited for a CPU: /proc/PID/schedstat).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

OUTSIDE_THRESHOLD = 0.25  # of all CPUs: more than this used by other work marks a scenario as loaded
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
_SERVERS: list[Path] = []  # data directories of the PostgreSQL servers the bench started


def register_server(datadir: Path) -> None:
    """Count this PostgreSQL server's processes as the bench's own."""
    _SERVERS.append(datadir)


def postmaster_pid(datadir: Path) -> int | None:
    try:
        return int((datadir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU clock ticks) of a live process: its own utime + stime and its reaped
    children's (cutime + cstime). The children's share matters: a process that starts and exits
    between two samples (initdb's helpers, a CLI run, a short-lived backend) is never seen alive,
    and its CPU would otherwise count as load from outside; once its parent reaps it, it is in
    the parent's cutime."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), sum(int(f) for f in fields[11:15])


def _all_processes() -> dict[int, tuple[int, int]]:
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                out[int(entry.name)] = stat
    return out


def descendants(roots: Iterable[int], table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    """The roots and every process below them."""
    table = table if table is not None else _all_processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _cpu_totals() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


class LoadSampler:
    """Samples every `period` s in a thread; `mark(label)` starts a new segment (a scenario)."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.segments: dict[str, list[tuple[float, float]]] = {}  # label -> [(busy, bench)] fractions
        self.bench_seconds: dict[str, float] = {}  # label -> CPU seconds used by the bench's processes
        self.loadavg: dict[str, list[float]] = {}
        self._label = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def mark(self, label: str) -> None:
        with self._lock:
            self._label = label

    def _bench_ticks(self, table: dict[int, tuple[int, int]],
                     last: dict[int, tuple[int, int]]) -> tuple[int, dict[int, tuple[int, int]]]:
        """(ticks used by the bench since the last sample, {pid: (ticks now, ticks counted so far)})."""
        roots = [os.getpid(), *(p for p in map(postmaster_pid, _SERVERS) if p is not None)]
        now: dict[int, tuple[int, int]] = {}
        grown = 0
        for pid in descendants(roots, table):
            ticks = table[pid][1]
            before, counted = last.get(pid, (ticks, 0))  # first seen: counted from here on
            growth = max(0, ticks - before)
            grown += growth
            now[pid] = (ticks, counted + growth)
        # A process seen before and gone now was reaped by its parent (all of ours are): the
        # parent's cutime grew by the child's whole total, of which we had already counted some.
        counted_before = sum(counted for pid, (_, counted) in last.items() if pid not in now)
        return max(0, grown - counted_before), now

    def _run(self) -> None:
        busy0, total0 = _cpu_totals()
        _, last = self._bench_ticks(_all_processes(), {})
        while not self._stop.wait(self.period):
            busy1, total1 = _cpu_totals()
            bench, last = self._bench_ticks(_all_processes(), last)
            span = total1 - total0
            if span > 0:
                with self._lock:
                    self.segments.setdefault(self._label, []).append(
                        ((busy1 - busy0) / span, min(bench / span, (busy1 - busy0) / span)))
                    self.loadavg.setdefault(self._label, []).append(os.getloadavg()[0])
                    self.bench_seconds[self._label] = self.bench_seconds.get(self._label, 0.0) + bench / TICKS
            busy0, total0 = busy1, total1

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per segment: mean fraction of all CPUs busy, used by the bench, used from outside."""
        out = {}
        with self._lock:
            for label, samples in self.segments.items():
                busy = sum(s[0] for s in samples) / len(samples)
                bench = sum(s[1] for s in samples) / len(samples)
                outside = max(0.0, busy - bench)
                out[label] = {"samples": len(samples), "busy": busy, "bench": bench, "outside": outside,
                              "outside_max": max(max(0.0, s[0] - s[1]) for s in samples),
                              "loadavg_max": max(self.loadavg.get(label, [float("nan")])),
                              "bench_cpu_seconds": self.bench_seconds.get(label, 0.0),
                              "loaded": outside > OUTSIDE_THRESHOLD}
        return out


# --- per-process facts --------------------------------------------------------------------------------


def backend_memory(datadir: Path) -> dict[str, float]:
    """Resident memory of a PostgreSQL server's processes (postmaster and every child), MiB: the
    plain RSS sum (what `ps` adds up; shared_buffers pages a backend touched count in each) and the
    private part (RSS minus shared pages: what each extra backend really costs)."""
    pid = postmaster_pid(datadir)
    if pid is None:
        return {"processes": 0, "rss_mib": float("nan"), "private_mib": float("nan")}
    rss = private = 0
    pids = descendants([pid])
    for member in pids:
        try:
            fields = Path(f"/proc/{member}/statm").read_text().split()
        except OSError:
            continue
        resident, shared = int(fields[1]), int(fields[2])
        rss += resident
        private += resident - shared
    return {"processes": len(pids), "rss_mib": rss * PAGE / 2**20, "private_mib": private * PAGE / 2**20}


class MemoryPeak:
    """The largest backend_memory() seen while the block runs (sampled every `period` s)."""

    def __init__(self, datadir: Path, period: float = 0.25) -> None:
        self.datadir, self.period = datadir, period
        self.peak: dict[str, float] = {"processes": 0, "rss_mib": 0.0, "private_mib": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-peak", daemon=True)

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            now = backend_memory(self.datadir)
            if now["rss_mib"] > self.peak["rss_mib"]:
                self.peak = now


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of a process since it started."""
    try:
        on_cpu, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return float("nan"), float("nan")
    return int(on_cpu) / 1e9, int(waiting) / 1e9


class CpuShare:
    """How much CPU one process got during the block, and how long it waited for one."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seconds = self.on_cpu = self.waiting = float("nan")

    def __enter__(self) -> CpuShare:
        self._t0, (self._c0, self._w0) = time.monotonic(), schedstat(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        c1, w1 = schedstat(self.pid)
        self.seconds = time.monotonic() - self._t0
        self.on_cpu, self.waiting = c1 - self._c0, w1 - self._w0

    def facts(self, prefix: str) -> dict[str, float]:
        """CPU used and CPU waited for, as fractions of the block's wall time."""
        span = self.seconds if self.seconds > 0 else float("nan")
        return {f"{prefix}_cpu": self.on_cpu / span, f"{prefix}_wait": self.waiting / span}
