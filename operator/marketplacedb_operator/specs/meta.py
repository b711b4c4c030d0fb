"""Metadata shared by every manifest: labels, owner references, the restricted security profile."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .. import naming
from ..settings import Settings


def owner_reference(resource: dict[str, Any]) -> dict[str, Any]:
    """Owned objects are garbage-collected with their MarketplaceDB (never set on foreign objects)."""
    meta = resource["metadata"]
    return {
        "apiVersion": naming.API_VERSION,
        "kind": naming.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(resource: dict[str, Any], name: str, component: str) -> dict[str, Any]:
    meta = resource["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": naming.labels(meta["name"], component),
        "ownerReferences": [owner_reference(resource)],
    }


def content_hash(value: Any) -> str:
    """A stable hash of JSON-able inputs: pods roll exactly when their inputs change."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_pull_secrets(settings: Settings) -> dict[str, Any]:
    """The pod-spec entry for the operator's pull Secrets (nothing when none are configured).

    Every pod the operator creates runs an image from the operator's settings (its own image for
    refreshes and the pooler agent): a private registry must reach them all, not only the operator.
    """
    if not settings.image_pull_secrets:
        return {}
    return {"imagePullSecrets": [{"name": name} for name in settings.image_pull_secrets]}


# https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted
def restricted_pod_security(uid: int = 65532) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
