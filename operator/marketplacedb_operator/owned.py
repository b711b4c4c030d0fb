"""Keep the operator's own Kubernetes objects equal to the desired manifests, writing only on change.

What proves an object is the resource's: its uid is in the resource's record (status.ownedObjects),
which the operator writes from its own create responses. Users cannot write the status subresource,
and a uid cannot be chosen, so a name, a label, an ownerReference (anyone who may create a
ConfigMap can forge one with the resource's uid, which any reader of the MarketplaceDB sees) or a
spec-hash annotation (computable offline) proves nothing on its own. Per component:

- a desired object that is absent is created (a plain create: if the name got taken meanwhile,
  the API answers 409 and nothing is taken over), and its uid recorded;
- a recorded object (uid and controller ownerReference) is compared field by field with the
  desired manifest (not by an annotation the attacker can copy) and re-applied when any field we
  render differs: an idle resync makes zero writes, a tampered field is put back;
- an unrecorded object that carries our controller ownerReference is adopted (recorded) only when
  every field we render already has our value and its data keys are exactly ours: the upgrade path
  for objects created before the record existed, and the crash between a create and the status
  write. Adopting such an object hands its creator nothing: it does what ours would, and whatever
  extra it holds they could do with their own right to create that kind. Anything else is a
  conflict: the component writes nothing at all (a pooler Deployment must not mount someone
  else's ConfigMap) and the conflict names the object; deleting it lets the operator recreate it;
- objects with our labels that are no longer desired are deleted only when they carry our
  controller ownerReference (the garbage collector would delete them with the resource anyway).

Known limit: server-side apply (forced) sets every field we render, but fields another manager
added to a recorded object and that we do not render (an extra data key, an extra label) stay.
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

# (apiVersion, kind, name) -> uid: the objects the operator created or adopted (status.ownedObjects).
Record = dict[tuple[str, str, str], str]
# Kinds whose payload is a map mounted whole: their data keys must be exactly ours to adopt.
_DATA_KINDS = {"ConfigMap", "Secret"}


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


def covers(desired: Any, live: Any) -> bool:
    """Every field of `desired` has the same value in `live` (API-server defaults, i.e. extra map
    keys in `live`, are tolerated; lists must match item for item, so an extra container or volume
    is a difference)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and covers(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and all(map(covers, desired, live))
    return bool(desired == live)


def adoptable(desired: dict[str, Any], live: dict[str, Any], owner_uid: str | None) -> bool:
    """An unrecorded object may become ours only when it already is what we would write."""
    if not controlled_by(live, owner_uid) or not covers(desired, live):
        return False
    if desired["kind"] in _DATA_KINDS:
        return all(set(live.get(f) or {}) == set(desired.get(f) or {}) for f in ("data", "binaryData"))
    return True


def recorded(obj: dict[str, Any], key: tuple[str, str, str], record: Record, owner_uid: str | None) -> bool:
    uid = (obj.get("metadata") or {}).get("uid")
    return bool(uid) and record.get(key) == uid and controlled_by(obj, owner_uid)


def conflict_message(kind: str, namespace: str, name: str) -> str:
    return (
        f"{kind} {namespace}/{name} exists and was not created by this MarketplaceDB (its uid is not in "
        "status.ownedObjects and its content is not what the operator renders); rename or remove it: "
        "nothing of this component was written"
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
    record: Record | None = None,
) -> SyncResult:
    """Create, update and prune `component`'s objects; the writes made and the conflicts found.
    `record` (status.ownedObjects) is updated in place for `kinds`: created and adopted objects in,
    deleted and vanished ones out.

    Secrets are never listed (the operator may not enumerate Secrets): the ones it may own are
    looked up by name, `secret_names` plus the desired ones.
    """
    record = {} if record is None else record
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
    for key, obj in wanted.items():
        current = live.get(key)
        if current is not None and not recorded(current, key, record, owner_uid) and adoptable(obj, current, owner_uid):
            record[key] = str(current["metadata"]["uid"])  # the upgrade / crash-after-create path
    conflicts = [
        conflict_message(key[1], namespace, key[2])
        for key in wanted
        if key in live and not recorded(live[key], key, record, owner_uid)
    ]
    if conflicts:
        return SyncResult(conflicts=conflicts)
    return _write(kube, namespace, wanted, live, owner_uid, _scoped(record, kinds, live))


def _scoped(record: Record, kinds: list[tuple[str, str]], live: dict[tuple[str, str, str], Any]) -> Record:
    """`record` without entries of `kinds` whose object is gone (a stale uid proves nothing)."""
    for key in [k for k in record if k[:2] in kinds and k not in live]:
        del record[key]
    return record


def _write(
    kube: Kube,
    namespace: str,
    wanted: dict[tuple[str, str, str], dict[str, Any]],
    live: dict[tuple[str, str, str], dict[str, Any]],
    owner_uid: str | None,
    record: Record,
) -> SyncResult:
    result = SyncResult()
    for key, obj in live.items():
        if key not in wanted and controlled_by(obj, owner_uid):
            kube.delete(key[0], key[1], namespace, key[2])
            record.pop(key, None)
            result.writes += 1
    for key, obj in wanted.items():
        current = live.get(key)
        if current is None:
            try:
                created = kube.create(obj)
            except Exception as exc:  # 409: someone took the name since the read
                if getattr(exc, "status", None) != 409:
                    raise
                result.conflicts.append(conflict_message(key[1], namespace, key[2]))
                continue
            uid = ((created or {}).get("metadata") or {}).get("uid")
            if uid:
                record[key] = str(uid)
            result.writes += 1
            continue
        if not covers(obj, current):
            body = copy.deepcopy(obj)
            version = (current.get("metadata") or {}).get("resourceVersion")
            if version:
                # Precondition: the object is still the one whose ownership was checked.
                body["metadata"]["resourceVersion"] = version
            kube.apply(body)
            result.writes += 1
    return result
