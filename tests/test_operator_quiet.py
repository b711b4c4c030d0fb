"""A steady state writes nothing (issue 14, finding 8): reconciles with nothing changed write no
status, also when the body a reconcile gets predates the operator's own last status write.

Found by tests/reliability/test_loop_restart.py under CPU load: a MarketplaceDB status PATCH
identical to the previous one, after the resource was Ready. kopf delivers bodies in order, but
its own annotation patch (finalizer, `seen` marker) can land between the body a reconcile read
and that reconcile's status write; the watch then delivers a body with a new resourceVersion and
the old status. A reconcile on it compared with that old status and wrote the same status again
(and its condition transitions would have posted the same Events again).

Real PostgreSQL 15, the KMock API emulator; handlers._run is called directly (in a thread: the
Kubernetes client is synchronous and the emulator serves from this test's event loop), so the
interleaving is exact rather than a matter of timing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kubernetes

from harness.kube import KubeEmulator, KubeObjects, iter_requests
from marketplacedb_operator import handlers, naming
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.settings import Settings

NS = "prod"
API = "marketplacedb.io/v1alpha1"
log = logging.getLogger(__name__)


def _status_writes(api: KubeEmulator) -> int:
    return sum(1 for r in iter_requests(api, "PATCH") if r.url.path.endswith("/status"))


async def test_a_body_older_than_our_own_status_write_is_not_written_again(
    kube_api: KubeEmulator, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient, fresh_db: Any
) -> None:
    await kube_objects.ensure_namespace(NS)
    await kube_objects.create({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "owner", "namespace": NS, "labels": {naming.LABEL_CREDENTIALS: "true"},
                     "annotations": {naming.ANN_CREDENTIALS_FOR: "shop"}},
        "stringData": {"username": fresh_db.owner, "password": fresh_db.owner_password},
    })
    # Nothing to build: every reconcile of it computes the same status.
    created = await kube_objects.create({
        "apiVersion": API, "kind": "MarketplaceDB", "metadata": {"name": "shop", "namespace": NS},
        "spec": {"database": {"host": fresh_db.server.host, "port": fresh_db.server.port, "dbname": fresh_db.name,
                              "sslMode": "disable", "credentialsSecretRef": {"name": "owner"}},
                 "pooler": {"enabled": False}},
    })
    deps = make_deps(Settings(), kube_client)
    state = handlers.ResourceState()
    # kopf's own patch (here its `seen` marker) lands after the body the first reconcile got ...
    await kube_objects.patch(created, {"metadata": {"annotations": {f"{naming.ANNOTATION_PREFIX}/seen": "true"}}})
    annotated = kube_objects.get(API, "MarketplaceDB", "shop", NS)
    assert annotated is not None and annotated["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    # ... and before that reconcile's status write.
    await asyncio.to_thread(handlers._run, deps, created, state, log)
    assert _status_writes(kube_api) == 1
    written = kube_objects.get(API, "MarketplaceDB", "shop", NS)
    assert written is not None and [c["status"] for c in written["status"]["conditions"]][:1] == ["True"]
    # The watch now delivers the annotated body (new resourceVersion, the status from before the
    # write): nothing changed, so nothing is written.
    await asyncio.to_thread(handlers._run, deps, annotated, state, log)
    assert _status_writes(kube_api) == 1
    # Then the body with our status: still nothing.
    await asyncio.to_thread(handlers._run, deps, written, state, log)
    assert _status_writes(kube_api) == 1
