"""Issue 13, finding 1: a MarketplaceDB cannot exfiltrate a Secret, learn its values from status,
Events or logs, or probe ports through error texts. The reconciler runs on KMock with the real
Kubernetes gateway; the servers are a fake PostgreSQL that asks for a cleartext password and the
session's real PostgreSQL 15."""

from __future__ import annotations

import asyncio
import pathlib
import secrets
from typing import Any

import jsonschema
import psycopg
import pytest

from chart_render import render_chart
from marketplacedb_operator.credentials import host_allowed
from marketplacedb_operator.gateways.postgres import ConnInfo, DatabaseUnreachable, connect
from marketplacedb_operator.redact import (
    EXPLANATIONS,
    METHOD_REFUSED_EXPLANATION,
    classify_connect_error,
    describe_db_error,
)
from marketplacedb_operator.settings import Settings
from security_env import NS, FakePostgres, Sec, resource, sec_env, secret


def _cert_like() -> tuple[str, str]:
    token = secrets.token_hex(12)
    return (f"-----BEGIN CERTIFICATE-----\nMIIuser{token}\n-----END CERTIFICATE-----",
            f"-----BEGIN PRIVATE KEY-----\nMIIkey{token}\n-----END PRIVATE KEY-----")


async def test_a_foreign_secret_is_refused_before_any_connection(sec: Sec, fake: FakePostgres) -> None:
    crt, key = _cert_like()
    await sec.objects.create(secret("other-team-tls", {"tls.crt": crt, "tls.key": key}, opted_in=False))
    await sec.objects.create(resource({
        "host": "127.0.0.1", "port": fake.port, "dbname": "x", "sslMode": "disable",
        "credentialsSecretRef": {"name": "other-team-tls", "usernameKey": "tls.crt", "passwordKey": "tls.key"}}))
    await sec.reconcile()
    cond = sec.condition("DatabaseReachable")
    assert (cond["status"], cond["reason"]) == ("False", "SecretNotOptedIn")
    assert 'marketplacedb.io/credentials="true"' in cond["message"] and "other-team-tls" in cond["message"]
    assert fake.connections == 0 and fake.received == b""
    everything = sec.everything()
    for value in (crt, key, "MIIuser", "MIIkey"):
        assert value not in everything


async def test_no_refresh_cronjob_references_a_refused_secret(sec: Sec, fake: FakePostgres) -> None:
    """A CronJob's pod reads the Secret by reference (secretKeyRef) and would send its values to the
    spec's host: a refused Secret gets no CronJob, and one made while it was accepted is pruned."""
    crt, key = _cert_like()
    await sec.objects.create(secret("other-team-tls", {"tls.crt": crt, "tls.key": key}, opted_in=True, annotations={
        "marketplacedb.io/username-key": "tls.crt", "marketplacedb.io/password-key": "tls.key"}))
    view = {"name": "mv_x", "query": "SELECT id FROM t", "uniqueKey": ["id"], "refresh": {"schedule": "@hourly"}}
    await sec.objects.create(resource({
        "host": "127.0.0.1", "port": fake.port, "dbname": "x", "sslMode": "disable",
        "credentialsSecretRef": {"name": "other-team-tls", "usernameKey": "tls.crt", "passwordKey": "tls.key"}},
        materializedViews=[view]))
    await sec.reconcile()
    (cronjob,) = sec.objects.list_objects("batch/v1", "CronJob", NS)  # accepted: the owner's choice
    env = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "PGREQUIREAUTH", "value": "scram-sha-256,none"} in env  # the pod, too: SCRAM only
    tls_secret = sec.objects.get("v1", "Secret", "other-team-tls", NS)
    await sec.objects.patch(tls_secret, {"metadata": {"labels": {"marketplacedb.io/credentials": None}}})
    await sec.reconcile()
    assert sec.objects.list_objects("batch/v1", "CronJob", NS) == []
    cond = sec.condition("RefreshScheduled")
    assert (cond["status"], cond["reason"]) == ("False", "SecretNotOptedIn")


async def test_the_user_name_never_reaches_status_events_or_logs(sec: Sec, fake: FakePostgres) -> None:
    """An opted-in Secret whose user name is certificate-like: the server quotes it back in its
    error (as PostgreSQL does); the operator says only 'authentication failed'."""
    crt, key = _cert_like()
    await sec.objects.create(secret("own", {"username": crt, "password": key}, opted_in=True))
    await sec.objects.create(resource({"host": "127.0.0.1", "port": fake.port, "dbname": "x", "sslMode": "disable",
                                       "credentialsSecretRef": {"name": "own"}}))
    await sec.reconcile()
    assert fake.connections >= 1 and b"MIIuser" in fake.received  # the login happened (the witness)
    assert b"MIIkey" not in fake.received  # require_auth: no cleartext password to this server
    cond = sec.condition("DatabaseReachable")
    assert (cond["status"], cond["reason"]) == ("False", "AuthenticationFailed")
    # The server asked for a cleartext password: refused by require_auth, the message says to use SCRAM.
    assert cond["message"] == f"cannot connect to 127.0.0.1:{fake.port}/x: {METHOD_REFUSED_EXPLANATION}"
    everything = sec.everything()
    assert sec.events
    for value in ("MIIuser", "MIIkey", "BEGIN CERTIFICATE", "BEGIN PRIVATE KEY", "for user"):
        assert value not in everything


@pytest.mark.parametrize("reply", [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 400 Bad Request\r\n\r\n", b"",
                                   b"E\0\0\0\x1aSFATAL\0C28000\0Mrsync\0\0"])
async def test_what_listens_on_a_port_is_not_told(sec: Sec, reply: bytes) -> None:
    """A closed port and a port speaking another protocol give the same class and sentence."""
    other = await FakePostgres(reply=reply).start()
    closed = FakePostgres()
    await closed.start()
    closed_port = closed.port
    await closed.stop()
    try:
        await sec.objects.create(secret("own", {"username": "u", "password": "p"}, opted_in=True, bound="a,b"))
        for name, port in (("a", other.port), ("b", closed_port)):
            await sec.objects.create(resource({"host": "127.0.0.1", "port": port, "dbname": "x", "sslMode": "prefer",
                                               "credentialsSecretRef": {"name": "own"}}, name=name))
            await sec.reconcile(name)
        a, b = sec.condition("DatabaseReachable", "a"), sec.condition("DatabaseReachable", "b")
        assert a["reason"] == b["reason"] == "DatabaseUnreachable"
        assert a["message"].replace(str(other.port), "N") == b["message"].replace(str(closed_port), "N")
        for word in ("OpenSSH", "Bad Request", "rsync", "received", "invalid response", "refused"):
            assert word not in sec.everything()
    finally:
        await other.stop()


async def test_host_outside_the_allow_list_is_refused_without_reading_the_secret(
    kube_api: Any, kube_objects: Any, kube_client: Any, fake: FakePostgres
) -> None:
    settings = Settings(connect_timeout_seconds=3, allowed_database_hosts=("10.0.0.0/8", "*.db.internal"))
    async with sec_env(kube_api, kube_objects, kube_client, settings) as sec:
        await sec.objects.create(secret("own", {"username": "u", "password": "p"}, opted_in=True))
        await sec.objects.create(resource({"host": "127.0.0.1", "port": fake.port, "dbname": "x",
                                           "credentialsSecretRef": {"name": "own"}}))
        await sec.reconcile()
        cond = sec.condition("DatabaseReachable")
        assert (cond["status"], cond["reason"]) == ("False", "HostNotAllowed")
        assert "MARKETPLACEDB_ALLOWED_DATABASE_HOSTS" in cond["message"] and "10.0.0.0/8" in cond["message"]
        assert fake.connections == 0 and sec.reads("/secrets/own") == []


def test_host_patterns_and_networks() -> None:
    allowed = ("10.0.0.0/8", "*.db.internal", "fd00::/8", "pg.example.com")
    assert host_allowed("10.1.2.3", allowed) and host_allowed("PG-1.DB.internal", allowed)
    assert host_allowed("[fd00::1]", allowed) and host_allowed("pg.example.com", allowed)
    assert not host_allowed("127.0.0.1", allowed) and not host_allowed("db.internal.evil.com", allowed)
    assert not host_allowed("169.254.169.254", allowed) and not host_allowed("10.db.internal.x", allowed)
    # A CIDR entry matches addresses, not names that happen to look like one.
    assert not host_allowed("10.0.0.0.nip.io", allowed)


async def test_connection_classes_on_the_real_server(fresh_db: Any) -> None:
    server = fresh_db.server

    def attempt(**kwargs: Any) -> str:
        params = {"host": server.host, "port": server.port, "dbname": fresh_db.name, "user": fresh_db.owner,
                  "password": fresh_db.owner_password, "connect_timeout": 3, "sslmode": "disable", **kwargs}
        try:
            psycopg.connect(**params).close()
        except psycopg.Error as exc:
            return classify_connect_error(exc)
        return "connected"

    assert await asyncio.to_thread(attempt) == "connected"
    assert await asyncio.to_thread(attempt, password="wrong") == "AuthenticationFailed"
    assert await asyncio.to_thread(attempt, user="no_such_role_x") == "AuthenticationFailed"
    assert await asyncio.to_thread(attempt, dbname="no_such_db_x") == "ConnectionRejected"
    assert await asyncio.to_thread(attempt, sslmode="require") == "TLSFailed"  # the session server has no SSL


def test_database_errors_are_sqlstate_and_names_never_row_values(fresh_db: Any) -> None:
    token = "tok_" + secrets.token_hex(8)
    with psycopg.connect(fresh_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE api_keys (id int PRIMARY KEY, api_key text NOT NULL)")
        conn.execute("INSERT INTO api_keys VALUES (1, %s)", [token])
        with pytest.raises(psycopg.Error) as cast:
            conn.execute("SELECT api_key::int FROM api_keys")
        with pytest.raises(psycopg.Error) as duplicate:
            conn.execute("INSERT INTO api_keys VALUES (1, %s)", [token])
        with pytest.raises(psycopg.Error) as null:
            conn.execute("INSERT INTO api_keys VALUES (2, NULL)")
    assert token in str(cast.value) and token not in describe_db_error(cast.value)  # PostgreSQL quotes the row
    assert describe_db_error(cast.value) == "SQLSTATE 22P02 (InvalidTextRepresentation)"
    assert describe_db_error(duplicate.value) == (
        "SQLSTATE 23505 (UniqueViolation) on schema public, table api_keys, constraint api_keys_pkey")
    assert describe_db_error(null.value) == (
        "SQLSTATE 23502 (NotNullViolation) on schema public, table api_keys, column api_key")
    assert "1" not in describe_db_error(duplicate.value).replace("23505", "")


def test_the_chart_sets_the_host_allow_list() -> None:
    chart = pathlib.Path(__file__).resolve().parent.parent / "charts" / "marketplacedb-operator"

    def env(overrides: dict[str, Any]) -> dict[str, str]:
        (deployment,) = render_chart(chart, overrides).find("Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", "") for e in container["env"]}

    assert "MARKETPLACEDB_ALLOWED_DATABASE_HOSTS" not in env({})  # default: any host
    rendered = env({"allowedDatabaseHosts": ["*.db.internal", "10.20.0.0/16"]})
    settings = Settings.from_env(rendered)
    assert settings.allowed_database_hosts == ("*.db.internal", "10.20.0.0/16")
    assert host_allowed("pg.db.internal", settings.allowed_database_hosts)
    assert not host_allowed("127.0.0.1", settings.allowed_database_hosts)
    with pytest.raises(jsonschema.ValidationError):
        render_chart(chart, {"allowedDatabaseHosts": ["evil host; rm"]})


async def test_a_server_that_never_answers_is_a_timeout() -> None:
    silent = await FakePostgres(silent=True).start()
    try:
        info = ConnInfo(host="127.0.0.1", port=silent.port, dbname="x", user="user-canary", password="pw-canary",
                        connect_timeout=2)
        with pytest.raises(DatabaseUnreachable) as caught:
            await asyncio.to_thread(connect, info)
    finally:
        await silent.stop()
    assert caught.value.reason == "DatabaseTimeout"
    assert str(caught.value) == f"cannot connect to 127.0.0.1:{silent.port}/x: {EXPLANATIONS['DatabaseTimeout']}"


def test_host_allow_list_refuses_separators_and_keeps_ip_globs_for_addresses() -> None:
    """Red-team follow-up: the check holds by itself (not only behind the model's host regex), and an
    IP-looking glob admits addresses only, never DNS names that start like one."""
    allowed = ("10.20.*", "*.db.internal", "192.168.0.0/16", "fd00:*")
    assert host_allowed("10.20.1.2", allowed) and host_allowed("[fd00::1]", allowed)
    assert host_allowed("pg.db.internal", allowed) and host_allowed("192.168.4.5", allowed)
    for host in ("10.20.evil.com", "10.20.1.evil.com", "pg.db.internal,evil.com", "evil.com,pg.db.internal",
                 "/tmp", "/var/run/postgresql", "u@pg.db.internal", "pg.db.internal ", "pg .db.internal",
                 "pg.db.internal\n", "", "127.1", "10.20.1", "2130706433", "0x7f.0x1"):
        assert not host_allowed(host, allowed), host
    # A name glob never admits an IP literal; "*" is names only (0.0.0.0/0 admits every IPv4 address).
    assert not host_allowed("127.0.0.1", ("*",)) and host_allowed("x.example", ("*",))
    assert host_allowed("127.0.0.1", ("0.0.0.0/0",))
