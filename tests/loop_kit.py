"""Bodies shared by the control-loop tests (kopf in-process on KMock, tests/test_loop_*.py): a
MarketplaceDB reaching a test database and its credentials Secret, one builder each.

The harness (tests/harness/) does not import the operator package; these need its naming
constants, so they live beside the tests.
"""

from __future__ import annotations

from typing import Any

from harness.kube import KubeObjects
from marketplacedb_operator import naming

API = "marketplacedb.io/v1alpha1"


def resource(name: str, namespace: str, db: Any, *, database: dict[str, Any] | None = None,
             **spec: Any) -> dict[str, Any]:
    """A MarketplaceDB on `db` (sslMode disable, credentials in Secret `<name>-owner`, no pooler);
    `database` adds to the database block, `spec` to the spec (ddl, indexes, ...)."""
    return {
        "apiVersion": API,
        "kind": "MarketplaceDB",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "database": {"host": db.server.host, "port": db.server.port, "dbname": db.name, "sslMode": "disable",
                         "credentialsSecretRef": {"name": f"{name}-owner"}, **(database or {})},
            **spec,
            "pooler": {"enabled": False},
        },
    }


def credentials_secret(name: str, namespace: str, username: str, password: str) -> dict[str, Any]:
    """Secret `<name>-owner`, labelled and annotated as the credentials of resource `name`."""
    return {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": f"{name}-owner", "namespace": namespace, "labels": {naming.LABEL_CREDENTIALS: "true"},
                     "annotations": {naming.ANN_CREDENTIALS_FOR: name}},
        "stringData": {"username": username, "password": password},
    }


def get(objects: KubeObjects, name: str, namespace: str) -> dict[str, Any]:
    """The MarketplaceDB as stored ({} when there is none)."""
    return dict(objects.get(API, "MarketplaceDB", name, namespace) or {})
