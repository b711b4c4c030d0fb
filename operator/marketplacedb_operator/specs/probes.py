"""Server-side-apply bodies that set only probe fields on an application's Deployment.

The Deployment is not ours: the apply body names nothing but the container, its probes and one
claim annotation (`probes.marketplacedb.io/<container>: <mdb>/<probe kinds>`), so the resource's
own field manager (naming.probe_field_manager) owns exactly those fields and GitOps keeps the rest.
No ownerReference is ever set on a foreign object.

Comparing desired and live probes tolerates what the API server fills in (timeoutSeconds: 1,
periodSeconds: 10, successThreshold: 1, failureThreshold: 3, httpGet.scheme: HTTP, grpc.service:
""; https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#Probe), so a
real cluster gets no PATCH on every resync.
"""

from __future__ import annotations

from typing import Any

from .. import naming
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


_DEFAULTS = {"initialDelaySeconds": 0, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1,
             "failureThreshold": 3}
_HANDLER_DEFAULTS = {"httpGet": {"scheme": "HTTP"}, "grpc": {"service": ""}}


def claim_key(container: str) -> str:
    return naming.PROBE_CLAIM_PREFIX + container


def claim_value(resource: str, target: HealthProbeSpec) -> str:
    """`<mdb>/<probe kinds>`: who set the probes, and which (a kind dropped from the spec changes it)."""
    return f"{resource}/" + ",".join(field for field, _ in _FIELDS if getattr(target, field) is not None)


def claimed_by(deployment: dict[str, Any], container: str) -> str | None:
    """The MarketplaceDB that claims the container's probes, if any."""
    value = ((deployment.get("metadata") or {}).get("annotations") or {}).get(claim_key(container))
    return str(value).split("/", 1)[0] if value else None


def opted_in(deployment: dict[str, Any], resource: str) -> bool:
    """The Deployment's owner allows this MarketplaceDB to set its probes (annotation probed-by)."""
    value = ((deployment.get("metadata") or {}).get("annotations") or {}).get(naming.ANN_PROBED_BY, "")
    return resource in {part.strip() for part in str(value).split(",")}


def probe_patch(namespace: str, target: HealthProbeSpec, container: str, resource: str) -> dict[str, Any]:
    """The apply body: only the probes this resource declares for that container, and its claim."""
    entry: dict[str, Any] = {"name": container}
    for field, key in _FIELDS:
        probe = getattr(target, field)
        if probe is not None:
            entry[key] = probe_manifest(probe)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": target.deployment,
            "namespace": namespace,
            "annotations": {claim_key(container): claim_value(resource, target)},
        },
        "spec": {"template": {"spec": {"containers": [entry]}}},
    }


def normalized(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    """A probe as the API server stores it: its defaults filled in."""
    if probe is None:
        return None
    result = {**_DEFAULTS, **probe}
    for handler, defaults in _HANDLER_DEFAULTS.items():
        if isinstance(result.get(handler), dict):
            result[handler] = {**defaults, **result[handler]}
    return result


def up_to_date(deployment: dict[str, Any], patch: dict[str, Any]) -> bool:
    """Whether the live Deployment already has the patch's probes (defaults tolerated) and claim."""
    entry = patch["spec"]["template"]["spec"]["containers"][0]
    live = applied_probes(deployment, entry["name"])
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    claim = patch["metadata"]["annotations"]
    if any(annotations.get(key) != value for key, value in claim.items()):
        return False
    return all(normalized(live.get(key)) == normalized(entry.get(key)) for key in (k for _, k in _FIELDS)
               if key in entry)


def release_patch(namespace: str, deployment: str) -> dict[str, Any]:
    """An empty apply (under the resource's field manager): the API server removes every field
    this manager alone owned, its probes and its claim."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": deployment, "namespace": namespace}}


def applied_probes(deployment: dict[str, Any], container: str) -> dict[str, Any]:
    """The probe fields currently on the container (to skip writes when nothing changed)."""
    for item in deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
        if item.get("name") == container:
            return {key: item[key] for _, key in _FIELDS if key in item}
    return {}
