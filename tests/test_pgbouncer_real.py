"""The rendered pooler config against the real pgbouncer binary (1.18) and the real PostgreSQL 15.

Only paths and ports of the rendered pgbouncer.ini are overridden (tests/harness/pgbouncer.py).
The pooler agent runs as the real `marketplacedb pooler-agent` CLI in a subprocess, as the same OS
user as pgbouncer (the admin socket admits `pgbouncer` without password only for that uid).
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from harness.pgbouncer import PgBouncerFactory, PgBouncerProcess, free_port
from harness.postgres import FreshDatabase, PostgresServer, as_service_user
from harness.service_python import service_python_command
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec, PoolerBudget
from marketplacedb_operator.gateways.postgres import server
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.specs import pgbouncer as pgb
from marketplacedb_operator.specs.pooler_manifests import AGENT_ADMIN_PORT, PRESTOP_DRAIN
from marketplacedb_operator.specs.pooler_sizing import compute_budget

SETTINGS = Settings()


def make_spec(pg: PostgresServer, db: FreshDatabase, **pooler: Any) -> MarketplaceDBSpec:
    return MarketplaceDBSpec.model_validate({
        "database": {"host": pg.host, "port": pg.port, "dbname": db.name, "sslMode": "prefer",
                     "credentialsSecretRef": {"name": "owner"}},
        "pooler": {"enabled": True, **pooler},
    })


def budget_for(db: FreshDatabase, spec: MarketplaceDBSpec) -> PoolerBudget:
    with db.connect() as conn:  # the owner: reading the limits needs no privilege
        limits = server.read_server_limits(conn)
    return compute_budget(spec.pooler, SETTINGS, limits.max_connections, limits.superuser_reserved_connections)


def server_credentials(db: FreshDatabase) -> pgb.PoolerCredentials:
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        verifier = server.read_scram_verifier(conn, db.owner)
    return pgb.choose_credentials(db.owner, db.owner_password, verifier)


def start_pooler(factory: PgBouncerFactory, spec: MarketplaceDBSpec, budget: PoolerBudget,
                 credentials: pgb.PoolerCredentials) -> PgBouncerProcess:
    return factory(pgb.render_ini(spec, budget), pgb.render_userlist(credentials))


def select_user(bouncer: PgBouncerProcess, db: FreshDatabase, password: str) -> str:
    with psycopg.connect(bouncer.dsn(db.name, db.owner, password)) as conn:
        row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return str(row[0])


# --- authentication ---------------------------------------------------------------------------


def test_rendered_config_starts_and_authenticates_with_the_servers_verifier(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory) -> None:
    spec = make_spec(pg, fresh_db)
    credentials = server_credentials(fresh_db)
    assert credentials.kind == "scram-verifier"  # no plaintext when a verifier can be used
    bouncer = start_pooler(pgbouncer_factory, spec, budget_for(fresh_db, spec), credentials)
    assert fresh_db.owner_password not in bouncer.userlist_path.read_text()
    assert select_user(bouncer, fresh_db, fresh_db.owner_password) == fresh_db.owner
    with pytest.raises(psycopg.OperationalError, match="SASL authentication failed"):
        select_user(bouncer, fresh_db, "wrong password")
    running = bouncer.config()
    assert running["pool_mode"] == "transaction"
    assert running["auth_type"] == "scram-sha-256"
    # The admin console over TCP: nobody is an admin there (the owner is refused).
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(bouncer.dsn("pgbouncer", fresh_db.owner, fresh_db.owner_password)).close()


def test_without_superuser_the_password_is_used_and_works(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory) -> None:
    with fresh_db.connect() as conn:  # the owner cannot read pg_authid
        assert server.read_scram_verifier(conn, fresh_db.owner) is None
    credentials = pgb.choose_credentials(fresh_db.owner, fresh_db.owner_password, None)
    assert credentials.kind == "password"
    spec = make_spec(pg, fresh_db)
    bouncer = start_pooler(pgbouncer_factory, spec, budget_for(fresh_db, spec), credentials)
    assert select_user(bouncer, fresh_db, fresh_db.owner_password) == fresh_db.owner


def test_a_computed_verifier_works_only_once_the_server_holds_the_same_one(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory) -> None:
    """PgBouncer replays the client's SCRAM keys to the server: salt and iterations must match."""
    salt = pgb.derived_salt(fresh_db.owner_password, "test", fresh_db.name, fresh_db.owner)
    computed = pgb.PoolerCredentials(fresh_db.owner, pgb.scram_verifier(fresh_db.owner_password, salt))
    spec = make_spec(pg, fresh_db)
    budget = budget_for(fresh_db, spec)
    before = start_pooler(pgbouncer_factory, spec, budget, computed)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        select_user(before, fresh_db, fresh_db.owner_password)
    before.stop()
    with fresh_db.connect() as conn:  # no superuser needed: a role may set its own password
        server.set_own_verifier(conn, computed.secret)
    assert pg.scram_verifier(fresh_db.owner) == computed.secret
    after = start_pooler(pgbouncer_factory, spec, budget, computed)
    assert select_user(after, fresh_db, fresh_db.owner_password) == fresh_db.owner
    with psycopg.connect(fresh_db.dsn) as direct:  # the password itself did not change
        assert direct.execute("SELECT 1").fetchone() == (1,)


# --- many clients, few server connections ------------------------------------------------------


async def _client(dsn: str, transactions: int, failures: list[str]) -> int:
    done = 0
    try:
        # prepare_threshold=None: what docs/transaction-mode.md tells application teams (psycopg
        # would otherwise prepare a statement after its 5th run; see the hazard test below).
        async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None) as conn:
            for _ in range(transactions):
                async with conn.transaction():
                    cur = await conn.execute("SELECT pg_sleep(0.002), pg_backend_pid()")
                    await cur.fetchone()
                done += 1
    except psycopg.Error as exc:
        failures.append(type(exc).__name__ + ": " + str(exc).strip()[:200])
    return done


async def _sample_server_connections(pg: PostgresServer, dbname: str, stop: asyncio.Event, seen: list[int]) -> None:
    async with await psycopg.AsyncConnection.connect(pg.dsn("postgres"), autocommit=True) as conn:
        while not stop.is_set():
            cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [dbname])
            row = await cur.fetchone()
            assert row is not None
            seen.append(int(row[0]))
            await asyncio.sleep(0.02)


async def test_500_clients_share_the_budgeted_server_connections(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory) -> None:
    clients, transactions = 500, 5
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= 2 * clients + 100, f"file-descriptor limit {soft} is too low for {clients} clients"
    spec = make_spec(pg, fresh_db, replicas=2)
    budget = budget_for(fresh_db, spec)
    assert budget.max_connections < clients  # far fewer server connections than clients
    assert not budget.oversubscribed
    bouncer = start_pooler(pgbouncer_factory, spec, budget, server_credentials(fresh_db))
    dsn = bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)
    failures: list[str] = []
    seen: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_server_connections(pg, fresh_db.name, stop, seen))
    started = time.monotonic()
    done = await asyncio.gather(*(_client(dsn, transactions, failures) for _ in range(clients)))
    elapsed = time.monotonic() - started
    stop.set()
    await sampler
    assert failures == []
    assert sum(done) == clients * transactions
    assert seen and max(seen) <= budget.pool_size + budget.reserve_pool_size
    assert max(seen) <= budget.max_db_connections
    print(f"\n{clients} clients x {transactions} transactions in {elapsed:.1f}s; server connections "
          f"max {max(seen)} (pool {budget.pool_size} + reserve {budget.reserve_pool_size}, "
          f"max_connections {budget.max_connections})")


# --- the agent: reload without dropping clients, health, drain ---------------------------------


def _agent_command() -> tuple[list[str], dict[str, str]]:
    """The real CLI, as pgbouncer's OS user, from a copy that user can read (the checkout may be
    in a root-only dir): see tests/harness/service_python.py."""
    command, env = service_python_command("marketplacedb_operator.cli")
    return [*command, "pooler-agent"], env


class Agent:
    def __init__(self, bouncer: PgBouncerProcess, database: str, drain_delay: float = 0.2,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        command, env = _agent_command()
        args = ["--socket-dir", str(bouncer.workdir), "--port", str(bouncer.port),
                "--config", str(bouncer.ini_path), "--auth-file", str(bouncer.userlist_path),
                "--database", database, "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
                "--admin-port", str(self.admin_port),
                "--interval", "0.1", "--drain-delay", str(drain_delay), "--drain-timeout", "20", *extra]
        self.log = bouncer.workdir / "agent.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(command + args, env=env, cwd="/tmp", stdout=out, stderr=out,
                                         **as_service_user())
        deadline = time.monotonic() + 30
        while self.get("/livez")[0] != 200:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "agent did not start:\n" + self.log.read_text()
            time.sleep(0.1)

    def get(self, path: str, timeout: float = 5, *, method: str = "GET", port: int | None = None
            ) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{port or self.port}{path}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError:
            return 0, {}

    def prestop(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The pgbouncer container's rendered preStop hook, run as is (bash), aimed at this agent."""
        script = PRESTOP_DRAIN.replace(f"/{AGENT_ADMIN_PORT} ", f"/{self.admin_port} ")
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # SIGTERM would wait for a drain, as in a pod
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


async def _loop_transactions(dsn: str, stop: asyncio.Event, failures: list[str]) -> int:
    done = 0
    async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None) as conn:
        while not stop.is_set():
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_sleep(0.005)")
                    await conn.execute("SELECT 1")
                done += 1
            except psycopg.Error as exc:
                failures.append(str(exc).strip()[:200])
                if conn.closed or conn.broken:
                    break  # a lost connection would fail at once forever, starving the event loop
                await asyncio.sleep(0.01)
    return done


async def _wait_for(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


async def test_reload_safe_change_applied_by_the_agent_drops_no_transaction(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory,
        agents: list[Agent]) -> None:
    old_spec = make_spec(pg, fresh_db, parameters={"server_idle_timeout": "600"})
    new_spec = make_spec(pg, fresh_db, parameters={"server_idle_timeout": "120"})
    budget = budget_for(fresh_db, old_spec)
    credentials = server_credentials(fresh_db)
    old = pgb.PoolerConfig(pgb.render_ini(old_spec, budget), pgb.render_userlist(credentials), "pgbouncer:1.18")
    new = pgb.PoolerConfig(pgb.render_ini(new_spec, budget), old.userlist, old.image)
    assert pgb.classify_change(old, new) == "reload"
    bouncer = pgbouncer_factory(old.ini, old.userlist)
    agent = Agent(bouncer, fresh_db.name)
    agents.append(agent)
    assert agent.get("/readyz") == (200, {"ok": True, "reason": "serving", "reloads": 0})
    assert agent.get("/healthz")[0] == 200
    pid = bouncer.pid
    dsn = bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)
    stop = asyncio.Event()
    failures: list[str] = []
    loops = [asyncio.create_task(_loop_transactions(dsn, stop, failures)) for _ in range(20)]
    await asyncio.sleep(1.0)
    await asyncio.to_thread(bouncer.write_config, new.ini)  # what kubelet does to the mounted files
    await _wait_for(lambda: bouncer.config()["server_idle_timeout"] == "120")
    await _wait_for(lambda: agent.get("/readyz")[0] == 200)
    await asyncio.sleep(1.0)
    stop.set()
    done = sum(await asyncio.gather(*loops))
    assert failures == []
    assert done > 100
    status, body = agent.get("/readyz")
    assert status == 200 and body["reloads"] >= 1
    assert bouncer.pid == pid and bouncer.is_running()  # no restart
    print(f"\n{done} transactions across the reload, 0 failed")


async def test_drain_lets_the_running_transaction_finish_then_stops(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory,
        agents: list[Agent]) -> None:
    spec = make_spec(pg, fresh_db)
    bouncer = start_pooler(pgbouncer_factory, spec, budget_for(fresh_db, spec), server_credentials(fresh_db))
    agent = Agent(bouncer, fresh_db.name, drain_delay=0.3)
    agents.append(agent)
    dsn = bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)
    async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None) as conn:
        await conn.execute("CREATE TABLE drained (id int)")
        await conn.commit()
        await conn.execute("INSERT INTO drained VALUES (1)")
        drain = asyncio.create_task(asyncio.to_thread(agent.prestop))
        await _wait_for(lambda: agent.get("/readyz")[1].get("reason") == "draining", timeout=5)
        await conn.execute("SELECT pg_sleep(1.0)")  # still inside the transaction when PAUSE comes
        await conn.commit()
    hook = await drain
    assert hook.returncode == 0 and "200 OK" in hook.stdout.splitlines()[0]
    assert json.loads(hook.stdout.split("\n\n", 1)[1]) == {"ok": True, "reason": "drained", "reloads": 0}
    assert bouncer.proc is not None and bouncer.proc.wait(10) == 0
    with fresh_db.connect() as direct:
        assert direct.execute("SELECT count(*) FROM drained").fetchone() == (1,)


async def test_agent_reports_a_reload_that_pgbouncer_silently_rejected(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory,
        agents: list[Agent]) -> None:
    """PgBouncer < 1.25 keeps the old value when a reloaded one is invalid, and says nothing."""
    spec = make_spec(pg, fresh_db, parameters={"server_idle_timeout": "600"})
    bouncer = start_pooler(pgbouncer_factory, spec, budget_for(fresh_db, spec), server_credentials(fresh_db))
    agent = Agent(bouncer, fresh_db.name)
    agents.append(agent)
    assert agent.get("/readyz")[0] == 200
    # Not something the renderer can produce: a hand-edited or corrupted file.
    broken = bouncer.ini_text.replace("server_idle_timeout = 600", "server_idle_timeout = soon")
    await asyncio.to_thread(bouncer.write_config, broken)
    await _wait_for(lambda: agent.get("/readyz")[0] == 503)
    status, body = agent.get("/readyz")
    assert "server_idle_timeout" in body["reason"]
    assert bouncer.config()["server_idle_timeout"] == "600"  # the old value still runs
    assert agent.get("/healthz")[0] == 200  # alive: no restart for a bad reload
    await asyncio.to_thread(bouncer.write_config, bouncer.ini_text.replace("soon", "300"))
    await _wait_for(lambda: agent.get("/readyz")[0] == 200)
    assert bouncer.config()["server_idle_timeout"] == "300"


# --- the transaction-mode hazard: prepared statements on PgBouncer 1.18 -----------------------


def test_prepared_statements_break_in_transaction_mode_unless_disabled(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory) -> None:
    """docs/transaction-mode.md: psycopg prepare_threshold=None, JDBC prepareThreshold=0, asyncpg
    statement_cache_size=0. One server connection makes the collision deterministic."""
    spec = make_spec(pg, fresh_db, defaultPoolSize=1)
    bouncer = start_pooler(pgbouncer_factory, spec, budget_for(fresh_db, spec), server_credentials(fresh_db))
    assert bouncer.config()["default_pool_size"] == "1"
    dsn = bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)
    # Server-side prepared statements (psycopg prepares on first use with prepare_threshold=0): the
    # statement lives on whichever server connection ran it, which the next client then gets.
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as first, \
            psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as second:
        assert first.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises((psycopg.errors.DuplicatePreparedStatement, psycopg.errors.InvalidSqlStatementName)):
            second.execute("SELECT 2")
    # The fix application teams configure: no server-side prepared statements.
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as first, \
            psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as second:
        for _ in range(10):
            assert first.execute("SELECT 1").fetchone() == (1,)
            assert second.execute("SELECT 2").fetchone() == (2,)
