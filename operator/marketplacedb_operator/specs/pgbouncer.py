"""PgBouncer configuration: `pgbouncer.ini`, the auth file, change classification and hashes.

Pure: from the spec, the budget (specs/pooler_sizing.py) and the credentials to text. The text is
deterministic (sections and keys sorted) so that an unchanged spec never rolls or reloads pods.

Reference: https://www.pgbouncer.org/config.html (1.18, Debian 12's, which the tests run).
"""

from __future__ import annotations

import base64
import configparser
import dataclasses
import hashlib
import hmac
import re
import stringprep
import unicodedata
from typing import Literal

from ..api.parameters import PGBOUNCER_PARAMETERS, check_named
from ..api.v1alpha1 import MarketplaceDBSpec, PoolerBudget
from .meta import content_hash

PORT = 5432
RUN_DIR = "/var/run/pgbouncer"  # the admin Unix socket, shared with the agent and exporter (emptyDir)
CONFIG_DIR = "/etc/pgbouncer/config"  # ConfigMap volume (never subPath: kubelet updates it in place)
AUTH_DIR = "/etc/pgbouncer/auth"  # Secret volume
INI_KEY = "pgbouncer.ini"
AUTH_KEY = "userlist.txt"
INI_PATH = f"{CONFIG_DIR}/{INI_KEY}"
AUTH_PATH = f"{AUTH_DIR}/{AUTH_KEY}"
# Debian's CA bundle (the default image is Debian-based) for verify-ca/verify-full upstream TLS.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# JDBC sends extra_float_digits; some drivers and tools send `options`. Listing `options` also
# keeps 1.20-1.26.0 out of CVE-2026-107349 (a `-c=` option loops forever unless `options` is
# ignored). https://www.pgbouncer.org/config.html#ignore_startup_parameters
IGNORE_STARTUP_PARAMETERS = "extra_float_digits,options"
# The name PgBouncer admits to the admin console without a password on its Unix socket when the
# peer has the same uid: it must not also be a database user in the auth file.
ADMIN_USER = "pgbouncer"

# Read only at start-up (a RELOAD does not apply them): a change rolls the pods.
STARTUP_KEYS = frozenset(
    {"listen_addr", "listen_port", "unix_socket_dir", "unix_socket_mode", "unix_socket_group", "user", "pidfile"}
    | {name for name, param in PGBOUNCER_PARAMETERS.items() if not param.reload_safe}
)
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:*/\-\[\]]*$")


class PoolerConfigError(ValueError):
    """A pooler setting that cannot be rendered; the message names the field."""


# --- credentials ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PoolerCredentials:
    """The auth-file entry: a SCRAM verifier when one can be used, else the password (Secret only)."""

    username: str
    secret: str = dataclasses.field(repr=False)

    @property
    def kind(self) -> Literal["scram-verifier", "password"]:
        return "scram-verifier" if is_scram_verifier(self.secret) else "password"


def is_scram_verifier(text: str) -> bool:
    return parse_verifier(text) is not None


def parse_verifier(text: str) -> tuple[int, bytes, bytes, bytes] | None:
    """(iterations, salt, stored_key, server_key) of `SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>`."""
    match = re.fullmatch(r"SCRAM-SHA-256\$([0-9]+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)", text)
    if match is None:
        return None
    try:
        salt, stored, server = (base64.b64decode(match.group(i), validate=True) for i in (2, 3, 4))
    except ValueError:
        return None
    return int(match.group(1)), salt, stored, server


def _saslprep(password: str) -> bytes:
    """RFC 4013 SASLprep as PostgreSQL applies it; like PostgreSQL, fall back to the raw bytes."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in password if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    prohibited = (stringprep.in_table_c21_c22, stringprep.in_table_c3, stringprep.in_table_c4,
                  stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7,
                  stringprep.in_table_c8, stringprep.in_table_c9, stringprep.in_table_a1)
    if not normalized or any(check(ch) for ch in normalized for check in prohibited):
        return password.encode()
    return normalized.encode()


def scram_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL would store for `password` with this salt (RFC 5802/7677)."""
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def verifier_matches(verifier: str, password: str) -> bool:
    """True when `verifier` was computed from `password` (so the Secret and the server agree)."""
    parsed = parse_verifier(verifier)
    if parsed is None:
        return False
    iterations, salt, _stored, _server = parsed
    return hmac.compare_digest(scram_verifier(password, salt, iterations), verifier)


def derived_salt(password: str, *context: str) -> bytes:
    """A salt that is stable for (password, context), so a computed verifier does not churn.

    Keyed by the password: guessing still costs one PBKDF2 per guess and per context, as with a
    random salt; the context (namespace/name/user) prevents one table for every deployment.
    """
    message = "\x00".join(("marketplacedb-scram-salt", *context)).encode()
    return hmac.new(password.encode(), message, "sha256").digest()[:16]


def choose_credentials(username: str, password: str, server_verifier: str | None) -> PoolerCredentials:
    """The auth-file secret: the server's own verifier when readable and current, else the password.

    PgBouncer (1.18 verified in tests/test_pgbouncer_real.py) logs in to a SCRAM server with a
    verifier only if it is *identical* to the server's (it replays the client's SCRAM keys, which
    depend on salt and iterations); a verifier with another salt fails the server login. Without
    superuser the server's verifier cannot be read (pg_authid), so the password is used, in a
    Secret only. The other route, computing a verifier with `derived_salt` and storing it on the
    role (gateways/postgres/server.set_own_verifier), is tested too but changes the role, so it is
    left to an explicit choice.
    """
    if server_verifier is not None and verifier_matches(server_verifier, password):
        return PoolerCredentials(username, server_verifier)
    return PoolerCredentials(username, password)


def _auth_quote(value: str, field: str) -> str:
    # https://www.pgbouncer.org/config.html#authentication-file-format: "..." with "" for a quote.
    if any(ch in value for ch in "\r\n\x00"):
        raise PoolerConfigError(f"{field}: contains a line break or NUL, which the auth file cannot hold")
    return '"' + value.replace('"', '""') + '"'


def render_userlist(credentials: PoolerCredentials) -> str:
    """The auth file (`userlist.txt`): one quoted line; goes into a Secret, never a ConfigMap."""
    if credentials.username == ADMIN_USER:
        raise PoolerConfigError(
            f"spec.database.credentialsSecretRef: user {ADMIN_USER!r} is reserved for PgBouncer's admin console"
        )
    user = _auth_quote(credentials.username, "spec.database.credentialsSecretRef username")
    secret = _auth_quote(credentials.secret, "spec.database.credentialsSecretRef password")
    return f"{user} {secret}\n"


# --- pgbouncer.ini ----------------------------------------------------------------------------


def checked_parameters(spec: MarketplaceDBSpec) -> dict[str, str]:
    """`spec.pooler.parameters` checked again (defence in depth: a model may be built unvalidated)."""
    checked: dict[str, str] = {}
    for name, raw in spec.pooler.parameters.items():
        field = f"spec.pooler.parameters.{name}"
        if name in ("pool_mode", "max_client_conn", "default_pool_size"):
            raise PoolerConfigError(f"{field}: set through poolMode, maxClientConn or defaultPoolSize")
        try:
            checked[name] = check_named(PGBOUNCER_PARAMETERS, name, raw, "pooler parameter")
        except ValueError as exc:
            raise PoolerConfigError(f"{field}: {exc}") from None
    return checked


def _safe(value: str, field: str) -> str:
    if not _SAFE_VALUE.fullmatch(value):
        raise PoolerConfigError(f"{field}: {value!r} holds characters not allowed in pgbouncer.ini")
    return value


def pgbouncer_section(spec: MarketplaceDBSpec, budget: PoolerBudget) -> dict[str, str]:
    """The [pgbouncer] settings. Explicit fields win over `parameters` (pool_mode cannot be overridden)."""
    pooler, database = spec.pooler, spec.database
    settings = checked_parameters(spec)
    settings.update({
        # The budget already honours explicit reserve_pool_size / max_db_connections parameters.
        "max_db_connections": str(budget.max_db_connections),
        "reserve_pool_size": str(budget.reserve_pool_size),
        # No admin_users/stats_users (left at their empty default, and not settable through
        # parameters): the console is reachable only as `pgbouncer` over the Unix socket by a
        # process with PgBouncer's own uid (the agent and exporter sidecars).
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
    if database.ssl_mode in ("verify-ca", "verify-full"):
        settings["server_tls_ca_file"] = CA_BUNDLE
    return {key: _safe(value, f"pooler setting {key}") for key, value in settings.items()}


def databases_section(spec: MarketplaceDBSpec) -> dict[str, str]:
    """[databases]: only the resource's database (no `*` fallback that would reach other databases)."""
    db = spec.database
    host = _safe(db.host, "spec.database.host")
    name = _safe(db.dbname, "spec.database.dbname")
    return {name: f"host={host} port={db.port} dbname={name}"}


def render_ini(spec: MarketplaceDBSpec, budget: PoolerBudget) -> str:
    """`pgbouncer.ini`, deterministic: sections and keys sorted, one `key = value` per line."""
    lines = ["; Rendered by marketplacedb-operator; edits are overwritten.", "[databases]"]
    lines += [f"{key} = {value}" for key, value in sorted(databases_section(spec).items())]
    lines += ["", "[pgbouncer]"]
    lines += [f"{key} = {value}" for key, value in sorted(pgbouncer_section(spec, budget).items())]
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
    if kinds or old.userlist != new.userlist:
        return "reload"
    return "none"


def config_hash(config: PoolerConfig) -> str:
    """Everything but the credentials: status and annotations carry nothing derived from a secret
    (a fast hash of a password is an offline guessing oracle). Credential changes reach pods
    through the mounted Secret and the agent's RELOAD all the same."""
    return content_hash({"ini": config.ini, "image": config.image})


def restart_hash(config: PoolerConfig) -> str:
    """Only the inputs a RELOAD cannot apply; on the pod template (naming.ANN_RESTART_HASH)."""
    startup = {k: v for k, v in parse_ini(config.ini).get("pgbouncer", {}).items() if k in STARTUP_KEYS}
    return content_hash({"image": config.image, "startup": startup})
