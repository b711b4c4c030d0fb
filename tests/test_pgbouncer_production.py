"""The pooler for production against the real pgbouncer 1.18 and PostgreSQL 15: application roles,
client TLS and its rotation, PAUSE/RESUME, parameters newer than 1.18, and a drain that is neither
reachable from the pod network nor final.

The rendered pgbouncer.ini is used as is except for paths and ports (tests/harness/pgbouncer.py);
the TLS files' paths are pointed at the test's own certificate the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from harness.pgbouncer import PgBouncerFactory, PgBouncerProcess, free_port, override_ini
from harness.postgres import FreshDatabase, PostgresServer, make_service_dir, write_service_file
from marketplacedb_operator.specs import pgbouncer as pgb
from test_pgbouncer_real import Agent, _loop_transactions, _wait_for, budget_for, make_spec, server_credentials


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def app_role(db: FreshDatabase, name: str) -> str:
    """A login role that may use the database (what a DBA creates for an application); its password."""
    password = secrets.token_urlsafe(16)
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        grant = sql.SQL("GRANT CONNECT ON DATABASE {} TO {}")
        conn.execute(grant.format(sql.Identifier(db.name), sql.Identifier(name)))
    return password


def drop_role(db: FreshDatabase, name: str) -> None:
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(sql.Identifier(db.name), sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


# --- application roles ------------------------------------------------------------------------


def test_app_role_logs_in_with_its_own_password_and_the_owner_no_longer_can(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory) -> None:
    role = f"app_{fresh_db.name}"[:60]
    password = app_role(fresh_db, role)
    try:
        spec = make_spec(pg, fresh_db, users=[{"credentialsSecretRef": {"name": "app"}}])
        # What the operator does without superuser: the app role's password, in the auth Secret only.
        with fresh_db.connect() as conn:
            from marketplacedb_operator.gateways.postgres import server
            assert server.read_scram_verifier(conn, role) is None
        entry = pgb.choose_credentials(role, password, None, "spec.pooler.users[0].credentialsSecretRef")
        bouncer = pgbouncer_factory(pgb.render_ini(spec, budget_for(fresh_db, spec)), pgb.render_userlist(entry))
        with psycopg.connect(bouncer.dsn(fresh_db.name, role, password)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        # The owner's password does not open the app role, and the owner is not a pooler login.
        with pytest.raises(psycopg.OperationalError, match="authentication failed"):
            psycopg.connect(bouncer.dsn(fresh_db.name, role, fresh_db.owner_password)).close()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)).close()
    finally:
        drop_role(fresh_db, role)


async def test_several_users_share_max_db_connections(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory) -> None:
    """default_pool_size is per user; max_db_connections caps the sum across users (per pod)."""
    roles = [f"app{i}_{fresh_db.name}"[:60] for i in range(3)]
    passwords = [app_role(fresh_db, r) for r in roles]
    try:
        spec = make_spec(pg, fresh_db, defaultPoolSize=4, parameters={"max_db_connections": "5"},
                         users=[{"credentialsSecretRef": {"name": f"app{i}"}} for i in range(3)])
        budget = budget_for(fresh_db, spec)
        assert budget.max_db_connections == 5 and budget.pool_size == 4
        entries = [pgb.choose_credentials(r, p, None) for r, p in zip(roles, passwords, strict=True)]
        bouncer = pgbouncer_factory(pgb.render_ini(spec, budget), pgb.render_userlist(*entries))
        failures: list[str] = []
        stop = asyncio.Event()
        loops = [asyncio.create_task(_loop_transactions(bouncer.dsn(fresh_db.name, r, p), stop, failures))
                 for r, p in zip(roles, passwords, strict=True) for _ in range(6)]
        seen = []
        for _ in range(40):
            with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
                query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                row = conn.execute(query, [fresh_db.name]).fetchone()
            assert row is not None
            seen.append(int(row[0]))
            await asyncio.sleep(0.05)
        stop.set()
        done = sum(await asyncio.gather(*loops))
        assert failures == [] and done > 0
        assert max(seen) <= 5 < 3 * 4  # without the cap, three users could hold 12
    finally:
        for role in roles:
            drop_role(fresh_db, role)


# --- client TLS -------------------------------------------------------------------------------


def make_ca_and_cert(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """(ca.crt, tls.crt, tls.key): a CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    ca_key, ca_crt = directory / f"{name}-ca.key", directory / f"{name}-ca.crt"
    key, csr, crt = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name} test CA",
        "-keyout", str(ca_key), "-out", str(ca_crt))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(crt))
    return ca_crt, crt, key


@pytest.fixture
def tls_dir() -> Iterator[Path]:
    path = make_service_dir("mdb-tls-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def install_cert(tls_dir: Path, crt: Path, key: Path) -> tuple[Path, Path]:
    """What kubelet does with the kubernetes.io/tls Secret volume: both files appear at once (a new
    directory, then one atomic rename of the `..data` symlink), readable by PgBouncer."""
    version = make_service_dir("mdb-tls-version-")
    shutil.move(str(version), tls_dir / version.name)
    write_service_file(tls_dir / version.name / "tls.crt", crt.read_text())
    write_service_file(tls_dir / version.name / "tls.key", key.read_text())
    link = tls_dir / "..data_tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(version.name)
    os.replace(link, tls_dir / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (tls_dir / name).is_symlink():
            (tls_dir / name).symlink_to(f"..data/{name}")
    return tls_dir / "tls.crt", tls_dir / "tls.key"


def tls_pooler(pg: PostgresServer, db: FreshDatabase, factory: PgBouncerFactory, tls_dir: Path,
               crt: Path, key: Path) -> PgBouncerProcess:
    spec = make_spec(pg, db, tls={"secretRef": {"name": "pooler-tls"}})
    ini = pgb.render_ini(spec, budget_for(db, spec))
    section = pgb.parse_ini(ini)["pgbouncer"]
    assert section["client_tls_sslmode"] == "require"
    assert (section["client_tls_cert_file"], section["client_tls_key_file"]) == (pgb.TLS_CERT_PATH, pgb.TLS_KEY_PATH)
    cert_path, key_path = install_cert(tls_dir, crt, key)
    ini = override_ini(ini, "pgbouncer", {"client_tls_cert_file": str(cert_path), "client_tls_key_file": str(key_path)})
    return factory(ini, pgb.render_userlist(server_credentials(db)))


def tls_select(bouncer: PgBouncerProcess, db: FreshDatabase, **tls: Any) -> Any:
    with psycopg.connect(bouncer.dsn(db.name, db.owner, db.owner_password), **tls) as conn:
        row = conn.execute("SELECT 1").fetchone()
        return row, conn.pgconn.ssl_in_use


def test_client_tls_required_and_verified_with_the_tests_certificate(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory, tls_dir: Path) -> None:
    ca, crt, key = make_ca_and_cert(tls_dir, "first")
    bouncer = tls_pooler(pg, fresh_db, pgbouncer_factory, tls_dir, crt, key)
    assert tls_select(bouncer, fresh_db, sslmode="require") == ((1,), True)
    assert tls_select(bouncer, fresh_db, sslmode="verify-full", sslrootcert=str(ca)) == ((1,), True)
    with pytest.raises(psycopg.OperationalError):  # a client without TLS is refused
        tls_select(bouncer, fresh_db, sslmode="disable")


async def test_certificate_rotation_reloads_without_dropping_a_client(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory, tls_dir: Path,
        agents: list[Agent]) -> None:
    old_ca, old_crt, old_key = make_ca_and_cert(tls_dir, "old")
    new_ca, new_crt, new_key = make_ca_and_cert(tls_dir, "new")
    bouncer = tls_pooler(pg, fresh_db, pgbouncer_factory, tls_dir, old_crt, old_key)
    watch = ("--watch", str(tls_dir / "tls.crt"), "--watch", str(tls_dir / "tls.key"))
    agent = Agent(bouncer, fresh_db.name, extra=watch)
    agents.append(agent)
    with pytest.raises(psycopg.OperationalError):
        tls_select(bouncer, fresh_db, sslmode="verify-ca", sslrootcert=str(new_ca))
    dsn = bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)
    dsn += f" sslmode=verify-ca sslrootcert={old_ca}"
    stop, failures = asyncio.Event(), []

    async def client() -> tuple[int, bool]:
        """Transactions on one TLS connection; (transactions done, connection still open at the end)."""
        done = 0
        async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None) as conn:
            while not stop.is_set():
                try:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_sleep(0.005)")
                    done += 1
                except psycopg.Error as exc:
                    failures.append(str(exc).strip()[:200])
                    if conn.closed or conn.broken:
                        break
                    await asyncio.sleep(0.05)
            return done, not (conn.closed or conn.broken)

    loops = [asyncio.create_task(client()) for _ in range(20)]
    await asyncio.sleep(0.5)
    await asyncio.to_thread(install_cert, tls_dir, new_crt, new_key)  # cert-manager renews, kubelet swaps

    def new_certificate_served() -> bool:
        try:
            return bool(tls_select(bouncer, fresh_db, sslmode="verify-ca", sslrootcert=str(new_ca)) == ((1,), True))
        except psycopg.OperationalError:
            return False

    await _wait_for(new_certificate_served, timeout=30)  # (the check runs in a thread: the clients go on)
    assert agent.get("/readyz")[1]["reloads"] >= 1
    await asyncio.sleep(0.5)
    stop.set()
    results = await asyncio.gather(*loops)
    # No client dropped: every TLS session opened before the rotation is still open and kept working.
    assert all(alive for _done, alive in results) and all(done > 0 for done, _alive in results)
    # PgBouncer 1.18 recycles server connections on RELOAD ("obsolete connection"); a server login in
    # flight at that instant counts as failed, and for server_login_retry seconds waiting clients get
    # this error for a transaction (their connection stays). That is the only error tolerated here.
    assert all("server login has been failing" in f for f in failures), failures


# --- PAUSE / RESUME ---------------------------------------------------------------------------


async def test_paused_holds_and_releases_50_running_clients(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory, agents: list[Agent]) -> None:
    spec = make_spec(pg, fresh_db)
    bouncer = pgbouncer_factory(pgb.render_ini(spec, budget_for(fresh_db, spec)),
                                pgb.render_userlist(server_credentials(fresh_db)))
    paused_file = bouncer.workdir / "paused"
    write_service_file(paused_file, "false")
    agent = Agent(bouncer, fresh_db.name, extra=("--paused-file", str(paused_file)))
    agents.append(agent)
    dsn = bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)
    counts = [0] * 50
    failures: list[str] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None) as conn:
            while not stop.is_set():
                try:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_sleep(0.01)")
                    counts[i] += 1
                except psycopg.Error as exc:
                    failures.append(str(exc)[:200])

    tasks = [asyncio.create_task(client(i)) for i in range(50)]
    await _wait_for(lambda: min(counts) > 0)
    await asyncio.to_thread(write_service_file, paused_file, "true")  # spec.pooler.paused: true
    await _wait_for(lambda: any(r["name"] == fresh_db.name and r["paused"] == "1"
                                for r in bouncer.admin("SHOW DATABASES")))

    def waiting() -> int:
        return sum(int(r["cl_waiting"]) for r in bouncer.admin("SHOW POOLS") if r["database"] == fresh_db.name)

    await _wait_for(lambda: waiting() == 50)  # every client has sent its next transaction and waits
    held = sum(counts)
    await asyncio.sleep(0.5)
    assert sum(counts) == held  # nobody gets a server while paused: they wait, nobody fails
    assert agent.get("/readyz")[0] == 200  # an intended pause keeps the pod in the Service
    assert agent.get("/status")[1]["paused"] is True
    await asyncio.to_thread(write_service_file, paused_file, "false")
    await _wait_for(lambda: sum(counts) > held + 50)
    stop.set()
    await asyncio.gather(*tasks)
    assert failures == []
    assert all(c > 0 for c in counts)


# --- PgBouncer versions -----------------------------------------------------------------------


async def test_parameters_newer_than_the_running_pgbouncer_are_left_out_and_reported(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory, agents: list[Agent]) -> None:
    newer = {"max_prepared_statements": "200", "track_extra_parameters": "IntervalStyle,search_path",
             "max_db_client_connections": "1000"}
    spec = make_spec(pg, fresh_db, parameters={**newer, "tcp_user_timeout": "30000",
                                                "server_reset_query": "DISCARD ALL"})
    budget = budget_for(fresh_db, spec)
    userlist = pgb.render_userlist(server_credentials(fresh_db))
    # The image's tag unknown (a custom build): everything is rendered ...
    full = pgb.render_ini(spec, budget)
    section = pgb.parse_ini(full)["pgbouncer"]
    assert section["max_prepared_statements"] == "200" and section["server_reset_query"] == "discard all"
    assert pgb.unsupported_parameters(section, (1, 18)) == sorted(newer)
    assert pgb.unsupported_parameters(section, (1, 25)) == []
    # ... and 1.18 refuses to start on a key it does not know (it does not ignore it): a crash loop.
    with pytest.raises(RuntimeError, match="unknown parameter"):
        pgbouncer_factory(full, userlist)
    # So with the image's version known, they are left out of the file (and reported in status).
    known = pgb.render_ini(spec, budget, version=(1, 18, 0))
    assert not set(newer) & set(pgb.parse_ini(known)["pgbouncer"])
    bouncer = pgbouncer_factory(known, userlist)
    assert bouncer.config()["tcp_user_timeout"] == "30000"  # older ones run
    agent = Agent(bouncer, fresh_db.name)
    agents.append(agent)
    assert agent.get("/status")[1]["unsupported"] == []
    # A file with them anyway (hand-edited, or an image retagged): the agent reports them from the
    # running binary's SHOW CONFIG instead of letting them pass unnoticed.
    await asyncio.to_thread(bouncer.write_config, full)
    await _wait_for(lambda: agent.get("/status")[1]["unsupported"] == sorted(newer))
    status, body = agent.get("/status")
    assert body["version"].startswith("PgBouncer 1.18")
    # 1.18 rejects that whole reload: the pod leaves the Service rather than run half a config.
    status, body = agent.get("/readyz")
    assert status == 503 and body["unsupported"] == sorted(newer)
    assert bouncer.is_running()


# --- drain: loopback only, and not final --------------------------------------------------------


def test_drain_is_not_on_the_probe_port_and_a_restarted_pgbouncer_is_served_again(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory, agents: list[Agent]) -> None:
    spec = make_spec(pg, fresh_db)
    bouncer = pgbouncer_factory(pgb.render_ini(spec, budget_for(fresh_db, spec)),
                                pgb.render_userlist(server_credentials(fresh_db)))
    agent = Agent(bouncer, fresh_db.name)
    agents.append(agent)
    for method in ("GET", "POST"):  # the probe listener (the pod IP in a cluster) cannot drain
        assert agent.get("/drain", method=method)[0] == 404
    assert bouncer.is_running() and agent.get("/readyz")[0] == 200
    hook = agent.prestop()  # the rendered preStop hook, over loopback
    assert hook.returncode == 0 and "200 OK" in hook.stdout
    assert bouncer.proc is not None and bouncer.proc.wait(10) == 0
    assert agent.get("/readyz") [1]["reason"] == "draining"
    bouncer.start()  # kubelet restarts the container (for example after a liveness failure)
    deadline = time.monotonic() + 15
    while agent.get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, agent.get("/readyz")
        time.sleep(0.1)
    with psycopg.connect(bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- metrics ----------------------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "marketplacedb.json"


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{metric name: {labels: value}} of one scrape (the Prometheus text format, parsed by its client)."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_agent_serves_pool_metrics_under_the_exporters_names_and_the_dashboard_uses_them(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory, agents: list[Agent]) -> None:
    spec = make_spec(pg, fresh_db, metrics={"enabled": True})
    bouncer = pgbouncer_factory(pgb.render_ini(spec, budget_for(fresh_db, spec)),
                                pgb.render_userlist(server_credentials(fresh_db)))
    port = free_port()
    agent = Agent(bouncer, fresh_db.name, extra=("--metrics-port", str(port)))
    agents.append(agent)
    dsn = bouncer.dsn(fresh_db.name, fresh_db.owner, fresh_db.owner_password)
    clients = [psycopg.connect(dsn, autocommit=True) for _ in range(5)]
    try:
        for conn in clients:
            for _ in range(3):
                conn.execute("SELECT 1")
        deadline = time.monotonic() + 20  # SHOW STATS_TOTALS is refreshed every stats_period (60 s default)
        while True:
            metrics = scrape(port)
            if metrics["pgbouncer_up"] == {(): 1.0} and agent.get("/livez")[0] == 200:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        db = (("database", fresh_db.name),)
        assert metrics["pgbouncer_pools_client_active_connections"][db] == 5
        assert metrics["pgbouncer_pools_client_waiting_connections"][db] == 0
        assert metrics["pgbouncer_pools_server_idle_connections"][db] + \
            metrics["pgbouncer_pools_server_active_connections"][db] + \
            metrics["pgbouncer_pools_server_used_connections"][db] >= 1
        assert metrics["pgbouncer_databases_paused"][(("database", fresh_db.name), ("name", fresh_db.name))] == 0
        assert "pgbouncer_stats_totals_sql_transactions_pooled_total" in metrics
        assert any(k[0][1].startswith("PgBouncer 1.18") for k in metrics["pgbouncer_version_info"])
        # No user label anywhere: user names come from Secrets.
        assert all("user" not in dict(labels) for series in metrics.values() for labels in series)
        assert fresh_db.owner not in str(metrics)
        # The dashboard's pooler panels query names this scrape serves.
        exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
        used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bpgbouncer_[a-z_]+", e)}
        assert {"pgbouncer_pools_client_waiting_connections", "pgbouncer_pools_client_active_connections"} <= used
        assert used <= set(metrics), used - set(metrics)
    finally:
        for conn in clients:
            conn.close()


# --- SCRAM: scramp's verifier is PostgreSQL's ---------------------------------------------------


@pytest.mark.parametrize("password", ["correct horse battery staple", "p\u00e4ss\u00a0w\u00f6rd \ufb01x \u2163"])
def test_scramp_verifier_equals_the_one_postgresql_computed(fresh_db: FreshDatabase, password: str) -> None:
    """Known answer: PostgreSQL computes the verifier (SASLprep: U+00A0 -> space, NFKC: U+FB01 -> fi,
    U+2163 -> IV); the glue over scramp reproduces it byte for byte from the same salt."""
    role = f"kat_{fresh_db.name}"[:60]
    with psycopg.connect(fresh_db.superuser_dsn, autocommit=True) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        try:
            row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", [role]).fetchone()
        finally:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert row is not None
    server = str(row[0])
    parsed = pgb.parse_verifier(server)
    assert parsed is not None
    iterations, salt, _stored, _server_key = parsed
    assert pgb.scram_verifier(password, salt, iterations) == server
    assert pgb.verifier_matches(server, password) and not pgb.verifier_matches(server, password + "x")
    assert pgb.choose_credentials(role, password, server).kind == "scram-verifier"


def test_a_password_saslprep_refuses_is_used_as_is_and_still_logs_in(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory) -> None:
    """PostgreSQL hashes the raw bytes when SASLprep refuses a password (here a control character);
    the operator then keeps the password (Secret only) instead of guessing a verifier."""
    role = f"ctl_{fresh_db.name}"[:60]
    password = "bell\u0007" + secrets.token_hex(4)
    with psycopg.connect(fresh_db.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(fresh_db.name),
                                                                          sql.Identifier(role)))
        row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", [role]).fetchone()
    try:
        assert row is not None
        with pytest.raises(pgb.PoolerConfigError, match="SASLprep"):
            pgb.scram_verifier(password, b"0123456789abcdef")
        entry = pgb.choose_credentials(role, password, str(row[0]))
        assert entry.kind == "password"
        spec = make_spec(pg, fresh_db, users=[{"credentialsSecretRef": {"name": "ctl"}}])
        bouncer = pgbouncer_factory(pgb.render_ini(spec, budget_for(fresh_db, spec)), pgb.render_userlist(entry))
        with psycopg.connect(bouncer.dsn(fresh_db.name, role, password)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
    finally:
        drop_role(fresh_db, role)


# --- authQuery ----------------------------------------------------------------------------------


def test_auth_query_admits_a_role_not_listed_and_the_check_sees_the_function(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory) -> None:
    from marketplacedb_operator.gateways.postgres.pooler import lookup_function_exists
    from marketplacedb_operator.specs.pooler_auth import lookup_function_ddl
    auth_user, role = f"auth_{fresh_db.name}"[:60], f"looked_{fresh_db.name}"[:60]
    auth_password, password = app_role(fresh_db, auth_user), app_role(fresh_db, role)
    function = "pgbouncer.user_lookup"
    try:
        with fresh_db.connect() as conn:  # the operator's check, as the owner
            assert not lookup_function_exists(conn, function)
        with psycopg.connect(fresh_db.superuser_dsn, autocommit=True) as conn:
            assert conn.info.dbname == fresh_db.name
            assert not lookup_function_exists(conn, function)
            for statement in lookup_function_ddl(function, auth_user):  # the README's SQL, as a DBA runs it
                conn.execute(statement)
        with fresh_db.connect() as conn:
            assert lookup_function_exists(conn, function)
        spec = make_spec(pg, fresh_db, authQuery={"credentialsSecretRef": {"name": "auth"}, "function": function},
                         users=[])
        ini = pgb.render_ini(spec, budget_for(fresh_db, spec), auth_user)
        section = pgb.parse_ini(ini)["pgbouncer"]
        assert section["auth_query"] == 'SELECT usename, passwd FROM "pgbouncer"."user_lookup"($1)'
        assert section["auth_user"] == auth_user
        entry = pgb.choose_credentials(auth_user, auth_password, None)
        bouncer = pgbouncer_factory(ini, pgb.render_userlist(entry))  # only the auth_user is listed
        with psycopg.connect(bouncer.dsn(fresh_db.name, role, password)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        with pytest.raises(psycopg.OperationalError, match="authentication failed"):
            psycopg.connect(bouncer.dsn(fresh_db.name, role, auth_password)).close()
    finally:
        with psycopg.connect(fresh_db.superuser_dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS pgbouncer CASCADE")
        drop_role(fresh_db, role)
        drop_role(fresh_db, auth_user)


def test_a_paused_pooler_still_drains(
        pg: PostgresServer, fresh_db: FreshDatabase, pgbouncer_factory: PgBouncerFactory, agents: list[Agent]) -> None:
    """spec.pooler.paused and then a drain (a rollout during maintenance): the pod still stops."""
    spec = make_spec(pg, fresh_db)
    bouncer = pgbouncer_factory(pgb.render_ini(spec, budget_for(fresh_db, spec)),
                                pgb.render_userlist(server_credentials(fresh_db)))
    paused_file = bouncer.workdir / "paused"
    write_service_file(paused_file, "true")
    agent = Agent(bouncer, fresh_db.name, extra=("--paused-file", str(paused_file)))
    agents.append(agent)
    deadline = time.monotonic() + 15
    while not any(r["name"] == fresh_db.name and r["paused"] == "1" for r in bouncer.admin("SHOW DATABASES")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    hook = agent.prestop()
    assert hook.returncode == 0 and "200 OK" in hook.stdout
    assert bouncer.proc is not None and bouncer.proc.wait(10) == 0
