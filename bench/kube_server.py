"""The Kubernetes API for the operator benchmark: the test harness's KMock emulator, in its own
process (so the operator's memory is the operator's alone), driven over stdin/stdout.

    python -m bench.kube_server        # prints {"url": ...}, then answers one JSON command per line

Commands: {"op": "create", "file": PATH} creates the objects in a JSON list through the HTTP API
(watchers see them, as a GitOps sync would); {"op": "stats"} returns the requests served by method
and resource, and when each MarketplaceDB first became Ready; {"op": "writes", "since": EPOCH} returns
the writes recorded since then (of the last 5,000: time, method, resource, namespace/name, body);
{"op": "statuses"} returns every MarketplaceDB's stored status; {"op": "quit"}.

KMock runs no controllers. Here the Deployment "controller" is instant: a Deployment is stored
with all its replicas ready, so the benchmark measures the operator, not pod start-up.

Two costs of the emulator that grow with the run are removed, so that the emulator is not what the
benchmark measures: KMock 0.8 matches every new request against the whole history of served
requests (`request in view` iterates it: ~15 ms per request after a few thousand), so served
requests are counted here and then forgotten; and every GET, LIST and the resource check of each
request scan every stored object of every kind (12,000 objects with 1,000 resources), so objects
are indexed here by resource and by key. A real API server answers from its watch cache of that
resource.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import kmock

from ._harness import harness_module

_kube = harness_module("kube")  # tests/harness/kube.py: the emulator the operator tests use
KubeEmulator, KubeObjects = _kube.KubeEmulator, _kube.KubeObjects

WRITES = ("POST", "PUT", "PATCH", "DELETE")


class BenchEmulator(KubeEmulator):
    """The harness emulator plus instant Deployments and a record of first-Ready times."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.ready_at: dict[str, float] = {}
        self.by_resource: dict[Any, dict[Any, Any]] = collections.defaultdict(dict)
        self._served_cache: list[Any] | None = None
        self.by_method: collections.Counter[str] = collections.Counter()
        self.writes_by_resource: collections.Counter[str] = collections.Counter()
        # The last writes as (time, method, resource[/subresource], namespace/name, body): what a
        # write that should not have happened (a restart that is not quiet) actually changed.
        self.write_log: collections.deque[tuple[float, str, str, str, Any]] = collections.deque(maxlen=5000)

    async def _handle(self, request: kmock.Request) -> Any:
        method = str(getattr(request.method, "value", request.method))
        self.by_method[method] += 1
        if method in WRITES and request.resource is not None:
            sub = f"/{request.subresource}" if request.subresource else ""
            self.writes_by_resource[f"{request.resource.plural}{sub}"] += 1
            self.write_log.append((time.time(), method, f"{request.resource.plural}{sub}",
                                   f"{request.namespace}/{request.name}", request.data))
        try:
            return await super()._handle(request)
        finally:
            with contextlib.suppress(ValueError):
                self._requests.remove(request)  # counted above; kmock would re-scan it forever
            for payload in self._payloads:
                payload._requests.clear()

    async def _store(self, request: kmock.Request, obj: dict[str, Any], *, created: bool,
                     current: dict[str, Any] | None = None) -> None:
        plural = request.resource.plural if request.resource is not None else ""
        if plural == "deployments" and request.subresource != "status":
            replicas = int((obj.get("spec") or {}).get("replicas", 1))
            obj["status"] = {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                             "updatedReplicas": replicas,
                             "observedGeneration": obj.get("metadata", {}).get("generation", 1)}
        await super()._store(request, obj, created=created, current=current)
        meta = obj.get("metadata", {})
        key = (request.resource, meta.get("namespace") if self._namespaced(request) else None, meta.get("name"))
        if key in self.objects:
            if request.resource not in self.by_resource:
                self._served_cache = None  # a new kind of object: served resources may change
            self.by_resource[request.resource][key] = self.objects[key]
        if plural == "marketplacedbs":
            self._note_ready(obj)

    def _get_resources(self) -> Any:
        """kmock's set of served resources (registered + stored), rebuilt only when a kind is new."""
        if self._served_cache is None:
            self._served_cache = super()._get_resources()
        return self._served_cache

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        """GET one object by its key (kmock scans them all); kmock's own GET when not indexed."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            obj = self.by_resource.get(request.resource, {}).get(key)
            if obj is not None and not obj.deleted:
                return obj.raw
        return await super()._serve_fetch(request)

    async def _serve_list(self, request: kmock.Request) -> Any:
        """The harness's LIST, from the per-resource index instead of a scan of every object."""
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = [copy.deepcopy(obj.raw) for obj in self.by_resource.get(request.resource, {}).values()
                     if not obj.deleted and _kube._selected(request, obj.raw)]
            revision = self._last_rv
        info = self._info(request)
        api_version = f"{request.resource.group}/{request.resource.version}".lstrip("/")
        return {"apiVersion": api_version, "kind": f"{info.kind or 'Object'}List",
                "metadata": {"resourceVersion": str(revision)}, "items": items}

    def _note_ready(self, obj: dict[str, Any]) -> None:
        meta, status = obj.get("metadata", {}), obj.get("status") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        if key in self.ready_at or status.get("observedGeneration") != meta.get("generation"):
            return
        for condition in status.get("conditions") or []:
            if condition.get("type") == "Ready" and condition.get("status") == "True":
                self.ready_at[key] = time.time()


def stats(api: BenchEmulator) -> dict[str, Any]:
    return {"by_method": dict(api.by_method), "writes_by_resource": dict(api.writes_by_resource),
            "ready_at": dict(api.ready_at), "time": time.time()}


def statuses(api: BenchEmulator) -> dict[str, Any]:
    """The stored status of every MarketplaceDB, by namespace/name."""
    return {f"{key[1]}/{key[2]}": copy.deepcopy(obj.raw.get("status"))
            for resource, objects in api.by_resource.items() if resource.plural == "marketplacedbs"
            for key, obj in objects.items() if not obj.deleted}


async def create_all(api: BenchEmulator, path: str, concurrency: int = 16) -> dict[str, Any]:
    objects = json.loads(Path(path).read_text())
    client = KubeObjects(api)
    started = time.perf_counter()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for obj in objects:
        queue.put_nowait(obj)

    async def worker() -> None:
        while not queue.empty():
            await client.create(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"created": len(objects), "seconds": time.perf_counter() - started}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with BenchEmulator() as api, kmock.Server(api):
        print(json.dumps({"url": str(api.url).rstrip("/")}), flush=True)
        while line := await reader.readline():
            command = json.loads(line)
            if command["op"] == "quit":
                break
            if command["op"] == "create":
                reply = await create_all(api, command["file"])
            elif command["op"] == "stats":
                reply = stats(api)
            elif command["op"] == "writes":
                since = float(command.get("since", 0))
                reply = {"writes": [list(w) for w in api.write_log if w[0] >= since]}
            elif command["op"] == "statuses":
                reply = statuses(api)
            else:
                reply = {"error": f"unknown op {command['op']!r}"}
            print(json.dumps(reply, default=str), flush=True)


if __name__ == "__main__":
    asyncio.run(serve())
