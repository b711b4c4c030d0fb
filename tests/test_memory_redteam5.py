"""Red team 5 (issue 14, operator memory): the operator's own /metrics server and exposition.

The served page replaced prometheus_client.start_http_server (metrics_exposition.serve). These
compare it with what prometheus_client's server answered the same request before, and probe the
server under disconnects and concurrent writers. Findings fail; probes that held are kept as coverage.
"""

from __future__ import annotations

import asyncio
import contextvars
import gzip
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import kopf
import kubernetes
import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from harness.kube import KubeEmulator, KubeObjects, eventually, kopf_runner
from marketplacedb_operator import handlers, metrics, metrics_exposition, naming
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.reconcile import Outcome
from marketplacedb_operator.scheduler import PeeringPause, Scheduler
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.status import Event

NS = "redteam5"
# Prometheus 2.x's default scrape Accept header (scrape/scrape.go, acceptHeader) and its encoding.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def _get(port: int, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


@pytest.fixture()
def servers() -> Iterator[tuple[int, int]]:
    """(old, new): prometheus_client's start_http_server and metrics_exposition.serve, same registry."""
    for i in range(5):
        metrics.record_reconcile(NS, f"r{i}", 0.2, invalid_indexes=0, drifted=0, pooler_ready=1, problems=["X"])
    old, old_thread = start_http_server(0, addr="127.0.0.1", registry=metrics.REGISTRY)
    new = metrics_exposition.serve(0, metrics.REGISTRY, addr="127.0.0.1")
    try:
        yield old.server_address[1], new.server_address[1]
    finally:
        for server in (old, new):
            server.shutdown()
            server.server_close()
        for i in range(5):
            metrics.forget_resource(NS, f"r{i}")


def test_plain_scrape_is_labelled_with_the_format_it_is_in(servers: tuple[int, int]) -> None:
    """FINDING: the page is text format 0.0.4 (generate_latest's), but it is served as
    CONTENT_TYPE_LATEST, which in prometheus_client 0.26 is `text/plain; version=1.0.0`; the old
    server (choose_encoder) labelled the same bytes `version=0.0.4`."""
    old, new = servers
    old_status, old_headers, _ = _get(old)
    new_status, new_headers, _ = _get(new)
    assert (new_status, new_headers["Content-Type"]) == (old_status, old_headers["Content-Type"])


def test_a_prometheus_scrape_gets_the_text_format_it_can_take(servers: tuple[int, int]) -> None:
    """FINDING (declined, documented in README "Metrics"): Prometheus asks for OpenMetrics first; the old
    server answered OpenMetrics, the operator's own answers the text format 0.0.4 whatever the Accept
    header (streaming OpenMetrics would be a second formatter of prometheus_client's; Prometheus
    takes text 0.0.4, the format its Accept header lists next). So this pins what is served:
    labelled 0.0.4, gzip as asked, and the text generate_latest writes."""
    _, new = servers
    _, headers, body = _get(new, {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers.get("Content-Encoding") == "gzip"
    assert gzip.decompress(body) == generate_latest(metrics.REGISTRY)


def test_gzip_is_honoured_as_before(servers: tuple[int, int]) -> None:
    """FINDING (low): Accept-Encoding: gzip (Prometheus always sends it) was honoured; the new page is
    sent uncompressed (~4 MB per scrape at N = 1,000 instead of a few hundred KB on the wire)."""
    old, new = servers
    _, old_headers, old_body = _get(old, {"Accept-Encoding": "gzip"})
    _, new_headers, new_body = _get(new, {"Accept-Encoding": "gzip"})
    assert old_headers.get("Content-Encoding") == "gzip" and gzip.decompress(old_body)  # the baseline
    assert new_headers.get("Content-Encoding") == "gzip"


@pytest.mark.parametrize("method", ["OPTIONS"])
def test_other_methods_are_answered_as_before(servers: tuple[int, int], method: str) -> None:
    """FINDING (low): the old server answered OPTIONS 200 (Allow: OPTIONS,GET), HEAD 405; the
    new one answers 501 Unsupported method to both (HEAD: both refuse, not asserted)."""
    old, new = servers
    old_status, _, _ = _get(old, method=method)
    new_status, _, _ = _get(new, method=method)
    assert new_status == old_status


class _Families:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        return iter(self.families)


def test_exposition_matches_generate_latest_on_hostile_values() -> None:
    """PROBE (held): non-finite and extreme floats, \\r / tab / unicode / empty label values, HELP with
    backslash, newline and unicode, empty families, counters with and without `_created`, a
    histogram, and an empty registry: exposition() is generate_latest's text byte for byte."""
    values = [float("nan"), float("inf"), -float("inf"), 1e-300, 1e300, -0.0, 0.1 + 0.2, 5e-324, 2.0**53 + 1, 0.0]
    gauge = GaugeMetricFamily("rt5_values", "h\\e\nl\r\t\"é", labels=["i"])
    for i, value in enumerate(values):
        gauge.add_metric([str(i)], value)
    labels = GaugeMetricFamily("rt5_labels", "h", labels=["v"])
    for text in ["a\rb", "a\tb", "é漢🙂", "\\n", '"', "", "\x00", "\u2028"]:
        labels.add_metric([text], 1)
    created = CounterMetricFamily("rt5_c", "h", labels=["x"])
    created.add_metric(["1"], 2, created=123.5)
    plain = CounterMetricFamily("rt5_d_total", "h", labels=["x"])
    plain.add_metric(["1"], float("inf"))
    histogram = HistogramMetricFamily("rt5_h", "h", labels=["x"])
    histogram.add_metric(["1"], [("0.1", 1), ("+Inf", 2)], float("nan"))
    for families in ([gauge, labels, created, plain, histogram, GaugeMetricFamily("rt5_empty", "")], []):
        registry = CollectorRegistry()
        registry.register(_Families(families))
        assert metrics_exposition.exposition(registry) == generate_latest(registry)


def _populate(count: int) -> None:
    for i in range(count):
        metrics.record_reconcile(NS, f"big{i}", 0.3, invalid_indexes=1, drifted=0, pooler_ready=2,
                                 problems=["A", "B"])


def test_a_scraper_that_hangs_up_mid_page_costs_nothing() -> None:
    """PROBE (held): clients that disconnect after a few bytes of a multi-chunk page neither stop the
    server nor leave handler threads behind; the next scrape is the whole page."""
    _populate(2000)
    server = metrics_exposition.serve(0, metrics.REGISTRY, addr="127.0.0.1")
    port = server.server_address[1]
    try:
        before = threading.active_count()
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                assert sock.recv(64).startswith(b"HTTP/1.0 200")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        status, _, body = _get(port)
        assert status == 200
        assert body == metrics_exposition.exposition(metrics.REGISTRY)
        for _ in range(100):  # handler threads end once their write fails
            if threading.active_count() <= before + 1:
                break
            threading.Event().wait(0.1)
        assert threading.active_count() <= before + 1
    finally:
        server.shutdown()
        server.server_close()
        for i in range(2000):
            metrics.forget_resource(NS, f"big{i}")


def test_concurrent_scrapes_while_other_threads_write_and_forget() -> None:
    """PROBE (held): two scrapers and writers/forgetters at once: every page parses, each histogram's
    `_count` equals its +Inf bucket, no series is duplicated, and nothing raises."""
    _populate(300)
    server = metrics_exposition.serve(0, metrics.REGISTRY, addr="127.0.0.1")
    port = server.server_address[1]
    stop, errors = threading.Event(), []

    def write() -> None:
        i = 0
        while not stop.is_set():
            name = f"big{i % 300}"
            metrics.forget_resource(NS, name)
            metrics.record_reconcile(NS, name, 0.01 * (i % 50), invalid_indexes=i % 3, drifted=0, pooler_ready=None,
                                     problems=["C"] if i % 2 else [])
            metrics.record_ddl(NS, name, ok=1, failed=i % 2)
            metrics.record_progress(NS, name, running=bool(i % 2), done=i, total=i + 1)
            i += 1

    def scrape() -> None:
        try:
            for _ in range(5):
                status, _, body = _get(port)
                assert status == 200
                seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
                counts: dict[tuple[tuple[str, str], ...], float] = {}
                infs: dict[tuple[tuple[str, str], ...], float] = {}
                for family in text_string_to_metric_families(body.decode()):
                    for sample in family.samples:
                        key = (sample.name, tuple(sorted(sample.labels.items())))
                        assert key not in seen, key
                        seen.add(key)
                        rest = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                        if sample.name.endswith("_count"):
                            counts[rest] = sample.value
                        elif sample.name.endswith("_bucket") and sample.labels["le"] == "+Inf":
                            infs[rest] = sample.value
                assert counts == infs
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    writers = [threading.Thread(target=write) for _ in range(2)]
    scrapers = [threading.Thread(target=scrape) for _ in range(2)]
    try:
        for thread in writers + scrapers:
            thread.start()
        for thread in scrapers:
            thread.join(120)
    finally:
        stop.set()
        for thread in writers:
            thread.join(30)
        server.shutdown()
        server.server_close()
        for i in range(300):
            metrics.forget_resource(NS, f"big{i}")
    assert not errors, errors


# --- the packed event body and kopf's short worker idle, on KMock ---------------------------------

UNICODE = "é漢🙂\u2028\t\r\"\\"


def _shop(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": naming.API_VERSION, "kind": naming.KIND,
            "metadata": {"name": "shop", "namespace": NS, "labels": {"team": "a"},
                         "annotations": {"note": UNICODE * 50}},
            "spec": spec}


async def test_a_packed_body_is_the_object_and_its_events_reference_it(
    kube_api: KubeEmulator, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PROBE (held): an event reconcile gets, after _pack/_run_packed, the object as the API holds it
    (non-ASCII annotation, ~60 KiB spec), and kopf.event on the kopf.Body built from the plain dict
    posts an Event whose involvedObject is the object (kind, apiVersion, name, namespace, uid).
    Then rapid spec edits around kopf's 0.5 s worker idle: the last generation is reconciled."""
    await kube_objects.ensure_namespace(NS)
    seen: list[dict[str, Any]] = []

    def reconcile(body: dict[str, Any], deps: Any) -> Outcome:
        seen.append(body)
        generation = body["metadata"]["generation"]
        return Outcome(events=[Event("Normal", "RedTeam", f"gen {generation} {UNICODE}")], temporary=False,
                       requeue_after=3600)

    monkeypatch.setattr(handlers, "reconcile", reconcile)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, make_deps(Settings(resync_seconds=3600), kube_client))
    spec = {"indexes": [{"name": f"idx_{n}", "table": "items", "columns": [{"name": "sku"}]} for n in range(600)]}
    async with kopf_runner(kube_api, registry, namespaces=[NS]):
        created = await kube_objects.create(_shop(spec))
        await eventually(lambda: bool(seen), timeout=30, message="the event reconcile ran")
        first = seen[0]
        assert first["metadata"]["annotations"] == created["metadata"]["annotations"]
        assert first["spec"] == created["spec"] and first["metadata"]["uid"] == created["metadata"]["uid"]

        def posted() -> list[dict[str, Any]]:
            return [e for e in kube_objects.events(NS, involved_name="shop") if e.get("reason") == "RedTeam"]

        await eventually(lambda: bool(posted()), timeout=30, message="the Event was posted")
        event = posted()[0]
        involved = event.get("involvedObject") or event.get("regarding") or {}
        assert {k: involved.get(k) for k in ("apiVersion", "kind", "name", "namespace", "uid")} == {
            "apiVersion": naming.API_VERSION, "kind": naming.KIND, "name": "shop", "namespace": NS,
            "uid": created["metadata"]["uid"]}
        assert UNICODE in (event.get("message") or event.get("note") or "")
        last = created
        for i, pause in enumerate([0.05, 0.45, 0.5, 0.55, 0.6, 0.0, 0.5, 0.52]):
            await asyncio.sleep(pause)
            last = await kube_objects.patch_spec(created, {"indexes": [{"name": f"edit_{i}", "table": "items",
                                                                        "columns": [{"name": "sku"}]}]})
        final = last["metadata"]["generation"]
        await eventually(lambda: any(b["metadata"]["generation"] == final for b in seen), timeout=30,
                         message=f"generation {final} reconciled")
        await asyncio.sleep(2)  # nothing later re-runs an older generation
        assert seen[-1]["metadata"]["generation"] == final, [b["metadata"]["generation"] for b in seen]


# --- scheduler slots --------------------------------------------------------------------------------

async def test_a_run_that_raises_gives_its_slot_back_and_stop_frees_waiting_readers(
    kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
) -> None:
    """PROBE (held): workers=1. Runs that raise release their slot (every resource still runs in turn);
    a reader waiting for the slot while the one run hangs ends after stop(), and its body never runs."""
    await kube_objects.ensure_namespace(NS)
    for i in range(3):
        await kube_objects.create({"apiVersion": naming.API_VERSION, "kind": naming.KIND,
                                   "metadata": {"name": f"s{i}", "namespace": NS}, "spec": {}})
    deps = make_deps(Settings(tick_seconds=0.05), kube_client)
    ran: list[str] = []
    hang = threading.Event()

    def run(body: Any, state: Any, logger: Any) -> None:
        ran.append(body["metadata"]["name"])
        if body["metadata"]["name"] == "s2":
            hang.wait(30)
        raise RuntimeError("boom")  # never sets next_due: stays infinite, not resubmitted

    states = {f"{NS}/s{i}": handlers.ResourceState() for i in range(3)}
    states[f"{NS}/s2"].next_due = time.monotonic() + 3600
    scheduler = Scheduler(deps, states, run, workers=1, backoff=lambda failures: 1.0, pause=PeeringPause())
    scheduler.context = contextvars.copy_context()
    try:
        scheduler.tick()
        await eventually(lambda: sorted(ran) == ["s0", "s1"], timeout=30, message="both raising runs ran")
        states[f"{NS}/s2"].next_due = 0.0
        scheduler.tick()
        await eventually(lambda: "s2" in ran, timeout=30, message="the hanging run started")
        states[f"{NS}/s0"].next_due = 0.0
        scheduler.tick()  # its reader reads, then waits for the slot s2 holds
        await asyncio.sleep(0.5)
        scheduler.stop()
        await asyncio.sleep(1.5)  # the waiting reader sees the stop flag within a second
        hang.set()
        await asyncio.sleep(1.0)
        assert ran.count("s0") == 1, ran
    finally:
        hang.set()
        scheduler.stop()


# --- a page that cannot be written fully ------------------------------------------------------------

class _FailsMidPage:
    """Two families: the first larger than a chunk (so part of the page is sent), then one whose
    samples cannot be produced (any bug, MemoryError; the same as the process exiting mid-scrape)."""

    def collect(self) -> Iterator[Any]:
        big = GaugeMetricFamily("rt5_before", "h", labels=["i"])
        for i in range(5000):
            big.add_metric([str(i)], 1.0)
        yield big
        raise RuntimeError("a family failed mid-page")


def _scrape_outcome(port: int) -> str:
    """'complete-looking' when the client got 200 and read a body to its end without an error."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            response.read()
            return "complete-looking"
    except Exception as exc:  # any failure is what a scraper must see
        return f"failed: {type(exc).__name__}"


def test_a_page_cut_short_is_not_a_successful_scrape() -> None:
    """FINDING (medium): the page is sent with neither Content-Length nor chunked encoding (HTTP/1.0,
    ended by closing the connection), so when writing stops half-way (a family raising, or the
    operator exiting during a scrape: every rollout) the scraper reads a shorter page that parses
    and looks complete. Prometheus ingests it as a successful scrape and marks every series after
    the cut stale (a firing `marketplacedb_refresh_stale == 1` alert resolves). prometheus_client's
    server answered 500 (and sent Content-Length), a failed scrape (up == 0)."""
    registry = CollectorRegistry()
    registry.register(_FailsMidPage())
    old, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    new = metrics_exposition.serve(0, registry, addr="127.0.0.1")
    try:
        assert _scrape_outcome(old.server_address[1]).startswith("failed")  # the baseline
        assert _scrape_outcome(new.server_address[1]).startswith("failed")
    finally:
        for server in (old, new):
            server.shutdown()
            server.server_close()


async def test_readers_waiting_for_slots_behind_slow_reconciles_keep_the_scheduler_live(
    kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient,
) -> None:
    """PROBE (held): workers=1 and its one reconcile hangs; every reader ends up holding a body and
    waiting for the slot. The scheduler thread still ticks (health() holds), a resource deleted
    meanwhile leaves `states`, and once the reconcile ends every waiting body is reconciled."""
    await kube_objects.ensure_namespace(NS)
    count = 12
    for i in range(count):
        await kube_objects.create({"apiVersion": naming.API_VERSION, "kind": naming.KIND,
                                   "metadata": {"name": f"w{i}", "namespace": NS}, "spec": {}})
    deps = make_deps(Settings(tick_seconds=0.05), kube_client)
    ran: list[str] = []
    hang = threading.Event()

    def run(body: Any, state: Any, logger: Any) -> None:
        ran.append(body["metadata"]["name"])
        hang.wait(30)
        state.next_due = time.monotonic() + 3600

    states = {f"{NS}/w{i}": handlers.ResourceState() for i in range(count)}
    scheduler = Scheduler(deps, states, run, workers=1, backoff=lambda failures: 1.0, pause=PeeringPause())
    scheduler.context = contextvars.copy_context()
    try:
        scheduler.start()
        await eventually(lambda: len(ran) == 1, timeout=30, message="the first reconcile hangs")
        deleted = next(state for key, state in states.items() if key != f"{NS}/{ran[0]}")
        deleted.deleted = True
        for _ in range(20):
            await asyncio.sleep(0.1)
            scheduler.health()  # raises SchedulerStalled if the thread stopped ticking
        assert deleted not in states.values()
        hang.set()
        await eventually(lambda: len(set(ran)) >= count - 1, timeout=60, message="every waiting body ran")
    finally:
        hang.set()
        scheduler.stop()
