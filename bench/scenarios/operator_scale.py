"""Scenario 6: the operator itself with N MarketplaceDB resources, each on its own database.

What is realistic on 2 cores: every resource gets a database of its own (the reference schema
with a small data set, copied from a template with CREATE DATABASE ... STRATEGY FILE_COPY, ~80 ms
each) and a login role of its own that owns its tables, as a platform team's tenants would. All
databases live on one PostgreSQL because this is one machine; in production they would be spread
over servers. Each resource is the example resource (its indexes and views, pooler, 3 probed
Deployments of its own) pointed at its database.

The operator is the real `marketplacedb run` process (bench/operator_proc.py) against the KMock
emulator in another process (bench/kube_server.py), so its resident memory is its own. Measured:
time until all are Ready, reconcile p50/p99 (first reconciles and idle resyncs), resident memory,
API writes per reconcile, and DDL statements (PostgreSQL's log_statement = ddl) in an idle window.
Every write after the restart is traced and sorted into owed and spurious (restart_writes.py);
with trace_restart, where the restarted process's memory went is profiled (tracemalloc).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from marketplacedb_operator import workload

from .. import load, stats
from .._harness import PostgresServer
from ..env import example_body, pointed_at
from . import restart_writes
from .fleet_procs import NAMESPACE, KubeServer, Operator

TEMPLATE_DB, TEMPLATE_OWNER = "fleet_template", "fleet_template_owner"
TEMPLATE_PRODUCTS = 1000
PROBED = ("bff-marketplace-home", "bff-marketplace-search", "bff-store-public")


@dataclasses.dataclass(frozen=True)
class Tenant:
    index: int
    password: str = dataclasses.field(repr=False)

    @property
    def name(self) -> str:
        return f"shop-{self.index:04d}"

    @property
    def db(self) -> str:
        return f"fleet_{self.index:04d}"

    @property
    def role(self) -> str:
        return f"fleet_{self.index:04d}_owner"


class Fleet:
    """One PostgreSQL holding a database per resource; databases are reused across runs after a
    reset that removes everything the operator created (so each run starts from the same state)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        with _on_tmpfs():
            self.pg = PostgresServer(max_connections=300, shared_buffers="128MB",
                                     extra_conf={"log_statement": "'ddl'", "max_wal_size": "'4GB'"})
        self.pg.start()
        load.register_server(self.pg.datadir)  # its CPU is the bench's own, not outside load
        self.tenants: list[Tenant] = []
        self.create_seconds = 0.0
        self._reassign = threading.Lock()
        self._template()

    def _template(self) -> None:
        password = secrets.token_urlsafe(12)
        self.pg.create_role(TEMPLATE_OWNER, password)
        self.pg.create_database(TEMPLATE_DB, TEMPLATE_OWNER)
        with psycopg.connect(self.pg.dsn(TEMPLATE_DB, TEMPLATE_OWNER, password), autocommit=True) as conn:
            conn.execute(workload.schema_sql())
            conn.execute(workload.data_sql(TEMPLATE_PRODUCTS))
            conn.execute("VACUUM (ANALYZE)")

    def ensure(self, count: int) -> list[Tenant]:
        """`count` tenants in the pristine state: reset the used ones, create the missing ones."""
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(self._reset, self.tenants[:count]))
            started = time.perf_counter()
            new = [Tenant(i, secrets.token_urlsafe(12)) for i in range(len(self.tenants), count)]
            list(pool.map(self._create, new))
            self.create_seconds += time.perf_counter() - started
        self.tenants.extend(new)
        return self.tenants[:count]

    def _create(self, tenant: Tenant) -> None:
        with self.pg.connect() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(tenant.role), sql.Literal(tenant.password)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {} STRATEGY FILE_COPY").format(
                sql.Identifier(tenant.db), sql.Identifier(TEMPLATE_DB), sql.Identifier(tenant.role)))
        # REASSIGN OWNED updates the template owner's rows in the shared pg_shdepend: two at once
        # fail with "tuple concurrently updated", so this part goes one at a time.
        with self._reassign, self.pg.connect(tenant.db) as db:
            db.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(
                sql.Identifier(TEMPLATE_OWNER), sql.Identifier(tenant.role)))

    def _reset(self, tenant: Tenant) -> None:
        with self.pg.connect(tenant.db) as db:
            db.execute("DROP MATERIALIZED VIEW IF EXISTS mv_hot_products, mv_category_counts CASCADE")
            for index in workload_index_names():
                db.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(index)))
            db.execute("DROP SCHEMA IF EXISTS marketplacedb CASCADE")
            db.execute(sql.SQL("ALTER DATABASE {} RESET ALL").format(sql.Identifier(tenant.db)))

    def ddl_statements(self) -> int:
        """DDL statements the server logged so far (log_statement = ddl)."""
        return sum(1 for line in self.pg.log_text().splitlines() if "LOG:  statement: " in line)

    def close(self) -> None:
        self.pg.cleanup()


@contextlib.contextmanager
def _on_tmpfs() -> Iterator[None]:
    """Create the fleet's data directory on /dev/shm when it has room: CREATE DATABASE copies ~9 MB
    and checkpoints twice, ~0.3 s each on this VM's shared disk (5 minutes for 1,000) but ~20 ms in
    memory. The operator's DDL on 1,000-product tables is not disk-bound either way."""
    shm = Path("/dev/shm")
    room = shutil.disk_usage(shm).free if shm.is_dir() else 0
    if room < 12 * 1024**3:
        yield
        return
    saved = tempfile.tempdir
    tempfile.tempdir = str(shm)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def workload_index_names() -> list[str]:
    return [index["name"] for index in example_body()["spec"].get("indexes", [])]


# --- the Kubernetes side ------------------------------------------------------------------------


def _objects(fleet: Fleet, tenants: list[Tenant]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Secrets and Deployments created before the operator starts, the MarketplaceDBs)."""
    setup: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
    resources = []
    template = example_body()
    for tenant in tenants:
        b64 = base64.b64encode
        setup.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                      "metadata": {"name": f"{tenant.name}-owner", "namespace": NAMESPACE,
                                   "labels": {"marketplacedb.io/credentials": "true"},
                                   "annotations": {"marketplacedb.io/credentials-for": tenant.name}},
                      "data": {"username": b64(tenant.role.encode()).decode(),
                               "password": b64(tenant.password.encode()).decode()}})
        body = pointed_at(template, fleet.pg.host, fleet.pg.port, tenant.db)
        body["metadata"] = {"name": tenant.name, "namespace": NAMESPACE}
        body["spec"]["database"]["credentialsSecretRef"] = {"name": f"{tenant.name}-owner"}
        for probe in body["spec"].get("healthProbes", []):
            probe["deployment"] = f"{probe['deployment']}-{tenant.index:04d}"
            setup.append(_app_deployment(probe["deployment"], tenant.name))
        resources.append(body)
    return setup, resources


def _app_deployment(name: str, probed_by: str) -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "annotations": {"marketplacedb.io/probed-by": probed_by}},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": "example.com/bff:1.0",
                                                           "ports": [{"containerPort": 8080}]}]}}}}


# --- one run ------------------------------------------------------------------------------------


def _writes(snapshot: dict[str, Any]) -> int:
    return sum(v for k, v in snapshot["by_method"].items() if k in ("POST", "PUT", "PATCH", "DELETE"))


def _diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    changed = {k: v - before["writes_by_resource"].get(k, 0) for k, v in after["writes_by_resource"].items()}
    return {k: v for k, v in sorted(changed.items()) if v}


def _wait(predicate: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _ms(records: list[dict[str, Any]]) -> list[float]:
    return [r["seconds"] * 1000 for r in records]


def _create_phase(kube: KubeServer, operator: Operator, fleet: Fleet, resources: list[dict[str, Any]],
                  timeout: float) -> dict[str, Any]:
    """Create every resource at once (as a GitOps sync would) and wait until all are Ready."""
    before, ddl_before = kube.stats(), fleet.ddl_statements()
    t0 = time.time()
    created = kube.create(resources)
    names = {f"{NAMESPACE}/{r['metadata']['name']}" for r in resources}
    all_ready = _wait(lambda: names <= set(kube.stats()["ready_at"]), timeout, 0.5)
    after = kube.stats()
    ready_times = sorted(after["ready_at"][n] - t0 for n in names if n in after["ready_at"])
    reconciles = operator.reconciles()
    writes = _writes(after) - _writes(before) - created["created"]
    changed = _diff(after, before)
    changed["marketplacedbs"] = changed.get("marketplacedbs", 0) - created["created"]  # ours, not the operator's
    return {
        "all_ready": all_ready,
        "ready_all_s": ready_times[-1] if all_ready else float("nan"),
        "ready_p50_s": stats.percentile(ready_times, 50),
        "reconciles_until_ready": len(reconciles),
        "reconcile_p50_ms": stats.percentile(_ms(reconciles), 50),
        "reconcile_p99_ms": stats.percentile(_ms(reconciles), 99),
        "api_writes_until_ready": writes,
        "api_writes_per_reconcile": writes / len(reconciles) if reconciles else float("nan"),
        "api_writes_per_resource": writes / len(resources),
        "writes_by_resource": {k: v for k, v in changed.items() if v},
        "ddl_per_resource": (fleet.ddl_statements() - ddl_before) / len(resources),
        "rss_ready_mib": operator.status_mib("VmRSS"),
        "rss_peak_mib": operator.status_mib("VmHWM"),
        "ready_times": ready_times,
        "rss_timeline": [(t - t0, v) for t, v in operator.rss_samples],
        "metrics_scrapes": len(operator.scrapes),
        "metrics_scrape_bytes": operator.scrapes[-1] if operator.scrapes else 0,
    }


def _resync_phase(kube: KubeServer, operator: Operator, fleet: Fleet, names: set[str],
                  timeout: float, stored: dict[str, Any], stopped: float) -> dict[str, Any]:
    """A restarted operator reconciles every resource once with nothing to do: the idle resync.

    The same level-based reconcile() runs on the periodic timer (resyncSeconds, 300 s by default);
    a restart makes all N happen now, in a bounded time, instead of spread over five minutes."""
    before, ddl_before = kube.stats(), fleet.ddl_statements()
    t0 = time.time()

    def seen() -> set[str]:
        return {r["name"] for r in operator.reconciles()}

    complete = _wait(lambda: names <= seen(), timeout, 0.5)
    pass_seconds = max((r["start"] + r["seconds"] for r in operator.reconciles()), default=t0) - t0
    time.sleep(1.0)  # anything a reconcile would still write arrives now
    after = kube.stats()
    reconciles = operator.reconciles()
    # Every write since the first operator stopped, against the statuses stored at that moment.
    traced = restart_writes.classify(stored, kube.call({"op": "writes", "since": stopped})["writes"])
    rss_after = operator.status_mib("VmRSS")
    profile = operator.memory_profile()  # after every figure above: taking it costs time and memory
    return {
        "idle_memory_profile": profile,
        "idle_writes_owed": traced["owed"],
        "idle_writes_spurious": traced["spurious"],
        "idle_writes_traced": traced,
        "idle_complete": complete,
        "idle_pass_s": pass_seconds if complete else float("nan"),
        "idle_reconciles": len(reconciles),
        "idle_reconcile_p50_ms": stats.percentile(_ms(reconciles), 50),
        "idle_reconcile_p99_ms": stats.percentile(_ms(reconciles), 99),
        "idle_api_writes": _writes(after) - _writes(before),
        "idle_writes_by_resource": _diff(after, before),
        "idle_api_reads_per_reconcile": (after["by_method"].get("GET", 0) - before["by_method"].get("GET", 0))
        / max(1, len(reconciles)),
        "idle_ddl": fleet.ddl_statements() - ddl_before,
        "rss_after_resync_mib": rss_after,
        "rss_after_resync_traced": operator.trace is not None,
        "rss_resync_peak_mib": operator.status_mib("VmHWM"),
    }


def run_once(fleet: Fleet, count: int, workdir: Path, *, ready_timeout: float, idle_timeout: float,
             idle_resync: bool = True, trace_restart: bool = False) -> dict[str, Any]:
    """One run with `count` resources: create until all Ready, then (idle_resync) restart for an
    idle resync of all of them. trace_restart: the restarted process runs under tracemalloc (its
    RSS is inflated by it; the first process's figures are not) and reports where its memory
    went after the resync: what one resource costs at rest, by owner."""
    marks = [("start", time.perf_counter())]
    tenants = fleet.ensure(count)
    marks.append(("databases", time.perf_counter()))
    workdir.mkdir(parents=True, exist_ok=True)
    setup, resources = _objects(fleet, tenants)
    names = {f"{NAMESPACE}/{r['metadata']['name']}" for r in resources}
    kube = KubeServer(workdir)
    operator: Operator | None = None
    try:
        kube.create(setup)
        marks.append(("api", time.perf_counter()))
        operator = Operator(workdir, kube.url, "first")
        operator.wait_ready()
        marks.append(("operator up", time.perf_counter()))
        result: dict[str, Any] = {"resources": count, "rss_start_mib": operator.status_mib("VmRSS")}
        result.update(_create_phase(kube, operator, fleet, resources, ready_timeout))
        marks.append(("ready", time.perf_counter()))
        operator.close()
        marks.append(("operator stopped", time.perf_counter()))
        stopped, stored = time.time(), kube.call({"op": "statuses"})
        if idle_resync:
            operator = Operator(workdir, kube.url, "restarted", trace=trace_restart)
            operator.wait_ready()
            marks.append(("operator up again", time.perf_counter()))
            result.update(_resync_phase(kube, operator, fleet, names, idle_timeout, stored, stopped))
            marks.append(("idle resync", time.perf_counter()))
        result["idle_resync"] = idle_resync
        result["phases"] = {b[0]: round(b[1] - a[1], 2) for a, b in zip(marks, marks[1:], strict=False)}
        return result
    finally:
        if operator is not None:
            operator.close()
        kube.close()
