"""Who may log in through the pooler: SCRAM verifiers, the auth file and the auth_query lookup.

Pure. SCRAM-SHA-256 key derivation and SASLprep come from `scramp` (a vetted library); this module
only formats PostgreSQL's verifier text (`SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>`) around it
and decides what goes into the auth file. The auth file lives in a Secret, never in a ConfigMap.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import re
from typing import Literal

from psycopg import sql
from scramp import ScramMechanism
from scramp.core import ScramException

# The name PgBouncer admits to the admin console without a password on its Unix socket when the
# peer has the same uid: it must not also be a database user in the auth file.
ADMIN_USER = "pgbouncer"
_SCRAM = ScramMechanism("SCRAM-SHA-256")
_VERIFIER = re.compile(r"SCRAM-SHA-256\$([0-9]+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)")


class PoolerConfigError(ValueError):
    """A pooler setting or credential that cannot be rendered; the message names the field, never a value."""


@dataclasses.dataclass(frozen=True)
class PoolerCredentials:
    """One auth-file entry: a SCRAM verifier when one can be used, else the password (Secret only)."""

    username: str
    secret: str = dataclasses.field(repr=False)
    # Which spec field it came from, for error messages (never the value).
    field: str = "spec.database.credentialsSecretRef"

    @property
    def kind(self) -> Literal["scram-verifier", "password"]:
        return "scram-verifier" if is_scram_verifier(self.secret) else "password"


def parse_verifier(text: str) -> tuple[int, bytes, bytes, bytes] | None:
    """(iterations, salt, stored_key, server_key) of a PostgreSQL SCRAM-SHA-256 verifier, or None."""
    match = _VERIFIER.fullmatch(text)
    if match is None:
        return None
    try:
        salt, stored, server = (base64.b64decode(match.group(i), validate=True) for i in (2, 3, 4))
    except ValueError:
        return None
    return int(match.group(1)), salt, stored, server


def is_scram_verifier(text: str) -> bool:
    return parse_verifier(text) is not None


def scram_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    """The verifier PostgreSQL stores for `password` with this salt (scramp: SASLprep + RFC 5802 keys).

    A password SASLprep refuses (PostgreSQL then hashes the raw bytes) raises PoolerConfigError: such a
    password is used as is, in the Secret, rather than derived by hand here.
    """
    try:
        salt, stored_key, server_key, iterations = _SCRAM.make_auth_info(password, iterations, salt)
    except ScramException:
        raise PoolerConfigError("the password is not valid SASLprep text; no verifier computed") from None
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def verifier_matches(verifier: str, password: str) -> bool:
    """True when `verifier` was computed from `password` (so the Secret and the server agree)."""
    parsed = parse_verifier(verifier)
    if parsed is None:
        return False
    iterations, salt, _stored, _server = parsed
    try:
        return hmac.compare_digest(scram_verifier(password, salt, iterations), verifier)
    except PoolerConfigError:
        return False


def derived_salt(password: str, *context: str) -> bytes:
    """A salt that is stable for (password, context), so a computed verifier does not churn.

    Keyed by the password: guessing still costs one PBKDF2 per guess and per context, as with a
    random salt; the context (namespace/name/user) prevents one table for every deployment.
    """
    message = "\x00".join(("marketplacedb-scram-salt", *context)).encode()
    return hmac.new(password.encode(), message, "sha256").digest()[:16]


def choose_credentials(username: str, password: str, server_verifier: str | None,
                       field: str = "spec.database.credentialsSecretRef") -> PoolerCredentials:
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
        return PoolerCredentials(username, server_verifier, field)
    return PoolerCredentials(username, password, field)


def _auth_quote(value: str, field: str) -> str:
    # https://www.pgbouncer.org/config.html#authentication-file-format: "..." with "" for a quote.
    if any(ch in value for ch in "\r\n\x00"):
        raise PoolerConfigError(f"{field}: contains a line break or NUL, which the auth file cannot hold")
    return '"' + value.replace('"', '""') + '"'


def render_userlist(*entries: PoolerCredentials) -> str:
    """The auth file (`userlist.txt`): one quoted line per user; goes into a Secret, never a ConfigMap."""
    lines, seen = [], set()
    for entry in entries:
        if entry.username == ADMIN_USER:
            raise PoolerConfigError(f"{entry.field}: user {ADMIN_USER!r} is reserved for PgBouncer's admin console")
        if entry.username in seen:
            raise PoolerConfigError(f"{entry.field}: the same user name is listed twice for the pooler")
        seen.add(entry.username)
        user = _auth_quote(entry.username, f"{entry.field} username")
        secret = _auth_quote(entry.secret, f"{entry.field} password")
        lines.append(f"{user} {secret}\n")
    return "".join(sorted(lines))


# --- auth_query ---------------------------------------------------------------------------------

# The lookup the README tells a database administrator to create (SECURITY DEFINER, owned by a
# superuser so it can read pg_authid, executable only by the auth_user). Expired passwords are
# refused as in CVE-2025-2291's fix; superusers are never returned. Composed with psycopg.sql.
LOOKUP_FUNCTION_SQL = sql.SQL(
    "CREATE FUNCTION {function}(p_usename text) RETURNS TABLE (usename name, passwd text)\n"
    "LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$\n"
    "  SELECT rolname, CASE WHEN rolvaliduntil IS NULL OR rolvaliduntil > now() THEN rolpassword END\n"
    "  FROM pg_catalog.pg_authid WHERE rolname = p_usename AND rolcanlogin AND NOT rolsuper\n"
    "$$"
)


def lookup_function_ddl(function: str, auth_user: str) -> list[sql.Composed]:
    """The statements an administrator runs (as a superuser) in the database for authQuery."""
    fn, schema = function_identifier(function), sql.Identifier(function.split(".", 1)[0])
    user = sql.Identifier(auth_user)
    signature = sql.SQL("{}(text)").format(fn)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema),
        LOOKUP_FUNCTION_SQL.format(function=fn),
        sql.SQL("REVOKE ALL ON FUNCTION {} FROM PUBLIC").format(signature),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, user),
        sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(signature, user),
    ]


def function_identifier(function: str) -> sql.Identifier:
    schema, name = function.split(".", 1)
    return sql.Identifier(schema, name)


def auth_query(function: str) -> str:
    """The auth_query line: a fixed SELECT around `schema.function`, quoted by psycopg.sql."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}\.[a-z_][a-z0-9_]{0,62}", function):
        raise PoolerConfigError("spec.pooler.authQuery.function: not a lower-case schema.function name")
    query = sql.SQL("SELECT usename, passwd FROM {}($1)").format(function_identifier(function))
    return query.as_string(None)
