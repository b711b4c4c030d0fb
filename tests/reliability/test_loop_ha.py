"""HA (issue 14, finding 1): two operator processes with `--peering`, one active and one standby;
SIGKILL the active one and the standby takes over within the peering lifetime.

Each process authenticates with its own token (its own kubeconfig), so the emulator can tell
which one sent what. kopf's peering needs a KopfPeering object in the watched namespace (the
chart creates it; here the test does).
"""

from __future__ import annotations

import asyncio
import copy
import pathlib
import signal
import time
from typing import Any

import yaml
from rel_operator import OperatorProcess

from conftest import NS, Rel
from harness.kube import eventually

PEERING = "marketplacedb"
LIFETIME = 6  # MARKETPLACEDB_PEERING_LIFETIME_SECONDS for both processes
# Takeover bound after a SIGKILL: the dead peer's entry expires after LIFETIME; then the standby
# resumes its watches (and kopf's watch reconnect) and reconciles. 30 s of slack for the loaded machine.
TAKEOVER_BOUND = LIFETIME + 30


class PeeredOperator(OperatorProcess):
    """`marketplacedb run --peering NAME` with a pod name (POD_ID, kopf's peer identity) and a token."""

    def __init__(self, workdir: pathlib.Path, server: str, pod: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.token = f"token-of-{pod}"
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": server}}],
            "users": [{"name": pod, "user": {"token": self.token}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": pod, "namespace": "default"}}],
        }))
        super().__init__(workdir, kubeconfig, NS,
                         env={"POD_ID": pod, "MARKETPLACEDB_PEERING_LIFETIME_SECONDS": str(LIFETIME)})

    def command(self) -> list[str]:
        return [*super().command(), "--peering", PEERING]


def _sent_by(rel: Rel, operator: PeeredOperator) -> list[Any]:
    """The requests this process made, except its peering keep-alives (and their watch)."""
    found = []
    for request in list(rel.api):
        headers = {k.lower(): v for k, v in request.headers.items()}
        if operator.token not in headers.get("authorization", ""):
            continue
        if request.resource is not None and "peering" in str(request.resource.plural):
            continue
        found.append(request)
    return found


def _reconciled(rel: Rel, operator: PeeredOperator) -> int:
    """Reconciles made by this process: each one reads the credentials Secret."""
    return sum(1 for r in _sent_by(rel, operator)
               if r.method == "GET" and r.resource is not None and r.resource.plural == "secrets")


async def test_one_active_replica_and_a_standby_that_takes_over(rel: Rel) -> None:
    await rel.objects.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                              "metadata": {"name": PEERING, "namespace": NS}})
    server = str(rel.api.url).rstrip("/")
    first = PeeredOperator(rel.workdir / "a", server, "operator-a")
    second = PeeredOperator(rel.workdir / "b", server, "operator-b")
    try:
        await first.start()
        await asyncio.sleep(1.0)  # started later: the younger, lower-priority replica
        await second.start()
        created = await rel.create()
        await rel.wait_ready(timeout=90)
        # With both replicas up, edits are still applied (equal priorities paused everyone).
        spec = copy.deepcopy(created["spec"])
        spec["database"]["settings"] = {"work_mem": "40MB"}
        await rel.objects.patch_spec(rel.resource(), spec)
        await eventually(lambda: rel.resource()["status"].get("observedGeneration") == 2, timeout=30,
                         interval=0.2, message="generation 2 reconciled with both replicas up")
        await asyncio.sleep(3)  # several resyncs (1 s) of the active one
        assert _reconciled(rel, first) >= 2
        assert _reconciled(rel, second) == 0, "the standby reconciled while the active replica was alive"
        writes = [f"{r.method} {r.url.path}" for r in _sent_by(rel, second) if r.method != "GET"]
        assert writes == [], writes

        os_killed = time.monotonic()
        await first.signal(signal.SIGKILL)
        spec["database"]["settings"] = {"work_mem": "48MB"}
        await rel.objects.patch_spec(rel.resource(), spec)  # generation 3: only a live operator applies it
        await eventually(lambda: rel.resource()["status"].get("observedGeneration") == 3, timeout=TAKEOVER_BOUND,
                         interval=0.2, message="the standby took over and reconciled generation 2")
        took = time.monotonic() - os_killed
        rel.measurements["takeover_seconds"] = round(took, 1)
        print(f"takeover after SIGKILL: {took:.1f} s (lifetime {LIFETIME} s)")
        assert _reconciled(rel, second) >= 1
        await rel.wait_ready(timeout=30)
        assert second.running
    finally:
        await first.kill()
        await second.kill()
