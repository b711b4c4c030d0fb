"""Shared fixtures: a real PostgreSQL 15, real pgbouncer processes, and a KMock Kubernetes API.

Every server is started by the tests themselves on free loopback ports (docs/architecture.md#testing-with-real-parts);
nothing here needs a cluster, a container engine or a pre-started service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import kubernetes.client
import pytest

from harness.kube import KubeEmulator, KubeObjects, kube_emulator
from harness.pgbouncer import PgBouncerFactory, PgBouncerProcess
from harness.postgres import FreshDatabase, PostgresServer, new_database

# Every teardown is bounded, failed test or not (pytest-timeout disarms itself on a failure).
# security_env: the `sec` and `fake` fixtures of the security tests.
pytest_plugins = ["harness.watchdog", "security_env"]


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL for the whole session; tests isolate themselves by database."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def _drop_database(pg: PostgresServer, db: FreshDatabase) -> None:
    pg.drop_database(db.name)
    pg.drop_role(db.owner)


@pytest.fixture
def fresh_db(pg: PostgresServer) -> Iterator[FreshDatabase]:
    """An empty database owned by a new login role (unique names), dropped after the test."""
    db = new_database(pg)
    try:
        yield db
    finally:
        _drop_database(pg, db)


@pytest.fixture
def workload_db(pg: PostgresServer) -> Iterator[FreshDatabase]:
    """Like fresh_db, loaded with the reference marketplace workload (docs/architecture.md#reference-workload).

    Loaded as the owner, so the owner owns the tables (on PostgreSQL 15 only the owner may
    REFRESH a materialized view or build an index on them, as in production).
    """
    from marketplacedb_operator import workload

    db = new_database(pg)
    try:
        with db.connect() as conn:
            conn.execute(workload.schema_sql())  # one session: data_sql uses temporary functions
            conn.execute(workload.data_sql(products=2000))
        yield db
    finally:
        _drop_database(pg, db)


@pytest.fixture
def pgbouncer_factory() -> Iterator[PgBouncerFactory]:
    """Start real pgbouncer processes: factory(ini_text, userlist_text="", start=True, port=None).

    Only paths and ports of the given config are overridden (see harness/pgbouncer.py); every
    process is stopped and its files removed at teardown.
    """
    started: list[PgBouncerProcess] = []

    def factory(ini_text: str, userlist_text: str = "", *, start: bool = True,
                port: int | None = None) -> PgBouncerProcess:
        bouncer = PgBouncerProcess(ini_text, userlist_text, port=port)
        started.append(bouncer)
        if start:
            bouncer.start()
        return bouncer

    try:
        yield factory
    finally:
        for bouncer in started:
            bouncer.cleanup()


@pytest.fixture
async def kube_api() -> AsyncIterator[KubeEmulator]:
    """A KMock Kubernetes API emulator on a random loopback port (`kube_api.url`), serving
    discovery for every kind in harness.kube.RESOURCES, with API-server bookkeeping on writes."""
    async with kube_emulator() as api:
        yield api


@pytest.fixture
def kube_objects(kube_api: KubeEmulator) -> KubeObjects:
    """Create/patch/delete/read objects in kube_api (see harness.kube.KubeObjects)."""
    return KubeObjects(kube_api)


@pytest.fixture
async def kube_client(kube_api: KubeEmulator) -> AsyncIterator[kubernetes.client.ApiClient]:
    """The official (synchronous) `kubernetes` client pointed at kube_api, no auth.

    The emulator runs in the test's event loop: call this client from a thread
    (`await asyncio.to_thread(...)`, or a sync kopf handler), never directly from async code,
    or the call waits for a loop that it blocks.
    """
    config = kubernetes.client.Configuration()
    config.host = str(kube_api.url).rstrip("/")
    client = kubernetes.client.ApiClient(config)
    try:
        yield client
    finally:
        client.close()  # type: ignore[no-untyped-call]
