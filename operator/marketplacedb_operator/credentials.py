"""The credentials boundary: which Secrets the operator reads, which hosts it connects to.

Whoever may create a MarketplaceDB is trusted with DDL through the role its Secret names, nothing
more (docs/architecture.md#ownership-and-trust). The operator's service account can read every
Secret it needs, so without a rule a MarketplaceDB could name another team's Secret
(`usernameKey: tls.crt`) and a host of its choosing, and receive that Secret's values in a login packet. Hence:

- a Secret is read only when it opts in with the label `marketplacedb.io/credentials: "true"`
  *and* names the MarketplaceDB in its annotation `marketplacedb.io/credentials-for` (both set by
  whoever owns the Secret; see README "Security model"): the label alone says "some MarketplaceDB",
  and whoever may create one in the namespace could pick any name. Otherwise the reconcile stops
  with `SecretNotOptedIn` (the message says exactly what to add) before any connection;
- the user name and password come only from the keys the Secret declares (annotations
  `marketplacedb.io/username-key` / `password-key`, default `username` / `password`): a spec cannot
  send another key (an API token, a private key) to a server as a user name;
- the host must match the operator setting `allowed_database_hosts` (patterns and CIDRs) when set;
- no value read here is ever put into a message: problems name the Secret and its keys only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fnmatch
import ipaddress
import re
from typing import Any

from . import naming
from .api.v1alpha1 import DatabaseSpec, DatabaseTLS, SecretRef
from .ports import ConnInfo, Kube, TLSMaterial
from .settings import Settings
from .specs.db_tls import REQUIRE_AUTH
from .status import Problem

OPT_IN_RULE = (
    f'the operator reads only Secrets labelled {naming.LABEL_CREDENTIALS}="true" and annotated '
    f'{naming.ANN_CREDENTIALS_FOR} with the MarketplaceDB names (README "Security model")'
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


def bound_to(secret: dict[str, Any], resource: str) -> bool:
    """True when the Secret's credentials-for annotation names `resource` (comma-separated names)."""
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    names = str(annotations.get(naming.ANN_CREDENTIALS_FOR) or "")
    return resource in {n.strip() for n in names.split(",")}


def _refused(field: str, namespace: str, name: str, resource: str, secret: dict[str, Any]) -> CredentialsRefused:
    """What exactly the Secret's owner must add (names only, no value)."""
    missing = [] if opted_in(secret) else [f'label {naming.LABEL_CREDENTIALS}: "true"']
    if not bound_to(secret, resource):
        annotations = (secret.get("metadata") or {}).get("annotations") or {}
        listed = str(annotations.get(naming.ANN_CREDENTIALS_FOR) or "").strip()
        value = f"{listed},{resource}" if listed else resource
        missing.append(f'annotation {naming.ANN_CREDENTIALS_FOR}: "{value}"')
    return CredentialsRefused(
        Problem(
            "SecretNotOptedIn",
            f"{field}: Secret {namespace}/{name} is refused for MarketplaceDB {resource}: add the "
            + " and the ".join(missing)
            + f" to the Secret ({OPT_IN_RULE})",
        )
    )


def read_secret(kube: Kube, namespace: str, name: str, field: str, resource: str) -> dict[str, str]:
    """The decoded data of a Secret opted in for the MarketplaceDB `resource`; CredentialsRefused
    otherwise (`field` names the spec field that points at it). Nothing is read from a Secret that
    does not opt in for this very resource."""
    data, _ = _read_secret(kube, namespace, name, field, resource)
    return data


def _read_secret(
    kube: Kube, namespace: str, name: str, field: str, resource: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(decoded data, annotations) of a Secret opted in for `resource`."""
    secret = kube.get("v1", "Secret", namespace, name)
    if secret is None:
        raise CredentialsRefused(Problem("SecretNotFound", f"Secret {namespace}/{name} not found"))
    if not opted_in(secret) or not bound_to(secret, resource):
        raise _refused(field, namespace, name, resource, secret)
    decoded: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            decoded[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, TypeError):
            raise CredentialsRefused(
                Problem("SecretInvalid", f"{field}: Secret {namespace}/{name} key {key!r} is not UTF-8 text")
            ) from None
    decoded.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
    annotations = {str(k): str(v) for k, v in ((secret.get("metadata") or {}).get("annotations") or {}).items()}
    return decoded, annotations


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


def read_credentials(kube: Kube, namespace: str, database: DatabaseSpec, resource: str) -> Credentials:
    return read_ref(kube, namespace, database.credentials_secret_ref, "spec.database.credentialsSecretRef", resource)


def read_ref(kube: Kube, namespace: str, ref: SecretRef, field: str, resource: str) -> Credentials:
    """Credentials from a Secret opted in for `resource` (the owner's, spec.pooler.users[], authQuery).

    The Secret says which keys hold the user name and the password; the spec may only agree, so no
    other key of the Secret (a token, a private key) can be sent to a server as a user name."""
    data, annotations = _read_secret(kube, namespace, ref.name, field, resource)
    for spec_key, annotation, default, spec_field in (
        (ref.username_key, naming.ANN_USERNAME_KEY, "username", "usernameKey"),
        (ref.password_key, naming.ANN_PASSWORD_KEY, "password", "passwordKey"),
    ):
        declared = annotations.get(annotation, default)
        if spec_key != declared:
            raise CredentialsRefused(
                Problem(
                    "SecretNotOptedIn",
                    f"{field}.{spec_field}: Secret {namespace}/{ref.name} declares key {declared!r} for this "
                    f"(annotation {annotation}, default {default!r}); the spec names {spec_key!r}: use "
                    f"{declared!r}, or have the Secret's owner set {annotation}: {spec_key!r}",
                )
            )
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


# Never part of a host name or address: a list separator (libpq takes "a,b" as two hosts), a
# path (a Unix socket directory), user info, or whitespace. Refused here, whatever the model allows.
_HOST_FORBIDDEN = frozenset(",/@\\") | frozenset(" \t\r\n\v\f")
# An IPv4 glob: digits, dots and wildcards only, at least one digit (`10.20.*`). An entry with a
# colon is an IPv6 glob (DNS names have none). Both match IP literals only.
_IPV4_GLOB = re.compile(r"^(?=.*[0-9])[0-9.*?\[\]]+$")


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """`host` matches an entry of the allow-list. Three kinds of entry, never mixed:

    - a CIDR (`10.20.0.0/16`, `fd00::/8`) or a single address matches IP literals in that network;
    - an IP glob (`10.20.*`: digits, dots, colons and wildcards only) matches IP literals only, so
      `10.20.*` never admits the name `10.20.evil.com`;
    - any other entry is a DNS-name glob (`*.db.internal`, case-insensitive) and matches names only,
      never an IP literal.

    A host name is never resolved: the entry is the contract, so DNS cannot slip an address past the
    list. A host holding `,` `/` `@` or whitespace is refused outright (libpq reads `a,b` as two hosts),
    and so is a numeric form that is not a plain IP literal (`127.1`: libc reads it as 127.0.0.1).
    """
    if not host or any(ch in _HOST_FORBIDDEN for ch in host):
        return False
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(literal)
    except ValueError:
        address = None
        last = literal.rstrip(".").rsplit(".", 1)[-1].lower()
        if last.isdigit() or last.startswith("0x"):
            # Not a DNS name (no top-level domain is numeric) but a form libc reads as an address
            # ("127.1", "0x7f.1", "2130706433"): neither a name glob nor a network may judge it.
            return False
    for entry in (e.strip() for e in allowed):
        if not entry:
            continue
        network = _network(entry)
        if network is not None:
            if address is not None and address.version == network.version and address in network:
                return True
        elif ":" in entry or _IPV4_GLOB.match(entry):
            if address is not None and fnmatch.fnmatchcase(str(address), entry.lower()):
                return True
        elif address is None and fnmatch.fnmatchcase(literal.lower(), entry.lower()):
            return True
    return False


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


def read_tls(kube: Kube, namespace: str, tls: DatabaseTLS | None, resource: str) -> TLSMaterial | None:
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
        data = read_secret(kube, namespace, ref.name, field, resource)
        (ca,) = _values(data, [ref.key], namespace, ref.name, field)
    cert = key = None
    if tls.client_cert_secret_ref is not None:
        client = tls.client_cert_secret_ref
        field = "spec.database.tls.clientCertSecretRef"
        data = read_secret(kube, namespace, client.name, field, resource)
        cert, key = _values(data, [client.cert_key, client.key_key], namespace, client.name, field)
    return TLSMaterial(ca=ca, cert=cert, key=key)


def conn_info(kube: Kube, namespace: str, database: DatabaseSpec, settings: Settings, resource: str) -> ConnInfo:
    """Where and as whom the operator connects for the MarketplaceDB `resource`: host checked first,
    then the Secrets opted in for that resource."""
    check_host(database.host, settings)
    found = read_credentials(kube, namespace, database, resource)
    tls = read_tls(kube, namespace, database.tls, resource)
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
    """The require_auth value for `ssl_mode`: the same for all (the sslMode proves nothing about
    whether the host deserves the password; see specs.db_tls.REQUIRE_AUTH)."""
    del ssl_mode
    return REQUIRE_AUTH
