"""Issue 13, finding 7: TLS to the database with a CA (and a client certificate) the user gives.

A second throwaway PostgreSQL 15 runs with ssl=on, a server certificate for 127.0.0.1 issued by a CA
made here with `openssl`, and pg_hba `hostssl ... clientcert=verify-ca`: a session exists only over
TLS with a client certificate of that CA. The operator (reconciler on KMock, real gateways) must
connect with sslMode verify-full and the right CA, and fail with a clear condition with a wrong
one; the refresh CronJob's pod gets the same material through a projected volume and libpq's
variables, and `marketplacedb refresh` connects with exactly those variables.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import kubernetes_validate
import psycopg
import pytest
from psycopg import sql

from harness.postgres import PostgresServer, write_service_file
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import ConnInfo, DatabaseUnreachable, connect
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.specs import db_tls
from marketplacedb_operator.specs.cronjobs import build_cronjobs
from security_env import NS, Sec, issue, make_ca, resource, sec_env, secret

SETTINGS = Settings(connect_timeout_seconds=5, resync_seconds=1)
ROLE, PASSWORD, DBNAME = "tls_owner", "tls-owner-Pw-1", "tls_db"


@dataclasses.dataclass
class TLSServer:
    server: PostgresServer
    certs: pathlib.Path
    ca: str
    wrong_ca: str
    client_cert: str
    client_key: str


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    certs = tmp_path_factory.mktemp("certs")
    ca, wrong = make_ca(certs, "ca"), make_ca(certs, "wrong-ca")
    server_cert = issue(certs, ca, "server", "127.0.0.1", san="IP:127.0.0.1,DNS:localhost")
    client = issue(certs, ca, "client", ROLE)
    server = PostgresServer()
    try:
        for name, source in (("server.crt", server_cert[0]), ("server.key", server_cert[1]), ("ca.crt", ca[0])):
            write_service_file(server.basedir / name, source.read_text())
        server.extra_conf.update(ssl="on", ssl_cert_file=f"'{server.basedir / 'server.crt'}'",
                                 ssl_key_file=f"'{server.basedir / 'server.key'}'",
                                 ssl_ca_file=f"'{server.basedir / 'ca.crt'}'")
        write_service_file(server.datadir / "pg_hba.conf", "local all all trust\n"
                           "hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n")
        server.start()
        with psycopg.connect(host=str(server.basedir), port=server.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE),
                                                                             sql.Literal(PASSWORD)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DBNAME), sql.Identifier(ROLE)))
        yield TLSServer(server, certs, ca[0].read_text(), wrong[0].read_text(), client[0].read_text(),
                        client[1].read_text())
    finally:
        server.cleanup()


@pytest.fixture
async def sec(kube_api: Any, kube_objects: Any, kube_client: Any, tls_pg: TLSServer) -> AsyncIterator[Sec]:
    async with sec_env(kube_api, kube_objects, kube_client, SETTINGS) as env:
        await env.objects.create(secret("owner", {"username": ROLE, "password": PASSWORD}, opted_in=True,
                                        bound="shop,nocert,noca"))
        await env.objects.create(secret("client-cert", {"tls.crt": tls_pg.client_cert, "tls.key": tls_pg.client_key},
                                        opted_in=True, bound="shop,nocert,noca"))
        await env.objects.create({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "db-ca", "namespace": NS}, "data": {"ca.crt": tls_pg.ca}})
        yield env


def _database(tls_pg: TLSServer, tls: dict[str, Any] | None, ssl_mode: str = "verify-full") -> dict[str, Any]:
    body: dict[str, Any] = {"host": "127.0.0.1", "port": tls_pg.server.port, "dbname": DBNAME, "sslMode": ssl_mode,
                            "credentialsSecretRef": {"name": "owner"}}
    if tls is not None:
        body["tls"] = tls
    return body


async def test_verify_full_with_the_right_ca_and_a_client_certificate_connects(sec: Sec, tls_pg: TLSServer) -> None:
    tls = {"caConfigMapRef": {"name": "db-ca"}, "clientCertSecretRef": {"name": "client-cert"}}
    await sec.objects.create(resource(_database(tls_pg, tls)))
    before = set(pathlib.Path(tempfile.gettempdir()).glob("marketplacedb-conn-tls-*"))
    await sec.reconcile()
    cond = sec.condition("DatabaseReachable")
    assert (cond["status"], cond["reason"]) == ("True", "Connected"), cond
    assert sec.condition("Ready")["status"] == "True"
    # No key file outlives the handshake.
    assert set(pathlib.Path(tempfile.gettempdir()).glob("marketplacedb-conn-tls-*")) <= before
    assert "PRIVATE KEY" not in sec.everything()


async def test_a_wrong_ca_fails_with_a_clear_condition(sec: Sec, tls_pg: TLSServer) -> None:
    await sec.objects.create(secret("wrong-ca", {"ca.crt": tls_pg.wrong_ca}, opted_in=True))
    tls = {"caSecretRef": {"name": "wrong-ca"}, "clientCertSecretRef": {"name": "client-cert"}}
    await sec.objects.create(resource(_database(tls_pg, tls)))
    await sec.reconcile()
    cond = sec.condition("DatabaseReachable")
    assert (cond["status"], cond["reason"]) == ("False", "TLSFailed")
    assert cond["message"].startswith(f"cannot connect to 127.0.0.1:{tls_pg.server.port}/{DBNAME}: TLS failed")
    wrong_body = tls_pg.wrong_ca.splitlines()[1]
    assert wrong_body not in sec.everything() and "PRIVATE KEY" not in sec.everything()


async def test_no_client_certificate_and_no_ca_fail_as_tls(sec: Sec, tls_pg: TLSServer) -> None:
    await sec.objects.create(resource(_database(tls_pg, {"caConfigMapRef": {"name": "db-ca"}}), name="nocert"))
    await sec.objects.create(resource(_database(tls_pg, None), name="noca"))  # system CA store: ours is not in it
    await sec.reconcile("nocert")
    await sec.reconcile("noca")
    assert sec.condition("DatabaseReachable", "nocert")["reason"] == "TLSFailed"
    assert sec.condition("DatabaseReachable", "noca")["reason"] == "TLSFailed"


async def test_tls_material_from_a_secret_that_does_not_opt_in_is_refused(sec: Sec, tls_pg: TLSServer) -> None:
    await sec.objects.create(secret("team-b-ca", {"ca.crt": tls_pg.ca}, opted_in=False))
    await sec.objects.create(resource(_database(tls_pg, {"caSecretRef": {"name": "team-b-ca"}})))
    await sec.reconcile()
    cond = sec.condition("DatabaseReachable")
    assert (cond["reason"], cond["status"]) == ("SecretNotOptedIn", "False")
    assert cond["message"].startswith("spec.database.tls.caSecretRef: Secret prod/team-b-ca is refused")


def test_refresh_cronjob_pods_mount_the_tls_material_and_libpq_uses_it(tls_pg: TLSServer,
                                                                       tmp_path: pathlib.Path) -> None:
    spec = MarketplaceDBSpec.model_validate({
        "database": _database(tls_pg, {"caConfigMapRef": {"name": "db-ca"},
                                       "clientCertSecretRef": {"name": "client-cert"}}),
        "materializedViews": [{"name": "mv_one", "query": "SELECT id FROM t", "uniqueKey": ["id"],
                               "refresh": {"schedule": "*/5 * * * *"}}]})
    body = {"metadata": {"name": "shop", "namespace": NS, "uid": "6f1c2f9e-2b1e-4c55-9a53-8f7f3d1c0a11"}}
    (cronjob,) = build_cronjobs(body, spec, SETTINGS)
    clean = {k: v for k, v in cronjob.items() if k != "status"}
    kubernetes_validate.validate(clean, "1.30.0", strict=True)
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == db_tls.VOLUME]
    assert volume["projected"]["defaultMode"] == 0o440
    assert volume["projected"]["sources"] == [
        {"configMap": {"name": "db-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"secret": {"name": "client-cert", "items": [{"key": "tls.crt", "path": "tls.crt"},
                                                     {"key": "tls.key", "path": "tls.key"}]}}]
    container = pod["containers"][0]
    assert {"name": db_tls.VOLUME, "mountPath": db_tls.MOUNT_PATH, "readOnly": True} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PGSSLMODE"] == "verify-full"
    assert env["PGREQUIREAUTH"] == "scram-sha-256,none"  # TLS proves the host, not that it deserves the password
    assert env["PGSSLROOTCERT"] == f"{db_tls.MOUNT_PATH}/ca.crt"
    assert (env["PGSSLCERT"], env["PGSSLKEY"]) == (f"{db_tls.MOUNT_PATH}/tls.crt", f"{db_tls.MOUNT_PATH}/tls.key")

    # The pod's view, on this machine: the same files under a local directory, the pod's environment.
    mount = tmp_path / "db-tls"
    mount.mkdir()
    (mount / "ca.crt").write_text(tls_pg.ca)
    (mount / "tls.crt").write_text(tls_pg.client_cert)
    (mount / "tls.key").write_text(tls_pg.client_key)
    (mount / "tls.key").chmod(0o600)  # the pod's 0440 root-owned file is its equivalent for libpq
    with psycopg.connect(host=str(tls_pg.server.basedir), port=tls_pg.server.port, user="postgres", dbname=DBNAME,
                         autocommit=True) as conn:
        conn.execute("DROP MATERIALIZED VIEW IF EXISTS mv_one; DROP TABLE IF EXISTS t")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
        conn.execute(sql.SQL("ALTER TABLE t OWNER TO {}").format(sql.Identifier(ROLE)))
    with psycopg.connect(host="127.0.0.1", port=tls_pg.server.port, user=ROLE, password=PASSWORD, dbname=DBNAME,
                         sslmode="verify-full", sslrootcert=str(mount / "ca.crt"), sslcert=str(mount / "tls.crt"),
                         sslkey=str(mount / "tls.key"), autocommit=True) as conn:
        conn.execute("CREATE MATERIALIZED VIEW mv_one AS SELECT id FROM t")
        conn.execute("CREATE UNIQUE INDEX ON mv_one (id)")
    pod_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    for item in container["env"]:
        if "value" in item:
            pod_env[item["name"]] = item["value"].replace(db_tls.MOUNT_PATH, str(mount))
    pod_env.update(PGUSER=ROLE, PGPASSWORD=PASSWORD)  # from secretKeyRef in the pod
    command = shutil.which("marketplacedb", path=str(pathlib.Path(sys.executable).parent))
    assert command is not None
    done = subprocess.run([command, *container["args"]], env=pod_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert '"outcome": "refreshed"' in done.stdout or '"outcome": "skipped"' in done.stdout, done.stdout
    # Without the client certificate the same pod cannot connect: the files were what made it work.
    no_cert = {k: v for k, v in pod_env.items() if k not in ("PGSSLCERT", "PGSSLKEY")}
    no_cert["HOME"] = str(tmp_path)  # no ~/.postgresql/postgresql.crt fallback
    failed = subprocess.run([command, *container["args"]], env=no_cert, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and PASSWORD not in failed.stdout + failed.stderr


def test_a_dsn_keeps_its_tls_files(tls_pg: TLSServer, tmp_path: pathlib.Path) -> None:
    """`plan`/`apply`/`refresh --dsn` parse the DSN into ConnInfo: sslrootcert, sslcert and sslkey
    must survive that, or verify-full can never connect from the command line."""
    for name, content in (("ca.crt", tls_pg.ca), ("c.crt", tls_pg.client_cert), ("c.key", tls_pg.client_key)):
        (tmp_path / name).write_text(content)
        (tmp_path / name).chmod(0o600)
    dsn = (f"host=127.0.0.1 port={tls_pg.server.port} dbname={DBNAME} user={ROLE} password={PASSWORD} "
           f"sslmode=verify-full sslrootcert={tmp_path / 'ca.crt'} sslcert={tmp_path / 'c.crt'} "
           f"sslkey={tmp_path / 'c.key'}")
    with connect(ConnInfo.from_dsn(dsn)) as conn:
        row = conn.execute("SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True, f"/CN={ROLE}")
    with pytest.raises(DatabaseUnreachable) as refused:
        connect(ConnInfo.from_dsn(dsn.replace(str(tmp_path / "ca.crt"), str(tls_pg.certs / "wrong-ca.crt"))))
    assert refused.value.reason == "TLSFailed" and ROLE not in str(refused.value)
