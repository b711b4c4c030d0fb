"""Prometheus metrics of the operator, on one dedicated registry (`REGISTRY`).

Refresh metrics come from the state table, not from the process that refreshed: CronJob pods live
too briefly to be scraped, so the operator reads every view's row and sets these series.
Labels are namespace, resource and view only (never a DSN, user or secret).
https://prometheus.io/docs/practices/naming/

Structure: module-level metric objects, plus pure-ish functions that set them from rows
(`set_refresh_metrics`, `forget_resource`). Reconcile metrics are added here the same way.
"""

from __future__ import annotations

import datetime
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

VIEW_LABELS = ("namespace", "resource", "view")


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


def _view_gauge(name: str, documentation: str) -> Gauge:
    """A per-view gauge of the refresh state (labels: namespace, resource, schema, view)."""
    return Gauge(name, documentation, VIEW_LABELS, registry=REGISTRY)


REFRESH_LAST_SUCCESS = _view_gauge(
    "marketplacedb_refresh_last_success_timestamp_seconds",
    "Unix time of the last successful refresh of a materialized view.",
)
REFRESH_LAST_DURATION = _view_gauge(
    "marketplacedb_refresh_last_duration_seconds",
    "Duration of the last successful refresh (REFRESH and row count).",
)
REFRESH_ROWS = _view_gauge(
    "marketplacedb_refresh_rows", "Rows in the view after its last successful refresh.",
)
REFRESH_STALENESS = _view_gauge(
    "marketplacedb_refresh_staleness_seconds",
    "Seconds since the last successful refresh; never refreshed: since the view was first seen declared "
    "(+Inf when unknown).",
)
REFRESH_NEVER = _view_gauge(
    "marketplacedb_refresh_never_refreshed",
    "1 when no successful refresh of a declared view was ever recorded (whatever the scheduler).",
)
REFRESH_STALE = _view_gauge(
    "marketplacedb_refresh_stale", "1 when staleness exceeds the view's maxStaleness (or it never refreshed).",
)
REFRESH_MAX_STALENESS = _view_gauge(
    "marketplacedb_refresh_max_staleness_seconds", "The view's maxStaleness policy.",
)
REFRESH_FAILURES = _view_gauge(
    "marketplacedb_refresh_consecutive_failures", "Failed refreshes since the last success.",
)
_GAUGES = (REFRESH_LAST_SUCCESS, REFRESH_LAST_DURATION, REFRESH_ROWS, REFRESH_STALENESS, REFRESH_STALE,
           REFRESH_MAX_STALENESS, REFRESH_FAILURES, REFRESH_NEVER)


class OutcomeCounters(Collector):
    """`marketplacedb_refresh_outcomes_total{result}`: the state table's cumulative counts.

    The counts are kept in the database (every CronJob pod and the operator add to them), so the
    exporter mirrors them rather than incrementing a process-local Counter, which has no `set`.
    A reset (state row dropped) looks like a counter reset, which Prometheus' rate() handles.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str, str, str], int] = {}

    def set(self, namespace: str, resource: str, view: str, outcomes: Mapping[str, int]) -> None:
        with self._lock:
            for result, count in outcomes.items():
                self._values[(namespace, resource, view, result)] = int(count)

    def forget(self, namespace: str, resource: str, keep_views: Iterable[str] = ()) -> None:
        keep = set(keep_views)
        with self._lock:
            for key in [k for k in self._values if k[:2] == (namespace, resource) and k[2] not in keep]:
                del self._values[key]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "marketplacedb_refresh_outcomes", "Refresh outcomes by result (refreshed, refreshed-plain, "
            "skipped-busy, skipped-unchanged, failed), from the state table.", labels=[*VIEW_LABELS, "result"],
        )
        with self._lock:
            for key, value in sorted(self._values.items()):
                family.add_metric(list(key), value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("marketplacedb_refresh_outcomes", "", labels=[*VIEW_LABELS, "result"])


REFRESH_OUTCOMES = OutcomeCounters()
REGISTRY.register(REFRESH_OUTCOMES)

_lock = threading.Lock()
_views: dict[tuple[str, str], set[str]] = {}


def staleness_seconds(last_success: datetime.datetime | None, now: datetime.datetime) -> float:
    if last_success is None:
        return float("inf")
    return max(0.0, (now - last_success).total_seconds())


def stale(last_success: datetime.datetime | None, now: datetime.datetime, max_staleness: float | None) -> bool:
    """The Stale signal: never refreshed, or older than maxStaleness."""
    if last_success is None:
        return True
    return max_staleness is not None and staleness_seconds(last_success, now) > max_staleness


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


def set_view_metrics(namespace: str, resource: str, views: Iterable[DeclaredView], now: datetime.datetime) -> None:
    """Set the refresh series of a resource's *declared* views (and remove every other view's).

    A declared view with no recorded success is exported as never refreshed, its staleness
    counted from when it was first seen declared, so `marketplacedb_refresh_stale` turns 1 after
    maxStaleness even when no refresh could ever record anything.
    """
    seen: set[str] = set()
    for view in views:
        labels = (namespace, resource, view.name)
        seen.add(view.name)
        row = view.state
        if row is not None:  # the spec's maxStaleness; none (refreshed on demand only): never stale, as in status
            _set_row(labels, row, now, view.max_staleness)
        if row is None or row.last_success is None:
            if row is None:
                REFRESH_FAILURES.labels(*labels).set(0)
            age = math.inf if view.first_seen is None else max(0.0, (now - view.first_seen).total_seconds())
            REFRESH_STALENESS.labels(*labels).set(age)
            limit = view.max_staleness
            if limit is not None:
                REFRESH_MAX_STALENESS.labels(*labels).set(limit)
            REFRESH_STALE.labels(*labels).set(1 if limit is not None and age > limit else 0)
        REFRESH_NEVER.labels(*labels).set(1 if row is None or row.last_success is None else 0)
    _forget_others(namespace, resource, seen)


def _set_row(labels: tuple[str, str, str], row: RefreshRow, now: datetime.datetime, limit: float | None) -> None:
    if row.last_success is not None:
        REFRESH_LAST_SUCCESS.labels(*labels).set(row.last_success.timestamp())
    if row.last_seconds is not None:
        REFRESH_LAST_DURATION.labels(*labels).set(row.last_seconds)
    if row.rows is not None:
        REFRESH_ROWS.labels(*labels).set(row.rows)
    if limit is not None:
        REFRESH_MAX_STALENESS.labels(*labels).set(limit)
    REFRESH_STALENESS.labels(*labels).set(staleness_seconds(row.last_success, now))
    REFRESH_STALE.labels(*labels).set(1 if stale(row.last_success, now, limit) else 0)
    REFRESH_FAILURES.labels(*labels).set(row.consecutive_failures)
    REFRESH_OUTCOMES.set(labels[0], labels[1], labels[2], row.outcomes)


def set_refresh_metrics(namespace: str, resource: str, rows: Iterable[RefreshRow], now: datetime.datetime,
                        max_staleness: Mapping[str, float] | None = None) -> None:
    """Set every refresh series of one resource from state rows (every row passed is exported).

    `max_staleness` (view name -> seconds, from the spec) overrides the policy recorded in the
    row. Views no longer passed are removed, so deleted views leave no stale series behind.
    The operator uses set_view_metrics (declared views only); this is for rows read directly.
    """
    seen: set[str] = set()
    for row in rows:
        labels = (namespace, resource, row.name)
        seen.add(row.name)
        _set_row(labels, row, now, (max_staleness or {}).get(row.name, row.max_staleness))
        REFRESH_NEVER.labels(*labels).set(1 if row.last_success is None else 0)
    _forget_others(namespace, resource, seen)


def _forget_others(namespace: str, resource: str, seen: set[str]) -> None:
    with _lock:
        gone = _views.get((namespace, resource), set()) - seen
        _views[(namespace, resource)] = seen
    for view in gone:
        _remove(namespace, resource, view)
    REFRESH_OUTCOMES.forget(namespace, resource, keep_views=seen)


def forget_resource(namespace: str, resource: str) -> None:
    """Remove every refresh series of a deleted resource."""
    forget_reconcile(namespace, resource)
    with _lock:
        views = _views.pop((namespace, resource), set())
    for view in views:
        _remove(namespace, resource, view)
    REFRESH_OUTCOMES.forget(namespace, resource)


def _remove(namespace: str, resource: str, view: str) -> None:
    for gauge in _GAUGES:
        try:
            gauge.remove(namespace, resource, view)
        except KeyError:
            pass  # this series was never set (e.g. no success yet)


# --- reconcile metrics --------------------------------------------------------------------------

RESOURCE_LABELS = ("namespace", "resource")

RECONCILE_DURATION = Histogram(
    "marketplacedb_reconcile_duration_seconds",
    "Time one reconcile took (observe, plan, act, report).",
    RESOURCE_LABELS,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "marketplacedb_reconcile_errors_total",
    "Reconciles that ended with a part not converged, by condition reason.",
    (*RESOURCE_LABELS, "reason"),
    registry=REGISTRY,
)
DDL_STEPS = Counter(
    "marketplacedb_ddl_objects_total",
    "Database objects the executor worked on, by result (ok, failed).",
    (*RESOURCE_LABELS, "result"),
    registry=REGISTRY,
)
INVALID_INDEXES = Gauge(
    "marketplacedb_invalid_indexes",
    "Declared indexes that are INVALID or failed to build.",
    RESOURCE_LABELS,
    registry=REGISTRY,
)
DRIFTED_OBJECTS = Gauge(
    "marketplacedb_drifted_objects",
    "Declared database objects whose definition differs from the spec (not yet repaired).",
    RESOURCE_LABELS,
    registry=REGISTRY,
)
POOLER_READY = Gauge(
    "marketplacedb_pooler_ready_replicas",
    "Ready PgBouncer pods of the resource's pooler.",
    RESOURCE_LABELS,
    registry=REGISTRY,
)
_RESOURCE_SERIES = (RECONCILE_DURATION, INVALID_INDEXES, DRIFTED_OBJECTS, POOLER_READY)


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
    labels = (namespace, resource)
    RECONCILE_DURATION.labels(*labels).observe(seconds)
    INVALID_INDEXES.labels(*labels).set(invalid_indexes)
    DRIFTED_OBJECTS.labels(*labels).set(drifted)
    if pooler_ready is not None:
        POOLER_READY.labels(*labels).set(pooler_ready)
    for reason in problems:
        RECONCILE_ERRORS.labels(*labels, reason).inc()


def record_ddl(namespace: str, resource: str, ok: int, failed: int) -> None:
    if ok:
        DDL_STEPS.labels(namespace, resource, "ok").inc(ok)
    if failed:
        DDL_STEPS.labels(namespace, resource, "failed").inc(failed)


def forget_reconcile(namespace: str, resource: str) -> None:
    for metric in _RESOURCE_SERIES:
        try:
            metric.remove(namespace, resource)
        except KeyError:
            pass


# --- background DDL progress (issue 14: long DDL off the handler threads) ------------------------

DDL_IN_PROGRESS = Gauge(
    "marketplacedb_ddl_in_progress",
    "1 while DDL of the resource runs (or waits for a slot) in the background, else 0.",
    RESOURCE_LABELS,
    registry=REGISTRY,
)
INDEX_BUILD_BLOCKS = Gauge(
    "marketplacedb_index_build_blocks",
    "Blocks of the running index build's current phase (pg_stat_progress_create_index), done and total.",
    (*RESOURCE_LABELS, "kind"),
    registry=REGISTRY,
)


def record_progress(namespace: str, resource: str, running: bool, done: int | None, total: int | None) -> None:
    DDL_IN_PROGRESS.labels(namespace, resource).set(1 if running else 0)
    for kind, value in (("done", done), ("total", total)):
        if running and value is not None:
            INDEX_BUILD_BLOCKS.labels(namespace, resource, kind).set(value)
        else:
            try:
                INDEX_BUILD_BLOCKS.remove(namespace, resource, kind)
            except KeyError:
                pass
