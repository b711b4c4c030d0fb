"""Health probes on application Deployments: only where invited, one owner per container.

A MarketplaceDB's author may not be allowed to edit the Deployments it names, and the operator's
service account may patch every Deployment in the namespace; so a Deployment is patched only
when it opts in (annotation `marketplacedb.io/probed-by` listing the MarketplaceDB's name, set
by whoever owns the Deployment). Each MarketplaceDB applies with its own field manager and no
force; a container already claimed by another MarketplaceDB is a Conflict and nothing is written.
Removing the invitation releases this MarketplaceDB's probe fields, as removing the target does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from . import naming
from .api.v1alpha1 import HealthProbeSpec
from .ports import Kube
from .specs import probes as specs


@dataclasses.dataclass
class ProbeResult:
    applied: int = 0
    writes: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)  # missing, not opted in, no container
    conflicts: list[str] = dataclasses.field(default_factory=list)
    reason: str = "ProbeTargetMissing"  # the condition reason for `problems`


def sync_probes(kube: Kube, namespace: str, resource: str, targets: Iterable[HealthProbeSpec]) -> ProbeResult:
    result = ProbeResult()
    manager = naming.probe_field_manager(resource)
    for target in targets:
        deployment = kube.get("apps/v1", "Deployment", namespace, target.deployment)
        if deployment is None:
            result.problems.append(f"Deployment {target.deployment} not found")
            continue
        if not specs.opted_in(deployment, resource):
            # An invitation withdrawn (the annotation removed) takes our probes with it: the empty
            # apply under our own field manager removes exactly the fields it owned, nothing else.
            result.writes += release(kube, namespace, resource, [target.deployment])
            result.problems.append(
                f"Deployment {target.deployment} does not opt in: only Deployments annotated "
                f"{naming.ANN_PROBED_BY} with this MarketplaceDB's name ({resource}) are patched"
            )
            result.reason = "ProbeTargetNotOptedIn"
            continue
        try:
            container = specs.pick_container(deployment, target.container)
        except specs.ProbeTargetError as exc:
            result.problems.append(f"Deployment {target.deployment}: {exc}")
            continue
        owner = specs.claimed_by(deployment, container)
        if owner is not None and owner != resource:
            result.conflicts.append(
                f"Deployment {target.deployment} container {container}: probes are set by MarketplaceDB {owner}"
            )
            continue
        patch = specs.probe_patch(namespace, target, container, resource)
        if not specs.up_to_date(deployment, patch):
            try:
                result.writes += _apply(kube, patch, manager)
            except Exception as exc:  # 409: a field owned by another manager (GitOps, kubectl)
                if getattr(exc, "status", None) != 409:
                    raise
                result.conflicts.append(f"Deployment {target.deployment} container {container}: {str(exc)[:300]}")
                continue
        result.applied += 1
    return result


# "Apply failed with 1 conflict: conflict with "kubectl" using apps/v1: .spec..." (one per manager).
_CONFLICT_WITH = re.compile(r'conflicts? with "([^"]+)"')


def _apply(kube: Kube, patch: dict[str, Any], manager: str) -> int:
    """Apply without force; the writes made. A conflict only with the operator's former shared
    field manager (`marketplacedb-operator`, which set probes before managers were per resource)
    is an upgrade, not a dispute: those fields are taken over. Any other conflict is raised."""
    try:
        kube.apply(patch, field_manager=manager, force=False)
        return 1
    except Exception as exc:
        if getattr(exc, "status", None) != 409 or set(_CONFLICT_WITH.findall(str(exc))) != {naming.FIELD_MANAGER}:
            raise
    kube.apply(patch, field_manager=manager, force=True)
    return 2


def release(kube: Kube, namespace: str, resource: str, deployments: Iterable[str]) -> int:
    """Remove this resource's probes from Deployments it no longer targets; the writes made.

    Only a Deployment that still carries this resource's claim is touched: the empty apply under
    its own field manager removes exactly the fields that manager owned.
    """
    writes = 0
    for name in deployments:
        deployment = kube.get("apps/v1", "Deployment", namespace, name)
        if deployment is None or not _claims(deployment, resource):
            continue
        kube.apply(specs.release_patch(namespace, name), field_manager=naming.probe_field_manager(resource),
                   force=False)
        writes += 1
    return writes


def _claims(deployment: dict[str, Any], resource: str) -> bool:
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    return any(
        key.startswith(naming.PROBE_CLAIM_PREFIX) and str(value).split("/", 1)[0] == resource
        for key, value in annotations.items()
    )
