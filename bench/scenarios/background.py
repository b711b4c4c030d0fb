"""A pgbench load running in a thread while the scenario does something else (a refresh, a build)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from .. import pgbench, stats


class Background:
    """Start pgbench in a thread; `join()` returns its Result."""

    def __init__(self, run: Callable[[], pgbench.Result]) -> None:
        self._result: pgbench.Result | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._target, args=(run,), daemon=True)
        self.started = time.time()
        self._thread.start()

    def _target(self, run: Callable[[], pgbench.Result]) -> None:
        try:
            self._result = run()
        except BaseException as exc:
            self._error = exc

    def join(self, timeout: float = 600) -> pgbench.Result:
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise TimeoutError("the background pgbench did not finish")
        return self._result


def wal_lsn(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    return str(row[0]) if row else "0/0"


def wal_bytes(conn: psycopg.Connection[Any], since: str) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)::bigint", [since]).fetchone()
    return int(row[0]) if row else 0


def window_figures(load: pgbench.Result, start: float, end: float, prefix: str) -> dict[str, Any]:
    """How the background load fared while [start, end] (a refresh or a build) ran.

    A transaction "overlaps" when it was in flight at some point of the window; its latency is
    measured from when pgbench scheduled it (-R), so time spent blocked shows in full."""
    overlapping = [lat for lat, s, e in zip(load.latencies_ms, load.starts, load.completions, strict=True)
                   if s <= end and e >= start]
    # Whole seconds of the load's own clock (from its first start) covering the window.
    origin = min(load.starts) if load.starts else start
    first, last = int(start - origin), int(end - origin) + 1
    return {
        f"{prefix}_longest_ms": max(overlapping, default=float("nan")),
        f"{prefix}_p99_ms": stats.percentile(overlapping, 99),
        f"{prefix}_overlapping": len(overlapping),
        f"{prefix}_stall_seconds": stats.empty_seconds(load.completions, origin + first, origin + last),
        f"{prefix}_longest_gap_ms": stats.longest_gap(load.completions, start, end) * 1000,
        f"{prefix}_failed": load.failed + load.aborted_clients,
    }
