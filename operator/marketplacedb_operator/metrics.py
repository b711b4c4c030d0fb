"""Prometheus metrics of the operator, on one dedicated registry (`REGISTRY`).

Refresh metrics come from the state table, not from the process that refreshed: CronJob pods live
too briefly to be scraped, so the operator reads every view's row and sets these series. Labels are
namespace, resource and view only (never a DSN, user or secret): prometheus.io/docs/practices/naming/

Memory (issue 14): a prometheus_client labelled child is an object with a lock and a value object
per sample: 18.7 KiB per resource. So the values live here as plain floats in one `_Resource` per
(namespace, resource), under one lock, and one collector builds the families at scrape time (same
names, HELP, TYPE, labels, buckets, `_total`, `_created`), sample by sample (metrics_exposition.py).
"""

from __future__ import annotations

import bisect
import datetime
import functools
import math
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import NamedTuple, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from .metrics_exposition import LazyFamily

REGISTRY = CollectorRegistry(auto_describe=True)

VIEW_LABELS = ("namespace", "resource", "view")
RESOURCE_LABELS = ("namespace", "resource")


class RefreshRow(Protocol):
    """The fields of a refresh state row the metrics need (sql.refresh.RefreshState has them)."""

    @property
    def name(self) -> str: ...
    @property
    def last_success(self) -> datetime.datetime | None: ...
    @property
    def last_seconds(self) -> float | None: ...
    @property
    def rows(self) -> int | None: ...
    @property
    def counters(self) -> Decimal | None: ...
    @property
    def consecutive_failures(self) -> int: ...
    @property
    def max_staleness(self) -> float | None: ...
    @property
    def outcomes(self) -> dict[str, int]: ...


class DeclaredView(Protocol):
    """One declared view of a resource and its state row, if any (sql.refresh_truth.ViewSeries)."""

    @property
    def name(self) -> str: ...
    @property
    def max_staleness(self) -> float | None: ...
    @property
    def first_seen(self) -> datetime.datetime | None: ...
    @property
    def state(self) -> RefreshRow | None: ...


# Per-view gauges: (name, HELP), in exposition order; a view's values are a tuple in this order.
VIEW_GAUGES = (
    ("marketplacedb_refresh_last_success_timestamp_seconds",
     "Unix time of the last successful refresh of a materialized view."),
    ("marketplacedb_refresh_last_duration_seconds", "Duration of the last successful refresh (REFRESH and row count)."),
    ("marketplacedb_refresh_rows", "Rows in the view after its last successful refresh."),
    ("marketplacedb_refresh_staleness_seconds",
     "Seconds since the last successful refresh; never refreshed: since the view was first seen declared "
     "(+Inf when unknown)."),
    ("marketplacedb_refresh_never_refreshed",
     "1 when no successful refresh of a declared view was ever recorded (whatever the scheduler)."),
    ("marketplacedb_refresh_stale", "1 when staleness exceeds the view's maxStaleness (or it never refreshed)."),
    ("marketplacedb_refresh_max_staleness_seconds", "The view's maxStaleness policy."),
    ("marketplacedb_refresh_consecutive_failures", "Failed refreshes since the last success."),
)
LAST_SUCCESS, LAST_DURATION, ROWS, STALENESS, NEVER, STALE, MAX_STALENESS, FAILURES = range(len(VIEW_GAUGES))
_UNSET: tuple[float | None, ...] = (None,) * len(VIEW_GAUGES)
_ZERO, _ONE = 0.0, 1.0  # shared: most gauges are flags or zero counts, no float object per series


class _View(NamedTuple):
    """One view's series: gauge values (None: series not set) and the state table's outcome counts."""

    gauges: tuple[float | None, ...]
    outcomes: dict[str, float]


BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, math.inf)
_LE = (*(repr(float(b)) for b in BUCKETS[:-1]), "+Inf")  # as prometheus_client writes `le`
_SUM, _CREATED = len(BUCKETS), len(BUCKETS) + 1  # a histogram: per-bucket counts, then sum, created


class _Resource:
    """Every series of one resource. Written only under `_lock`; `views` is replaced, never mutated."""

    __slots__ = ("views", "duration", "errors", "ddl", "invalid", "drifted", "pooler", "in_progress", "blocks")

    def __init__(self) -> None:
        self.views: dict[str, _View] = {}
        self.duration: array[float] | None = None
        self.errors: dict[str, tuple[float, float]] = {}  # reason -> (count, created)
        self.ddl: dict[str, tuple[float, float]] = {}  # result -> (count, created)
        self.invalid: float | None = None
        self.drifted: float | None = None
        self.pooler: float | None = None
        self.in_progress: float | None = None
        self.blocks: tuple[float | None, float | None] = (None, None)  # done, total


_lock = threading.Lock()
_resources: dict[tuple[str, str], _Resource] = {}


def _resource(namespace: str, resource: str) -> _Resource:
    """The resource's record, created on first use (call with `_lock` held)."""
    found = _resources.get((namespace, resource))
    if found is None:
        found = _resources[(namespace, resource)] = _Resource()
    return found


def _flag(value: bool) -> float:
    return _ONE if value else _ZERO


def _num(value: float) -> float:
    return _ZERO if value == 0 else float(value)


def staleness_seconds(last_success: datetime.datetime | None, now: datetime.datetime) -> float:
    if last_success is None:
        return float("inf")
    return max(0.0, (now - last_success).total_seconds())


def stale(last_success: datetime.datetime | None, now: datetime.datetime, max_staleness: float | None) -> bool:
    """The Stale signal: never refreshed, or older than maxStaleness."""
    if last_success is None:
        return True
    return max_staleness is not None and staleness_seconds(last_success, now) > max_staleness


def set_view_metrics(namespace: str, resource: str, views: Iterable[DeclaredView], now: datetime.datetime) -> None:
    """Set the refresh series of a resource's *declared* views (and remove every other view's).

    A declared view with no recorded success is exported as never refreshed, its staleness
    counted from when it was first seen declared, so `marketplacedb_refresh_stale` turns 1 after
    maxStaleness even when no refresh could ever record anything.
    """
    with _lock:
        record = _resource(namespace, resource)
        updated: dict[str, _View] = {}
        for view in views:
            row = view.state
            old = updated.get(view.name) or record.views.get(view.name) or _View(_UNSET, {})
            values = list(old.gauges)
            outcomes = old.outcomes
            if row is not None:  # the spec's maxStaleness; none (refreshed on demand only): never stale, as in status
                outcomes = _set_row(values, old.outcomes, row, now, view.max_staleness)
            if row is None or row.last_success is None:
                if row is None:
                    values[FAILURES] = _ZERO
                age = math.inf if view.first_seen is None else max(0.0, (now - view.first_seen).total_seconds())
                values[STALENESS] = age
                limit = view.max_staleness
                if limit is not None:
                    values[MAX_STALENESS] = float(limit)
                values[STALE] = _flag(limit is not None and age > limit)
            values[NEVER] = _flag(row is None or row.last_success is None)
            updated[view.name] = _View(tuple(values), outcomes)
        record.views = updated  # views not passed (left the spec) lose every series


def _set_row(values: list[float | None], outcomes: dict[str, float], row: RefreshRow, now: datetime.datetime,
             limit: float | None) -> dict[str, float]:
    """Write a state row into a view's gauge values; returns its outcome counts merged into `outcomes`."""
    if row.last_success is not None:
        values[LAST_SUCCESS] = row.last_success.timestamp()
    if row.last_seconds is not None:
        values[LAST_DURATION] = float(row.last_seconds)
    if row.rows is not None:
        values[ROWS] = _num(row.rows)
    if limit is not None:
        values[MAX_STALENESS] = float(limit)
    values[STALENESS] = staleness_seconds(row.last_success, now)
    values[STALE] = _flag(stale(row.last_success, now, limit))
    values[FAILURES] = _num(row.consecutive_failures)
    if not row.outcomes:
        return outcomes
    # Results are a handful of words read anew from every row: interned, one copy for all views.
    return {**outcomes, **{sys.intern(result): _num(count) for result, count in row.outcomes.items()}}


def set_refresh_metrics(namespace: str, resource: str, rows: Iterable[RefreshRow], now: datetime.datetime,
                        max_staleness: Mapping[str, float] | None = None) -> None:
    """Set every refresh series of one resource from state rows (every row passed is exported).

    `max_staleness` (view name -> seconds, from the spec) overrides the policy recorded in the
    row. Views no longer passed are removed, so deleted views leave no stale series behind.
    The operator uses set_view_metrics (declared views only); this is for rows read directly.
    """
    with _lock:
        record = _resource(namespace, resource)
        updated: dict[str, _View] = {}
        for row in rows:
            old = updated.get(row.name) or record.views.get(row.name) or _View(_UNSET, {})
            values = list(old.gauges)
            outcomes = _set_row(values, old.outcomes, row, now, (max_staleness or {}).get(row.name, row.max_staleness))
            values[NEVER] = _flag(row.last_success is None)
            updated[row.name] = _View(tuple(values), outcomes)
        record.views = updated


def forget_resource(namespace: str, resource: str) -> None:
    """Remove every series of a deleted resource (refresh, reconcile, DDL and progress)."""
    with _lock:
        _resources.pop((namespace, resource), None)


# --- reconcile metrics --------------------------------------------------------------------------

def record_reconcile(
    namespace: str,
    resource: str,
    seconds: float,
    *,
    invalid_indexes: int,
    drifted: int,
    pooler_ready: int | None,
    problems: Iterable[str],
) -> None:
    reasons = list(problems)
    now = time.time()
    with _lock:  # one acquisition: a scrape sees all of this reconcile or none of it
        record = _resource(namespace, resource)
        if record.duration is None:
            record.duration = array("d", [0.0] * _SUM + [0.0, now])
        record.duration[bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bucket with seconds <= le
        record.duration[_SUM] += seconds
        record.invalid = _num(invalid_indexes)
        record.drifted = _num(drifted)
        if pooler_ready is not None:
            record.pooler = _num(pooler_ready)
        for reason in reasons:
            count, created = record.errors.get(reason, (0.0, now))
            record.errors[reason] = (count + 1, created)


def record_ddl(namespace: str, resource: str, ok: int, failed: int) -> None:
    if not ok and not failed:
        return
    now = time.time()
    with _lock:
        record = _resource(namespace, resource)
        for result, amount in (("ok", ok), ("failed", failed)):
            if amount:
                count, created = record.ddl.get(result, (0.0, now))
                record.ddl[result] = (count + amount, created)


# --- background DDL progress (issue 14: long DDL off the handler threads) ------------------------

def record_progress(namespace: str, resource: str, running: bool, done: int | None, total: int | None) -> None:
    """In progress 0/1; the blocks series only while running and known (removed otherwise)."""
    with _lock:
        record = _resource(namespace, resource)
        record.in_progress = _flag(running)
        record.blocks = (_num(done) if running and done is not None else None,
                         _num(total) if running and total is not None else None)


# --- exposition ---------------------------------------------------------------------------------

class _Snapshot(NamedTuple):
    namespace: str
    resource: str
    views: dict[str, _View]
    duration: array[float] | None
    errors: list[tuple[str, tuple[float, float]]]
    ddl: list[tuple[str, tuple[float, float]]]
    gauges: tuple[float | None, float | None, float | None, float | None]
    blocks: tuple[float | None, float | None]


def _snapshot() -> list[_Snapshot]:
    """A consistent copy of every resource, taken under the lock; the families are built after it."""
    with _lock:
        return [_Snapshot(ns, res, r.views, None if r.duration is None else array("d", r.duration),
                          list(r.errors.items()), list(r.ddl.items()),
                          (r.invalid, r.drifted, r.pooler, r.in_progress), r.blocks)
                for (ns, res), r in _resources.items()]


RESOURCE_GAUGES = (  # (name, HELP), the order of _Snapshot.gauges
    ("marketplacedb_invalid_indexes", "Declared indexes that are INVALID or failed to build."),
    ("marketplacedb_drifted_objects", "Declared database objects whose definition differs from the spec (not yet "
     "repaired)."),
    ("marketplacedb_pooler_ready_replicas", "Ready PgBouncer pods of the resource's pooler."),
    ("marketplacedb_ddl_in_progress",
     "1 while DDL of the resource runs (or waits for a slot) in the background, else 0."),
)
OUTCOMES = ("marketplacedb_refresh_outcomes", "Refresh outcomes by result (refreshed, refreshed-plain, skipped-busy, "
            "skipped-unchanged, failed), from the state table.")
DURATION = ("marketplacedb_reconcile_duration_seconds", "Time one reconcile took (observe, plan, act, report).")
ERRORS = ("marketplacedb_reconcile_errors", "Reconciles that ended with a part not converged, by condition reason.")
DDL_OBJECTS = ("marketplacedb_ddl_objects", "Database objects the executor worked on, by result (ok, failed).")
BLOCKS = ("marketplacedb_index_build_blocks",
          "Blocks of the running index build's current phase (pg_stat_progress_create_index), done and total.")


def _families(snapshot: list[_Snapshot]) -> Iterator[Metric]:
    """The families in the order the Gauge/Counter/Histogram objects were registered; each makes
    its samples when read (metrics_exposition.LazyFamily): a scrape holds one sample at a time."""
    for index, (name, documentation) in enumerate(VIEW_GAUGES):
        yield LazyFamily(name, documentation, "gauge", functools.partial(_view_gauge, snapshot, name, index))
    # The outcome counts mirror the state table (CronJob pods and the operator add to them): no
    # `_created`, as this process did not create them; a dropped row looks like a counter reset.
    yield LazyFamily(*OUTCOMES, "counter", functools.partial(_outcomes, snapshot))
    yield LazyFamily(*DURATION, "histogram", functools.partial(_histogram, snapshot))
    yield LazyFamily(*ERRORS, "counter", functools.partial(_counter, snapshot, ERRORS[0], "reason", 0))
    yield LazyFamily(*DDL_OBJECTS, "counter", functools.partial(_counter, snapshot, DDL_OBJECTS[0], "result", 1))
    for index, (name, documentation) in enumerate(RESOURCE_GAUGES):
        yield LazyFamily(name, documentation, "gauge", functools.partial(_resource_gauge, snapshot, name, index))
    yield LazyFamily(*BLOCKS, "gauge", functools.partial(_blocks, snapshot))


def _view_gauge(snapshot: list[_Snapshot], name: str, index: int) -> Iterator[Sample]:
    for s in snapshot:
        for view, series in s.views.items():
            if (value := series.gauges[index]) is not None:
                yield Sample(name, {"namespace": s.namespace, "resource": s.resource, "view": view}, value)


def _outcomes(snapshot: list[_Snapshot]) -> Iterator[Sample]:
    for s in snapshot:
        for view, series in s.views.items():
            for result, count in sorted(series.outcomes.items()):
                labels = {"namespace": s.namespace, "resource": s.resource, "view": view, "result": result}
                yield Sample(f"{OUTCOMES[0]}_total", labels, count)


def _counter(snapshot: list[_Snapshot], name: str, label: str, which: int) -> Iterator[Sample]:
    for s in snapshot:
        for value, (count, created) in s.errors if which == 0 else s.ddl:
            labels = {"namespace": s.namespace, "resource": s.resource, label: value}
            yield Sample(f"{name}_total", labels, count)
            yield Sample(f"{name}_created", labels, created)


def _histogram(snapshot: list[_Snapshot]) -> Iterator[Sample]:
    name = DURATION[0]
    for s in snapshot:
        if s.duration is None:
            continue
        labels = {"namespace": s.namespace, "resource": s.resource}
        cumulative = 0.0
        for le, count in zip(_LE, s.duration[:_SUM], strict=True):
            cumulative += count
            yield Sample(f"{name}_bucket", {**labels, "le": le}, cumulative)
        yield Sample(f"{name}_count", labels, cumulative)
        yield Sample(f"{name}_sum", labels, s.duration[_SUM])
        yield Sample(f"{name}_created", labels, s.duration[_CREATED])


def _resource_gauge(snapshot: list[_Snapshot], name: str, index: int) -> Iterator[Sample]:
    for s in snapshot:
        if (value := s.gauges[index]) is not None:
            yield Sample(name, {"namespace": s.namespace, "resource": s.resource}, value)


def _blocks(snapshot: list[_Snapshot]) -> Iterator[Sample]:
    for s in snapshot:
        for kind, value in zip(("done", "total"), s.blocks, strict=True):
            if value is not None:
                yield Sample(BLOCKS[0], {"namespace": s.namespace, "resource": s.resource, "kind": kind}, value)


class _Exporter(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from _families(_snapshot())  # the lock is released before the first family is built

    def describe(self) -> Iterator[Metric]:
        yield from _families([])


REGISTRY.register(_Exporter())
