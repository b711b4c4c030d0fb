"""Every name, label and annotation the operator writes, in one place so nothing churns."""

from __future__ import annotations

import hashlib
import re

GROUP = "marketplacedb.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MarketplaceDB"
PLURAL = "marketplacedbs"
SINGULAR = "marketplacedb"
SHORT_NAMES = ["mdb"]
CRD_NAME = f"{PLURAL}.{GROUP}"
FIELD_MANAGER = "marketplacedb-operator"
APP_NAME = "marketplacedb-operator"

ANNOTATION_PREFIX = GROUP
ANN_CONFIG_HASH = f"{GROUP}/config-hash"
ANN_RESTART_HASH = f"{GROUP}/restart-hash"
ANN_REFRESH_NOW = f"{GROUP}/refresh-now"
ANN_APPROVE_PLAN = f"{GROUP}/approve-plan"
FINALIZER = f"{GROUP}/finalizer"

# Opt-ins of the security model (README "Security model"): the operator reads only Secrets that
# carry LABEL_CREDENTIALS=true, and patches probes only onto Deployments whose ANN_PROBED_BY
# annotation names the MarketplaceDB (comma-separated names).
LABEL_CREDENTIALS = f"{GROUP}/credentials"
# ... and whose ANN_CREDENTIALS_FOR annotation names the MarketplaceDB (comma-separated names); a
# credentials Secret's user name and password are read only from the keys it declares (default
# `username` / `password`), so no other key (a token) can be sent as a user name.
ANN_CREDENTIALS_FOR = f"{GROUP}/credentials-for"
ANN_USERNAME_KEY = f"{GROUP}/username-key"
ANN_PASSWORD_KEY = f"{GROUP}/password-key"
ANN_PROBED_BY = f"{GROUP}/probed-by"
# On a probed Deployment, one annotation per container, `probes.marketplacedb.io/<container>`:
# which MarketplaceDB sets that container's probes (a second one naming it is a Conflict).
PROBE_CLAIM_PREFIX = f"probes.{GROUP}/"

# Schema the operator owns inside the target database (refresh state table).
STATE_SCHEMA = "marketplacedb"
STATE_TABLE = "refresh_state"

# PostgreSQL identifiers: lower-case, unquoted-safe, at most 63 bytes (NAMEDATALEN - 1);
# PostgreSQL silently truncates longer ones, which would make two declared names collide.
IDENTIFIER_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
MAX_IDENTIFIER_BYTES = 63
# Kubernetes object names (RFC 1123 DNS label, which also fits Services).
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


def is_identifier(name: str) -> bool:
    return bool(re.fullmatch(IDENTIFIER_PATTERN, name)) and len(name.encode()) <= MAX_IDENTIFIER_BYTES


def owner_key(namespace: str, name: str) -> str:
    """The owner marker written on database objects this resource created."""
    return f"{namespace}/{name}"


def probe_field_manager(resource: str) -> str:
    """One server-side-apply field manager per MarketplaceDB for the probe fields it owns, so two
    resources never share (and so take over) each other's fields. At most 128 characters."""
    manager = f"{FIELD_MANAGER}/probes/{resource}"
    return manager if len(manager) <= 128 else f"{manager[:117]}-{short_hash(resource)}"


def short_hash(*parts: str, length: int = 10) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return digest[:length]


def _dns_name(*parts: str, max_len: int = 63) -> str:
    """Join parts into a DNS label; when too long, cut and append a hash so names stay unique."""
    raw = "-".join(parts).replace("_", "-").lower()
    raw = re.sub(r"[^a-z0-9-]", "-", raw).strip("-")
    if len(raw) <= max_len:
        return raw
    suffix = short_hash(raw, length=8)
    return f"{raw[: max_len - 9].rstrip('-')}-{suffix}"


def pooler_name(resource: str) -> str:
    return _dns_name(resource, "pooler")


def pooler_auth_secret_name(resource: str) -> str:
    return _dns_name(resource, "pooler", "auth")


def refresh_cronjob_name(resource: str, view: str) -> str:
    # CronJob names are limited to 52 characters (the controller appends an 11-character suffix).
    return _dns_name(resource, "refresh", view, max_len=52)


def temp_object_name(name: str, purpose: str) -> str:
    """A temporary database identifier for a rebuild (`<name>__new`), kept within 63 bytes."""
    suffix = f"__{purpose}"
    if len(name) + len(suffix) <= MAX_IDENTIFIER_BYTES:
        return name + suffix
    return f"{name[: MAX_IDENTIFIER_BYTES - len(suffix) - 9]}_{short_hash(name, length=8)}{suffix}"


def labels(resource: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/instance": resource,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "marketplacedb",
        "app.kubernetes.io/managed-by": APP_NAME,
    }


def selector_labels(resource: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": resource, "app.kubernetes.io/component": component}
