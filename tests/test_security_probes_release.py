"""Red-team follow-up on probes: a Deployment's owner who removes the invitation (annotation
marketplacedb.io/probed-by) gets this MarketplaceDB's probe fields released, as when the target
leaves the spec: the empty server-side apply under the resource's own field manager, which on an
API server removes exactly the fields that manager owned. KMock records the request (it does not
track field ownership), so the test checks the request and the condition."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from marketplacedb_operator import naming
from marketplacedb_operator.settings import Settings
from security_env import NS, Sec, resource, sec_env, secret

SETTINGS = Settings(connect_timeout_seconds=3, resync_seconds=1)
PROBE = {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 5}


@pytest.fixture
async def sec(kube_api: Any, kube_objects: Any, kube_client: Any, fresh_db: Any) -> AsyncIterator[Sec]:
    with psycopg.connect(fresh_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    async with sec_env(kube_api, kube_objects, kube_client, SETTINGS) as env:
        await env.objects.create(secret("own", {"username": fresh_db.owner, "password": fresh_db.owner_password},
                                        opted_in=True))
        env.db = fresh_db  # type: ignore[attr-defined]
        yield env


async def test_removing_the_invitation_releases_our_probe_fields(sec: Sec) -> None:
    labels = {"app": "web"}
    await sec.objects.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "web", "namespace": NS, "annotations": {naming.ANN_PROBED_BY: "shop"}},
        "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [{"name": "app", "image": "example.com/app:1"}]}}}})
    db = sec.db  # type: ignore[attr-defined]
    await sec.objects.create(resource({"host": db.server.host, "port": db.server.port, "dbname": db.name,
                                       "sslMode": "disable", "credentialsSecretRef": {"name": "own"}},
                                      healthProbes=[{"deployment": "web", "readiness": PROBE}]))
    await sec.reconcile()
    assert sec.condition("ProbesApplied")["status"] == "True"
    manager = f"fieldManager={naming.probe_field_manager('shop')}"
    mark = len(sec.api)
    live = sec.objects.get("apps/v1", "Deployment", "web", NS)
    await sec.objects.patch(live, {"metadata": {"annotations": {naming.ANN_PROBED_BY: None}}})
    await sec.reconcile()
    cond = sec.condition("ProbesApplied")
    assert (cond["status"], cond["reason"]) == ("False", "ProbeTargetNotOptedIn")
    releases = [r for r in list(sec.api)[mark:] if r.method == "PATCH" and r.url.path.endswith("/deployments/web")
                and manager in str(r.url.query_string)]
    assert len(releases) == 1, [f"{r.method} {r.url}" for r in list(sec.api)[mark:]]
    body = releases[0].data
    assert isinstance(body, dict) and "spec" not in body and body["metadata"] == {"name": "web", "namespace": NS}
