"""The harness itself works: real pgbouncer into real PostgreSQL, kopf against KMock, restarts.

If one of these fails, every higher tier's failures are noise: fix the harness first.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any

import kopf
import kubernetes.client
import psycopg
import pytest

from harness.kube import (
    MDB,
    KubeApiError,
    KubeEmulator,
    KubeObjects,
    eventually,
    kopf_runner,
    kopf_tasks,
    marketplacedb,
)
from harness.pgbouncer import PgBouncerFactory
from harness.postgres import FreshDatabase, PostgresServer

TESTS = pathlib.Path(__file__).resolve().parent

BOUNCER_INI = """\
[databases]
{db} = host=127.0.0.1 port={port} dbname={db}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 6432
auth_type = scram-sha-256
auth_file = /etc/pgbouncer/userlist.txt
pool_mode = transaction
max_client_conn = 50
default_pool_size = 2
"""


def test_query_through_pgbouncer(pg: PostgresServer, fresh_db: FreshDatabase,
                                 pgbouncer_factory: PgBouncerFactory) -> None:
    # The userlist holds the SCRAM verifier, not the password: pgbouncer authenticates the
    # client with it and then logs in to PostgreSQL with the client's SCRAM keys.
    verifier = pg.scram_verifier(fresh_db.owner)
    bouncer = pgbouncer_factory(BOUNCER_INI.format(db=fresh_db.name, port=pg.port),
                                f'"{fresh_db.owner}" "{verifier}"\n')
    assert bouncer.config()["pool_mode"] == "transaction"

    dsn = bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)
    # prepare_threshold=None: pgbouncer 1.18 has no prepared statements in transaction mode.
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        answer, backend_pid = conn.execute("SELECT 40 + 2, pg_backend_pid()").fetchone()  # type: ignore[misc]
    assert answer == 42

    # The server session belongs to pgbouncer: pgbouncer reports it (remote_pid is the backend's
    # pid), and PostgreSQL sees that backend's client socket on pgbouncer's local port.
    servers = [s for s in bouncer.admin("SHOW SERVERS") if int(s["remote_pid"]) == backend_pid]
    assert len(servers) == 1, bouncer.admin("SHOW SERVERS")
    rows = pg.execute("SELECT datname, usename, host(client_addr), client_port FROM pg_stat_activity "
                      "WHERE pid = %s", params=[backend_pid])
    assert rows == [(fresh_db.name, fresh_db.owner, "127.0.0.1", int(servers[0]["local_port"]))]

    # And authentication is real: a wrong password is refused by pgbouncer.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(bouncer.dsn(fresh_db.name, fresh_db.owner, "wrong-password")).close()


async def test_kopf_sees_marketplacedb_in_kmock(kube_api: KubeEmulator, kube_objects: KubeObjects) -> None:
    registry = kopf.OperatorRegistry()
    seen: list[dict[str, Any]] = []

    @kopf.on.create(MDB.group, MDB.version, MDB.plural, registry=registry)
    def on_create(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        seen.append(dict(body))
        patch.status["observedBy"] = "harness"

    async with kopf_runner(kube_api, registry, namespaces=["shop"]):
        created = await kube_objects.create(marketplacedb("shop", "shop", {"database": {"dbname": "m"}}))
        await eventually(lambda: seen, message="the create handler ran")

        def stored() -> dict[str, Any]:
            return kube_objects.get("marketplacedb.io/v1alpha1", "MarketplaceDB", "shop", "shop") or {}

        # kopf wrote through the status subresource, and the emulator kept what it wrote.
        await eventually(lambda: stored().get("status", {}).get("observedBy"), message="status written")

    assert len(seen) == 1
    assert seen[0]["metadata"]["name"] == "shop"
    assert seen[0]["metadata"]["uid"] == created["metadata"]["uid"]
    assert seen[0]["spec"] == {"database": {"dbname": "m"}}
    assert stored()["metadata"]["generation"] == 1  # kopf's own writes never touch spec
    # kopf finished its handling cycle: it recorded the handled spec on the object.
    assert "kopf.zalando.org/last-handled-configuration" in stored()["metadata"]["annotations"]


async def test_kube_client_talks_to_kmock(kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient,
                                          kube_objects: KubeObjects) -> None:
    core = kubernetes.client.CoreV1Api(kube_client)
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": "ns", "labels": {"app": "x"}}, "data": {"a": "1"}}
    # Server-side apply creates what is missing (as a real API server does). The sync client runs
    # in a thread: the emulator serves from this very event loop.
    applied = await asyncio.to_thread(core.patch_namespaced_config_map, "cfg", "ns", body,
                                      field_manager="harness", _content_type="application/apply-patch+yaml")
    assert applied.metadata is not None
    assert applied.metadata.uid and applied.metadata.resource_version
    await kube_objects.create({**body, "metadata": {"name": "other", "namespace": "ns"}})

    listed = await asyncio.to_thread(core.list_namespaced_config_map, "ns", label_selector="app=x")
    assert [item.metadata.name for item in listed.items if item.metadata] == ["cfg"]
    read = await asyncio.to_thread(core.read_namespaced_config_map, "cfg", "ns")
    assert read.data == {"a": "1"}


async def test_emulator_keeps_api_server_rules(kube_api: KubeEmulator, kube_objects: KubeObjects) -> None:
    """What harness.kube.KubeEmulator adds to KMock, and the operator's tests rely on."""
    api, kind = "apps/v1", "Deployment"
    deployment = {"apiVersion": api, "kind": kind, "metadata": {"name": "web", "namespace": "ns"},
                  "spec": {"replicas": 1, "template": {"spec": {"containers": [
                      {"name": "app", "image": "app:1"}, {"name": "sidecar", "image": "side:1"}]}}}}
    created = await kube_objects.create(deployment)
    assert created["metadata"]["generation"] == 1 and created["metadata"]["uid"]

    # Server-side apply of the probe fields only: containers merge by name, spec changed -> generation 2.
    probe = {"apiVersion": api, "kind": kind, "metadata": {"name": "web", "namespace": "ns"},
             "spec": {"template": {"spec": {"containers": [{"name": "app", "readinessProbe": {"periodSeconds": 5}}]}}}}
    applied = await kube_objects.patch(deployment, probe, content_type="application/apply-patch+yaml")
    containers = applied["spec"]["template"]["spec"]["containers"]
    assert [(c["name"], c["image"]) for c in containers] == [("app", "app:1"), ("sidecar", "side:1")]
    assert containers[0]["readinessProbe"] == {"periodSeconds": 5}
    assert applied["metadata"]["generation"] == 2

    # A no-op write stores nothing; status goes only through /status and never bumps generation.
    again = await kube_objects.patch(deployment, probe, content_type="application/apply-patch+yaml")
    assert again["metadata"]["resourceVersion"] == applied["metadata"]["resourceVersion"]
    await kube_objects.patch(deployment, {"status": {"readyReplicas": 9}})
    await kube_objects.patch(deployment, {"status": {"readyReplicas": 1}}, subresource="status")
    stored = kube_objects.get(api, kind, "web", "ns") or {}
    assert stored["status"] == {"readyReplicas": 1} and stored["metadata"]["generation"] == 2

    # Optimistic concurrency, as kopf and the kubernetes client expect it.
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "spec": {"replicas": 3}}
    with pytest.raises(KubeApiError) as conflict:
        await kube_objects.patch(deployment, stale)
    assert conflict.value.status == 409

    # Apply creates a missing object; a plain patch of a missing one is 404.
    other = {**deployment, "metadata": {"name": "new", "namespace": "ns", "labels": {"tier": "db"}}}
    await kube_objects.patch(other, other, content_type="application/apply-patch+yaml")
    with pytest.raises(KubeApiError) as missing:
        await kube_objects.patch({**deployment, "metadata": {"name": "gone", "namespace": "ns"}}, {"spec": {}})
    assert missing.value.status == 404

    # LIST honours label selectors.
    async with kube_api.get("/apis/apps/v1/namespaces/ns/deployments", params={"labelSelector": "tier=db"}) as resp:
        assert [item["metadata"]["name"] for item in (await resp.json())["items"]] == ["new"]


def test_postgres_stop_and_start() -> None:
    server = PostgresServer(max_connections=20)  # its own: stopping the session's would hurt others
    try:
        server.start()
        server.execute("CREATE TABLE kept (v int)")
        server.execute("INSERT INTO kept VALUES (7)")
        port = server.port

        server.stop()
        assert not server.is_running()
        with pytest.raises(psycopg.OperationalError):
            server.execute("SELECT 1")

        server.start()
        assert server.is_running() and server.port == port
        assert server.execute("SELECT v FROM kept") == [(7,)]
        server.restart()
        assert server.execute("SHOW max_connections") == [("20",)]
        assert "database system is ready to accept connections" in server.log_text()
    finally:
        server.cleanup()
    assert not server.basedir.exists()


async def test_a_kopf_stop_that_times_out_leaves_no_kopf_task_behind(kube_api: KubeEmulator,
                                                                     kube_objects: KubeObjects) -> None:
    """The CI hang: kopf's stop timed out (a slow reconcile under load) and kopf was cancelled
    mid-stop. It then cancels its own helper tasks, and its watcher waits forever in `finally`
    for a `Scheduler.close()` that needs one of them, suppressing every cancellation; after the
    failed test, pytest-asyncio's loop close waited for it forever. Reproduced here with an event
    handler in its thread and a second event queued when the stop gives up."""
    registry = kopf.OperatorRegistry()
    in_handler = threading.Event()

    @kopf.on.event(MDB.group, MDB.version, MDB.plural, registry=registry)
    def slow(**_: Any) -> None:
        in_handler.set()
        time.sleep(2)  # a reconcile still running when the stop gives up

    body = marketplacedb("shop", "shop", {"database": {"dbname": "m"}})
    with pytest.raises(TimeoutError):
        async with kopf_runner(kube_api, registry, namespaces=["shop"], stop_timeout=0.5):
            await kube_objects.create(body)
            await eventually(in_handler.is_set, timeout=60, message="the handler runs")
            await kube_objects.patch_spec(body, {"database": {"dbname": "n"}})  # queued behind it
    assert [t.get_name() for t in kopf_tasks()] == []


STUBBORN_TEST = '''
import asyncio

import pytest


@pytest.fixture
async def stubborn():
    async def ignores_cancellation():
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass

    asyncio.get_running_loop().create_task(ignores_cancellation(), name="stubborn")
    yield


async def test_fails(stubborn):
    assert False, "a failed async test, with a task left that ignores cancellation"


def test_after():
    pass
'''


def _run_stubborn(tmp_path: pathlib.Path, **limits: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_stubborn.py").write_text(STUBBORN_TEST)
    env = {**os.environ, "PYTHONPATH": str(TESTS), **limits}
    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "harness.watchdog",
             "-o", "asyncio_mode=auto", "-o", "timeout=300", "-o", "timeout_method=thread",
             str(tmp_path / "test_stubborn.py")],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the run hung after the failed test:\n{exc.stdout!r}")


def test_a_failed_async_test_with_a_stubborn_task_does_not_stop_the_run(tmp_path: pathlib.Path) -> None:
    """After a failure pytest-timeout is disarmed, and the loop close waited for a task that ignores
    cancellation forever. Now the close gives up after its bound, names the task in an error of
    that test, and the run goes on to the next test (harness/watchdog.py)."""
    done = _run_stubborn(tmp_path, MDB_LOOP_CLOSE_LIMIT_SECONDS="2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed, 1 error" in done.stdout, done.stdout
    assert "LeftoverTasks" in done.stdout and "task stubborn" in done.stdout, done.stdout


def test_a_teardown_that_hangs_anyway_ends_the_run_with_stacks(tmp_path: pathlib.Path) -> None:
    """The last resort: a teardown still running after its bound ends the run with the stacks."""
    done = _run_stubborn(tmp_path, MDB_LOOP_CLOSE_LIMIT_SECONDS="600", MDB_TEARDOWN_LIMIT_SECONDS="3")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "still running after 3s" in done.stderr and "task stubborn" in done.stderr, done.stderr
