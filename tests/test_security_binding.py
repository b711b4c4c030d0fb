"""Red-team R2 follow-up: the opt-in label says only "some MarketplaceDB may use this Secret"; the
Secret's owner must also name which ones (annotation marketplacedb.io/credentials-for), for the
credentials Secret and the TLS Secrets alike, and the user name and password are read only from the
keys the Secret declares. Reconciler on KMock, a fake PostgreSQL as the witness of what is sent."""

from __future__ import annotations

from typing import Any

import pytest

from security_env import NS, FakePostgres, Sec, resource, secret


def _db(port: int, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "dbname": "x", "sslMode": "disable", **extra}


async def test_a_secret_bound_to_another_marketplacedb_is_refused(sec: Sec, fake: FakePostgres) -> None:
    await sec.objects.create(secret("team-b", {"username": "team_b_user", "password": "team-b-pw-1"},
                                    opted_in=True, bound="shop"))
    await sec.objects.create(resource(_db(fake.port, credentialsSecretRef={"name": "team-b"}), name="attacker"))
    await sec.reconcile("attacker")
    cond = sec.condition("DatabaseReachable", "attacker")
    assert (cond["status"], cond["reason"]) == ("False", "SecretNotOptedIn")
    # The message says exactly what the Secret's owner would add (names only).
    assert 'annotation marketplacedb.io/credentials-for: "shop,attacker"' in cond["message"], cond
    assert fake.connections == 0 and fake.received == b""
    assert "team_b_user" not in sec.everything() and "team-b-pw-1" not in sec.everything()
    # The MarketplaceDB it names is served (the witness sees the login).
    await sec.objects.create(resource(_db(fake.port, credentialsSecretRef={"name": "team-b"})))
    await sec.reconcile()
    assert sec.condition("DatabaseReachable")["reason"] == "AuthenticationFailed"
    assert b"team_b_user" in fake.received and b"team-b-pw-1" not in fake.received


async def test_a_label_only_secret_gets_the_exact_annotation_to_add(sec: Sec, fake: FakePostgres) -> None:
    """Secrets opted in before the binding (label only) are refused with the one line to add."""
    legacy = secret("legacy", {"username": "u", "password": "p"}, opted_in=True)
    del legacy["metadata"]["annotations"]
    await sec.objects.create(legacy)
    await sec.objects.create(resource(_db(fake.port, credentialsSecretRef={"name": "legacy"})))
    await sec.reconcile()
    cond = sec.condition("DatabaseReachable")
    assert cond["reason"] == "SecretNotOptedIn"
    assert 'add the annotation marketplacedb.io/credentials-for: "shop" to the Secret' in cond["message"], cond
    assert fake.connections == 0


@pytest.mark.parametrize("tls", [{"caSecretRef": {"name": "team-b-tls", "key": "tls.crt"}},
                                 {"clientCertSecretRef": {"name": "team-b-tls"}}])
async def test_tls_secrets_are_bound_too(sec: Sec, fake: FakePostgres, tls: dict[str, Any]) -> None:
    await sec.objects.create(secret("own", {"username": "u", "password": "p"}, opted_in=True, bound="attacker"))
    await sec.objects.create(secret("team-b-tls", {"tls.crt": "CERT-team-b", "tls.key": "KEY-team-b"},
                                    opted_in=True, bound="shop"))
    await sec.objects.create(resource(_db(fake.port, sslMode="verify-full", credentialsSecretRef={"name": "own"},
                                          tls=tls), name="attacker"))
    await sec.reconcile("attacker")
    cond = sec.condition("DatabaseReachable", "attacker")
    assert cond["reason"] == "SecretNotOptedIn" and "team-b-tls" in cond["message"], cond
    assert fake.connections == 0 and "KEY-team-b" not in sec.everything()


async def test_declared_keys_only(sec: Sec, fake: FakePostgres) -> None:
    """usernameKey/passwordKey must be the keys the Secret declares (default username/password)."""
    data = {"db-user": "custom_user", "db-pass": "custom-pw-9", "username": "plain_user", "password": "plain-pw-9"}
    await sec.objects.create(secret("custom", data, opted_in=True, annotations={
        "marketplacedb.io/username-key": "db-user", "marketplacedb.io/password-key": "db-pass"}))
    # The default keys are not what this Secret declares: refused, the message names the key to use.
    await sec.objects.create(resource(_db(fake.port, credentialsSecretRef={"name": "custom"})))
    await sec.reconcile()
    cond = sec.condition("DatabaseReachable")
    assert cond["reason"] == "SecretNotOptedIn" and "usernameKey" in cond["message"] and "'db-user'" in cond["message"]
    assert fake.connections == 0
    # The declared ones are used.
    body = sec.objects.get("marketplacedb.io/v1alpha1", "MarketplaceDB", "shop", NS)
    await sec.objects.patch(body, {"spec": {"database": _db(fake.port, credentialsSecretRef={
        "name": "custom", "usernameKey": "db-user", "passwordKey": "db-pass"})}})
    await sec.reconcile()
    assert sec.condition("DatabaseReachable")["reason"] == "AuthenticationFailed"
    assert b"custom_user" in fake.received and b"plain_user" not in fake.received
