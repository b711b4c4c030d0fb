"""The only user of the Kubernetes client: create, server-side apply, reads, deletes.

Owned objects are created with a plain create (which fails on an existing name: nothing is taken
over by name) and updated by server-side apply with the field manager `marketplacedb-operator`;
probe fields on application Deployments use one field manager per MarketplaceDB and no force, so
a field someone else owns is a conflict, not a takeover
(https://kubernetes.io/docs/reference/using-api/server-side-apply/#conflicts).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from typing import Any

from kubernetes import client as k8s

from .. import naming

log = logging.getLogger(__name__)

# (apiVersion, kind) -> (path prefix, plural). Only the kinds the operator writes or reads;
# RBAC in the chart is generated from RBAC_NEEDS below (see install.py).
RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Secret"): ("/api/v1", "secrets"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("batch/v1", "CronJob"): ("/apis/batch/v1", "cronjobs"),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("/apis/monitoring.coreos.com/v1", "servicemonitors"),
    (naming.API_VERSION, naming.KIND): (f"/apis/{naming.API_VERSION}", naming.PLURAL),
}

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


def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    try:
        prefix, plural = RESOURCES[(api_version, kind)]
    except KeyError:
        raise KubeError(0, f"the operator does not manage {kind} ({api_version})") from None
    path = f"{prefix}/namespaces/{urllib.parse.quote(namespace)}/{plural}"
    return f"{path}/{urllib.parse.quote(name)}" if name else path


class KubeGateway:
    """Synchronous calls through the official client (kopf runs sync handlers in threads)."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self._api = api_client
        self.writes = 0  # API writes made, for the "idle resync writes nothing" check and metrics

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """One request; the parsed JSON body, None on 404, KubeError on other failures."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method_, url, headers_, body_, _ = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        if method != "GET":
            self.writes += 1
        response = self._api.call_api(method_, url, header_params=headers_, body=body_)
        data: bytes = response.read()  # type: ignore[no-untyped-call]
        if response.status == 404:
            return None
        if not 200 <= response.status < 300:
            raise KubeError(response.status, _message(data))
        parsed: dict[str, Any] = json.loads(data) if data else {}
        return parsed

    def apply(
        self, obj: dict[str, Any], *, field_manager: str = naming.FIELD_MANAGER, force: bool = True
    ) -> dict[str, Any]:
        """Server-side apply. force: the operator is the authority for its owned objects' fields
        (callers checked the controller ownerReference first); probes apply without it."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", field_manager)] + ([("force", "true")] if force else [])
        result = self._call("PATCH", path, query=query, body=obj, content_type="application/apply-patch+yaml")
        if result is None:
            # A real API server creates on apply; API emulators answer 404 for a missing
            # object, so create it (same body, same field manager).
            created = self._call(
                "POST",
                _path(obj["apiVersion"], obj["kind"], meta["namespace"]),
                query=[("fieldManager", field_manager)],
                body=obj,
            )
            if created is None:
                raise KubeError(404, f"cannot create {obj['kind']} {meta['name']}: resource type not served")
            result = created
        return result

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create; KubeError 409 when the name is taken (never a takeover)."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], obj["kind"], meta["namespace"])
        created = self._call("POST", path, query=[("fieldManager", naming.FIELD_MANAGER)], body=obj)
        if created is None:
            raise KubeError(404, f"cannot create {obj['kind']} {meta['name']}: resource type not served")
        return created

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replace the status (merge patch on the status subresource; lists are replaced whole)."""
        path = _path(naming.API_VERSION, naming.KIND, namespace, name) + "/status"
        self._call("PATCH", path, body={"status": status}, content_type="application/merge-patch+json")

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call("GET", _path(api_version, kind, namespace, name))

    def list(self, api_version: str, kind: str, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        result = self._call("GET", _path(api_version, kind, namespace), query=[("labelSelector", label_selector)])
        items: list[dict[str, Any]] = (result or {}).get("items", [])
        # Emulators may ignore labelSelector: filter here too (a no-op on a real server).
        return [i for i in items if _matches(i, selector)]

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """True when something was deleted; a missing object is not an error."""
        return self._call("DELETE", _path(api_version, kind, namespace, name)) is not None


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message", ""))[:500]
    except (ValueError, AttributeError):
        return data[:200].decode(errors="replace")
