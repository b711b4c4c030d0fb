"""gateways/kube.py on the dynamic client, against the KMock emulator (tests/harness/kube.py)."""

from __future__ import annotations

import asyncio
import glob
import os
import tempfile
from typing import Any

import kubernetes
import pytest

from harness.kube import RESOURCES, KubeEmulator, iter_requests
from marketplacedb_operator import naming
from marketplacedb_operator.gateways.kube import MISSING_TTL_SECONDS, KubeError, KubeGateway

NS = "shop"
MONITOR = "monitoring.coreos.com/v1/servicemonitors"


def _config_map(name: str, data: dict[str, str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "data": data,
            "metadata": {"name": name, "namespace": NS, "labels": labels or {}}}


def _writes(api: KubeEmulator) -> list[str]:
    return [f"{r.method.value} {r.url.path}?{r.url.query_string}" for r in iter_requests(api)
            if r.method in ("POST", "PATCH", "PUT", "DELETE")]


async def test_apply_is_one_server_side_apply_found_through_discovery(
        kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient) -> None:
    gateway = KubeGateway(kube_client)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "osrcp-*.json")))
    applied = await asyncio.to_thread(gateway.apply, _config_map("cfg", {"a": "1"}, {"app": "x"}))
    assert applied["metadata"]["uid"] and applied["data"] == {"a": "1"}
    (write,) = _writes(kube_api)  # no create fallback: apply creates, as on an API server
    assert write.startswith(f"PATCH /api/v1/namespaces/{NS}/configmaps/cfg?")
    assert f"fieldManager={naming.FIELD_MANAGER}" in write and "force=true" in write
    assert await asyncio.to_thread(gateway.list, "v1", "ConfigMap", NS, {"app": "x"}) == [applied]
    assert await asyncio.to_thread(gateway.list, "v1", "ConfigMap", NS, {"app": "y"}) == []
    assert await asyncio.to_thread(gateway.get, "v1", "ConfigMap", NS, "nope") is None
    with pytest.raises(KubeError) as taken:
        await asyncio.to_thread(gateway.create, _config_map("cfg", {"b": "2"}))
    assert taken.value.status == 409 and "body" not in str(taken.value).lower()
    assert await asyncio.to_thread(gateway.delete, "v1", "ConfigMap", NS, "cfg") is True
    assert await asyncio.to_thread(gateway.delete, "v1", "ConfigMap", NS, "cfg") is False
    assert gateway.writes == 4  # apply, refused create, two deletes
    # Discovery stays in the process: no cache file for another process to read or plant.
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "osrcp-*.json"))) == before


async def test_a_kind_not_served_is_absent_without_rediscovery_each_time(
        kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient) -> None:
    del kube_api.resources[MONITOR]  # no Prometheus Operator in this cluster
    now = [1000.0]
    gateway = KubeGateway(kube_client, monotonic=lambda: now[0])
    for _ in range(5):  # sync_owned lists every owned kind on every reconcile
        assert await asyncio.to_thread(gateway.list, "monitoring.coreos.com/v1", "ServiceMonitor", NS, {}) == []
    discovery = [r for r in iter_requests(kube_api, "GET") if r.url.path in ("/api", "/apis")]
    assert len(discovery) <= 4, [r.url.path for r in discovery]  # first look-up and its one retry
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "m", "namespace": NS}, "spec": {}}
    with pytest.raises(KubeError, match="not served") as refused:
        await asyncio.to_thread(gateway.apply, monitor)
    assert refused.value.status == 404 and _writes(kube_api) == []  # nothing sent for an unserved kind
    # Installed later: found once the absence has aged.
    kube_api.resources[MONITOR] = RESOURCES[MONITOR]
    now[0] += MISSING_TTL_SECONDS + 1
    assert (await asyncio.to_thread(gateway.apply, monitor))["metadata"]["name"] == "m"


async def test_status_is_a_merge_patch_on_the_subresource(
        kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient) -> None:
    gateway = KubeGateway(kube_client)
    body = {"apiVersion": naming.API_VERSION, "kind": naming.KIND, "metadata": {"name": "db", "namespace": NS},
            "spec": {"x": 1}}
    await asyncio.to_thread(gateway.create, body)
    await asyncio.to_thread(gateway.patch_status, NS, "db", {"observedGeneration": 1})
    path = f"/apis/{naming.API_VERSION}/namespaces/{NS}/{naming.PLURAL}/db/status"
    assert _writes(kube_api)[-1].startswith(f"PATCH {path}?")
    got = await asyncio.to_thread(gateway.get, naming.API_VERSION, naming.KIND, NS, "db")
    assert got is not None and got["status"] == {"observedGeneration": 1} and got["spec"] == {"x": 1}


async def test_a_kind_the_operator_does_not_manage_is_refused(kube_client: kubernetes.client.ApiClient) -> None:
    with pytest.raises(KubeError, match="does not manage"):
        await asyncio.to_thread(KubeGateway(kube_client).get, "v1", "Pod", NS, "p")


async def test_a_call_the_api_never_answers_gives_up_after_the_timeout(
        kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient) -> None:
    """Without a request timeout a GET the API server (or a half-open connection) never answers
    holds its thread for good: the scheduler's reads then stalled every resync (test_loop_redteam4)."""
    gateway = KubeGateway(kube_client, timeout=(2.0, 1.0))
    await asyncio.to_thread(gateway.apply, _config_map("cfg", {"a": "1"}))
    released = asyncio.Event()

    async def hold(_: Any) -> int:
        await released.wait()
        return 503

    kube_api[lambda r: r.method == "GET" and r.name == "cfg"] << hold
    try:  # held until the test ends (60 s) without a timeout; ~4 x 1 s with it (urllib3 retries a GET)
        with pytest.raises(KubeError) as failed:
            await asyncio.wait_for(asyncio.to_thread(gateway.get, "v1", "ConfigMap", NS, "cfg"), 60)
        assert failed.value.status == 0
        assert str(failed.value) == "HTTP 0: no answer from the API server (ReadTimeoutError)"
    finally:
        released.set()


async def test_discovery_the_api_never_answers_gives_up_after_the_timeout(
        kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient) -> None:
    """Discovery (first use of a gateway, or a kind re-discovered while absent) passed no timeout and
    runs under the gateway's lock: one unanswered discovery GET held every API call of every thread."""
    gateway = KubeGateway(kube_client, timeout=(2.0, 1.0))
    released = asyncio.Event()

    async def hold(_: Any) -> int:
        await released.wait()
        return 503

    kube_api[lambda r: r.method == "GET"] << hold
    try:  # held until the test ends (60 s) without a timeout
        with pytest.raises(KubeError) as failed:
            await asyncio.wait_for(asyncio.to_thread(gateway.get, "v1", "ConfigMap", NS, "cfg"), 60)
        assert "no answer from the API server" in str(failed.value)
    finally:
        released.set()
