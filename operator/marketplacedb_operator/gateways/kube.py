"""The only user of the Kubernetes client: create, server-side apply, reads, deletes.

Owned objects are created with a plain create (which fails on an existing name: nothing is taken
over by name) and updated by server-side apply with the field manager `marketplacedb-operator`;
probe fields on application Deployments use one field manager per MarketplaceDB and no force, so
a field someone else owns is a conflict, not a takeover
(https://kubernetes.io/docs/reference/using-api/server-side-apply/#conflicts).

Calls go through the client's discovery-based dynamic client (`kubernetes.dynamic`): URLs and
plurals come from the server's discovery documents, and `server_side_apply(field_manager=...,
force_conflicts=...)` is the apply PATCH. It was tried against the test suite's KMock emulator
(tests/harness/kube.py) and works there: KMock serves discovery for the kinds it is given, and the
harness makes apply create a missing object and honours label selectors, as an API server does, so
the product keeps no emulator workaround (the old 404-then-POST fallback on apply and the client-side
label filter are gone). Three choices around the dynamic client, each for a reason:

- Discovery stays in memory. Its default LazyDiscoverer reads and writes a cache file named after
  the API URL in the shared temp directory (`/tmp/osrcp-<md5 of the URL>.json`): a file another
  local user could plant to redirect writes, and one a read-only root filesystem cannot hold.
- Resolved resources are kept per kind under a lock (kopf runs sync handlers in threads; the
  discoverer's cache is not thread-safe), and a kind the server does not serve (ServiceMonitor
  without the Prometheus Operator) is remembered as absent for MISSING_TTL_SECONDS: the dynamic
  client answers each such lookup with a full re-discovery, which `sync_owned` would otherwise
  trigger on every reconcile of every resource. Reads of an absent kind find nothing, as a 404 did.
- RESOURCES stays, as the allow-list of kinds the operator touches and the plural its RBAC grant
  names (tests/test_rbac.py); discovery must agree with it, or the call is refused here rather
  than failing with 403 in a cluster.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.discovery import LazyDiscoverer
from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError
from kubernetes.dynamic.resource import Resource

from .. import naming

log = logging.getLogger(__name__)

# (apiVersion, kind) -> plural: the only kinds the operator writes or reads, with the resource name
# RBAC grants (the chart's RBAC is generated from RBAC_NEEDS below, see install.py).
RESOURCES: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("apps/v1", "Deployment"): "deployments",
    ("batch/v1", "CronJob"): "cronjobs",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    (naming.API_VERSION, naming.KIND): naming.PLURAL,
}
# How long a kind the server does not serve is taken as absent before discovery is asked again
# (a CRD installed later, e.g. the Prometheus Operator's, is picked up within this).
MISSING_TTL_SECONDS = 300.0
# (connect, read) timeout of each call unless the caller gives one (settings.py:
# MARKETPLACEDB_KUBE_CONNECT_TIMEOUT_SECONDS, MARKETPLACEDB_KUBE_REQUEST_TIMEOUT_SECONDS). Per
# attempt: urllib3 retries an idempotent call (GET, DELETE) whose answer timed out up to 3 times,
# so a read the server never answers gives up after about 4 x the read timeout.
DEFAULT_TIMEOUT = (10.0, 30.0)

# What this gateway's calls need from RBAC: (apiGroup, resource, verbs). install.py builds the
# chart's and deploy/install.yaml's Role/ClusterRole from this list (and kopf's in handlers.py);
# tests/test_rbac.py checks the rendered rules grant exactly these. `apply` is a server-side apply
# PATCH, which also needs `create` when the object does not exist yet
# (https://kubernetes.io/docs/reference/using-api/server-side-apply/#using-server-side-apply-in-a-controller).
# Secrets: `get` for the database credentials (used only when labelled marketplacedb.io/credentials),
# `patch`/`create`/`delete` for the pooler's auth
# Secret (deleted when the pooler is disabled); no list or watch, so the operator cannot enumerate
# Secrets (names are per resource and chosen by users, so resourceNames cannot narrow them: see
# docs/rbac.md).
_OWNED_VERBS = ("get", "list", "patch", "create", "delete")
RBAC_NEEDS: list[tuple[str, str, tuple[str, ...]]] = [
    ("", "configmaps", _OWNED_VERBS),
    ("", "secrets", ("get", "patch", "create", "delete")),
    ("", "services", _OWNED_VERBS),
    ("apps", "deployments", _OWNED_VERBS),  # the pooler's; get/patch also on application Deployments (probes)
    ("batch", "cronjobs", _OWNED_VERBS),
    ("policy", "poddisruptionbudgets", _OWNED_VERBS),
    ("monitoring.coreos.com", "servicemonitors", _OWNED_VERBS),
    (naming.GROUP, naming.PLURAL, ("get",)),
    (naming.GROUP, f"{naming.PLURAL}/status", ("patch",)),
]


class KubeError(Exception):
    """An API call failed; carries the HTTP status and the server's message (never a body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class _MemoryDiscoverer(LazyDiscoverer):
    """LazyDiscoverer without its file cache (module docstring): discovery lives in this process."""

    def _write_cache(self) -> None:
        return None


class _TimedDynamicClient(DynamicClient):
    """The dynamic client with a timeout on every request it makes, discovery included: discovery
    passes none, and one unanswered discovery GET (first use, or a kind re-discovered while absent)
    would hold the gateway's lock, and with it every API call of every thread."""

    def __init__(self, client: k8s.ApiClient, timeout: tuple[float, float], **kwargs: Any) -> None:
        self._timeout = timeout  # before super().__init__: the discoverer may call the server there
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]

    def request(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self._timeout)
        return super().request(*args, **kwargs)


def _raw(_client: Any, data: Any) -> Any:
    """The dynamic client's serializer: the parsed JSON as is (plain dicts, no ResourceInstance)."""
    return data


class KubeGateway:
    """Synchronous calls through the official client (kopf runs sync handlers in threads)."""

    def __init__(self, api_client: k8s.ApiClient, monotonic: Callable[[], float] = time.monotonic,
                 timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        self._api = api_client
        # (connect, read) seconds for every call (_TimedDynamicClient): urllib3 waits forever by default.
        self._timeout = timeout
        self._monotonic = monotonic
        self._dynamic: DynamicClient | None = None  # discovery on first use, not at construction
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str], Resource] = {}
        self._missing: dict[tuple[str, str], float] = {}  # kind -> when it was found not served
        self.writes = 0  # API writes made, for the "idle resync writes nothing" check and metrics

    def _resource(self, api_version: str, kind: str) -> Resource | None:
        """The served resource of a kind the operator manages; None when the server does not serve it."""
        key = (api_version, kind)
        if key not in RESOURCES:
            raise KubeError(0, f"the operator does not manage {kind} ({api_version})")
        with self._lock:
            if key in self._resources:
                return self._resources[key]
            if key in self._missing and self._monotonic() - self._missing[key] < MISSING_TTL_SECONDS:
                return None
            try:
                dynamic = self._dynamic = self._dynamic or _call(self._discover)
                found: Resource = _call(lambda: dynamic.resources.get(api_version=api_version, kind=kind))
            except ResourceNotFoundError:
                self._missing[key] = self._monotonic()
                return None
            if found.name != RESOURCES[key]:
                raise KubeError(0, f"the server serves {kind} ({api_version}) as {found.name!r}, "
                                   f"not {RESOURCES[key]!r} as the operator's RBAC grants")
            self._resources[key] = found
            return found

    def _discover(self) -> DynamicClient:
        # A cache path that never exists: nothing is read from (or written to) the temp directory.
        nowhere = Path("/nonexistent") / f"marketplacedb-{uuid.uuid4().hex}.json"
        return _TimedDynamicClient(self._api, self._timeout, cache_file=str(nowhere), discoverer=_MemoryDiscoverer)

    def _served(self, api_version: str, kind: str, name: str) -> Resource:
        resource = self._resource(api_version, kind)
        if resource is None:
            raise KubeError(404, f"cannot write {kind} {name}: resource type not served")
        return resource

    def apply(
        self, obj: dict[str, Any], *, field_manager: str = naming.FIELD_MANAGER, force: bool = True
    ) -> dict[str, Any]:
        """Server-side apply (creates a missing object). force: the operator is the authority for its
        owned objects' fields (callers checked the controller ownerReference first); probes apply without it."""
        meta = obj["metadata"]
        resource = self._served(obj["apiVersion"], obj["kind"], meta["name"])
        self.writes += 1
        result: dict[str, Any] = _call(lambda: resource.server_side_apply(
            body=obj, name=meta["name"], namespace=meta["namespace"], field_manager=field_manager,
            force_conflicts=True if force else None, serializer=_raw))
        return result

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create; KubeError 409 when the name is taken (never a takeover)."""
        meta = obj["metadata"]
        resource = self._served(obj["apiVersion"], obj["kind"], meta["name"])
        self.writes += 1
        created: dict[str, Any] = _call(lambda: resource.create(
            body=obj, namespace=meta["namespace"], field_manager=naming.FIELD_MANAGER, serializer=_raw))
        return created

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replace the status (merge patch on the status subresource; lists are replaced whole)."""
        resource = self._served(naming.API_VERSION, naming.KIND, name)
        self.writes += 1
        _call(lambda: resource.status.patch(body={"status": status}, name=name, namespace=namespace,
                                            content_type="application/merge-patch+json", serializer=_raw))

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        resource = self._resource(api_version, kind)
        if resource is None:
            return None
        found: dict[str, Any] | None = _call(lambda: resource.get(name=name, namespace=namespace, serializer=_raw),
                                             missing=None)
        return found

    def list(self, api_version: str, kind: str, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        resource = self._resource(api_version, kind)
        if resource is None:
            return []
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        result = _call(lambda: resource.get(namespace=namespace, label_selector=label_selector, serializer=_raw),
                       missing=None)
        items: list[dict[str, Any]] = (result or {}).get("items") or []
        return items

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """True when something was deleted; a missing object (or kind) is not an error."""
        resource = self._resource(api_version, kind)
        if resource is None:
            return False
        self.writes += 1
        return _call(lambda: resource.delete(name=name, namespace=namespace, serializer=_raw), missing=None) is not None


_RAISE = object()


def _call(request: Callable[[], Any], missing: Any = _RAISE) -> Any:
    """One request; `missing` on 404 when given, else KubeError with the server's message only (the
    dynamic client's own exception text quotes the whole response body and headers)."""
    try:
        return request()
    except urllib3.exceptions.HTTPError as exc:  # no answer within the timeout (after the client's retries)
        cause = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
        raise KubeError(0, f"no answer from the API server ({type(cause).__name__})") from None
    except DynamicApiError as exc:
        if exc.status == 404 and missing is not _RAISE:
            return missing
        raise KubeError(int(exc.status or 0), _message(exc.body)) from None


def _message(data: bytes | str | None) -> str:
    if not data:
        return ""
    try:
        return str(json.loads(data).get("message", ""))[:500]
    except (ValueError, AttributeError):
        text = data if isinstance(data, str) else data.decode(errors="replace")
        return text[:200]
