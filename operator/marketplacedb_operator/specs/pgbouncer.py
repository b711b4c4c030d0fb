"""PgBouncer configuration: `pgbouncer.ini`, the auth file, change classification and hashes.

Pure: from the spec, the budget (specs/pooler_sizing.py) and the credentials to text. The text is
deterministic (sections and keys sorted) so that an unchanged spec never rolls or reloads pods.

Reference: https://www.pgbouncer.org/config.html (1.18, Debian 12's, which the tests run).
"""

from __future__ import annotations

import configparser
import dataclasses
import re
from collections.abc import Iterable
from typing import Literal

from ..api.parameters import PGBOUNCER_PARAMETERS, check_pooler_parameters
from ..api.v1alpha1 import MarketplaceDBSpec, PoolerBudget
from . import db_tls
from .meta import content_hash
from .pooler_auth import ADMIN_USER as ADMIN_USER
from .pooler_auth import PoolerConfigError as PoolerConfigError
from .pooler_auth import PoolerCredentials as PoolerCredentials
from .pooler_auth import auth_query
from .pooler_auth import choose_credentials as choose_credentials
from .pooler_auth import derived_salt as derived_salt
from .pooler_auth import is_scram_verifier as is_scram_verifier
from .pooler_auth import parse_verifier as parse_verifier
from .pooler_auth import render_userlist as render_userlist
from .pooler_auth import scram_verifier as scram_verifier
from .pooler_auth import verifier_matches as verifier_matches

PORT = 5432
RUN_DIR = "/var/run/pgbouncer"  # the admin Unix socket, shared with the agent (emptyDir)
CONFIG_DIR = "/etc/pgbouncer/config"  # ConfigMap volume (never subPath: kubelet updates it in place)
AUTH_DIR = "/etc/pgbouncer/auth"  # Secret volume
TLS_DIR = "/etc/pgbouncer/tls"  # the client TLS Secret (kubernetes.io/tls), a whole volume too
INI_KEY = "pgbouncer.ini"
AUTH_KEY = "userlist.txt"
PAUSED_KEY = "paused"  # "true"/"false" in the ConfigMap: the agent issues PAUSE/RESUME on change
INI_PATH = f"{CONFIG_DIR}/{INI_KEY}"
AUTH_PATH = f"{AUTH_DIR}/{AUTH_KEY}"
PAUSED_PATH = f"{CONFIG_DIR}/{PAUSED_KEY}"
TLS_CERT_PATH = f"{TLS_DIR}/tls.crt"
TLS_KEY_PATH = f"{TLS_DIR}/tls.key"
# Debian's CA bundle (the default image is Debian-based) for verify-ca/verify-full upstream TLS.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# JDBC sends extra_float_digits; some drivers and tools send `options`. Listing `options` also
# keeps 1.20.0-1.26.0 clear of CVE-2026-107349 (an empty option name such as `-c=` made
# PgBouncer spin forever when ignore_startup_parameters was non-empty but lacked `options`;
# https://www.cve.org/CVERecord?id=CVE-2026-107349, fixed in 1.26.1).
IGNORE_STARTUP_PARAMETERS = "extra_float_digits,options"

# Read only at start-up (a RELOAD does not apply them): a change rolls the pods.
STARTUP_KEYS = frozenset(
    {"listen_addr", "listen_port", "unix_socket_dir", "unix_socket_mode", "unix_socket_group", "user", "pidfile"}
    | {name for name, param in PGBOUNCER_PARAMETERS.items() if not param.reload_safe}
)
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:*/\-\[\]]*$")
# Allow-listed parameter values are typed already; some (server_reset_query) hold single spaces.
_SAFE_WORDS = re.compile(r"^[A-Za-z0-9_.,:*/\-\[\]]+( [A-Za-z0-9_.,:*/\-\[\]]+)*$|^$")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from `PgBouncer 1.18.0` or an image tag such as `1.25.2-trixie`."""
    match = re.search(r"(?<![0-9])([0-9]+)\.([0-9]+)(?:\.([0-9]+))?", text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def image_version(image: str) -> tuple[int, int, int] | None:
    """The PgBouncer release an image tag names (`...:1.25.2`, `...:1.25.1-trixie@sha256:...`)."""
    name = image.split("@", 1)[0]
    tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
    return parse_version(tag) if tag else None


def unsupported_parameters(keys: Iterable[str], version: tuple[int, ...]) -> list[str]:
    """Allow-listed keys introduced after `version` (that PgBouncer ignores them with a log line)."""
    return sorted(k for k in keys if k in PGBOUNCER_PARAMETERS and PGBOUNCER_PARAMETERS[k].since > version[:2])


# --- pgbouncer.ini ----------------------------------------------------------------------------


def checked_parameters(spec: MarketplaceDBSpec) -> dict[str, str]:
    """`spec.pooler.parameters` checked again (defence in depth: a model may be built unvalidated)."""
    try:
        return check_pooler_parameters(spec.pooler.parameters)
    except ValueError as exc:  # "<name>: why"
        raise PoolerConfigError(f"spec.pooler.parameters.{exc}") from None


def _safe(value: str, field: str, pattern: re.Pattern[str] = _SAFE_VALUE) -> str:
    if not pattern.fullmatch(value):
        raise PoolerConfigError(f"{field}: {value!r} holds characters not allowed in pgbouncer.ini")
    return value


def pgbouncer_section(spec: MarketplaceDBSpec, budget: PoolerBudget) -> dict[str, str]:
    """The [pgbouncer] settings. Explicit fields win over `parameters` (pool_mode cannot be overridden)."""
    pooler, database = spec.pooler, spec.database
    settings = {k: _safe(v, f"spec.pooler.parameters.{k}", _SAFE_WORDS) for k, v in checked_parameters(spec).items()}
    settings.update({
        # The budget already honours explicit reserve_pool_size / max_db_connections parameters.
        # max_db_connections is per database across all users: it caps the sum of their pools.
        "max_db_connections": str(budget.max_db_connections),
        "reserve_pool_size": str(budget.reserve_pool_size),
        # No admin_users/stats_users (left at their empty default, and not settable through
        # parameters): the console is reachable only as `pgbouncer` over the Unix socket by a
        # process with PgBouncer's own uid (the agent sidecar).
        "auth_file": AUTH_PATH,
        # SCRAM towards clients whatever the auth file holds (a verifier or a password).
        "auth_type": "scram-sha-256",
        "default_pool_size": str(budget.pool_size),
        "ignore_startup_parameters": IGNORE_STARTUP_PARAMETERS,
        "listen_addr": "*",
        "listen_port": str(PORT),
        "max_client_conn": str(pooler.max_client_conn),
        "pool_mode": pooler.pool_mode,
        "server_tls_sslmode": database.ssl_mode,
        "unix_socket_dir": RUN_DIR,
        "unix_socket_mode": "0700",
    })
    settings.update(server_tls(spec))
    if pooler.tls is not None:
        # Files of the mounted kubernetes.io/tls Secret; kubelet swaps them on rotation and the
        # agent's RELOAD makes new handshakes use them (established sessions keep theirs).
        settings.update({
            "client_tls_sslmode": pooler.tls.ssl_mode,
            "client_tls_cert_file": TLS_CERT_PATH,
            "client_tls_key_file": TLS_KEY_PATH,
        })
    checked = {key: _safe(value, f"pooler setting {key}", _SAFE_WORDS) for key, value in settings.items()}
    if pooler.auth_query is not None:
        # auth_user is read from its Secret by the operator and listed in the auth file; the name
        # goes here quoted-free, so it must be a plain identifier (checked by the caller too).
        checked["auth_query"] = auth_query(pooler.auth_query.function)
    return checked


def server_tls(spec: MarketplaceDBSpec) -> dict[str, str]:
    """Upstream TLS files from spec.database.tls, mounted by specs/db_tls.py as for the refresh pods:
    the CA that verifies the server (else the image's system bundle for verify-*) and the optional
    client certificate PgBouncer presents to PostgreSQL."""
    database, settings = spec.database, {}
    tls = database.tls
    if tls is not None and (tls.ca_config_map_ref is not None or tls.ca_secret_ref is not None):
        settings["server_tls_ca_file"] = f"{db_tls.MOUNT_PATH}/{db_tls.CA_FILE}"
    elif database.ssl_mode in ("verify-ca", "verify-full"):
        settings["server_tls_ca_file"] = CA_BUNDLE
    if tls is not None and tls.client_cert_secret_ref is not None:
        settings["server_tls_cert_file"] = f"{db_tls.MOUNT_PATH}/{db_tls.CERT_FILE}"
        settings["server_tls_key_file"] = f"{db_tls.MOUNT_PATH}/{db_tls.KEY_FILE}"
    return settings


def with_auth_user(section: dict[str, str], auth_user: str | None) -> dict[str, str]:
    """[pgbouncer] plus `auth_user` (a user name from a Secret: checked, never echoed in errors)."""
    if auth_user is None:
        return section
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,63}", auth_user):
        raise PoolerConfigError("spec.pooler.authQuery.credentialsSecretRef: the user name must be a plain "
                                "role name (letters, digits, _ . -) to be written into pgbouncer.ini")
    return {**section, "auth_user": auth_user}


def databases_section(spec: MarketplaceDBSpec) -> dict[str, str]:
    """[databases]: only the resource's database (no `*` fallback that would reach other databases)."""
    db = spec.database
    host = _safe(db.host, "spec.database.host")
    name = _safe(db.dbname, "spec.database.dbname")
    return {name: f"host={host} port={db.port} dbname={name}"}


def render_ini(spec: MarketplaceDBSpec, budget: PoolerBudget, auth_user: str | None = None,
               version: tuple[int, ...] | None = None) -> str:
    """`pgbouncer.ini`, deterministic: sections and keys sorted, one `key = value` per line.

    `version`: the image's PgBouncer release when its tag names one. Parameters newer than it are
    left out: PgBouncer refuses to start on a key it does not know (1.18 verified: "unknown
    parameter ... FATAL cannot load config file"), so rendering them would crash-loop every pod;
    they are reported in status instead (unsupported_parameters).
    """
    lines = ["; Rendered by marketplacedb-operator; edits are overwritten.", "[databases]"]
    lines += [f"{key} = {value}" for key, value in sorted(databases_section(spec).items())]
    lines += ["", "[pgbouncer]"]
    section = with_auth_user(pgbouncer_section(spec, budget), auth_user)
    if version is not None:
        for key in unsupported_parameters(section, version):
            del section[key]
    lines += [f"{key} = {value}" for key, value in sorted(section.items())]
    return "\n".join(lines) + "\n"


def parse_ini(text: str) -> dict[str, dict[str, str]]:
    """{section: {key: value}} of a pgbouncer.ini (for comparison, not for rewriting)."""
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=(";", "#"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep database names' case
    parser.read_string(text)
    return {section: dict(parser.items(section)) for section in parser.sections()}


# --- changes and hashes -----------------------------------------------------------------------

Change = Literal["none", "reload", "restart"]


@dataclasses.dataclass(frozen=True)
class PoolerConfig:
    """What a pooler pod runs: the ini, the auth file and the PgBouncer image."""

    ini: str
    userlist: str = dataclasses.field(repr=False)
    image: str
    paused: bool = False


def changed_keys(old_ini: str, new_ini: str) -> dict[str, Literal["reload", "restart"]]:
    """`section.key` -> how the change reaches running pods (the plan shows this)."""
    old, new = parse_ini(old_ini), parse_ini(new_ini)
    result: dict[str, Literal["reload", "restart"]] = {}
    for section in sorted(set(old) | set(new)):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                restart = section == "pgbouncer" and key in STARTUP_KEYS
                result[f"{section}.{key}"] = "restart" if restart else "reload"
    return result


def classify_change(old: PoolerConfig, new: PoolerConfig) -> Change:
    """none, reload (RELOAD on the admin socket, no pod restart) or restart (rolled by the restart hash)."""
    if old.image != new.image:
        return "restart"
    kinds = set(changed_keys(old.ini, new.ini).values())
    if "restart" in kinds:
        return "restart"
    if kinds or old.userlist != new.userlist or old.paused != new.paused:
        return "reload"  # (paused: the agent's PAUSE/RESUME, no restart)
    return "none"


def config_hash(config: PoolerConfig) -> str:
    """Everything but the credentials: status and annotations carry nothing derived from a secret
    (a fast hash of a password is an offline guessing oracle). Credential changes reach pods
    through the mounted Secret and the agent's RELOAD all the same."""
    paused = {"paused": True} if config.paused else {}  # absent when false: old hashes stay valid
    return content_hash({"ini": config.ini, "image": config.image, **paused})


def restart_hash(config: PoolerConfig) -> str:
    """Only the inputs a RELOAD cannot apply; on the pod template (naming.ANN_RESTART_HASH)."""
    startup = {k: v for k, v in parse_ini(config.ini).get("pgbouncer", {}).items() if k in STARTUP_KEYS}
    return content_hash({"image": config.image, "startup": startup})
