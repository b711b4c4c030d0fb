"""spec.database.tls as pod parts: one projected volume and libpq's environment variables.

The CA (from a ConfigMap or a Secret) and the optional client certificate are projected into one
read-only directory. The files are owned by root and the pod's fsGroup with mode 0440: libpq
accepts a key file owned by root with at most u=rw,g=r
(https://www.postgresql.org/docs/15/libpq-ssl.html#LIBPQ-SSL-CLIENTCERT), and the non-root
container reads it through its group. Without a CA, verify-ca/verify-full use the system store.
"""

from __future__ import annotations

from typing import Any

from ..api.v1alpha1 import DatabaseSpec

VOLUME = "db-tls"
MOUNT_PATH = "/etc/marketplacedb/db-tls"
CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
FILE_MODE = 0o440

# libpq's require_auth for every connection the operator and its refresh pods make
# (https://www.postgresql.org/docs/16/libpq-connect.html#LIBPQ-CONNECT-REQUIRE-AUTH): SCRAM, or no
# password exchange at all (client-certificate or trust logins). A server that asks for a cleartext
# password or an md5 hash is refused before anything derived from the password leaves, whatever the
# sslMode: verify-full only proves the host matches a CA the MarketplaceDB's author chose (a
# ConfigMap anyone in the namespace may create), and an md5 response is password-equivalent and
# cracked offline. A role whose password is stored as md5 must be reset under password_encryption =
# scram-sha-256 (PostgreSQL's default since 14); the refusal is reported as AuthenticationFailed
# saying so. SCRAM still hands a server its proof: only a strong password keeps that uncrackable.
REQUIRE_AUTH = "scram-sha-256,none"


def _sources(database: DatabaseSpec) -> list[dict[str, Any]]:
    tls = database.tls
    if tls is None:
        return []
    sources: list[dict[str, Any]] = []
    if tls.ca_config_map_ref is not None:
        ref = tls.ca_config_map_ref
        sources.append({"configMap": {"name": ref.name, "items": [{"key": ref.key, "path": CA_FILE}]}})
    elif tls.ca_secret_ref is not None:
        ref = tls.ca_secret_ref
        sources.append({"secret": {"name": ref.name, "items": [{"key": ref.key, "path": CA_FILE}]}})
    client = tls.client_cert_secret_ref
    if client is not None:
        items = [{"key": client.cert_key, "path": CERT_FILE}, {"key": client.key_key, "path": KEY_FILE}]
        sources.append({"secret": {"name": client.name, "items": items}})
    return sources


def volumes(database: DatabaseSpec) -> list[dict[str, Any]]:
    sources = _sources(database)
    if not sources:
        return []
    return [{"name": VOLUME, "projected": {"defaultMode": FILE_MODE, "sources": sources}}]


def volume_mounts(database: DatabaseSpec) -> list[dict[str, Any]]:
    return [{"name": VOLUME, "mountPath": MOUNT_PATH, "readOnly": True}] if _sources(database) else []


def env(database: DatabaseSpec) -> list[dict[str, Any]]:
    """PGSSLROOTCERT / PGSSLCERT / PGSSLKEY for libpq (paths only: the contents stay in the volume)."""
    tls = database.tls
    has_ca = tls is not None and (tls.ca_config_map_ref is not None or tls.ca_secret_ref is not None)
    out: list[dict[str, Any]] = []
    if has_ca:
        out.append({"name": "PGSSLROOTCERT", "value": f"{MOUNT_PATH}/{CA_FILE}"})
    elif database.ssl_mode in ("verify-ca", "verify-full"):
        out.append({"name": "PGSSLROOTCERT", "value": "system"})
    if tls is not None and tls.client_cert_secret_ref is not None:
        out.append({"name": "PGSSLCERT", "value": f"{MOUNT_PATH}/{CERT_FILE}"})
        out.append({"name": "PGSSLKEY", "value": f"{MOUNT_PATH}/{KEY_FILE}"})
    # As the operator (whatever the sslMode): SCRAM or no password at all (see REQUIRE_AUTH).
    out.append({"name": "PGREQUIREAUTH", "value": REQUIRE_AUTH})
    return out

