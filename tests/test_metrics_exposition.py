"""The operator's /metrics exposition, scraped and parsed as Prometheus would, for a scripted sequence.

This is the contract dashboards and alerts rely on: family names, HELP, TYPE, label names and
values, histogram buckets (cumulative, `_sum`, `_count`), counters' `_total` and `_created`. The
expectations are written out by hand from the functions' documented meaning; the test passed on
the prometheus_client-object implementation and must keep passing on any other (issue 14:
metrics.py holds per-resource data compactly and builds the families at scrape time).
"""

from __future__ import annotations

import datetime
import re
import threading
import urllib.request
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from marketplacedb_operator import metrics, metrics_exposition
from marketplacedb_operator.sql.refresh import RefreshState
from marketplacedb_operator.sql.refresh_truth import ViewSeries

NOW = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.UTC)
NS = "expo"
INF = float("inf")
BUCKETS = ("0.01", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "60.0", "300.0", "1800.0", "+Inf")
CREATED = "created"  # a `_created` sample: present, its value (process time) not compared

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float | str]

FAMILIES = (  # name, TYPE, HELP: in the order they are exposed
    ("marketplacedb_refresh_last_success_timestamp_seconds", "gauge",
     "Unix time of the last successful refresh of a materialized view."),
    ("marketplacedb_refresh_last_duration_seconds", "gauge",
     "Duration of the last successful refresh (REFRESH and row count)."),
    ("marketplacedb_refresh_rows", "gauge", "Rows in the view after its last successful refresh."),
    ("marketplacedb_refresh_staleness_seconds", "gauge",
     "Seconds since the last successful refresh; never refreshed: since the view was first seen declared "
     "(+Inf when unknown)."),
    ("marketplacedb_refresh_never_refreshed", "gauge",
     "1 when no successful refresh of a declared view was ever recorded (whatever the scheduler)."),
    ("marketplacedb_refresh_stale", "gauge",
     "1 when staleness exceeds the view's maxStaleness (or it never refreshed)."),
    ("marketplacedb_refresh_max_staleness_seconds", "gauge", "The view's maxStaleness policy."),
    ("marketplacedb_refresh_consecutive_failures", "gauge", "Failed refreshes since the last success."),
    ("marketplacedb_refresh_outcomes_total", "counter",
     "Refresh outcomes by result (refreshed, refreshed-plain, skipped-busy, skipped-unchanged, failed), "
     "from the state table."),
    ("marketplacedb_reconcile_duration_seconds", "histogram", "Time one reconcile took (observe, plan, act, report)."),
    ("marketplacedb_reconcile_errors_total", "counter",
     "Reconciles that ended with a part not converged, by condition reason."),
    ("marketplacedb_ddl_objects_total", "counter", "Database objects the executor worked on, by result (ok, failed)."),
    ("marketplacedb_invalid_indexes", "gauge", "Declared indexes that are INVALID or failed to build."),
    ("marketplacedb_drifted_objects", "gauge",
     "Declared database objects whose definition differs from the spec (not yet repaired)."),
    ("marketplacedb_pooler_ready_replicas", "gauge", "Ready PgBouncer pods of the resource's pooler."),
    ("marketplacedb_ddl_in_progress", "gauge",
     "1 while DDL of the resource runs (or waits for a slot) in the background, else 0."),
    ("marketplacedb_index_build_blocks", "gauge",
     "Blocks of the running index build's current phase (pg_stat_progress_create_index), done and total."),
)
HEADERS = "".join(f"# HELP {name} {text}\n# TYPE {name} {kind}\n" for name, kind, text in FAMILIES)


def scrape(namespace: str = NS) -> Series:
    """Every sample of `namespace`, as Prometheus parses the text exposition (labels in text order)."""
    series: Series = {}
    for family in text_string_to_metric_families(metrics_exposition.exposition(metrics.REGISTRY).decode()):
        for sample in family.samples:
            if sample.labels.get("namespace") == namespace:
                key = (sample.name, tuple(sample.labels.items()))
                assert key not in series, f"duplicate series {key}"
                series[key] = CREATED if sample.name.endswith("_created") else sample.value
    return series


def headers() -> str:
    """The HELP and TYPE lines of the operator's own families (the `_created` gauges excluded)."""
    text = generate_latest(metrics.REGISTRY).decode()
    return "".join(line + "\n" for line in text.splitlines()
                   if line.startswith("# ") and not re.match(r"# \w+ \w+_created ", line))


def s(name: str, value: float | str, **labels: str) -> Series:
    ordered = tuple(sorted({"namespace": NS, **labels}.items()))
    return {(name, ordered): value}


def view(resource: str, name: str, **values: float) -> Series:
    """A view's gauges: keyword = metric name after `marketplacedb_refresh_`."""
    out: Series = {}
    for metric, value in values.items():
        out |= s(f"marketplacedb_refresh_{metric}", value, resource=resource, view=name)
    return out


def outcomes(resource: str, name: str, counts: dict[str, int]) -> Series:
    out: Series = {}
    for result, count in counts.items():
        out |= s("marketplacedb_refresh_outcomes_total", float(count), resource=resource, view=name, result=result)
    return out  # mirrored from the state table: no `_created` (the process did not create the count)


def histogram(resource: str, observations: Iterable[float]) -> Series:
    seen = list(observations)
    name = "marketplacedb_reconcile_duration_seconds"
    out: Series = {}
    for le in BUCKETS:
        count = sum(1 for o in seen if o <= float(le.replace("+Inf", "inf")))
        out |= s(f"{name}_bucket", float(count), resource=resource, le=le)
    out |= s(f"{name}_count", float(len(seen)), resource=resource)
    out |= s(f"{name}_sum", sum(seen), resource=resource)
    return out | s(f"{name}_created", CREATED, resource=resource)


def counter(name: str, resource: str, label: str, counts: dict[str, int]) -> Series:
    out: Series = {}
    for value, count in counts.items():
        out |= s(f"marketplacedb_{name}_total", float(count), resource=resource, **{label: value})
        out |= s(f"marketplacedb_{name}_created", CREATED, resource=resource, **{label: value})
    return out


def row(name: str, ago: float | None, **fields: Any) -> RefreshState:
    success = NOW - datetime.timedelta(seconds=ago) if ago is not None else None
    values: dict[str, Any] = {"schema": "public", "name": name, "last_attempt": NOW, "last_success": success,
                              "last_seconds": 0.25, "rows": 100, "counters": Decimal(42), "result": "refreshed",
                              "max_staleness": 3600.0, "outcomes": {"refreshed": 3, "skipped-unchanged": 7}}
    values.update(fields)
    return RefreshState(**values)


TWO_HOURS_AGO = NOW - datetime.timedelta(hours=2)
FRESH = ViewSeries("mv_fresh", 3600.0, TWO_HOURS_AGO, row("mv_fresh", 60))
NEVER = ViewSeries("mv_never", 3600.0, TWO_HOURS_AGO, None)  # declared, no state row
FAILING = ViewSeries("mv_failing", None, None,  # a row without success, no maxStaleness in the spec
                     row("mv_failing", None, last_seconds=0.5, rows=None, consecutive_failures=2,
                         outcomes={"failed": 2}))


def test_headers_are_the_documented_families() -> None:
    assert headers() == HEADERS


def test_scripted_sequence_exposes_exactly_these_series() -> None:
    # A resource with three declared views: fresh, never recorded, failing without a success.
    metrics.set_view_metrics(NS, "a", [FRESH, NEVER, FAILING], NOW)
    fresh = view("a", "mv_fresh", last_success_timestamp_seconds=NOW.timestamp() - 60, last_duration_seconds=0.25,
                 rows=100.0, staleness_seconds=60.0, stale=0.0, max_staleness_seconds=3600.0,
                 consecutive_failures=0.0, never_refreshed=0.0) | outcomes("a", "mv_fresh",
                                                                         {"refreshed": 3, "skipped-unchanged": 7})
    never = view("a", "mv_never", staleness_seconds=7200.0, stale=1.0, max_staleness_seconds=3600.0,
                 consecutive_failures=0.0, never_refreshed=1.0)
    # No first sight recorded: +Inf staleness; no maxStaleness: never stale (as in status).
    failing = view("a", "mv_failing", last_duration_seconds=0.5, staleness_seconds=INF, stale=0.0,
                   consecutive_failures=2.0, never_refreshed=1.0) | outcomes("a", "mv_failing", {"failed": 2})
    assert scrape() == fresh | never | failing

    # Reconciles, one with problems; DDL counts (a zero count creates no series).
    metrics.record_reconcile(NS, "a", 0.2, invalid_indexes=1, drifted=2, pooler_ready=3,
                             problems=["DatabaseUnreachable"])
    metrics.record_reconcile(NS, "a", 7.0, invalid_indexes=0, drifted=1, pooler_ready=None,
                             problems=["DatabaseUnreachable", "PoolerNotReady"])
    metrics.record_ddl(NS, "a", 3, 0)
    metrics.record_ddl(NS, "a", 2, 1)
    reconciled = (histogram("a", [0.2, 7.0])
                  | counter("reconcile_errors", "a", "reason", {"DatabaseUnreachable": 2, "PoolerNotReady": 1})
                  | counter("ddl_objects", "a", "result", {"ok": 5, "failed": 1})
                  | s("marketplacedb_invalid_indexes", 0.0, resource="a")
                  | s("marketplacedb_drifted_objects", 1.0, resource="a")
                  | s("marketplacedb_pooler_ready_replicas", 3.0, resource="a"))  # None: left as it was
    assert scrape() == fresh | never | failing | reconciled

    # Progress of a background build: blocks while running and known, gone otherwise.
    metrics.record_progress(NS, "a", True, 10, 100)
    assert scrape() == (fresh | never | failing | reconciled | s("marketplacedb_ddl_in_progress", 1.0, resource="a")
                        | s("marketplacedb_index_build_blocks", 10.0, resource="a", kind="done")
                        | s("marketplacedb_index_build_blocks", 100.0, resource="a", kind="total"))
    metrics.record_progress(NS, "a", True, 20, None)
    assert scrape() == (fresh | never | failing | reconciled | s("marketplacedb_ddl_in_progress", 1.0, resource="a")
                        | s("marketplacedb_index_build_blocks", 20.0, resource="a", kind="done"))
    metrics.record_progress(NS, "a", False, 30, 100)
    done = reconciled | s("marketplacedb_ddl_in_progress", 0.0, resource="a")
    assert scrape() == fresh | never | failing | done

    # Two views leave the spec: their series (outcomes included) go; the fresh view's stay.
    metrics.set_view_metrics(NS, "a", [FRESH], NOW)
    assert scrape() == fresh | done

    # The failing view comes back, now with a success and without outcomes in its row: values
    # set before and not set now stay (a gauge keeps its last value), as prometheus_client did.
    back = ViewSeries("mv_failing", 600.0, None, row("mv_failing", 900, rows=None, outcomes={}))
    metrics.set_view_metrics(NS, "a", [FRESH, back], NOW)
    failing_back = view("a", "mv_failing", last_success_timestamp_seconds=NOW.timestamp() - 900,
                        last_duration_seconds=0.25, staleness_seconds=900.0, stale=1.0, max_staleness_seconds=600.0,
                        consecutive_failures=0.0, never_refreshed=0.0)
    assert scrape() == fresh | failing_back | done

    # A second resource, from rows read directly; the first one's series are untouched.
    metrics.set_refresh_metrics(NS, "b", [row("mv_x", 30)], NOW, max_staleness={"mv_x": 10.0})
    metrics.record_reconcile(NS, "b", 0.01, invalid_indexes=0, drifted=0, pooler_ready=0, problems=[])
    b = (view("b", "mv_x", last_success_timestamp_seconds=NOW.timestamp() - 30, last_duration_seconds=0.25,
              rows=100.0, staleness_seconds=30.0, stale=1.0, max_staleness_seconds=10.0, consecutive_failures=0.0,
              never_refreshed=0.0) | outcomes("b", "mv_x", {"refreshed": 3, "skipped-unchanged": 7})
         | histogram("b", [0.01]) | s("marketplacedb_invalid_indexes", 0.0, resource="b")
         | s("marketplacedb_drifted_objects", 0.0, resource="b") | s("marketplacedb_pooler_ready_replicas", 0.0,
                                                                    resource="b"))
    assert scrape() == fresh | failing_back | done | b

    # Views of "b" emptied by set_refresh_metrics: its refresh series go, its reconcile series stay.
    metrics.set_refresh_metrics(NS, "b", [], NOW)
    assert scrape() == fresh | failing_back | done | {k: v for k, v in b.items() if "refresh" not in k[0]}
    assert headers() == HEADERS


def test_created_is_when_the_series_first_appeared() -> None:
    metrics.record_reconcile("created", "c", 0.3, invalid_indexes=0, drifted=0, pooler_ready=None, problems=["X"])
    text = generate_latest(metrics.REGISTRY).decode()
    first = re.search(r'^marketplacedb_reconcile_errors_created\{namespace="created",reason="X",resource="c"\} (\S+)$',
                      text, re.M)
    assert first is not None
    metrics.record_reconcile("created", "c", 0.3, invalid_indexes=0, drifted=0, pooler_ready=None, problems=["X"])
    again = generate_latest(metrics.REGISTRY).decode()
    assert f'marketplacedb_reconcile_errors_created{{namespace="created",reason="X",resource="c"}} {first[1]}' in again
    assert 'marketplacedb_reconcile_errors_total{namespace="created",reason="X",resource="c"} 2.0' in again
    metrics.forget_resource("created", "c")


def test_a_deleted_resource_leaves_no_series() -> None:
    """forget_resource (teardown) removes every series of the resource: refresh, reconcile, DDL, progress."""
    metrics.set_view_metrics("deleted", "gone", [FRESH, NEVER, FAILING], NOW)
    metrics.record_reconcile("deleted", "gone", 0.2, invalid_indexes=1, drifted=1, pooler_ready=1,
                             problems=["DatabaseUnreachable"])
    metrics.record_ddl("deleted", "gone", 3, 1)
    metrics.record_progress("deleted", "gone", True, 1, 2)
    metrics.record_reconcile("deleted", "kept", 0.2, invalid_indexes=0, drifted=0, pooler_ready=None, problems=[])
    assert len(scrape("deleted")) > 40
    metrics.forget_resource("deleted", "gone")
    assert {key[0] for key in scrape("deleted")} == {  # only the other resource's series remain
        *(f"marketplacedb_reconcile_duration_seconds_{s}" for s in ("bucket", "count", "sum", "created")),
        "marketplacedb_invalid_indexes", "marketplacedb_drifted_objects"}
    assert all(("resource", "kept") in key[1] for key in scrape("deleted"))
    metrics.forget_resource("deleted", "kept")
    assert scrape("deleted") == {}


def test_a_scrape_sees_whole_reconciles_never_half_of_one() -> None:
    """Reconciles run on handler threads while the HTTP server scrapes on its own."""
    stop = threading.Event()

    def reconciles() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            metrics.record_reconcile("torn", "r", 1.0, invalid_indexes=i, drifted=i, pooler_ready=i, problems=["X"])

    writer = threading.Thread(target=reconciles)
    writer.start()
    try:
        for _ in range(300):
            series = scrape("torn")
            if not series:
                continue
            values = {name: value for (name, labels), value in series.items() if ("le", "+Inf") in labels
                      or not name.endswith("_bucket")}
            count = values["marketplacedb_reconcile_duration_seconds_count"]
            assert values["marketplacedb_reconcile_duration_seconds_sum"] == count  # every observation is 1.0
            assert values["marketplacedb_reconcile_duration_seconds_bucket"] == count
            assert values["marketplacedb_reconcile_errors_total"] == count
            assert values["marketplacedb_invalid_indexes"] == values["marketplacedb_drifted_objects"] == \
                values["marketplacedb_pooler_ready_replicas"] == count
    finally:
        stop.set()
        writer.join()
        metrics.forget_resource("torn", "r")


def test_the_served_page_is_prometheus_clients_text_byte_for_byte() -> None:
    """The operator streams /metrics itself (metrics_exposition.py: memory); the page must be the
    text prometheus_client's generate_latest writes, hostile view names included (a quote, a
    backslash, a newline: escaped in label values), and the same over HTTP."""
    hostile = ['mv_"quoted"', "mv_back\\slash", "mv_new\nline"]
    metrics.set_view_metrics(NS, "hostile", [ViewSeries(name, 60.0, NOW, row(name, 30.0)) for name in hostile], NOW)
    metrics.record_reconcile(NS, "hostile", 0.3, invalid_indexes=1, drifted=0, pooler_ready=None, problems=["X"])
    metrics.record_ddl(NS, "hostile", 2, 1)
    metrics.record_progress(NS, "hostile", True, 3, 9)
    try:
        expected = generate_latest(metrics.REGISTRY)
        assert metrics_exposition.exposition(metrics.REGISTRY) == expected
        assert b'view="mv_\\"quoted\\""' in expected and b'view="mv_new\\nline"' in expected
        server = metrics_exposition.serve(0, metrics.REGISTRY, addr="127.0.0.1")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=10) as reply:
                assert reply.headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
                assert reply.read() == expected
        finally:
            server.shutdown()
            server.server_close()
    finally:
        metrics.forget_resource(NS, "hostile")
