"""Server-side-apply bodies that set only probe fields on an application's Deployment.

The Deployment is not ours: the apply body names nothing but the container and its probes, so
the field manager `marketplacedb-operator` owns exactly those fields and GitOps keeps the rest.
No ownerReference is ever set on a foreign object.
"""

from __future__ import annotations

from typing import Any

from ..api.v1alpha1 import HealthProbeSpec, Probe

_FIELDS = (("readiness", "readinessProbe"), ("liveness", "livenessProbe"), ("startup", "startupProbe"))


class ProbeTargetError(ValueError):
    """The Deployment cannot take the probes (no such container, several to choose from)."""


def probe_manifest(probe: Probe) -> dict[str, Any]:
    body: dict[str, Any] = probe.model_dump(by_alias=True, exclude_none=True)
    return body


def pick_container(deployment: dict[str, Any], wanted: str | None) -> str:
    containers: list[str] = [
        c["name"] for c in deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    ]
    if wanted is not None:
        if wanted not in containers:
            raise ProbeTargetError(f"container {wanted!r} not found (containers: {', '.join(containers) or 'none'})")
        return wanted
    if len(containers) != 1:
        raise ProbeTargetError(f"{len(containers)} containers: name one with healthProbes[].container")
    return containers[0]


def probe_patch(namespace: str, target: HealthProbeSpec, container: str) -> dict[str, Any]:
    """The apply body: only the probes this resource declares for that container."""
    entry: dict[str, Any] = {"name": container}
    for field, key in _FIELDS:
        probe = getattr(target, field)
        if probe is not None:
            entry[key] = probe_manifest(probe)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": target.deployment, "namespace": namespace},
        "spec": {"template": {"spec": {"containers": [entry]}}},
    }


def release_patch(namespace: str, deployment: str) -> dict[str, Any]:
    """An empty apply: the API server removes every field this manager alone owned."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": deployment, "namespace": namespace}}


def applied_probes(deployment: dict[str, Any], container: str) -> dict[str, Any]:
    """The probe fields currently on the container (to skip writes when nothing changed)."""
    for item in deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
        if item.get("name") == container:
            return {key: item[key] for _, key in _FIELDS if key in item}
    return {}
