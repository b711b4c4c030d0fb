"""A Kubernetes API for tests: KMock's emulator, made a little more like an API server, plus kopf.

KMock (https://kmock.readthedocs.io, by kopf's author) is "a database over HTTP": it stores what
it is sent and streams watch events, but assigns no uid/resourceVersion/generation, treats every
PATCH as a dict merge, 404s on server-side apply of a missing object, ignores status subresources
and selectors, and its watch can drop events. `KubeEmulator` adds, server-side and so for every
client (kopf, the `kubernetes` package, tests), the API-server behaviours the operator relies on:

- create: metadata.uid, resourceVersion, generation=1, creationTimestamp, namespace from the URL,
  metadata.generateName (kopf posts its Events with generateName only);
- every write: a new resourceVersion (none, and no watch event, for a no-op), generation + 1 when
  `spec` changed (status writes never bump it);
- PATCH by content type: merge-patch (RFC 7386), json-patch (RFC 6902; a failed `test` op is
  422 as kopf expects), strategic-merge and apply-patch with lists of named items merged by
  `name` (containers, env, volumes: enough for probe patching); a `resourceVersion` in the
  patch or PUT body is a precondition (409 on mismatch); PUT replaces;
- server-side apply (application/apply-patch+yaml) on a missing object creates it;
- the status subresource: writes to /status change only `status`; other writes never change it;
- LIST/WATCH: equality label/field selectors; WATCH loses no event between its replay and its
  subscription, and resumes after the LIST's resourceVersion.

Still not an API server: no validation, defaulting, admission, field ownership (apply never
removes fields), set-based selectors, garbage collection of owned objects, or controllers (a
Deployment never gets pods, a CronJob never fires). DELETE is kmock's own (finalizers honoured;
the deletionTimestamp write does not bump resourceVersion). A test reaction that fails a write
(`api[...] << 503`) answers the client, but the write was already stored, as in kmock.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import datetime
import io
import os
import secrets
import signal
import string
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from typing import Any, TypeVar

import attrs
import jsonpatch
import kmock
import kopf

T = TypeVar("T")

# -- the resources the emulator serves --------------------------------------------------------------

_ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


def _info(kind: str, *, namespaced: bool = True, status: bool = False,
          shortnames: Collection[str] = ()) -> kmock.ResourceInfo:
    return kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=set(_ALL_VERBS),
                              shortnames=set(shortnames), subresources={"status"} if status else set())


#: "group/version/plural" -> discovery info. kopf starts its watchers only after discovery lists
#: CRDs and namespaces; the rest is every kind the operator reads or writes.
RESOURCES: dict[str, kmock.ResourceInfo] = {
    "apiextensions.k8s.io/v1/customresourcedefinitions": _info("CustomResourceDefinition", namespaced=False,
                                                               status=True, shortnames=["crd"]),
    "v1/namespaces": _info("Namespace", namespaced=False, status=True, shortnames=["ns"]),
    "marketplacedb.io/v1alpha1/marketplacedbs": _info("MarketplaceDB", status=True, shortnames=["mdb"]),
    "v1/configmaps": _info("ConfigMap", shortnames=["cm"]),
    "v1/secrets": _info("Secret"),
    "v1/services": _info("Service", status=True, shortnames=["svc"]),
    "v1/events": _info("Event", shortnames=["ev"]),
    "v1/pods": _info("Pod", status=True, shortnames=["po"]),
    "events.k8s.io/v1/events": _info("Event", shortnames=["ev"]),
    "apps/v1/deployments": _info("Deployment", status=True, shortnames=["deploy"]),
    "batch/v1/cronjobs": _info("CronJob", status=True, shortnames=["cj"]),
    "batch/v1/jobs": _info("Job", status=True),
    "policy/v1/poddisruptionbudgets": _info("PodDisruptionBudget", status=True, shortnames=["pdb"]),
    "coordination.k8s.io/v1/leases": _info("Lease"),
    "kopf.dev/v1/clusterkopfpeerings": _info("ClusterKopfPeering", namespaced=False),
    "kopf.dev/v1/kopfpeerings": _info("KopfPeering"),
    "monitoring.coreos.com/v1/servicemonitors": _info("ServiceMonitor"),
}

MDB = kmock.resource("marketplacedb.io/v1alpha1/marketplacedbs")


def resource_of(api_version: str, kind: str) -> kmock.resource:
    """The served resource of an (apiVersion, kind) pair, e.g. ("apps/v1", "Deployment")."""
    group, _, version = api_version.rpartition("/")
    for key, info in RESOURCES.items():
        res = kmock.resource(key)
        if res.group == group and res.version == version and info.kind == kind:
            return res
    raise KeyError(f"{api_version} {kind} is not served by the test emulator; add it to RESOURCES")


def object_path(res: kmock.resource, namespace: str | None = None, name: str | None = None,
                subresource: str | None = None) -> str:
    parts = ["/api/v1"] if res.group == "" else [f"/apis/{res.group}/{res.version}"]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(str(res.plural))
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


# -- a kmock 0.8 URL-parsing bug ---------------------------------------------------------------------

def _install_namespace_path_fix() -> None:
    """kmock 0.8 parses `/api/v1/namespaces[/{name}]` as a namespace prefix with nothing after it
    (a 500 ValueError), so Namespace objects cannot be created, listed or watched, and kopf's
    namespaced mode (which lists namespaces) fails. Parse exactly those paths as the `namespaces`
    resource; delegate every other path to kmock. Idempotent."""
    from kmock._internal import parsing  # private: the only place the path is parsed

    original = parsing.parse_path
    if getattr(original, "_namespace_fix", False):
        return

    def parse_path(path: str) -> Any:
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and (len(parts) <= 4 or parts[4] in ("status", "finalize")):
            return parsing.ParsedPath(group="", version="v1", plural="namespaces",
                                      name=parts[3] if len(parts) > 3 else None,
                                      subresource=parts[4] if len(parts) > 4 else None)
        return original(path)

    parse_path._namespace_fix = True  # type: ignore[attr-defined]
    parsing.parse_path = parse_path


_install_namespace_path_fix()


# -- patch semantics ----------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge, null deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _named_items(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, Mapping) and "name" in item for item in value)


def named_merge(target: Any, patch: Any) -> Any:
    """Merge patch where lists of named items merge by `name` (how strategic-merge and server-side
    apply treat containers/env/volumes/ports); other lists are replaced."""
    if isinstance(patch, list) and _named_items(patch) and _named_items(target):
        merged = {item["name"]: item for item in target}
        for item in patch:
            merged[item["name"]] = named_merge(merged.get(item["name"]), item)
        return list(merged.values())
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = named_merge(result.get(key), value)
    return result


def _content_type(request: kmock.Request) -> str:
    for key, value in request.headers.items():
        if key.lower() == "content-type":
            return value.split(";")[0].strip().lower()
    return ""


class KubeEmulator(kmock.KubernetesEmulator):
    """KMock's emulator whose writes (POST, PATCH, PUT) follow API-server rules (module docstring).

    Writes change the stored state here; then kmock's reaction machinery runs as usual, so test
    reactions (e.g. `api['patch deployments'] << 500` for fault injection) still apply and the
    served requests stay recorded as sent. Reads, watches and DELETE are kmock's own.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._last_rv = 0
        self._written: dict[int, dict[str, Any]] = {}  # id(request) -> the object it wrote
        self.fallback[kmock.method.PUT] << self._serve_written
        for key, info in RESOURCES.items():
            self.resources[key] = info

    async def _handle(self, request: kmock.Request) -> Any:
        is_write = request.resource is not None and request.method in ("POST", "PATCH", "PUT")
        if not is_write or (request.name is None) != (request.method == "POST"):
            return await super()._handle(request)  # kmock: reads, watches, deletes, odd URLs
        async with self._lock:  # kmock's lock: its reads never see a half-done write
            await self._write(request)
        try:
            # Skip KubernetesEmulator._handle (its own state change); run the reactions/fallbacks.
            return await kmock.RawHandler._handle(self, request)
        finally:
            self._written.pop(id(request), None)

    # The fallbacks (no test reaction matched): answer with the object as this write left it.
    async def _serve_create(self, request: kmock.Request) -> Any:
        return self._written[id(request)]

    async def _serve_update(self, request: kmock.Request) -> Any:
        return self._written[id(request)]

    async def _serve_written(self, request: kmock.Request) -> Any:
        return self._written[id(request)]

    def _next_rv(self) -> str:
        # One counter for all objects, as etcd's revision: LIST returns it, WATCH resumes after it.
        self._last_rv += 1
        return str(self._last_rv)

    # -- reads: selectors, and a watch that loses nothing --------------------------------------------

    async def _serve_list(self, request: kmock.Request) -> Any:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = [copy.deepcopy(obj.raw) for (res, _, _), obj in self.objects.items()
                     if res == request.resource and not obj.deleted and _selected(request, obj.raw)]
            revision = self._last_rv
        info = self._info(request)
        api_version = f"{request.resource.group}/{request.resource.version}".lstrip("/")
        return {"apiVersion": api_version, "kind": f"{info.kind or 'Object'}List",
                "metadata": {"resourceVersion": str(revision)}, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """kmock's watch replays the stored objects, then subscribes to changes, and drops what
        changed in between (kopf then waits forever for its own patch). Here the subscription is
        taken together with the snapshot, and the replay skips what the client's LIST already had
        (?resourceVersion=N), as a real API server does."""
        assert request.resource is not None
        yield b""  # send the headers now: the client waits for them before reading events
        since = request.params.get("resourceVersion", "")
        since_rv = int(since) if since.isdigit() else 0
        bus = self._buses[request.resource]
        async with self._lock:
            mark = await bus.mark()
            replay = [{"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                      for (res, _, _), obj in self.objects.items()
                      if res == request.resource and not obj.deleted and _selected(request, obj.raw)
                      and _rv(obj.raw) > since_rv]
        try:
            for event in replay:
                yield event
            async for event in bus.stream(since=mark):
                if _selected(request, event.get("object", {})):
                    yield event
        finally:
            await bus.unmark(mark)

    # -- writes ---------------------------------------------------------------------------------------

    async def _write(self, request: kmock.Request) -> None:
        assert request.resource is not None
        current = self._current(request)
        if request.method == "POST":
            if not isinstance(request.data, Mapping):
                raise kmock.KubernetesError(status=400, reason="BadRequest", message="the body is not an object")
            await self._store(request, self._stamp_new(request, request.data), created=True)
        elif current is None:
            if request.method == "PATCH" and _content_type(request) == "application/apply-patch+yaml":
                # Server-side apply creates what does not exist yet.
                await self._store(request, self._stamp_new(request, request.data), created=True)
            else:
                raise kmock.KubernetesObjectNotFoundError()
        else:
            new = self._apply(request, current)
            new = self._protect_status(request, current, new)
            await self._store(request, self._bump(current, new), created=False, current=current)

    async def _store(self, request: kmock.Request, obj: dict[str, Any], *, created: bool,
                     current: dict[str, Any] | None = None) -> None:
        assert request.resource is not None
        meta = obj.get("metadata", {})
        key = (request.resource, meta.get("namespace") if self._namespaced(request) else None, meta.get("name"))
        if not key[2]:
            raise kmock.KubernetesError(status=422, reason="Invalid", message="metadata.name is required")
        bus = self._buses[request.resource]
        if created and key in self.objects and not self.objects[key].deleted:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                        message=f"{request.resource.plural} {key[2]!r} already exists")
        self._written[id(request)] = obj
        if created:
            if key in self.objects:
                self.objects[key].create(obj)  # a new life after a deletion: history goes on
            else:
                self.objects[key] = obj
            await bus.put({"type": "ADDED", "object": copy.deepcopy(obj)})
            return
        if obj == current:
            return  # a no-op write: a real server stores nothing and sends no watch event
        self.objects[key].create(obj)  # appends a version to the object's history
        await bus.put({"type": "MODIFIED", "object": copy.deepcopy(obj)})
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            # The last finalizer is gone from an object being deleted: the server deletes it.
            self.objects[key].delete()
            await bus.put({"type": "DELETED", "object": copy.deepcopy(obj)})

    def _info(self, request: kmock.Request) -> kmock.ResourceInfo:
        # Not self.resources[...]: that auto-creates an entry, and so a discovered resource.
        if request.resource is not None and request.resource in self.resources:
            return self.resources[request.resource]
        return kmock.ResourceInfo()

    def _namespaced(self, request: kmock.Request) -> bool:
        namespaced = self._info(request).namespaced
        return request.namespace is not None if namespaced is None else namespaced

    def _current(self, request: kmock.Request) -> dict[str, Any] | None:
        if request.resource is None or request.name is None:
            return None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _apply(self, request: kmock.Request, current: dict[str, Any]) -> dict[str, Any]:
        body = request.data
        if request.method == "PUT":
            if not isinstance(body, Mapping):
                raise kmock.KubernetesError(status=400, reason="BadRequest", message="the body is not an object")
            _check_precondition(body, current)
            return copy.deepcopy(dict(body))
        if isinstance(body, list):  # application/json-patch+json
            try:
                return jsonpatch.apply_patch(current, body, in_place=False)  # type: ignore[no-any-return]
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc
        if not isinstance(body, Mapping):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="the patch is not an object")
        _check_precondition(body, current)
        if _content_type(request) in ("application/strategic-merge-patch+json", "application/apply-patch+yaml"):
            return named_merge(current, body)  # type: ignore[no-any-return]
        return merge_patch(current, body)  # type: ignore[no-any-return]

    def _protect_status(self, request: kmock.Request, current: dict[str, Any], new: dict[str, Any]
                        ) -> dict[str, Any]:
        """With a status subresource, /status writes change only status; other writes never do."""
        if "status" not in self._info(request).subresources:
            return new
        result, source = (copy.deepcopy(current), new) if request.subresource == "status" else (new, current)
        result.pop("status", None)
        if "status" in source:
            result["status"] = source["status"]
        return result

    def _bump(self, current: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        meta = new.setdefault("metadata", {})
        old_meta = current.get("metadata", {})
        for key in ("uid", "creationTimestamp", "name", "namespace", "generation", "resourceVersion"):
            if key in old_meta:  # server-owned: whatever the client sent, these stay
                meta[key] = old_meta[key]
        if new == current:
            return new  # a no-op write keeps the resourceVersion
        if new.get("spec") != current.get("spec"):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_rv()
        return new

    def _stamp_new(self, request: kmock.Request, body: Mapping[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and request.name:
            meta["name"] = request.name
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
            meta["name"] = meta["generateName"] + suffix
        if self._namespaced(request) and request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._next_rv()
        meta["generation"] = 1
        meta["creationTimestamp"] = _now()
        return obj


def _rv(obj: Mapping[str, Any]) -> int:
    """An object's resourceVersion as a number; objects put into kmock directly have none (-> 0 is
    never skipped: see the `>` in _serve_watch, where since=0 replays everything)."""
    value = str(obj.get("metadata", {}).get("resourceVersion", ""))
    return int(value) if value.isdigit() else 1 << 62


def _selected(request: kmock.Request, obj: Mapping[str, Any]) -> bool:
    """Does `obj` belong in this LIST/WATCH: namespace, name, labelSelector, fieldSelector."""
    meta = obj.get("metadata", {})
    if request.namespace is not None and meta.get("namespace") != request.namespace:
        return False
    if request.name is not None and meta.get("name") != request.name:
        return False
    fields = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
    for term in filter(None, request.params.get("fieldSelector", "").split(",")):
        key, op, value = _split_term(term)
        if (fields.get(key) == value) != (op != "!="):
            return False
    labels = meta.get("labels") or {}
    for term in filter(None, request.params.get("labelSelector", "").split(",")):
        key, op, value = _split_term(term)
        if op == "" and (key.startswith("!") == (key.lstrip("!") in labels)):
            return False  # `key` (exists) / `!key` (does not exist)
        if op and (labels.get(key) == value) != (op != "!="):
            return False
    return True


def _split_term(term: str) -> tuple[str, str, str]:
    """`k=v`, `k==v`, `k!=v` or a bare `k`/`!k` (set-based `in (...)` selectors are not supported)."""
    for op in ("!=", "==", "="):
        if op in term:
            key, value = term.split(op, 1)
            return key.strip(), op, value.strip()
    return term.strip(), "", ""


def _check_precondition(body: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    wanted = (body.get("metadata") or {}).get("resourceVersion")
    actual = current.get("metadata", {}).get("resourceVersion")
    if wanted and wanted != actual:
        raise kmock.KubernetesError(status=409, reason="Conflict",
                                    message="the object has been modified; please apply your changes "
                                            "to the latest version and try again")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.asynccontextmanager
async def kube_emulator() -> AsyncIterator[KubeEmulator]:
    """A running emulator on a random loopback port; its URL is `api.url`."""
    async with KubeEmulator() as api, kmock.Server(api):
        yield api


# -- objects ----------------------------------------------------------------------------------------

class KubeObjects:
    """Create/patch/delete objects through the emulator's HTTP API (so watchers see them, and they
    get uid/resourceVersion/generation), and read them back from its memory."""

    def __init__(self, api: KubeEmulator) -> None:
        self.api = api

    async def _request(self, method: str, path: str, body: Any = None,
                       content_type: str = "application/json") -> dict[str, Any]:
        async with self.api.request(method, path, json=body, headers={"Content-Type": content_type}) as resp:
            # content_type=None: injected faults (`api[...] << 503`) answer with no JSON type.
            data: Any = await resp.json(content_type=None) if await resp.read() else {}
            if resp.status >= 400:
                raise KubeApiError(resp.status, data if isinstance(data, dict) else {"message": data})
            return data  # type: ignore[no-any-return]

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        res = resource_of(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace") if RESOURCES[_key(res)].namespaced else None
        return await self._request("POST", object_path(res, namespace), obj)

    async def patch(self, obj: Mapping[str, Any], patch: Any, *, subresource: str | None = None,
                    content_type: str = "application/merge-patch+json") -> dict[str, Any]:
        """Patch the object identified by `obj` (apiVersion, kind, metadata.name/namespace)."""
        res, namespace, name = self.ref(obj)
        return await self._request("PATCH", object_path(res, namespace, name, subresource), patch, content_type)

    async def patch_spec(self, obj: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
        """A user edit: merge into spec; the emulator bumps generation as the API server does."""
        return await self.patch(obj, {"spec": spec})

    async def delete(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        res, namespace, name = self.ref(obj)
        return await self._request("DELETE", object_path(res, namespace, name))

    async def ensure_namespace(self, name: str) -> dict[str, Any]:
        existing = self.get("v1", "Namespace", name)
        if existing is not None:
            return existing
        return await self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def ref(self, obj: Mapping[str, Any]) -> tuple[kmock.resource, str | None, str]:
        res = resource_of(obj["apiVersion"], obj["kind"])
        meta = obj.get("metadata", {})
        return res, meta.get("namespace") if RESOURCES[_key(res)].namespaced else None, meta["name"]

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The stored object (a deep copy), or None if absent or deleted."""
        key = (resource_of(api_version, kind), namespace, name)
        if key not in self.api.objects or self.api.objects[key].deleted:
            return None
        return copy.deepcopy(self.api.objects[key].raw)

    def list_objects(self, api_version: str, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        res = resource_of(api_version, kind)
        return [copy.deepcopy(obj.raw) for (r, ns, _), obj in self.api.objects.items()
                if r == res and (namespace is None or ns == namespace) and not obj.deleted]

    def history(self, api_version: str, kind: str, name: str, namespace: str | None = None
                ) -> list[dict[str, Any] | None]:
        """Every stored version of an object (None marks a deletion): what writes it went through."""
        key = (resource_of(api_version, kind), namespace, name)
        if key not in self.api.objects:
            return []
        return [None if v is None else copy.deepcopy(v.raw) for v in self.api.objects[key].history]

    def events(self, namespace: str | None = None, *, involved_name: str | None = None) -> list[dict[str, Any]]:
        """Core v1 and events.k8s.io/v1 Events, optionally for one involved object."""
        found = (self.list_objects("v1", "Event", namespace)
                 + self.list_objects("events.k8s.io/v1", "Event", namespace))
        if involved_name is not None:
            found = [ev for ev in found
                     if (ev.get("involvedObject") or ev.get("regarding") or {}).get("name") == involved_name]
        return found


class KubeApiError(Exception):
    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body.get('reason')}: {body.get('message')}")
        self.status = status
        self.body = body


def _key(res: kmock.resource) -> str:
    return f"{res.group}/{res.version}/{res.plural}" if res.group else f"{res.version}/{res.plural}"


async def create_object(api: KubeEmulator, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Create `obj` through the API (uid, resourceVersion, generation assigned; watchers notified)."""
    return await KubeObjects(api).create(obj)


async def patch_spec(api: KubeEmulator, obj: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """A user's spec edit (generation + 1)."""
    return await KubeObjects(api).patch_spec(obj, spec)


def marketplacedb(name: str, namespace: str, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A MarketplaceDB body to create (the spec is the caller's; nothing is defaulted)."""
    return {"apiVersion": "marketplacedb.io/v1alpha1", "kind": "MarketplaceDB",
            "metadata": {"name": name, "namespace": namespace}, "spec": dict(spec or {})}


# -- waiting ------------------------------------------------------------------------------------------

async def eventually(check: Callable[[], T | Awaitable[T]], *, timeout: float = 10, interval: float = 0.05,
                     message: str = "condition") -> T:
    """Poll `check` until it returns something truthy (and return it), or fail after `timeout`.

    Operators converge asynchronously: assert on the state they reach, never on a sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} not reached in {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


# -- kopf in-process ----------------------------------------------------------------------------------

# kopf asks its login handlers for credentials; ours answers with the emulator's URL. The URL comes
# from a context variable set by kopf_runner (kopf's tasks inherit the context), so one login
# handler per registry serves every run, whichever emulator it targets.
_KUBE_URL: contextvars.ContextVar[str] = contextvars.ContextVar("kmock_url")
_LOGIN_INSTALLED: weakref.WeakSet[kopf.OperatorRegistry] = weakref.WeakSet()


def install_login(registry: kopf.OperatorRegistry) -> None:
    if registry in _LOGIN_INSTALLED:
        return

    @kopf.on.login(registry=registry, id="kmock-login")
    async def _login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=_KUBE_URL.get(), default_namespace="default")

    _LOGIN_INSTALLED.add(registry)


def kopf_test_settings() -> kopf.OperatorSettings:
    """kopf's defaults, except what only matters to a process that must never hang a test run."""
    settings = kopf.OperatorSettings()
    # After a cancellation, kopf SIGKILLs its own thread (here: pytest) 10 minutes later.
    settings.process.ultimate_exiting_timeout = None
    settings.watching.reconnect_backoff = 0.1
    return settings


@attrs.define
class KopfRun:
    task: asyncio.Task[None]
    stop_flag: asyncio.Event
    ready_flag: asyncio.Event
    registry: kopf.OperatorRegistry


@contextlib.asynccontextmanager
async def kopf_runner(api: KubeEmulator, registry: kopf.OperatorRegistry, *,
                      namespaces: Collection[str] = (), clusterwide: bool = False,
                      settings: kopf.OperatorSettings | None = None, memo: object | None = None,
                      startup_timeout: float = 60, stop_timeout: float = 120) -> AsyncIterator[KopfRun]:
    """Run kopf in this event loop against `api` until the block exits, then stop it cleanly.

    Namespaced mode: kopf serves only namespaces that exist as objects, so they are created here.
    An operator crash is re-raised at exit. Sync handlers run in kopf's thread pool; an async
    handler that calls the sync `kubernetes` client must do so via asyncio.to_thread, or it blocks
    this loop, which also serves the emulator (a deadlock).
    """
    if bool(namespaces) == clusterwide:
        raise ValueError("pass either namespaces=[...] or clusterwide=True")
    objects = KubeObjects(api)
    for namespace in namespaces:
        await objects.ensure_namespace(namespace)
    install_login(registry)
    stop_flag, ready_flag = asyncio.Event(), asyncio.Event()
    existing = asyncio.all_tasks()  # kopf's own rule: tasks created from here on are kopf's or the test's
    token = _KUBE_URL.set(str(api.url).rstrip("/"))
    try:
        task = asyncio.create_task(kopf.operator(
            registry=registry, settings=settings or kopf_test_settings(), memo=memo, standalone=True,
            clusterwide=clusterwide, namespaces=list(namespaces), stop_flag=stop_flag, ready_flag=ready_flag,
        ), name="kopf-operator")
    finally:
        _KUBE_URL.reset(token)
    run = KopfRun(task=task, stop_flag=stop_flag, ready_flag=ready_flag, registry=registry)
    try:
        await _wait_ready(run, startup_timeout)
        yield run
    finally:
        try:
            await _stop(run, stop_timeout)
        finally:
            await _reap_kopf_tasks(existing)


async def _wait_ready(run: KopfRun, timeout: float) -> None:
    ready = asyncio.ensure_future(run.ready_flag.wait())
    done, _ = await asyncio.wait({ready, run.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if run.task in done:
        ready.cancel()
        run.task.result()  # raises the operator's startup error
        raise RuntimeError("kopf exited during startup")
    if ready not in done:
        ready.cancel()
        raise TimeoutError(f"kopf was not ready in {timeout}s")


async def _stop(run: KopfRun, timeout: float) -> None:
    run.stop_flag.set()
    try:
        await asyncio.wait_for(asyncio.shield(run.task), timeout)
    except TimeoutError:
        run.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run.task
        raise
    finally:
        _remove_signal_handlers()


def _is_kopf_task(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and f"{os.sep}kopf{os.sep}" in code.co_filename


def kopf_tasks() -> list[asyncio.Task[Any]]:
    """kopf's tasks still alive in this loop (none once a kopf_runner block has exited)."""
    return [t for t in asyncio.all_tasks() if not t.done() and _is_kopf_task(t)]


async def _reap_kopf_tasks(existing: Collection[asyncio.Task[Any]], timeout: float = 60) -> None:
    """End every kopf task that outlived kopf's own task, or fail naming them (with their stacks).

    Why: when kopf's task is cancelled while it stops (the stop timed out, or the test failed or
    was cancelled), kopf cancels every task it started, including the helper tasks of its
    schedulers. A watcher then sits in its `finally`, waiting for `Scheduler.close()`, which waits
    for a notification that only the (cancelled) cleaner task would have sent; the watcher
    suppresses every CancelledError until that close is done, so it never ends, and neither does
    pytest-asyncio's loop close, with pytest-timeout already disarmed by the failure (CI sat there
    until its limit). Likewise a timer runner whose handler is in a thread postpones its
    cancellation until the thread returns. So: cancel every kopf task, including those created
    while stopping (the `Scheduler.close()` task), again and again until all are done.
    """
    deadline = time.monotonic() + timeout
    while pending := {t for t in kopf_tasks() if t not in existing}:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
        if time.monotonic() > deadline and any(not t.done() for t in pending):
            stacks = io.StringIO()
            for task in kopf_tasks():
                stacks.write(f"--- {task.get_name()}\n")
                task.print_stack(file=stacks)
            raise RuntimeError(f"kopf tasks ignore cancellation for {timeout:.0f}s:\n{stacks.getvalue()}")


def _remove_signal_handlers() -> None:
    """kopf installs SIGINT/SIGTERM handlers on the loop when run in the main thread; drop them so
    Ctrl+C reaches pytest again."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(sig)


def iter_requests(api: KubeEmulator, method: str | None = None) -> Iterator[kmock.Request]:
    """The HTTP requests the emulator served (for asserting what the operator sent)."""
    for request in list(api):  # iterating a kmock handler yields the requests it served
        if method is None or request.method == method:
            yield request
