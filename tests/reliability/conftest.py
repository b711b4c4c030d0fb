"""Fixtures of the reliability suite: a real PostgreSQL database with the reference workload, the KMock
API, the operator as a subprocess (`marketplacedb run`), and the invariants every fault ends with.

`SOAK=1` (make soak) repeats the fault loops many more times; `make test` runs the short form.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import pathlib
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import rel_db
import yaml
from psycopg import sql
from rel_operator import FAST_ENV, OperatorProcess, all_cmdlines, api_requests, write_kubeconfig

from harness.kube import KubeEmulator, KubeObjects, eventually

ROOT = pathlib.Path(__file__).resolve().parents[2]
NS = "prod"
API = "marketplacedb.io/v1alpha1"
SECRET = "shop-db-owner"
SOAK = os.environ.get("SOAK") == "1"
# How long a test waits for a state the operator must reach (Ready, a condition, a session).
# A deadline, not an expectation: on an idle machine these states come within seconds; on a
# loaded 2-core CI machine (a CPU hog on each core) much later. Nothing here asserts speed.
DEADLINE = 180.0

# Spin bounds, derived from the operator's settings in the suite (rel_operator.FAST_ENV). A
# resource's timer wakes every tick and runs at most one reconcile (they are serialized and a
# failed one is backed off by at least retry_base/2 < tick), so reconciles per minute are at most
# 60/tick, plus one per spec edit or annotation (EDITS: a test makes a few). A hot loop against a
# dead dependency would not wait for the tick and would make thousands.
TICK = float(FAST_ENV["MARKETPLACEDB_TICK_SECONDS"])
DDL_RETRIES = int(FAST_ENV["MARKETPLACEDB_DDL_RETRIES"])
EDITS = 10
MAX_RECONCILES_PER_MINUTE = 60 / TICK + EDITS
# Per reconcile: a handful of API reads and writes (resource, Secret, owned objects, status; ~5
# measured), and for each object that cannot be built (1 + ddlRetries) attempts of 2 statements
# (the build, the drop of its INVALID leftover). Ceilings: 7 API calls; 2 failing objects' DDL.
API_CALLS_PER_RECONCILE = 7
DDL_PER_RECONCILE = 2 * (1 + DDL_RETRIES) * 2
MAX_API_CALLS_PER_MINUTE = MAX_RECONCILES_PER_MINUTE * API_CALLS_PER_RECONCILE
MAX_DDL_ATTEMPTS_PER_MINUTE = MAX_RECONCILES_PER_MINUTE * DDL_PER_RECONCILE


def base_spec(db: Any) -> dict[str, Any]:
    """The reference resource (examples/marketplacedb.yaml) aimed at the test database, pooler and
    probes off (KMock runs no controllers; they are not the point of most faults)."""
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "marketplacedb.yaml").read_text())
    spec = body["spec"]
    spec["database"].update(host=db.server.host, port=db.server.port, dbname=db.name, sslMode="disable",
                            settings={"work_mem": "32MB"})
    spec["ddl"]["lockTimeout"] = "2s"
    spec["pooler"]["enabled"] = False
    spec.pop("healthProbes", None)
    return spec


@dataclasses.dataclass
class Window:
    """API calls and DDL attempts between two moments: the spin check."""

    started: float
    api0: int
    ddl0: int
    reconciles0: float
    seconds: float = 0.0
    api_calls: int = 0
    ddl: int = 0
    reconciles: float = 0.0

    # Rates over at least 10 s: one legitimate reconcile's burst (the whole plan, ~17 statements)
    # inside a 3 s window must not extrapolate to a "spin"; a real hot loop makes hundreds.
    @property
    def api_per_minute(self) -> float:
        return self.api_calls * 60 / max(self.seconds, 10.0)

    @property
    def ddl_per_minute(self) -> float:
        return self.ddl * 60 / max(self.seconds, 10.0)

    @property
    def reconciles_per_minute(self) -> float:
        return self.reconciles * 60 / max(self.seconds, 10.0)


@dataclasses.dataclass
class Rel:
    api: KubeEmulator
    objects: KubeObjects
    db: Any
    canary: str  # the database password: must never show up anywhere but the two Secrets
    operator: OperatorProcess
    workdir: pathlib.Path
    measurements: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def app_dsn(self) -> str:
        """The application's connection: the owner with the (canary) password of the Secret."""
        return str(self.db.server.dsn(self.db.name, self.db.owner, self.canary))

    # -- the resource ---------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        return base_spec(self.db)

    async def create(self, spec: dict[str, Any] | None = None, name: str = "shop") -> dict[str, Any]:
        body = {"apiVersion": API, "kind": "MarketplaceDB", "metadata": {"name": name, "namespace": NS},
                "spec": spec if spec is not None else self.spec()}
        return await self.objects.create(body)

    def resource(self, name: str = "shop") -> dict[str, Any]:
        return self.objects.get(API, "MarketplaceDB", name, NS) or {}

    def condition(self, type_: str, name: str = "shop") -> dict[str, Any]:
        for item in self.resource(name).get("status", {}).get("conditions", []):
            if item["type"] == type_:
                return dict(item)
        return {}

    async def wait_condition(self, type_: str, status: str, reason: str | None = None, timeout: float = DEADLINE,
                             name: str = "shop") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            cond = self.condition(type_, name)
            ok = cond.get("status") == status and (reason is None or cond.get("reason") == reason)
            return cond if ok else None

        result: dict[str, Any] = await eventually(
            check, timeout=timeout, interval=0.1,
            message=f"{type_}={status}/{reason}; now {self.condition(type_, name)}")
        return result

    async def wait_ready(self, timeout: float = DEADLINE, name: str = "shop") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            resource = self.resource(name)
            status = resource.get("status", {})
            ready = self.condition("Ready", name)
            current = status.get("observedGeneration") == resource.get("metadata", {}).get("generation")
            return resource if ready.get("status") == "True" and current else None

        result: dict[str, Any] = await eventually(
            check, timeout=timeout, interval=0.1, message=f"Ready; now {self.condition('Ready', name)}")
        return result

    # -- measurements ---------------------------------------------------------------------------

    async def window(self) -> Window:
        ddl = await asyncio.to_thread(rel_db.ddl_attempts, self.db.superuser_dsn)
        return Window(time.monotonic(), api_requests(self.api), ddl, await self.reconciles())

    async def reconciles(self) -> float:
        """Reconciles the running operator process has finished (its own /metrics)."""
        text = await self.operator.metrics()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("marketplacedb_reconcile_duration_seconds_count"))

    async def close_window(self, window: Window) -> Window:
        window.seconds = time.monotonic() - window.started
        window.api_calls = api_requests(self.api) - window.api0
        window.ddl = await asyncio.to_thread(rel_db.ddl_attempts, self.db.superuser_dsn) - window.ddl0
        window.reconciles = await self.reconciles() - window.reconciles0
        return window

    def assert_no_spin(self, window: Window, label: str) -> None:
        self.measurements[label] = {"seconds": round(window.seconds, 1), "api_per_min": round(window.api_per_minute),
                                    "ddl_per_min": round(window.ddl_per_minute),
                                    "reconciles_per_min": round(window.reconciles_per_minute)}
        assert self.operator.running, f"the operator died during {label}:\n{self.operator.logs()[-3000:]}"
        assert window.reconciles_per_minute <= MAX_RECONCILES_PER_MINUTE, (label, self.measurements[label])
        assert window.api_per_minute <= MAX_API_CALLS_PER_MINUTE, (label, self.measurements[label])
        assert window.ddl_per_minute <= MAX_DDL_ATTEMPTS_PER_MINUTE, (label, self.measurements[label])

    # -- invariants -----------------------------------------------------------------------------

    def declared(self, spec: dict[str, Any] | None = None) -> rel_db.Declared:
        spec = spec if spec is not None else self.resource().get("spec", self.spec())
        return rel_db.Declared(tuple(i["name"] for i in spec.get("indexes", [])),
                               tuple(v["name"] for v in spec.get("materializedViews", [])))

    async def assert_invariants(self, writer: rel_db.CanaryWriter | None = None, *, stop_operator: bool = True,
                                spec: dict[str, Any] | None = None) -> None:
        """After a fault: Ready and current, database invariants, no lost row, no secret anywhere,
        then (operator stopped) no operator session or lock left behind."""
        await self.wait_ready()
        declared = self.declared(spec)
        problems = await asyncio.to_thread(rel_db.database_problems, self.db.superuser_dsn, self.db.name, declared)
        assert problems == []
        if writer is not None:
            assert writer.acked, "the canary writer wrote nothing"
            assert await asyncio.to_thread(writer.lost, self.db.superuser_dsn) == {
                "reltest.canary": [], "search_history": []}
        await self.assert_no_secret_anywhere()
        assert self.operator.running, f"operator exited:\n{self.operator.logs()[-3000:]}"
        if stop_operator:
            await self.operator.stop()

            def gone() -> list[str]:
                return rel_db.database_problems(self.db.superuser_dsn, self.db.name, declared, operator_gone=True)

            left = await asyncio.to_thread(rel_db.wait_until, lambda: not gone(), DEADLINE)
            assert left, gone()

    async def assert_no_secret_anywhere(self) -> None:
        leaks = []
        if self.canary in self.operator.logs():
            leaks.append("operator logs")
        for obj in self.everything():
            if self.canary in json.dumps(obj, default=str):
                leaks.append(f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}")
        if self.operator.running:
            if self.canary in await self.operator.metrics():
                leaks.append("metrics")
        leaks += [f"cmdline of pid {pid}" for pid, line in all_cmdlines().items() if self.canary in line]
        assert leaks == []

    def api_objects(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(o.raw) for o in self.api.objects.values() if not o.deleted]

    def everything(self) -> list[dict[str, Any]]:
        """Every stored object (events, status, annotations, ConfigMaps, CronJobs...) except the two
        Secrets that legitimately hold the credential: the user's and the pooler's auth file."""
        allowed = {SECRET, "shop-pooler-auth"}
        out = []
        for obj in self.api.objects.values():
            if obj.deleted:
                continue
            raw = copy.deepcopy(obj.raw)
            if raw.get("kind") == "Secret" and raw.get("metadata", {}).get("name") in allowed:
                continue
            out.append(raw)
        return out


@pytest.fixture
async def rel(kube_api: KubeEmulator, kube_objects: KubeObjects, workload_db: Any) -> AsyncIterator[Rel]:
    canary = "canary-" + secrets.token_hex(8) + "-Pw"
    with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(workload_db.owner),
                                                                   sql.Literal(canary)))
    await asyncio.to_thread(rel_db.prepare, workload_db.superuser_dsn)
    await kube_objects.ensure_namespace(NS)
    await kube_objects.create({"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": SECRET, "namespace": NS, "labels": {"marketplacedb.io/credentials": "true"},
        "annotations": {"marketplacedb.io/credentials-for": "shop,big"}},
                               "stringData": {"username": workload_db.owner, "password": canary}})
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="mdb-rel-"))
    kubeconfig = write_kubeconfig(workdir / "kubeconfig", str(kube_api.url).rstrip("/"))
    operator = OperatorProcess(workdir, kubeconfig, NS)
    env = Rel(kube_api, kube_objects, workload_db, canary, operator, workdir)
    try:
        yield env
    finally:
        await operator.kill()
        _record(env)


def _record(env: Rel) -> None:
    """Keep the figures measured (for the report in docs/reliability.md)."""
    if env.measurements:
        path = pathlib.Path(tempfile.gettempdir()) / "mdb-reliability-measurements.jsonl"
        with path.open("a") as out:
            out.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "?"), **env.measurements}) + "\n")
