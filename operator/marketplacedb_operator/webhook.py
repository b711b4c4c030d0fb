"""The validating admission webhook: the models' verdict, served by the operator (opt-in).

The CRD's schema and CEL rules catch what they can express (identifiers, enums, allow-listed
names, ports, unique names); what they cannot (PostgreSQL's grammar for view queries and index
predicates, typed pooler parameters, setting values checked against PostgreSQL's bounds) is
checked here, with the very validators reconcile() uses, so `kubectl apply` and a GitOps sync
fail at once instead of showing InvalidSpec later.

kopf serves it (`kopf.on.validate`, wired in handlers.py, the only kopf importer) over HTTPS
with the certificate mounted from a Secret (cert-manager's or your own). It is off unless
MARKETPLACEDB_WEBHOOK_PORT is set: the chart's `webhook.enabled`. The chart registers it with
failurePolicy Ignore and a 5 s timeout, scoped to MarketplaceDB only (docs/install.md): a
down operator never blocks any write, and the CRD's rules and reconcile()'s InvalidSpec
still stand behind it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .api.errors import format_errors
from .api.v1alpha1 import MarketplaceDB
from .settings import Settings

# The handler id: kopf serves it at https://<host>:<port>/<id>; the chart's
# ValidatingWebhookConfiguration points there.
HANDLER_ID = "validate-marketplacedb"
# An AdmissionReview message is shown to the user by kubectl; keep it readable.
MAX_PROBLEMS = 10


def enabled(settings: Settings) -> bool:
    return settings.webhook_port > 0


def verdict(body: dict[str, Any], old: dict[str, Any] | None = None) -> str | None:
    """None when the resource is acceptable, else one message naming each bad field.

    An update that leaves the spec as it was is let through (finalizer removal, annotations,
    a resource stored before the webhook was enabled): refusing it would wedge a deletion.
    """
    if old is not None and old.get("spec") == body.get("spec"):
        return None
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    if not isinstance(body.get("spec"), dict):
        return "spec: Field required"
    try:
        # The status is the operator's (and the status subresource's), never the author's.
        MarketplaceDB.model_validate({key: value for key, value in body.items() if key != "status"})
    except ValidationError as exc:
        lines = format_errors(exc)
        more = f" (and {len(lines) - MAX_PROBLEMS} more)" if len(lines) > MAX_PROBLEMS else ""
        return "; ".join(lines[:MAX_PROBLEMS]) + more
    return None


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for kopf.WebhookServer: HTTPS with the mounted certificate, never a
    self-generated one (the API server must trust it: cert-manager's CA or the one you gave)."""
    return {
        "addr": settings.webhook_addr,
        "port": settings.webhook_port,
        "certfile": settings.webhook_certfile,
        "pkeyfile": settings.webhook_keyfile,
    }
