"""The operator under benchmark: the real `marketplacedb run`, with a stopwatch around reconcile().

    KUBECONFIG=... MARKETPLACEDB_RESYNC_SECONDS=... python -m bench.operator_proc LOG -- run -n bench ...

Everything after `--` goes to the `marketplacedb` CLI unchanged; the only addition is a wrapper
around `handlers.reconcile` that appends one JSON line per reconcile (resource, start time,
seconds) to LOG. The wrapper is instrumentation, not a stand-in: the original runs every time.

With BENCH_TRACEMALLOC=PATH set, where the memory grows is traced (tracemalloc, after the imports)
and the largest growths since start-up, by allocation site, are rewritten to PATH every
BENCH_TRACEMALLOC_SECONDS (30) and at SIGUSR1, with BENCH_TRACEMALLOC_FRAMES (12) frames per
allocation; PATH.json holds the traced total and the growth by owner (see owner()). Tracing
slows the process down and inflates its RSS: for profiling, not for figures.

With BENCH_ALLOCATOR_STATS=PATH set, SIGUSR2 writes the allocators' own accounts to PATH: pymalloc's
arenas, used and free blocks (sys._debugmallocstats) and glibc's per-arena totals (malloc_stats).
No tracing cost: this is how a burst's live objects were told apart from freed-but-kept memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from marketplacedb_operator import cli, handlers


def instrument(log_path: str) -> None:
    original: Callable[..., Any] = getattr(handlers, "reconcile")  # noqa: B009  (handlers' own import)
    lock = threading.Lock()
    sink = open(log_path, "a", buffering=1)

    def timed(body: dict[str, Any], deps: Any) -> Any:
        started_wall, started = time.time(), time.perf_counter()
        try:
            return original(body, deps)
        finally:
            meta = body.get("metadata", {})
            line = json.dumps({"name": f"{meta.get('namespace')}/{meta.get('name')}", "start": started_wall,
                               "seconds": time.perf_counter() - started, "generation": meta.get("generation")})
            with lock:
                sink.write(line + "\n")

    setattr(handlers, "reconcile", timed)  # noqa: B010  handlers._run calls it through the module global


def owner(traceback: tracemalloc.Traceback) -> str:
    """Who allocated a block: the innermost frame outside the standard library (json.loads called by
    kopf's watch stream is kopf's), as a package or, for the operator, its module."""
    for frame in reversed(traceback):  # tracemalloc lists the oldest frame first
        name = frame.filename.replace("\\", "/")
        if "/marketplacedb_operator/" in name:
            return "operator:" + name.split("/marketplacedb_operator/", 1)[1]
        if "/site-packages/" in name:
            return name.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
        if "/bench/" in name:
            return "bench instrumentation"
    return "standard library only"


def trace_memory(path: str, every: float, frames: int = 12) -> None:
    """Every `every` s, write to `path` the growth since now by allocation site (see the docstring),
    and to `path`.json the traced total and the growth by owner (see owner())."""
    tracemalloc.start(frames)
    baseline = tracemalloc.take_snapshot()
    noise = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib*")]

    trigger = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: trigger.set())  # dump now (the bench's last look)

    def dump() -> None:
        while True:
            trigger.wait(every)
            trigger.clear()
            snapshot = tracemalloc.take_snapshot().filter_traces(noise)
            by_owner: dict[str, float] = {}
            for stat in snapshot.compare_to(baseline, "traceback"):
                by_owner[owner(stat.traceback)] = by_owner.get(owner(stat.traceback), 0.0) + stat.size_diff / 2**20
            rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            traced = tracemalloc.get_traced_memory()[0] / 2**20
            lines = [f"rss_peak_mib {rss_peak:.1f} traced_mib {traced:.1f}", "--- growth by owner"]
            lines += [f"{mib:8.2f} MiB {name}" for name, mib in sorted(by_owner.items(), key=lambda kv: -kv[1])]
            for kind in ("filename", "lineno", "traceback"):
                lines.append(f"--- growth by {kind}")
                for stat in snapshot.compare_to(baseline, kind)[: 25 if kind != "traceback" else 15]:
                    lines.append(f"{stat.size_diff / 2**20:8.2f} MiB {stat.count_diff:+8d} blocks")
                    frames_shown = stat.traceback.format()[-2 * frames:] if kind == "traceback" else \
                        [str(stat.traceback[0])]
                    lines.extend("    " + line for line in frames_shown)
            for name, text in ((path, "\n".join(lines) + "\n"), (f"{path}.json", json.dumps(
                    {"time": time.time(), "traced_mib": traced, "rss_peak_mib": rss_peak, "by_owner_mib": by_owner}))):
                with open(f"{name}.tmp", "w") as out:
                    out.write(text)
                os.replace(f"{name}.tmp", name)

    threading.Thread(target=dump, name="tracemalloc", daemon=True).start()


def dump_allocator_stats(path: str) -> None:
    """At SIGUSR2, write the allocators' own accounts to `path`: pymalloc's arenas and free pools
    (sys._debugmallocstats) and glibc's per-arena totals (malloc_stats), both on stderr's fd."""

    def dump(*_: Any) -> None:
        with open(path, "w") as out:
            saved = os.dup(2)
            os.dup2(out.fileno(), 2)
            try:
                sys._debugmallocstats()
                libc = ctypes.CDLL(None)
                if hasattr(libc, "malloc_stats"):
                    libc.malloc_stats()
                    libc.fflush(None)
            finally:
                os.dup2(saved, 2)
                os.close(saved)

    signal.signal(signal.SIGUSR2, dump)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m bench.operator_proc LOG -- <marketplacedb args>", file=sys.stderr)
        return 2
    instrument(argv[0])
    if os.environ.get("BENCH_ALLOCATOR_STATS"):
        dump_allocator_stats(os.environ["BENCH_ALLOCATOR_STATS"])
    if os.environ.get("BENCH_TRACEMALLOC"):
        trace_memory(os.environ["BENCH_TRACEMALLOC"], float(os.environ.get("BENCH_TRACEMALLOC_SECONDS", "30")),
                     int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "12")))
    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
