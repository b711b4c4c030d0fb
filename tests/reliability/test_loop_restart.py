"""A restart is quiet (issue 14, finding 8): with nothing changed, a restarted operator reconciles
every resource and writes nothing to the API. N = 100 resources (one index each, on one database), the
operator (a subprocess) stopped once every resource is Ready and has been reconciled twice more with
no write (a steady state owes nothing; the benchmark's operator at N = 1,000 was once stopped with
its queues still full), restarted, and every resource reconciled twice by the new process.

The API is the benchmark's emulator (bench/kube_server.py's BenchEmulator: the harness emulator
that counts served requests and then forgets them): KMock 0.8 matches every request against its
whole history, which at this N would slow the emulator down more than the operator.
"""

from __future__ import annotations

import pathlib
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import kmock
import psycopg
import pytest
from rel_operator import OperatorProcess, write_kubeconfig

from harness.kube import KubeObjects, eventually
from marketplacedb_operator import naming

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # bench/ is a top-level package
from bench.kube_server import BenchEmulator

N = 100
NS = "prod"
API = "marketplacedb.io/v1alpha1"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def _changed(api: BenchEmulator, write: tuple[Any, ...]) -> dict[str, Any]:
    """What a status write changed: its top-level status fields that differ from the resource's
    previous status write (the merge patch carries the whole status)."""
    earlier = [w for w in api.write_log if w[2] == write[2] and w[3] == write[3] and w[0] < write[0]]
    new = (write[4] or {}).get("status") or write[4] or {}
    old = ((earlier[-1][4] or {}).get("status") or earlier[-1][4] or {}) if earlier else {}
    changed = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
    if "conditions" in changed:  # only the conditions that differ, without their timestamps
        before, after = ({c.get("type"): (c.get("status"), c.get("reason"), c.get("message")) for c in side or []}
                         for side in changed["conditions"])
        changed["conditions"] = {t: (before.get(t), after.get(t)) for t in set(before) | set(after)
                                 if before.get(t) != after.get(t)} or "lastTransitionTime only"
    return {f"{write[1]} {write[2]} {write[3]}": changed or "identical to its previous write"}


@pytest.fixture
async def bench_api() -> AsyncIterator[BenchEmulator]:
    async with BenchEmulator() as api, kmock.Server(api):
        yield api


def _resource(i: int, db: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MarketplaceDB",
        "metadata": {"name": f"shop-{i:03d}", "namespace": NS},
        "spec": {
            "database": {
                "host": db.server.host,
                "port": db.server.port,
                "dbname": db.name,
                "sslMode": "disable",
                "credentialsSecretRef": {"name": "owner"},
            },
            "indexes": [{"name": f"idx_items_{i:03d}", "table": "items", "columns": [{"name": "sku"}]}],
            "pooler": {"enabled": False},
        },
    }


def _writes(api: BenchEmulator) -> int:
    return sum(v for k, v in api.by_method.items() if k in WRITES)


async def _reconciles(operator: OperatorProcess) -> dict[str, float]:
    """Reconciles this process has run, per resource name (from its /metrics)."""
    text = await operator.metrics()
    pattern = r'marketplacedb_reconcile_duration_seconds_count\{[^}]*resource="([^"]+)"[^}]*\} ([0-9.e+]+)'
    return {name: float(count) for name, count in re.findall(pattern, text)}


async def _each_reconciled(operator: OperatorProcess, times: int, since: dict[str, float], names: set[str],
                           message: str) -> None:
    """Wait until every resource in `names` ran `times` more reconciles than in `since`. The second
    of two starts only after the first wrote its status (reconciles of a resource are serialized),
    so no write of the first can still be in flight: no sleep that guesses how long one takes."""

    async def done() -> bool:
        counts = await _reconciles(operator)
        return all(counts.get(name, 0) >= since.get(name, 0) + times for name in names)

    await eventually(done, timeout=300, interval=0.5, message=message)


def _status_writes_after_ready(api: BenchEmulator) -> list[tuple[Any, ...]]:
    """MarketplaceDB writes (status or object) made after that resource first stored Ready=True."""
    return [w for w in api.write_log if w[2].startswith("marketplacedbs") and w[0] > api.ready_at.get(w[3], w[0])]


@pytest.mark.timeout(600)
async def test_a_restart_with_nothing_changed_writes_nothing(bench_api: BenchEmulator, fresh_db: Any) -> None:
    with psycopg.connect(fresh_db.dsn, autocommit=True) as conn:  # a table for one index per resource
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, sku text NOT NULL)")
        conn.execute("INSERT INTO items SELECT g, 'sku-' || g FROM generate_series(1, 2000) g")
    objects = KubeObjects(bench_api)
    await objects.ensure_namespace(NS)
    await objects.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "owner",
                "namespace": NS,
                "labels": {naming.LABEL_CREDENTIALS: "true"},
                "annotations": {naming.ANN_CREDENTIALS_FOR: ",".join(f"shop-{i:03d}" for i in range(N))},
            },
            "stringData": {"username": fresh_db.owner, "password": fresh_db.owner_password},
        }
    )
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="mdb-loop-restart-"))
    kubeconfig = write_kubeconfig(workdir / "kubeconfig", str(bench_api.url).rstrip("/"))
    operator = OperatorProcess(workdir, kubeconfig, NS, env={"MARKETPLACEDB_RESYNC_SECONDS": "5"})
    try:
        await operator.start()
        for i in range(N):
            await objects.create(_resource(i, fresh_db))
        names = {f"{NS}/shop-{i:03d}" for i in range(N)}
        await eventually(lambda: names <= set(bench_api.ready_at), timeout=300, interval=0.5, message="all Ready")
        # A steady state writes nothing: once a resource is Ready, later reconciles with nothing
        # changed owe no write (found: a build that waited for another session and then succeeded
        # listed that session in status.blockingSessions, and the next reconcile cleared it; 35 of
        # 100 resources here, so a restart in that window wrote). Two reconciles of each resource
        # after all are Ready, then not one MarketplaceDB write after that resource's Ready.
        short = {n.split("/")[1] for n in names}
        await _each_reconciled(operator, 2, await _reconciles(operator), short, "two steady reconciles each")
        steady = _status_writes_after_ready(bench_api)
        assert steady == [], [_changed(bench_api, w) for w in steady[:3]]
        await operator.stop()
        before, by_resource, stopped = _writes(bench_api), dict(bench_api.writes_by_resource), time.time()
        await operator.start()
        # Two reconciles of every resource by the new process: the first is the restart's resync,
        # the second proves the first's write (if any) has landed.
        await _each_reconciled(operator, 2, {}, short, "every resource reconciled twice after the restart")
        changed = {
            k: v - by_resource.get(k, 0) for k, v in bench_api.writes_by_resource.items() if v != by_resource.get(k, 0)
        }
        after = [_changed(bench_api, w) for w in bench_api.write_log if w[0] >= stopped]
        print(f"writes after the restart of {N} resources: {_writes(bench_api) - before} {changed}")
        assert _writes(bench_api) - before == 0, (changed, after[:5])
    finally:
        await operator.kill()
