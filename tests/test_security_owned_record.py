"""Red-team R3 follow-up: what proves a Kubernetes object is the resource's is its uid in
status.ownedObjects (written by the operator from its own create responses), and its managed fields
are compared by content, not by a spec-hash annotation anyone can copy. Objects made before the
record existed are adopted only when they already are exactly what the operator renders.

The reconciler runs on KMock with the real Kubernetes gateway and the session's PostgreSQL 15."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from marketplacedb_operator import naming
from marketplacedb_operator.owned import ANN_SPEC_HASH
from marketplacedb_operator.settings import Settings
from security_env import API, NS, Sec, resource, sec_env, secret

SETTINGS = Settings(connect_timeout_seconds=3, resync_seconds=1)
POOLER = naming.pooler_name("shop")


@pytest.fixture
async def sec(kube_api: Any, kube_objects: Any, kube_client: Any, fresh_db: Any) -> AsyncIterator[Sec]:
    with psycopg.connect(fresh_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
    async with sec_env(kube_api, kube_objects, kube_client, SETTINGS) as env:
        await env.objects.create(secret("own", {"username": fresh_db.owner, "password": fresh_db.owner_password},
                                        opted_in=True))
        await env.objects.create(resource({
            "host": fresh_db.server.host, "port": fresh_db.server.port, "dbname": fresh_db.name,
            "sslMode": "disable", "credentialsSecretRef": {"name": "own"}}, pooler={"enabled": True}))
        await env.reconcile()
        yield env


def _record(sec: Sec) -> dict[tuple[str, str], str]:
    status = sec.objects.get(API, "MarketplaceDB", "shop", NS).get("status") or {}
    return {(o["kind"], o["name"]): o["uid"] for o in status.get("ownedObjects", [])}


def _non_status_writes(sec: Sec, mark: int) -> list[str]:
    return [w for w in sec.writes()[mark:] if "/marketplacedbs/" not in w]


async def test_created_objects_are_recorded_by_uid(sec: Sec) -> None:
    record = _record(sec)
    for api_version, kind in (("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment")):
        assert record[(kind, POOLER)] == sec.objects.get(api_version, kind, POOLER, NS)["metadata"]["uid"]
    auth = naming.pooler_auth_secret_name("shop")
    assert record[("Secret", auth)] == sec.objects.get("v1", "Secret", auth, NS)["metadata"]["uid"]
    mark = len(sec.writes())
    await sec.reconcile()
    assert _non_status_writes(sec, mark) == []  # content compared, API defaults aside: no write when equal


async def test_a_tampered_field_is_put_back_even_with_our_hash(sec: Sec) -> None:
    """Someone who may edit ConfigMaps rewrites our pgbouncer.ini and keeps our spec-hash annotation."""
    live = sec.objects.get("v1", "ConfigMap", POOLER, NS)
    ours = live["data"]["pgbouncer.ini"]
    assert ANN_SPEC_HASH in live["metadata"]["annotations"]
    await sec.objects.patch(live, {"data": {"pgbouncer.ini": "[databases]\n* = host=10.0.0.1\n"}})
    await sec.reconcile()
    assert sec.objects.get("v1", "ConfigMap", POOLER, NS)["data"]["pgbouncer.ini"] == ours
    assert sec.condition("PoolerAvailable").get("reason") != "Conflict"


async def test_upgrade_adopts_only_what_is_exactly_ours(sec: Sec) -> None:
    """Objects made before status.ownedObjects existed (or just before a crash): no record. Adopted,
    with no write, when their content is exactly what would be rendered; else a Conflict."""
    before = _record(sec)
    body = sec.objects.get(API, "MarketplaceDB", "shop", NS)
    await sec.objects.patch(body, {"status": {"ownedObjects": []}}, subresource="status")
    assert _record(sec) == {}
    mark = len(sec.writes())
    await sec.reconcile()
    assert _record(sec) == before and _non_status_writes(sec, mark) == []
    # Unrecorded again, and one object changed meanwhile (an extra data key): not adopted.
    await sec.objects.patch(sec.objects.get(API, "MarketplaceDB", "shop", NS), {"status": {"ownedObjects": []}},
                            subresource="status")
    await sec.objects.patch(sec.objects.get("v1", "ConfigMap", POOLER, NS), {"data": {"extra.ini": "x"}})
    mark = len(sec.writes())
    await sec.reconcile()
    cond = sec.condition("PoolerAvailable")
    assert cond["reason"] == "Conflict" and f"ConfigMap {NS}/{POOLER}" in cond["message"], cond
    assert _non_status_writes(sec, mark) == []
