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
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql

from marketplacedb_operator import workload

from .. import load, stats
from .._harness import ROOT, PostgresServer, free_port
from ..env import example_body, pointed_at

NAMESPACE = "bench"
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


class KubeServer:
    """bench/kube_server.py in a subprocess, spoken to over its stdin/stdout."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.kube_server"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(workdir / "kube.log", "ab"), text=True)
        self.url = str(self._read()["url"])
        self._files = 0

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the API emulator exited: {(self.workdir / 'kube.log').read_text()[-2000:]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def create(self, objects: list[dict[str, Any]]) -> dict[str, Any]:
        self._files += 1
        path = self.workdir / f"objects-{self._files}.json"
        path.write_text(json.dumps(objects))
        return self.call({"op": "create", "file": str(path)})

    def stats(self) -> dict[str, Any]:
        return self.call({"op": "stats"})

    def close(self) -> None:
        try:
            self.call({"op": "quit"})
            self.proc.wait(10)
        except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)


class Operator:
    """`python -m bench.operator_proc LOG -- run -n bench` against the emulator (kubeconfig)."""

    def __init__(self, workdir: Path, url: str, label: str) -> None:
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": url}}],
            "users": [{"name": "anonymous", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "anonymous",
                                                        "namespace": NAMESPACE}}],
        }))
        self.log = workdir / f"reconciles-{label}.jsonl"
        self.log.write_text("")
        self.liveness = free_port()
        # The operator's own defaults (resync 300 s, JSON logs at INFO), as `marketplacedb run` has them.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "MARKETPLACEDB_"))}
        env.update(KUBECONFIG=str(kubeconfig))
        self.stderr: IO[bytes] = open(workdir / f"operator-{label}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.operator_proc", str(self.log), "--", "run", "-n", NAMESPACE,
             "--liveness-port", str(self.liveness), "--metrics-port", str(free_port())],
            cwd=ROOT, env=env, stdout=self.stderr, stderr=self.stderr)
        self.rss_samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the operator's liveness endpoint did not answer")

    def status_mib(self, key: str) -> float:
        """VmRSS (resident now) or VmHWM (peak resident) of the operator process, in MiB."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
        except OSError:
            pass
        return float("nan")

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.rss_samples.append((time.time(), self.status_mib("VmRSS")))

    def reconciles(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.stderr.close()


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
    }


def _resync_phase(kube: KubeServer, operator: Operator, fleet: Fleet, names: set[str],
                  timeout: float) -> dict[str, Any]:
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
    return {
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
        "rss_after_resync_mib": operator.status_mib("VmRSS"),
        "rss_resync_peak_mib": operator.status_mib("VmHWM"),
    }


def run_once(fleet: Fleet, count: int, workdir: Path, *, ready_timeout: float, idle_timeout: float,
             idle_resync: bool = True) -> dict[str, Any]:
    """One run with `count` resources: create until all Ready, then (idle_resync) restart for an
    idle resync of all of them."""
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
        if idle_resync:
            operator = Operator(workdir, kube.url, "restarted")
            operator.wait_ready()
            marks.append(("operator up again", time.perf_counter()))
            result.update(_resync_phase(kube, operator, fleet, names, idle_timeout))
            marks.append(("idle resync", time.perf_counter()))
        result["idle_resync"] = idle_resync
        result["phases"] = {b[0]: round(b[1] - a[1], 2) for a, b in zip(marks, marks[1:], strict=False)}
        return result
    finally:
        if operator is not None:
            operator.close()
        kube.close()
