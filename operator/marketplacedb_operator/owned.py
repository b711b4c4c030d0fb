"""Keep the operator's own Kubernetes objects equal to the desired manifests, writing only on change.

Each applied object carries a hash of its desired manifest (annotation `marketplacedb.io/spec-hash`).
One LIST per kind and component finds what exists; an object is applied only when its hash
differs, and deleted when it carries our labels but is no longer desired. An idle resync therefore
makes zero writes.
"""

from __future__ import annotations

import copy
from typing import Any

from . import naming
from .ports import Kube
from .specs.meta import content_hash

ANN_SPEC_HASH = f"{naming.GROUP}/spec-hash"

# Kinds that may belong to the pooler component (what `sync_owned` lists and prunes).
OWNED_KINDS: list[tuple[str, str]] = [
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
]


def with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    stamped = copy.deepcopy(obj)
    annotations = stamped["metadata"].setdefault("annotations", {})
    annotations[ANN_SPEC_HASH] = content_hash(obj)
    return stamped


def sync_owned(
    kube: Kube,
    namespace: str,
    resource: str,
    component: str,
    desired: list[dict[str, Any]],
    kinds: list[tuple[str, str]],
    secret_names: tuple[str, ...] = (),
) -> int:
    """Apply changed objects, delete undesired ones of `component`; the number of writes made.

    Secrets are never listed (the operator may not enumerate Secrets): the ones it may own are
    looked up by name, `secret_names` plus the desired ones.
    """
    selector = naming.selector_labels(resource, component)
    wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]): with_hash(o) for o in desired}
    writes = 0
    for api_version, kind in kinds:
        if kind == "Secret":
            names = set(secret_names) | {name for (_, k, name) in wanted if k == "Secret"}
            existing = _secrets(kube, namespace, sorted(names), selector)
        else:
            existing = _existing(kube, api_version, kind, namespace, selector)
        for name in existing:
            if (api_version, kind, name) not in wanted:
                kube.delete(api_version, kind, namespace, name)
                writes += 1
        for (w_api, w_kind, name), obj in wanted.items():
            if (w_api, w_kind) != (api_version, kind):
                continue
            live_hash = (existing.get(name, {}).get("metadata", {}).get("annotations") or {}).get(ANN_SPEC_HASH)
            if live_hash != obj["metadata"]["annotations"][ANN_SPEC_HASH]:
                kube.apply(obj)
                writes += 1
    return writes


def _existing(kube: Kube, api_version: str, kind: str, namespace: str, selector: dict[str, str]) -> dict[str, Any]:
    # A kind whose API is not served (ServiceMonitor without the Prometheus Operator) lists empty.
    return {o["metadata"]["name"]: o for o in kube.list(api_version, kind, namespace, selector)}


def _secrets(kube: Kube, namespace: str, names: list[str], selector: dict[str, str]) -> dict[str, Any]:
    found = {}
    for name in names:
        secret = kube.get("v1", "Secret", namespace, name)
        labels = (secret or {}).get("metadata", {}).get("labels") or {}
        if secret is not None and all(labels.get(k) == v for k, v in selector.items()):
            found[name] = secret
    return found
