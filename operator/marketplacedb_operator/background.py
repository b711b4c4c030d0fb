"""Long database work off kopf's handler threads, bounded per database and overall.

kopf runs sync handlers on a pool of min(32, CPUs + 4) threads; an index build (up to
statementTimeout, plus retries) or a `mode: Operator` refresh inside a handler held one of them,
so a few slow databases stalled every other resource, deletions included. Here reconcile()
submits such work as a job and returns at once; the next reconciles report the job's progress,
and the one after it finishes (woken by `on_done`) reports its outcome.

Bounds: at most `total` jobs run at once, and at most `per_database` on one database (several
CONCURRENTLY builds on one server compete for I/O and each waits for the others' snapshots);
the rest wait in submission order. One job per (resource, kind) at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace/name, kind): "schema" or "refresh"


@dataclasses.dataclass
class Job:
    """One unit of background work and what is known about it (read by reconcile)."""

    key: Key
    database: str  # host:port/dbname: the per-database bound
    work: Callable[[Job], Any]
    tag: str = ""  # what the job was started for (the plan hash, the refresh-now value)
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    started: float | None = None
    submitted_at: float = dataclasses.field(default_factory=time.time)  # wall clock, for status
    started_at: float | None = None
    finished: float | None = None
    result: Any = None
    error: str | None = None
    backend_pid: int | None = None  # the session doing the work, for progress and cancellation
    cancel: Callable[[], None] | None = None  # set by the work: stops it (terminates its session)
    cancelled: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    inputs: Any = None  # what the work reads when it starts; replaceable while queued (Background.refresh_inputs)

    @property
    def running(self) -> bool:
        return not self.done.is_set()


class Background:
    """A bounded pool of worker threads for jobs keyed by (resource, kind)."""

    def __init__(self, total: int, per_database: int, on_done: Callable[[Key], None] | None = None) -> None:
        self.total, self.per_database = max(1, total), max(1, per_database)
        self.on_done = on_done
        self._lock = threading.Lock()
        self._jobs: dict[Key, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._running: collections.Counter[str] = collections.Counter()

    def get(self, key: Key) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def submit(self, job: Job) -> Job:
        """Queue the job unless one for the same key is queued or running (that one is returned)."""
        with self._lock:
            existing = self._jobs.get(job.key)
            if existing is not None and existing.running:
                return existing
            self._jobs[job.key] = job
            self._queue.append(job)
        self._dispatch()
        return job

    def refresh_inputs(self, key: Key, inputs: Any) -> bool:
        """Replace a queued (not started) job's inputs, so that it starts from the latest reconcile's
        view (the spec, its approval) rather than the one that queued it. False once it started."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.started is not None or not job.running:
                return False
            job.inputs = inputs
            return True

    def take(self, key: Key) -> Job | None:
        """A finished job's record, removed so that it is reported once."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.running:
                return None
            del self._jobs[key]
            return job

    def cancel(self, key: Key, wait: float = 10.0) -> None:
        """Stop a job (dequeued, or its session terminated) and wait for it up to `wait` s."""
        with self._lock:
            job = self._jobs.pop(key, None)
            if job is None:
                return
            job.cancelled = True
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
        if queued:
            job.done.set()
            return
        started = time.monotonic()
        if job.cancel is not None:
            try:
                job.cancel()
            except Exception:  # the session may be gone already
                log.warning("cancelling %s failed", key, exc_info=True)
        finished = job.done.wait(wait)
        log.info("background job %s cancelled (%s after %.1fs)", key, "ended" if finished else "still ending",
                 time.monotonic() - started)  # bounded: deletion never waits longer than `wait`

    def running(self) -> int:
        with self._lock:
            return sum(self._running.values())

    def _dispatch(self) -> None:
        with self._lock:
            startable = []
            for job in list(self._queue):
                if sum(self._running.values()) >= self.total:
                    break
                if self._running[job.database] >= self.per_database:
                    continue
                self._queue.remove(job)
                self._running[job.database] += 1
                job.started, job.started_at = time.monotonic(), time.time()
                startable.append(job)
        for job in startable:
            threading.Thread(target=self._run, args=(job,), name=f"bg-{job.key[0]}-{job.key[1]}", daemon=True).start()
            # A queued job's status does not change until it starts (nobody polls it): say so now.
            self._notify(job)

    def _run(self, job: Job) -> None:
        try:
            job.result = job.work(job)
        except Exception as exc:  # reported by the next reconcile; never kills the worker
            job.error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
        finally:
            job.finished = time.monotonic()
            with self._lock:
                self._running[job.database] -= 1
            job.done.set()
            self._dispatch()
            self._notify(job)

    def _notify(self, job: Job) -> None:
        """on_done(key) when a job starts or ends: its resource has news to report."""
        if self.on_done is not None and not job.cancelled:
            try:
                self.on_done(job.key)
            except Exception:
                log.debug("on_done for %s failed", job.key, exc_info=True)
