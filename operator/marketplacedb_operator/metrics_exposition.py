"""The operator's /metrics page, written as it is read (issue 14: resident memory at N = 1,000).

prometheus_client's exposition (generate_latest) builds every sample of a family as an object and
every line of the page as a string, then joins them: at N = 1,000 (~45,000 series) one scrape held
~15 MiB of small objects at once, and Python's allocator keeps the arenas they filled while the
reconciles' long-lived objects land among them, so the operator's RSS rose with every scrape
(bench/REPORT-fleet.md scrapes every 30 s, as the chart's ServiceMonitor does). Here a family
produces its samples when they are read (LazyFamily), and the page is written 64 KiB at a time into
a gzip stream (Prometheus always accepts gzip): a scrape holds the compressed page (~0.3 MB at
N = 1,000), one chunk and one sample; uncompressed, the page (~4.3 MB) in one buffer.

The text is generate_latest's (tests/test_metrics_exposition.py compares them byte for byte): the
Prometheus text format 0.0.4, `_total` on a counter's name, `_created` samples as a gauge family
after their own, labels sorted, label values escaped as prometheus_client escapes them (backslash,
newline, double quote) and values formatted by its floatToGoString.
"""

from __future__ import annotations

import http.server
import io
import logging
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)


class LazyFamily(Metric):
    """A metric family whose samples are produced anew each time `samples` is read."""

    def __init__(self, name: str, documentation: str, typ: str, produce: Callable[[], Iterator[Sample]]) -> None:
        self._produce = produce
        super().__init__(name, documentation, typ)

    @property  # type: ignore[override]
    def samples(self) -> Iterator[Sample]:
        return self._produce()

    @samples.setter
    def samples(self, _: Any) -> None:  # Metric.__init__ sets an empty list: the samples are produced
        pass


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _line(sample: Sample) -> str:
    labels = ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(sample.labels.items()))
    value: str = floatToGoString(sample.value)  # type: ignore[no-untyped-call]
    return f"{sample.name}{{{labels}}} {value}\n" if labels else f"{sample.name} {value}\n"


CHUNK = 64 * 1024  # bytes of text handed to the writer at a time


def write_exposition(registry: Collector, write: Callable[[bytes], object]) -> None:
    """Write the text format of every family of `registry` (gauges, counters, histograms) to `write`,
    CHUNK bytes at a time: the page itself is never held."""
    lines: list[str] = []
    size = 0

    def emit(line: str) -> None:
        nonlocal size
        lines.append(line)
        size += len(line)
        if size >= CHUNK:
            write("".join(lines).encode())
            lines.clear()
            size = 0

    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        documentation = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        emit(f"# HELP {name} {documentation}\n# TYPE {name} {family.type}\n")
        created, seen_created = f"{family.name}_created", False
        for sample in family.samples:
            if sample.name == created:
                seen_created = True
            else:
                emit(_line(sample))
        if seen_created:  # a second pass: generate_latest puts them in a gauge family of their own
            emit(f"# HELP {created} {documentation}\n# TYPE {created} gauge\n")
            for sample in family.samples:
                if sample.name == created:
                    emit(_line(sample))
    write("".join(lines).encode())


def exposition(registry: Collector, *, compress: bool = False) -> bytes:
    """The whole page, gzip-compressed when `compress` (~10x smaller: what a scrape holds then)."""
    page = io.BytesIO()
    if not compress:
        write_exposition(registry, page.write)
        return page.getvalue()
    gzip = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # wbits 16+: the gzip container
    write_exposition(registry, lambda chunk: page.write(gzip.compress(chunk)))
    page.write(gzip.flush())
    return page.getvalue()


def serve(port: int, registry: Collector, addr: str = "0.0.0.0") -> http.server.ThreadingHTTPServer:
    """Serve the page on every GET path, as prometheus_client's start_http_server did: the text
    format 0.0.4 (also when OpenMetrics is asked for first, as Prometheus does: it then takes this
    format), gzip when accepted, with a Content-Length, and a 500 when the page cannot be written,
    so a failed page is a failed scrape, never a short one that parses."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            compress = gzip_accepted(self.headers.get("Accept-Encoding", ""))
            try:
                body = exposition(registry, compress=compress)
            except Exception:
                log.exception("writing the metrics page failed")
                self.send_error(500, "the metrics page could not be written")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
            if compress:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_OPTIONS(self) -> None:
            self.send_response(200)
            self.send_header("Allow", "OPTIONS,GET")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # a scrape is not news
            return None

    server = http.server.ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
