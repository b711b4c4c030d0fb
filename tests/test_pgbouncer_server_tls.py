"""The pooler's upstream TLS from spec.database.tls, against the real pgbouncer 1.18 and the TLS
PostgreSQL of tests/test_security_tls.py (ssl=on, `hostssl ... clientcert=verify-ca` only): a
session exists only over TLS with a client certificate of the test's CA, so a query through the
pooler proves that PgBouncer verified the server with the given CA and presented the certificate.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import psycopg
import pytest

import test_security_tls
from harness.pgbouncer import PgBouncerFactory, override_ini
from harness.postgres import make_service_dir, write_service_file
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.specs import db_tls
from marketplacedb_operator.specs import pgbouncer as pgb
from marketplacedb_operator.specs.pooler_manifests import build_pooler
from marketplacedb_operator.specs.pooler_sizing import compute_budget
from test_security_tls import DBNAME, PASSWORD, ROLE, TLSServer

tls_pg = test_security_tls.tls_pg  # the module's TLS server fixture
SETTINGS = Settings()
TLS = {"caConfigMapRef": {"name": "db-ca"}, "clientCertSecretRef": {"name": "client-cert"}}


def make_spec(tls_pg: TLSServer, tls: dict[str, Any] | None = TLS) -> MarketplaceDBSpec:
    database: dict[str, Any] = {"host": "127.0.0.1", "port": tls_pg.server.port, "dbname": DBNAME,
                                "sslMode": "verify-full", "credentialsSecretRef": {"name": "owner"}}
    if tls is not None:
        database["tls"] = tls
    return MarketplaceDBSpec.model_validate({"database": database, "pooler": {"enabled": True, "replicas": 1}})


@pytest.fixture
def files(tls_pg: TLSServer) -> Iterator[Path]:
    """What the projected volume holds (db_tls.py), readable by PgBouncer's OS user."""
    path = make_service_dir("mdb-pooler-dbtls-")
    write_service_file(path / db_tls.CA_FILE, tls_pg.ca)
    write_service_file(path / db_tls.CERT_FILE, tls_pg.client_cert)
    write_service_file(path / db_tls.KEY_FILE, tls_pg.client_key)
    write_service_file(path / "wrong-ca.crt", tls_pg.wrong_ca)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def local(ini: str, files: Path, ca: str = db_tls.CA_FILE) -> str:
    section = pgb.parse_ini(ini)["pgbouncer"]
    paths = {key: str(files / (ca if key == "server_tls_ca_file" else Path(section[key]).name))
             for key in ("server_tls_ca_file", "server_tls_cert_file", "server_tls_key_file") if key in section}
    # Bound the wait of a client whose server login fails (the negative case).
    return override_ini(ini, "pgbouncer", {**paths, "query_wait_timeout": "5", "server_login_retry": "1"})


def test_pooler_reaches_a_tls_only_server_with_the_given_ca_and_client_certificate(
        tls_pg: TLSServer, files: Path, pgbouncer_factory: PgBouncerFactory) -> None:
    spec = make_spec(tls_pg)
    ini = pgb.render_ini(spec, compute_budget(spec.pooler, SETTINGS, 100, 3))
    section = pgb.parse_ini(ini)["pgbouncer"]
    assert section["server_tls_sslmode"] == "verify-full"
    assert section["server_tls_ca_file"] == f"{db_tls.MOUNT_PATH}/{db_tls.CA_FILE}"
    assert section["server_tls_cert_file"] == f"{db_tls.MOUNT_PATH}/{db_tls.CERT_FILE}"
    userlist = pgb.render_userlist(pgb.choose_credentials(ROLE, PASSWORD, None))
    bouncer = pgbouncer_factory(local(ini, files), userlist)
    with psycopg.connect(bouncer.dsn(DBNAME, ROLE, PASSWORD)) as conn:
        row = conn.execute("SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row is not None and row[0] is True and ROLE in str(row[1])


def test_a_wrong_ca_fails_the_server_login(tls_pg: TLSServer, files: Path, pgbouncer_factory: PgBouncerFactory) -> None:
    spec = make_spec(tls_pg)
    ini = pgb.render_ini(spec, compute_budget(spec.pooler, SETTINGS, 100, 3))
    bouncer = pgbouncer_factory(local(ini, files, ca="wrong-ca.crt"),
                                pgb.render_userlist(pgb.choose_credentials(ROLE, PASSWORD, None)))
    with pytest.raises(psycopg.OperationalError):
        with psycopg.connect(bouncer.dsn(DBNAME, ROLE, PASSWORD)) as conn:
            conn.execute("SELECT 1")
    assert "certificate verify failed" in bouncer.log_text()


def test_the_pgbouncer_container_mounts_the_projected_tls_volume(tls_pg: TLSServer) -> None:
    resource = {"apiVersion": "marketplacedb.io/v1alpha1", "kind": "MarketplaceDB",
                "metadata": {"name": "shop", "namespace": "prod", "uid": "u-1"}}
    spec = make_spec(tls_pg)
    budget = compute_budget(spec.pooler, SETTINGS, 100, 3)
    objects = {o["kind"]: o for o in build_pooler(resource, spec, SETTINGS, budget, None)}
    kubernetes_validate.validate(copy.deepcopy(objects["Deployment"]), "1.30.0", strict=True)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert db_tls.volumes(spec.database)[0] in pod["volumes"]
    bouncer, agent = pod["containers"]
    assert {"name": db_tls.VOLUME, "mountPath": db_tls.MOUNT_PATH, "readOnly": True} in bouncer["volumeMounts"]
    assert all(m["name"] != db_tls.VOLUME for m in agent["volumeMounts"])  # the agent never sees the key
    # No tls: the system bundle for verify-full, and no volume.
    plain = make_spec(tls_pg, tls=None)
    section = pgb.parse_ini(pgb.render_ini(plain, compute_budget(plain.pooler, SETTINGS, 100, 3)))["pgbouncer"]
    assert section["server_tls_ca_file"] == pgb.CA_BUNDLE and "server_tls_cert_file" not in section
