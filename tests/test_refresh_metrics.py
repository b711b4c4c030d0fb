"""Refresh metrics: set from state rows on the dedicated registry, read back through it."""

from __future__ import annotations

import datetime
import math
from decimal import Decimal
from typing import Any

import psycopg
from prometheus_client import generate_latest

from marketplacedb_operator import metrics
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh, read_refresh_states
from marketplacedb_operator.refresh import RefreshOptions, ViewTarget, refresh_view
from marketplacedb_operator.sql.refresh import RefreshState

NOW = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.UTC)


def sample(name: str, view: str, namespace: str = "prod", resource: str = "shop", **extra: str) -> float | None:
    labels = {"namespace": namespace, "resource": resource, "view": view, **extra}
    return metrics.REGISTRY.get_sample_value(name, labels)


def state(name: str, ago: float | None, **fields: Any) -> RefreshState:
    success = NOW - datetime.timedelta(seconds=ago) if ago is not None else None
    values: dict[str, Any] = {"schema": "public", "name": name, "last_attempt": NOW, "last_success": success,
                              "last_seconds": 0.25, "rows": 100, "counters": Decimal(42), "result": "refreshed",
                              "max_staleness": 3600.0, "outcomes": {"refreshed": 3, "skipped-unchanged": 7}}
    values.update(fields)
    return RefreshState(**values)


def test_gauges_and_outcome_counters_from_rows() -> None:
    metrics.set_refresh_metrics("prod", "shop", [state("mv_hot", 60), state("mv_old", 7200, consecutive_failures=2,
                                                                              outcomes={"failed": 2})], NOW)
    assert sample("marketplacedb_refresh_last_success_timestamp_seconds", "mv_hot") == (NOW.timestamp() - 60)
    assert sample("marketplacedb_refresh_last_duration_seconds", "mv_hot") == 0.25
    assert sample("marketplacedb_refresh_rows", "mv_hot") == 100
    assert sample("marketplacedb_refresh_staleness_seconds", "mv_hot") == 60
    assert sample("marketplacedb_refresh_max_staleness_seconds", "mv_hot") == 3600
    assert sample("marketplacedb_refresh_stale", "mv_hot") == 0
    assert sample("marketplacedb_refresh_stale", "mv_old") == 1  # 2h > maxStaleness 1h
    assert sample("marketplacedb_refresh_consecutive_failures", "mv_old") == 2
    assert sample("marketplacedb_refresh_outcomes_total", "mv_hot", result="skipped-unchanged") == 7
    assert sample("marketplacedb_refresh_outcomes_total", "mv_old", result="failed") == 2
    text = generate_latest(metrics.REGISTRY).decode()
    assert "# TYPE marketplacedb_refresh_outcomes_total counter" in text


def test_spec_max_staleness_overrides_and_never_refreshed_is_stale() -> None:
    metrics.set_refresh_metrics("prod", "spec", [state("mv_a", 600), state("mv_new", None, rows=None)], NOW,
                                max_staleness={"mv_a": 300})
    assert sample("marketplacedb_refresh_stale", "mv_a", resource="spec") == 1
    assert sample("marketplacedb_refresh_max_staleness_seconds", "mv_a", resource="spec") == 300
    assert sample("marketplacedb_refresh_stale", "mv_new", resource="spec") == 1
    assert math.isinf(sample("marketplacedb_refresh_staleness_seconds", "mv_new", resource="spec") or 0)
    assert sample("marketplacedb_refresh_last_success_timestamp_seconds", "mv_new", resource="spec") is None


def test_removed_views_and_resources_leave_no_series() -> None:
    metrics.set_refresh_metrics("ns1", "gone", [state("mv_a", 1), state("mv_b", 1)], NOW)
    metrics.set_refresh_metrics("ns1", "gone", [state("mv_a", 1)], NOW)
    assert sample("marketplacedb_refresh_rows", "mv_a", "ns1", "gone") == 100
    assert sample("marketplacedb_refresh_rows", "mv_b", "ns1", "gone") is None
    assert sample("marketplacedb_refresh_outcomes_total", "mv_b", "ns1", "gone", result="refreshed") is None
    metrics.forget_resource("ns1", "gone")
    assert sample("marketplacedb_refresh_rows", "mv_a", "ns1", "gone") is None
    assert sample("marketplacedb_refresh_outcomes_total", "mv_a", "ns1", "gone", result="refreshed") is None


def test_labels_are_names_only() -> None:
    for family in metrics.REGISTRY.collect():
        if family.name.startswith("marketplacedb_refresh"):
            for s in family.samples:
                assert set(s.labels) <= {"namespace", "resource", "view", "result"}


def test_metrics_from_the_real_state_table(workload_db: Any) -> None:
    """CronJob runs write the state table; the operator reads it and exports what they did."""
    with psycopg.connect(workload_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE MATERIALIZED VIEW mv_cats AS SELECT id, name FROM categories WHERE is_active")
        conn.execute("CREATE UNIQUE INDEX ON mv_cats (id)")
        target = ViewTarget("public", "mv_cats")
        now = datetime.datetime.now(datetime.UTC)
        options = RefreshOptions(max_staleness=600)
        first = refresh_view(PostgresRefresh(conn), target, options, now)
        second = refresh_view(PostgresRefresh(conn), target, options, now, force=True)
        assert (first.outcome, second.outcome) == ("refreshed", "refreshed")
        rows = read_refresh_states(conn)
    metrics.set_refresh_metrics("real", "shop", rows, now + datetime.timedelta(seconds=30))
    assert sample("marketplacedb_refresh_rows", "mv_cats", "real") == 45
    assert sample("marketplacedb_refresh_outcomes_total", "mv_cats", "real", result="refreshed") == 2
    assert sample("marketplacedb_refresh_staleness_seconds", "mv_cats", "real") == 30
    assert sample("marketplacedb_refresh_stale", "mv_cats", "real") == 0
    assert (sample("marketplacedb_refresh_last_duration_seconds", "mv_cats", "real") or 0) > 0
    metrics.set_refresh_metrics("real", "shop", rows, now + datetime.timedelta(seconds=601))
    assert sample("marketplacedb_refresh_stale", "mv_cats", "real") == 1


def test_declared_views_only_never_refreshed_counted_from_first_sight() -> None:
    from marketplacedb_operator.sql.refresh_truth import ViewSeries

    two_hours_ago = NOW - datetime.timedelta(hours=2)
    metrics.set_view_metrics("decl", "shop", [
        ViewSeries("mv_scheduled", 3600.0, two_hours_ago, None),
        ViewSeries("mv_on_demand", None, two_hours_ago, None),
        ViewSeries("mv_fresh", 3600.0, two_hours_ago, state("mv_fresh", 60)),
    ], NOW)
    assert sample("marketplacedb_refresh_stale", "mv_scheduled", "decl") == 1
    assert sample("marketplacedb_refresh_staleness_seconds", "mv_scheduled", "decl") == 7200
    assert sample("marketplacedb_refresh_never_refreshed", "mv_scheduled", "decl") == 1
    assert sample("marketplacedb_refresh_stale", "mv_on_demand", "decl") == 0  # no maxStaleness: as in status
    assert sample("marketplacedb_refresh_stale", "mv_fresh", "decl") == 0
    assert sample("marketplacedb_refresh_never_refreshed", "mv_fresh", "decl") == 0
    metrics.set_view_metrics("decl", "shop", [ViewSeries("mv_fresh", 3600.0, two_hours_ago, state("mv_fresh", 60))],
                             NOW)
    assert sample("marketplacedb_refresh_stale", "mv_scheduled", "decl") is None  # left the spec
    assert sample("marketplacedb_refresh_never_refreshed", "mv_scheduled", "decl") is None
