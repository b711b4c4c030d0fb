"""The credentials boundary: which Secrets the operator reads, which hosts it connects to.

Whoever may create a MarketplaceDB is trusted with DDL through the role its Secret names, nothing
more (DESIGN.md 4a). The operator's service account can read every Secret it needs, so without a
rule a MarketplaceDB could name another team's Secret (`usernameKey: tls.crt`) and a host of its
choosing, and receive that Secret's values in a login packet. Hence:

- a Secret is read only when it opts in with the label `marketplacedb.io/credentials: "true"`
  (set by whoever owns the Secret; see README "Security model"); otherwise the reconcile stops with
  `SecretNotOptedIn` before any connection is attempted;
- the host must match the operator setting `allowed_database_hosts` (patterns and CIDRs) when set;
- no value read here is ever put into a message: problems name the Secret and its keys only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fnmatch
import ipaddress
from typing import Any

from . import naming
from .api.v1alpha1 import DatabaseSpec, DatabaseTLS
from .ports import ConnInfo, Kube, TLSMaterial
from .settings import Settings
from .status import Problem

OPT_IN_RULE = (
    f'the operator reads only Secrets labelled {naming.LABEL_CREDENTIALS}="true" '
    '(README "Security model")'
)


# Reasons that mean "this spec's Secrets or host are not usable": nothing that references them
# (refresh CronJob pods mount them by reference) may be created either.
REFUSALS = frozenset(
    {"SecretNotFound", "SecretNotOptedIn", "SecretInvalid", "HostNotAllowed", "TLSConfigNotFound", "TLSConfigInvalid"}
)


class CredentialsRefused(Exception):
    """The reconcile may not use this Secret or host; carries the Problem to report (no value)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Credentials:
    user: str = dataclasses.field(repr=False)
    password: str = dataclasses.field(repr=False)


def opted_in(secret: dict[str, Any]) -> bool:
    labels = (secret.get("metadata") or {}).get("labels") or {}
    return labels.get(naming.LABEL_CREDENTIALS) == "true"


def read_secret(kube: Kube, namespace: str, name: str, field: str) -> dict[str, str]:
    """The decoded data of an opted-in Secret; CredentialsRefused otherwise (`field` names the spec
    field that points at it). Nothing is read from a Secret that does not opt in."""
    secret = kube.get("v1", "Secret", namespace, name)
    if secret is None:
        raise CredentialsRefused(Problem("SecretNotFound", f"Secret {namespace}/{name} not found"))
    if not opted_in(secret):
        raise CredentialsRefused(
            Problem("SecretNotOptedIn", f"{field}: Secret {namespace}/{name} is refused: {OPT_IN_RULE}")
        )
    decoded: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            decoded[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, TypeError):
            raise CredentialsRefused(
                Problem("SecretInvalid", f"{field}: Secret {namespace}/{name} key {key!r} is not UTF-8 text")
            ) from None
    decoded.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
    return decoded


def _values(data: dict[str, str], keys: list[str], namespace: str, name: str, field: str) -> list[str]:
    missing = [key for key in keys if not data.get(key)]
    if missing:
        raise CredentialsRefused(
            Problem("SecretInvalid", f"{field}: Secret {namespace}/{name} has no (or empty) key(s) {missing}")
        )
    bad = [key for key in keys if "\x00" in data[key]]
    if bad:
        raise CredentialsRefused(Problem("SecretInvalid", f"{field}: Secret {namespace}/{name} key(s) {bad} hold NUL"))
    return [data[key] for key in keys]


def read_credentials(kube: Kube, namespace: str, database: DatabaseSpec) -> Credentials:
    ref = database.credentials_secret_ref
    field = "spec.database.credentialsSecretRef"
    data = read_secret(kube, namespace, ref.name, field)
    user, password = _values(data, [ref.username_key, ref.password_key], namespace, ref.name, field)
    return Credentials(user=user, password=password)


def check_host(host: str, settings: Settings) -> None:
    """CredentialsRefused(HostNotAllowed) when allowed_database_hosts is set and `host` matches none."""
    allowed = settings.allowed_database_hosts
    if not allowed or host_allowed(host, allowed):
        return
    raise CredentialsRefused(
        Problem(
            "HostNotAllowed",
            f"spec.database.host {host!r} is not in the operator's allowed database hosts "
            f"(setting MARKETPLACEDB_ALLOWED_DATABASE_HOSTS: {', '.join(allowed)})",
        )
    )


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """A host name matches a pattern (case-insensitive fnmatch); an IP literal matches a network.

    A host name is never resolved here: the pattern is the contract (a CIDR entry matches IP
    literals only), so DNS cannot be used to slip an address past the list.
    """
    literal = host.strip("[]")
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        address = None
    for entry in allowed:
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass  # a name pattern: compared as text below
        if "/" not in entry and fnmatch.fnmatchcase(literal.lower(), entry.lower()):
            return True
    return False


def read_tls(kube: Kube, namespace: str, tls: DatabaseTLS | None) -> TLSMaterial | None:
    """The CA (from a ConfigMap or an opted-in Secret) and the optional client certificate."""
    if tls is None:
        return None
    ca = None
    if tls.ca_config_map_ref is not None:
        ref = tls.ca_config_map_ref
        config_map = kube.get("v1", "ConfigMap", namespace, ref.name)
        if config_map is None:
            raise CredentialsRefused(Problem("TLSConfigNotFound", f"ConfigMap {namespace}/{ref.name} not found"))
        ca = str((config_map.get("data") or {}).get(ref.key) or "")
        if not ca:
            raise CredentialsRefused(
                Problem("TLSConfigInvalid", f"ConfigMap {namespace}/{ref.name} has no (or empty) key {ref.key!r}")
            )
    elif tls.ca_secret_ref is not None:
        ref = tls.ca_secret_ref
        field = "spec.database.tls.caSecretRef"
        (ca,) = _values(read_secret(kube, namespace, ref.name, field), [ref.key], namespace, ref.name, field)
    cert = key = None
    if tls.client_cert_secret_ref is not None:
        client = tls.client_cert_secret_ref
        field = "spec.database.tls.clientCertSecretRef"
        data = read_secret(kube, namespace, client.name, field)
        cert, key = _values(data, [client.cert_key, client.key_key], namespace, client.name, field)
    return TLSMaterial(ca=ca, cert=cert, key=key)


def conn_info(kube: Kube, namespace: str, database: DatabaseSpec, settings: Settings) -> ConnInfo:
    """Where and as whom the operator connects: host checked first, then the opted-in Secrets."""
    check_host(database.host, settings)
    found = read_credentials(kube, namespace, database)
    tls = read_tls(kube, namespace, database.tls)
    verify = database.ssl_mode in ("verify-ca", "verify-full")
    return ConnInfo(
        host=database.host,
        port=database.port,
        dbname=database.dbname,
        user=found.user,
        password=found.password,
        sslmode=database.ssl_mode,
        connect_timeout=int(settings.connect_timeout_seconds),
        tls=tls,
        # Verification without a given CA: the system CA store (libpq >= 16), never ~/.postgresql.
        sslrootcert="system" if verify and (tls is None or not tls.ca) else "",
        require_auth=require_auth(database.ssl_mode),
    )


def require_auth(ssl_mode: str) -> str:
    """Never hand a cleartext password to a server whose identity TLS did not prove: a host that
    asks for one (AuthenticationCleartextPassword) is refused by libpq before the password leaves
    (https://www.postgresql.org/docs/16/libpq-connect.html#LIBPQ-CONNECT-REQUIRE-AUTH). SCRAM and
    md5 never send the password itself."""
    return "" if ssl_mode == "verify-full" else "!password"
