"""The periodic reconciles (resync, retries with backoff) of every resource, from one thread.

Why not a kopf timer per object: kopf keeps, for each object with a timer, a live copy of its
whole body (spec and status: ~35 KiB parsed for the example resource) and the timer's task,
cause and patch (~25 KiB): the largest share of the operator's memory per resource (tracemalloc,
bench/REPORT-fleet.md). Here one thread looks every tick at each resource's next due time and
reads the object when it is due (one GET per resync), so no body is kept between reconciles.

Peering: kopf pauses a replica in favour of a peer with a higher priority; its timers stopped
with it. This thread follows the same decision: kopf logs it (kopf/_core/engines/peering.py,
"Pausing operations ..." / "Resuming operations ..."), and PeeringPause turns those records
into a flag. A replica that was never active has no resources to look at anyway (on_event,
which registers them, does not run while kopf is paused).

Reads: each due resource is read (GET) on a pool of READERS_PER_WORKER x workers threads, and
only a body that was read is handed to the `workers` reconcile threads: a few reads the API server
never answers (the gateway's request timeout bounds each) hold reader threads, not every
reconcile thread, so the other resources keep their resync (tests/test_loop_redteam4.py). A reader
hands its body on only when a reconcile thread is free (one slot each): reads are fast and
reconciles slow, so otherwise every due body waited in the pool's queue (at N = 1,000 a resync
pass queued hundreds, ~12 KiB each: tests/test_operator_scheduler.py); now at most one per reader.

Health: health() (kopf's liveness probe, handlers.py) fails when the thread died or its last tick
is older than STALL_TICKS ticks (at least STALL_MIN_SECONDS): /healthz then fails and the kubelet
restarts a process whose resyncs stopped.

Memory: the reconciles' transient allocations (plans, catalog rows, API replies) are freed, but
glibc keeps freed pages in per-thread arenas. At start the arenas are capped (M_ARENA_MAX) and
after a pass with work the free pages are handed back (malloc_trim), at most once a minute.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import ctypes
import functools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Protocol

from . import naming
from .ports import Deps

log = logging.getLogger(__name__)

PEERING_LOGGER = "kopf._core.engines.peering"
_M_ARENA_MAX = -8  # glibc's mallopt() parameter numbers
_M_MMAP_THRESHOLD = -3
# Fixed, not glibc's dynamic threshold (which rises to 32 MiB once a large block is freed): a
# reconcile's large transient buffers (API replies, plans) are mapped and unmapped, not kept in the heap.
MMAP_THRESHOLD = 128 * 1024
TRIM_EVERY = 10.0  # seconds between malloc_trim() calls (each costs a few ms), work or not: event
# reconciles (a bulk create) run outside the scheduler's passes
READERS_PER_WORKER = 4  # reads are I/O only: more reader threads than reconcile threads
STALL_TICKS = 10  # health(): a scheduler that has not ticked for this many ticks is stalled
STALL_MIN_SECONDS = 60.0


class Due(Protocol):
    """What the scheduler needs of a resource's state (handlers.ResourceState)."""

    next_due: float
    failures: int
    pending: bool  # a reconcile was asked for and did not run; a read that starts after it covers it
    lock: threading.Lock
    deleted: bool  # on_delete tore it down: never reconciled again


class PeeringPause(logging.Handler):
    """Paused while kopf is paused in favour of a peer (kopf says so in its peering log)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.paused = False

    def attach(self) -> None:
        peering = logging.getLogger(PEERING_LOGGER)
        if not peering.isEnabledFor(logging.INFO):  # "Pausing operations ..." is logged at INFO
            peering.setLevel(logging.INFO)
        peering.addHandler(self)

    def detach(self) -> None:
        logging.getLogger(PEERING_LOGGER).removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Pausing operations", "Pausing all operators")):
            self.paused = True
        elif message.startswith("Resuming operations"):
            self.paused = False


class _Prefixed(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['resource'] if self.extra else '?'}] {msg}", kwargs


class Scheduler:
    """Runs `run(body, state, logger)` for each resource in `states` (namespace/name -> state)
    once its next_due (deps.monotonic) has passed, on a pool of `workers` threads."""

    def __init__(self, deps: Deps, states: MutableMapping[str, Any],
                 run: Callable[[Mapping[str, Any], Any, Any], None], workers: int, backoff: Callable[[int], float],
                 pause: PeeringPause | None = None) -> None:
        self.deps, self.states, self.run, self.backoff = deps, states, run, backoff
        self.pause = pause or PeeringPause()
        self.context: contextvars.Context | None = None  # kopf's (for kopf.event), from the first event
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resync")
        self._reads = concurrent.futures.ThreadPoolExecutor(max_workers=workers * READERS_PER_WORKER,
                                                            thread_name_prefix="scheduler-read")
        self._slots = threading.BoundedSemaphore(workers)  # a free reconcile thread, taken before a hand-over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trimmed = 0.0
        self.ticked = time.monotonic()  # when the loop last finished a tick (health)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._reads.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict[str, Any]:
        """The liveness verdict: raises SchedulerStalled when the thread is dead or stalled."""
        age = time.monotonic() - self.ticked
        alive = self._thread is not None and self._thread.is_alive()
        limit = max(STALL_MIN_SECONDS, STALL_TICKS * self.deps.settings.tick_seconds)
        if not alive or age > limit:
            raise SchedulerStalled(f"scheduler {'alive' if alive else 'not running'}, last tick {age:.0f}s ago "
                                   f"(limit {limit:g}s): periodic reconciles have stopped")
        return {"alive": alive, "last_tick_seconds": round(age, 1), "paused": self.pause.paused,
                "resources": len(self.states)}

    def _loop(self) -> None:
        while not self._stop.wait(self.deps.settings.tick_seconds):
            try:
                self.tick()
            except Exception:  # never let the loop die: every resource's resync depends on it
                log.warning("scheduler tick failed", exc_info=True)
            self.ticked = time.monotonic()

    def tick(self) -> int:
        """Submit every due resource (once: its next_due is infinite until its reconcile ran)."""
        if self.pause.paused or self.context is None:
            return 0
        now, submitted = self.deps.monotonic(), 0
        for key, state in list(self.states.items()):
            if state.deleted:  # on_delete popped it; a read in flight may have put it back
                if self.states.get(key) is state:
                    self.states.pop(key, None)
                continue
            if now >= state.next_due and not state.lock.locked():
                state.next_due = math.inf
                self._reads.submit(self._read, key, state, self.context.copy())
                submitted += 1
        if time.monotonic() - self._trimmed > TRIM_EVERY:
            self._trimmed = time.monotonic()
            trim()
        return submitted

    def _read(self, key: str, state: Due, context: contextvars.Context) -> None:
        """Read a due resource (a reader thread), then reconcile it on a reconcile thread."""
        namespace, name = key.split("/", 1)
        state.pending = False  # this read starts after every request so far: its body covers them
        try:
            body = self.deps.kube.get(naming.API_VERSION, naming.KIND, namespace, name)
        except Exception as exc:  # the API is unreachable: try again with backoff
            state.failures += 1
            state.next_due = self.deps.monotonic() + self.backoff(state.failures)
            log.warning("[%s] reading the resource failed, retrying with backoff: %s", key, type(exc).__name__)
            return
        if body is None:  # gone (its deletion finished elsewhere), or a kind discovery cached as missing
            # Not left infinite: an event that tracks it again (nothing changed) runs no reconcile.
            state.next_due = self.deps.monotonic() + self.deps.settings.resync_seconds
            if self.states.get(key) is state:
                self.states.pop(key, None)
            return
        if body.get("metadata", {}).get("deletionTimestamp"):  # kopf's deletion handler has it
            state.next_due = self.deps.monotonic() + self.deps.settings.resync_seconds
            return
        if state.deleted:  # on_delete ran while it was read
            return
        logger = _Prefixed(logging.getLogger("kopf.objects"), {"resource": key})
        while not self._slots.acquire(timeout=1.0):  # the body waits here, one per reader, not in a queue
            if self._stop.is_set():
                return
        try:
            self._pool.submit(context.run, self._reconcile, body, state, logger)
        except RuntimeError:  # stopped meanwhile (shutdown): nothing more runs
            self._slots.release()

    def _reconcile(self, body: Mapping[str, Any], state: Due, logger: Any) -> None:
        try:
            self.run(body, state, logger)
        finally:
            self._slots.release()


# kopf peering (https://kopf.readthedocs.io/en/stable/peering/) pauses every replica that sees a
# live peer with a higher priority, and *all* replicas when two share the highest one ("Pausing all
# operators, including self"), so equal priorities mean nobody reconciles. Priorities here are
# distinct and ordered by start time: the oldest live replica is the active one, a newer one
# waits (kopf starts a peered operator paused until it has seen the peering object, so a
# restarting or rolling replica never preempts the active one). When the active replica exits it
# removes its entry and the next oldest resumes at once; when it is SIGKILLed, its entry expires
# after MARKETPLACEDB_PEERING_LIFETIME_SECONDS and the standby resumes then.
_PRIORITY_CEILING = 2**53  # exact in every JSON parser; above start-time-ms x 1000 until 2255


def peering_priority(started: float | None = None) -> int:
    """Higher for an older process: the ceiling minus the start time in milliseconds x 1000, minus
    a random tie-breaker below 1000 (two replicas started in the same millisecond still differ)."""
    at = time.time() if started is None else started
    return _PRIORITY_CEILING - int(at * 1000) * 1000 - random.randrange(1000)


class SchedulerStalled(Exception):
    """The scheduler thread is dead or has not ticked for too long (health())."""


def cap_arenas(arenas: int = 2) -> None:
    """At most `arenas` glibc malloc arenas (default 8 per core): each thread's arena keeps its
    own freed pages. No effect where the C library is not glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, arenas)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    """Hand freed malloc pages back to the OS (glibc's malloc_trim; elsewhere nothing)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    """The C library, loaded once. Not ctypes.util.find_library("c"): on Linux it runs
    `/sbin/ldconfig -p` (a fork/exec of this process) at every call, and finds nothing where
    ldconfig is absent. The process's own symbols (dlopen(NULL)) include the C library's."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
