"""Keep the operator's own Kubernetes objects equal to the desired manifests, writing only on change.

An object is the resource's only when it carries the resource's *controller ownerReference* (its
uid): a name or a label proves nothing, since anyone who may create a ConfigMap can pick
`<mdb>-pooler` or copy our labels. So, per component:

- a desired object that is absent is created (a plain create: if the name got taken meanwhile,
  the API answers 409 and nothing is taken over);
- an existing one is updated (server-side apply, with its resourceVersion as a precondition) only
  when it is ours and its spec-hash annotation differs: an idle resync makes zero writes;
- an existing one that is not ours is a conflict: the component writes nothing at all (a pooler
  Deployment must not mount someone else's ConfigMap) and the conflict names the object;
- objects with our labels that are no longer desired are deleted only when they are ours.
"""

from __future__ import annotations

import copy
import dataclasses
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


@dataclasses.dataclass
class SyncResult:
    writes: int = 0
    conflicts: list[str] = dataclasses.field(default_factory=list)


def with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    stamped = copy.deepcopy(obj)
    annotations = stamped["metadata"].setdefault("annotations", {})
    annotations[ANN_SPEC_HASH] = content_hash(obj)
    return stamped


def controlled_by(obj: dict[str, Any], owner_uid: str | None) -> bool:
    """True when `obj` carries a controller ownerReference to the resource with `owner_uid`."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return owner_uid is not None and any(r.get("uid") == owner_uid and r.get("controller") is True for r in refs)


def conflict_message(kind: str, namespace: str, name: str) -> str:
    return (
        f"{kind} {namespace}/{name} exists and is not controlled by this MarketplaceDB (no controller "
        "ownerReference with its uid); rename or remove it: nothing of this component was written"
    )


def sync_owned(
    kube: Kube,
    namespace: str,
    resource: str,
    component: str,
    desired: list[dict[str, Any]],
    kinds: list[tuple[str, str]],
    secret_names: tuple[str, ...] = (),
    *,
    owner_uid: str | None,
) -> SyncResult:
    """Create, update and prune `component`'s objects; the writes made and the conflicts found.

    Secrets are never listed (the operator may not enumerate Secrets): the ones it may own are
    looked up by name, `secret_names` plus the desired ones.
    """
    selector = naming.selector_labels(resource, component)
    wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]): with_hash(o) for o in desired}
    live: dict[tuple[str, str, str], dict[str, Any]] = {}
    for api_version, kind in kinds:
        if kind == "Secret":
            names = sorted(set(secret_names) | {name for (_, k, name) in wanted if k == "Secret"})
            found = {n: s for n in names if (s := kube.get(api_version, kind, namespace, n)) is not None}
        else:
            found = {o["metadata"]["name"]: o for o in kube.list(api_version, kind, namespace, selector)}
        live.update({(api_version, kind, name): obj for name, obj in found.items()})
    # A desired name that the label selector did not find may still be taken by a foreign object.
    for key in wanted:
        if key not in live and (obj := kube.get(*key[:2], namespace, key[2])) is not None:
            live[key] = obj
    conflicts = [
        conflict_message(kind, namespace, name)
        for (api_version, kind, name) in wanted
        if (api_version, kind, name) in live and not controlled_by(live[(api_version, kind, name)], owner_uid)
    ]
    if conflicts:
        return SyncResult(conflicts=conflicts)
    return _write(kube, namespace, wanted, live, owner_uid)


def _write(
    kube: Kube,
    namespace: str,
    wanted: dict[tuple[str, str, str], dict[str, Any]],
    live: dict[tuple[str, str, str], dict[str, Any]],
    owner_uid: str | None,
) -> SyncResult:
    result = SyncResult()
    for key, obj in live.items():
        if key not in wanted and controlled_by(obj, owner_uid):
            kube.delete(key[0], key[1], namespace, key[2])
            result.writes += 1
    for key, obj in wanted.items():
        current = live.get(key)
        if current is None:
            try:
                kube.create(obj)
            except Exception as exc:  # 409: someone took the name since the read
                if getattr(exc, "status", None) != 409:
                    raise
                result.conflicts.append(conflict_message(key[1], namespace, key[2]))
                continue
            result.writes += 1
            continue
        live_hash = ((current.get("metadata") or {}).get("annotations") or {}).get(ANN_SPEC_HASH)
        if live_hash != obj["metadata"]["annotations"][ANN_SPEC_HASH]:
            body = copy.deepcopy(obj)
            version = (current.get("metadata") or {}).get("resourceVersion")
            if version:
                # Precondition: the object is still the one whose ownership was checked.
                body["metadata"]["resourceVersion"] = version
            kube.apply(body)
            result.writes += 1
    return result
