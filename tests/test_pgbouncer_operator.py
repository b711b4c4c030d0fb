"""The pooler through the operator: kopf on the KMock API emulator and the real PostgreSQL 15.

A refused pooler image is a condition naming the field and nothing is applied; application roles
are read from their Secrets into the auth Secret, the owner is no longer listed; status carries the
image's PgBouncer version, the parameters it does not know and the paused flag.
"""

from __future__ import annotations

import base64
from typing import Any

import test_operator
from harness.kube import eventually
from marketplacedb_operator import naming
from test_operator import CANARY, NS, Env, example_resource

env = test_operator.env  # the operator tests' fixture (kopf on KMock, the workload database, Secrets)


def pooled(env: Env, **pooler: Any) -> dict[str, Any]:
    body = example_resource(env.db)
    body["spec"]["pooler"].update(pooler)
    return body


async def _condition(env: Env, type_: str, reason: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        condition = env.condition(type_)
        return condition if condition.get("reason") == reason else None

    found: dict[str, Any] = await eventually(check, timeout=60, message=f"{type_} {reason}; now {env.condition(type_)}")
    return found


async def test_a_pooler_image_outside_the_allowed_repositories_is_a_condition_and_nothing_runs(env: Env) -> None:
    async with env.operator():
        await env.objects.create(pooled(env, image="docker.io/attacker/pgbouncer:latest"))
        condition = await _condition(env, "PoolerAvailable", "PoolerConfigInvalid")
        assert condition["status"] == "False"
        assert "spec.pooler.image" in condition["message"] and "not allowed" in condition["message"]
        assert env.objects.get("apps/v1", "Deployment", naming.pooler_name("shop"), NS) is None
        assert env.objects.get("v1", "Secret", naming.pooler_auth_secret_name("shop"), NS) is None


async def test_app_roles_are_listed_and_the_owner_is_not(env: Env) -> None:
    await env.objects.create({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "shop-app", "namespace": NS, "labels": {naming.LABEL_CREDENTIALS: "true"},
                     "annotations": {naming.ANN_CREDENTIALS_FOR: "shop", naming.ANN_USERNAME_KEY: "user",
                                     naming.ANN_PASSWORD_KEY: "pass"}},
        # The workload database has one login role: the app Secret names it under another key set.
        "stringData": {"user": "shop_app", "pass": "app-Pa55-9d1e"},
    })
    users = [{"credentialsSecretRef": {"name": "shop-app", "usernameKey": "user", "passwordKey": "pass"}}]
    async with env.operator():
        await env.objects.create(pooled(env, users=users, paused=True,
                                        parameters={"server_idle_timeout": 600, "max_prepared_statements": 100}))
        name = naming.pooler_auth_secret_name("shop")
        # A deadline, not an expectation: the first reconcile (database, catalog, every part) ran
        # past the default 10 s on a loaded 2-core machine.
        secret = await eventually(lambda: env.objects.get("v1", "Secret", name, NS), timeout=180, message="auth Secret")
        userlist = base64.b64decode(secret["data"]["userlist.txt"]).decode()
        assert userlist == '"shop_app" "app-Pa55-9d1e"\n'  # the owner (and its password) not listed
        assert CANARY not in userlist and env.db.owner not in userlist
        config_map = env.objects.get("v1", "ConfigMap", naming.pooler_name("shop"), NS)
        assert config_map["data"]["paused"] == "true"
        assert "max_prepared_statements = 100" in config_map["data"]["pgbouncer.ini"]  # 1.25.2 knows it

        async def pooler_status() -> dict[str, Any] | None:
            status = (env.resource().get("status") or {}).get("pooler") or {}
            return status if status.get("pgbouncerVersion") else None

        status = await eventually(pooler_status, timeout=180, message="pooler status")
        assert status["pgbouncerVersion"] == "1.25.2" and status["paused"] is True
        assert status["unsupportedParameters"] == []
        # Nothing from the app Secret in status.
        assert "shop_app" not in str(env.resource().get("status"))


async def test_a_missing_app_role_secret_is_a_pooler_condition(env: Env) -> None:
    users = [{"credentialsSecretRef": {"name": "no-such-secret"}}]
    async with env.operator():
        await env.objects.create(pooled(env, users=users))
        condition = await _condition(env, "PoolerAvailable", "SecretNotFound")
        assert "no-such-secret" in condition["message"]
        # The database part is unaffected: only the pooler waits for its Secret.
        await eventually(lambda: env.condition("SchemaApplied").get("status") == "True" or None, timeout=60,
                         message="SchemaApplied")


async def test_auth_query_without_its_function_is_a_clear_condition(env: Env) -> None:
    auth = {"credentialsSecretRef": {"name": "shop-db-owner"}, "function": "pgbouncer.user_lookup"}
    async with env.operator():
        await env.objects.create(pooled(env, authQuery=auth))
        condition = await _condition(env, "PoolerAvailable", "AuthQueryFunctionMissing")
        assert "pgbouncer.user_lookup(text) does not exist" in condition["message"]
        assert "README" in condition["message"]
        assert env.objects.get("apps/v1", "Deployment", naming.pooler_name("shop"), NS) is None


async def test_an_app_role_secret_that_does_not_opt_in_is_refused(env: Env) -> None:
    await env.objects.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-b", "namespace": NS},
                              "stringData": {"username": "someone_else", "password": "not-for-us"}})
    async with env.operator():
        await env.objects.create(pooled(env, users=[{"credentialsSecretRef": {"name": "team-b"}}]))
        condition = await _condition(env, "PoolerAvailable", "SecretNotOptedIn")
        assert "spec.pooler.users[0].credentialsSecretRef" in condition["message"]
        assert env.objects.get("v1", "Secret", naming.pooler_auth_secret_name("shop"), NS) is None
        assert "someone_else" not in str(env.resource()) and "not-for-us" not in str(env.resource())
