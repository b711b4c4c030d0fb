"""What may be said about a database failure: a class and names, never the server's own words.

libpq and PostgreSQL messages quote what the client sent (`password authentication failed for user
"<the Secret's user name>"`), what the server read from rows (`invalid input syntax for type
integer: "<a row value>"`) and what sits behind a port (`received invalid response ...`). Echoing
them into status, Events or logs leaks Secret values and row data, and lets whoever can create a
MarketplaceDB probe ports from the operator's network position. So connection failures become one
of a few fixed classes, and database errors their SQLSTATE plus the object names PostgreSQL
reports in separate fields (https://www.postgresql.org/docs/15/protocol-error-fields.html).
"""

from __future__ import annotations

import psycopg

# Connection failure classes: condition reason -> the sentence that explains it.
UNREACHABLE = "DatabaseUnreachable"
TIMEOUT = "DatabaseTimeout"
AUTHENTICATION_FAILED = "AuthenticationFailed"
TLS_FAILED = "TLSFailed"
REJECTED = "ConnectionRejected"
EXPLANATIONS = {
    UNREACHABLE: "unreachable (no PostgreSQL server answered at that address)",
    TIMEOUT: "timed out (no answer within the connect timeout)",
    AUTHENTICATION_FAILED: "authentication failed (check the credentials Secret and pg_hba.conf)",
    TLS_FAILED: "TLS failed (handshake, certificate verification or client certificate; check sslMode "
    "and spec.database.tls)",
    REJECTED: "the server refused the session (database missing, too many connections, or shutting down)",
}

# Fragments of libpq's (English) messages, most specific first. Only the class is kept.
_PROTOCOL = ("invalid response to ssl negotiation", "expected authentication request", "server closed the connection",
             "unexpected message", "invalid length of startup packet", "received invalid response",
             "error response during ssl exchange")
_TIMEOUT = ("timeout expired", "timed out")
_AUTH = ("password authentication failed", "authentication failed", "no password supplied", "pg_hba.conf",
         "role \"", "server requested", "auth method", "sasl", "scram", "password is required")
_TLS = ("ssl", "certificate", "tls", "root cert", "sslmode", "server does not support")
_UNREACHABLE = ("connection refused", "could not translate host name", "no route to host", "network is unreachable",
                "name or service not known", "could not connect", "host is down", "connection reset")


def classify_connect_error(exc: BaseException) -> str:
    """The condition reason for a failed connection attempt (one of EXPLANATIONS)."""
    if isinstance(exc, psycopg.errors.ConnectionTimeout):
        return TIMEOUT
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate.startswith("28"):
        return AUTHENTICATION_FAILED
    text = str(exc).lower()
    if any(part in text for part in _PROTOCOL):
        return UNREACHABLE  # something answered, but not PostgreSQL: say no more than for a closed port
    if any(part in text for part in _TIMEOUT):
        return TIMEOUT
    if "fatal:" in text:
        # The server itself answered (PostgreSQL ends a login with FATAL); the auth words come
        # first: they precede the quoted user name, which could contain anything.
        if any(part in text for part in _AUTH):
            return AUTHENTICATION_FAILED
        return TLS_FAILED if any(part in text for part in _TLS) else REJECTED
    if any(part in text for part in _TLS):
        return TLS_FAILED
    if any(part in text for part in _AUTH):
        return AUTHENTICATION_FAILED
    return UNREACHABLE


# libpq refused the server's authentication request (require_auth, specs/db_tls.REQUIRE_AUTH).
_METHOD_REFUSED = "authentication method requirement"
METHOD_REFUSED_EXPLANATION = (
    "authentication failed: the server asked for a cleartext password or an md5 hash, which the operator "
    "never sends; use SCRAM (password_encryption = scram-sha-256, reset the role's password, scram-sha-256 "
    "in pg_hba.conf)"
)


def connect_failure(exc: BaseException, where: str) -> tuple[str, str]:
    """(reason, message) for a failed connection to `where` (host:port/dbname, from the spec)."""
    if _METHOD_REFUSED in str(exc).lower():
        return AUTHENTICATION_FAILED, f"cannot connect to {where}: {METHOD_REFUSED_EXPLANATION}"
    reason = classify_connect_error(exc)
    return reason, f"cannot connect to {where}: {EXPLANATIONS[reason]}"


def describe_db_error(exc: BaseException) -> str:
    """A database error as SQLSTATE, its name and the object names PostgreSQL reports; never the
    primary message, DETAIL or HINT (they may quote row values)."""
    if not isinstance(exc, psycopg.Error):
        return f"unexpected {type(exc).__name__}"
    sqlstate = exc.sqlstate
    if not sqlstate:
        return f"the database session failed ({type(exc).__name__}: {classify_connect_error(exc)})"
    name = type(exc).__name__ if type(exc).__module__ == "psycopg.errors" else _lookup(sqlstate)
    diag = exc.diag
    fields = [
        ("schema", diag.schema_name),
        ("table", diag.table_name),
        ("column", diag.column_name),
        ("constraint", diag.constraint_name),
        ("type", diag.datatype_name),
    ]
    names = ", ".join(f"{label} {value}" for label, value in fields if value)
    return f"SQLSTATE {sqlstate} ({name})" + (f" on {names}" if names else "")


def _lookup(sqlstate: str) -> str:
    try:
        return psycopg.errors.lookup(sqlstate).__name__
    except KeyError:
        return "unknown"
