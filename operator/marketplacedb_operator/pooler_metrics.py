"""PgBouncer's own counters as Prometheus metrics, served by the pooler agent (spec.pooler.metrics).

Why the agent and not a separate exporter image: the agent already holds the only way into the
admin console (the Unix socket, PgBouncer's uid), and one image fewer runs next to the auth file.
Debian's `prometheus-pgbouncer-exporter` (1.7) was tried against the tests' PgBouncer 1.18 and
fails at start-up: it reads a `total_requests` column that SHOW STATS lost in PgBouncer 1.8.

The metric names are those of prometheus-community/pgbouncer_exporter (collector.go), so that
dashboards and alerts written for it work unchanged: `pgbouncer_<SHOW command>_<column name>`,
for example `pgbouncer_pools_client_waiting_connections{database}`. One difference: pools are
summed per database (the longest wait is the maximum) and carry no `user` label, because user
names come from Secrets and stay out of metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .pooler_console import AdminConsole, AdminError

Column = tuple[str, str, float]  # (metric suffix, kind, factor)


def _columns(kind: str, factor: float, suffixes: dict[str, str]) -> dict[str, Column]:
    """SHOW columns of one kind and scale: column -> (metric suffix, kind, factor)."""
    return {column: (suffix, kind, factor) for column, suffix in suffixes.items()}


# SHOW <command>: labels, then column -> (metric suffix, kind, factor), as in pgbouncer_exporter.
_COLUMNS: dict[str, tuple[tuple[str, ...], dict[str, Column]]] = {
    "pools": (("database",), _columns("gauge", 1, {
        "cl_active": "client_active_connections", "cl_waiting": "client_waiting_connections",
        "sv_active": "server_active_connections", "sv_idle": "server_idle_connections",
        "sv_used": "server_used_connections", "sv_tested": "server_testing_connections",
        "sv_login": "server_login_connections", "maxwait": "client_maxwait_seconds",
    })),
    "stats_totals": (("database",), {
        **_columns("counter", 1, {"xact_count": "sql_transactions_pooled", "query_count": "queries_pooled",
                                  "bytes_received": "received_bytes", "bytes_sent": "sent_bytes"}),
        # PgBouncer counts these in microseconds.
        **_columns("counter", 1e-6, {"xact_time": "server_in_transaction_seconds",
                                     "query_time": "queries_duration_seconds", "wait_time": "client_wait_seconds"}),
    }),
    "databases": (("name", "database"), _columns("gauge", 1, {
        "pool_size": "pool_size", "reserve_pool": "reserve_pool", "max_connections": "max_connections",
        "current_connections": "current_connections", "paused": "paused", "disabled": "disabled",
    })),
}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class PgBouncerCollector(Collector):
    """One scrape = one admin-console connection per SHOW command; `pgbouncer_up` 0 when one failed."""

    def __init__(self, console: AdminConsole) -> None:
        self.console = console

    def collect(self) -> Iterator[Metric]:
        up = 1.0
        try:
            version = str((self.console.query("SHOW VERSION") or [{}])[0].get("version", ""))
            info = GaugeMetricFamily("pgbouncer_version_info", "The pgbouncer version info", labels=["version"])
            info.add_metric([version], 1.0)
            yield info
            for command, (labels, columns) in _COLUMNS.items():
                yield from self._table(command, labels, columns, self.console.query(f"SHOW {command.upper()}"))
            lists = {str(r["list"]): _number(r["items"]) for r in self.console.query("SHOW LISTS")}
            for name in ("databases", "users", "pools", "free_clients", "used_clients", "login_clients",
                         "free_servers", "used_servers"):
                if lists.get(name) is not None:
                    yield GaugeMetricFamily(f"pgbouncer_{name}", f"Count of {name.replace('_', ' ')}",
                                            value=lists[name])
        except AdminError:
            up = 0.0
        yield GaugeMetricFamily("pgbouncer_up", "The pgbouncer scrape succeeded", value=up)

    @staticmethod
    def _table(command: str, labels: tuple[str, ...], columns: dict[str, Column],
               rows: list[dict[str, Any]]) -> Iterator[Metric]:
        for column, (suffix, kind, factor) in columns.items():
            name = f"pgbouncer_{command}_{suffix}"
            family: GaugeMetricFamily | CounterMetricFamily
            if kind == "counter":
                family = CounterMetricFamily(name, f"SHOW {command.upper()} {column}", labels=list(labels))
            else:
                family = GaugeMetricFamily(name, f"SHOW {command.upper()} {column}", labels=list(labels))
            values: dict[tuple[str, ...], float] = {}
            for row in rows:
                value = _number(row.get(column))
                if value is None:
                    continue
                key = tuple(str(row.get(label) or "") for label in labels)
                # Several rows per database (one pool per user): sum them, the longest wait wins.
                value *= factor
                if key in values:
                    value = max(values[key], value) if column == "maxwait" else values[key] + value
                values[key] = value
            for key, value in sorted(values.items()):
                family.add_metric(list(key), value)
            yield family


def registry(console: AdminConsole) -> CollectorRegistry:
    """A registry with only PgBouncer's metrics (not the agent's own process metrics)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PgBouncerCollector(console))
    return reg
