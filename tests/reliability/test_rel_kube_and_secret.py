"""The Kubernetes API failing (500s, watches closed), and the credentials Secret missing, malformed,
then rotated while a client is mid-transaction."""

from __future__ import annotations

import asyncio
import base64
import secrets
from typing import Any

import psycopg
import rel_db
from psycopg import sql

from conftest import DEADLINE, NS, SECRET, SOAK, Rel
from harness.kube import eventually
from marketplacedb_operator import naming

NEW_INDEX = {"name": "idx_categories_order", "table": "categories", "columns": [{"name": "display_order"}]}


def _from_operator(request: Any) -> bool:
    """The operator (kopf and the kubernetes client) authenticates with the kubeconfig's token; the
    test's own requests carry none, so the fault hits the operator only."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    return "not-a-real-token" in headers.get("authorization", "")


async def test_api_answers_500_and_closes_watches_for_a_while(rel: Rel) -> None:
    await rel.operator.start()
    created = await rel.create()
    await rel.wait_ready()
    fault = {"on": True}
    # Every operator request: 500; a watch opened meanwhile is answered and closed at once.
    rel.api[lambda r: fault["on"] and _from_operator(r) and r.params.get("watch") != "true"] << 500
    rel.api[lambda r: fault["on"] and _from_operator(r) and r.params.get("watch") == "true"] << b""
    window = await rel.window()
    spec = dict(created["spec"])
    spec["indexes"] = [*spec["indexes"], NEW_INDEX]
    await rel.objects.patch_spec(rel.resource(), spec)  # a user edit during the outage
    await asyncio.sleep(20 if SOAK else 5)
    failed = sum(1 for r in rel.api if _from_operator(r))
    fault["on"] = False
    rel.assert_no_spin(await rel.close_window(window), "API 500s and closed watches")
    rel.measurements["operator requests during outage"] = failed
    assert failed > 0, "the operator made no request during the outage: the fault did not happen"
    await rel.assert_invariants(spec=spec)  # the edit made during the outage is applied, status current
    assert rel.resource()["status"]["observedGeneration"] == 2


async def _secret(rel: Rel, name: str, data: dict[str, str]) -> None:
    existing = rel.objects.get("v1", "Secret", name, NS)
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    if existing is None:
        await rel.objects.create({"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": name, "namespace": NS, "labels": {"marketplacedb.io/credentials": "true"},
            "annotations": {"marketplacedb.io/credentials-for": "shop"}},
                                  "data": encoded})
    else:
        await rel.objects.patch(existing, {"data": {**{k: None for k in existing.get("data", {})}, **encoded},
                                           "stringData": None})


async def test_secret_missing_then_malformed_then_fixed(rel: Rel) -> None:
    await rel.operator.start()
    spec = rel.spec()
    spec["database"]["credentialsSecretRef"]["name"] = "late-secret"
    await rel.create(spec)
    cond = await rel.wait_condition("DatabaseReachable", "False", "SecretNotFound")
    assert cond["message"] == f"Secret {NS}/late-secret not found"
    await _secret(rel, "late-secret", {"username": rel.db.owner})  # no password key
    cond = await rel.wait_condition("DatabaseReachable", "False", "SecretInvalid")
    assert "password" in cond["message"] and rel.canary not in cond["message"]
    await _secret(rel, "late-secret", {"username": rel.db.owner, "password": "wrong-" + rel.canary})
    cond = await rel.wait_condition("DatabaseReachable", "False", "AuthenticationFailed")
    assert rel.canary not in cond["message"]  # not even the wrong password, which contains it
    await _secret(rel, "late-secret", {"username": rel.db.owner, "password": rel.canary})
    await rel.assert_invariants()


async def test_secret_rotated_while_a_client_is_mid_transaction(rel: Rel) -> None:
    await rel.operator.start()
    spec = rel.spec()
    spec["pooler"].update(enabled=True, replicas=1)
    created = await rel.create(spec)
    pooler = naming.pooler_name("shop")
    deployment = await eventually(lambda: rel.objects.get("apps/v1", "Deployment", pooler, NS), timeout=DEADLINE,
                                  message="pooler Deployment")
    # Play the Deployment controller (KMock runs none).
    await rel.objects.patch(deployment, {"status": {"readyReplicas": 1}}, subresource="status")
    await rel.wait_ready()
    auth_name = naming.pooler_auth_secret_name("shop")
    auth_before = rel.objects.get("v1", "Secret", auth_name, NS)
    assert auth_before is not None

    client = psycopg.connect(rel.app_dsn, autocommit=False)  # the application, mid-transaction
    client.execute("INSERT INTO reltest.canary (id) VALUES (-1)")
    old = rel.canary
    new = "canary-" + secrets.token_hex(8) + "-Rotated"
    with psycopg.connect(rel.db.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(rel.db.owner), sql.Literal(new)))
    await _secret(rel, SECRET, {"username": rel.db.owner, "password": new})
    rel.canary = new

    def auth_changed() -> bool:
        current = rel.objects.get("v1", "Secret", auth_name, NS) or {}
        return current.get("data") != auth_before.get("data") or current.get("stringData") != auth_before.get(
            "stringData")

    await eventually(auth_changed, timeout=DEADLINE, message="the pooler's auth Secret follows the rotation")
    # The operator's own sessions follow: a spec change after the rotation needs a new login.
    spec = dict(created["spec"])
    spec["indexes"] = [*spec["indexes"], NEW_INDEX]
    await rel.objects.patch_spec(rel.resource(), spec)
    client.execute("INSERT INTO reltest.canary (id) VALUES (-2)")
    client.commit()  # never interrupted: PostgreSQL was not restarted, the session was not cut
    client.close()
    with psycopg.connect(rel.db.superuser_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM reltest.canary WHERE id < 0").fetchone() == (2,)
    try:
        psycopg.connect(rel.db.server.dsn(rel.db.name, rel.db.owner, old)).close()
        raise AssertionError("the old password still logs in")
    except psycopg.OperationalError:
        pass
    await rel.assert_invariants(spec=spec)
    assert rel.resource()["status"]["observedGeneration"] == 2
    for leaked in (old, new):  # neither password anywhere but the two Secrets
        rel.canary = leaked
        await rel.assert_no_secret_anywhere()
    _ = rel_db
