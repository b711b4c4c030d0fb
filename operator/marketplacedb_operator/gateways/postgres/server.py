"""Server facts the pooler is sized and authenticated from: connection limits and SCRAM verifiers."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
from psycopg import sql


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    max_connections: int
    superuser_reserved_connections: int


def read_server_limits(conn: psycopg.Connection[Any]) -> ServerLimits:
    """max_connections and superuser_reserved_connections as the server runs them (any user may read)."""
    row = conn.execute(
        "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int"
    ).fetchone()
    assert row is not None  # a SELECT without FROM always returns one row
    return ServerLimits(max_connections=int(row[0]), superuser_reserved_connections=int(row[1]))


def read_scram_verifier(conn: psycopg.Connection[Any], role: str) -> str | None:
    """The role's stored SCRAM-SHA-256 verifier; None when not readable (pg_authid needs superuser)
    or not SCRAM (md5, no password). The value is secret-equivalent towards PgBouncer: never log it."""
    try:
        row = conn.execute("SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = %s", [role]).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None
    if row is None or not isinstance(row[0], str) or not row[0].startswith("SCRAM-SHA-256$"):
        return None
    return row[0]


def set_own_verifier(conn: psycopg.Connection[Any], verifier: str) -> None:
    """Store a precomputed SCRAM verifier (same password, chosen salt) on the connected role.

    Any role may change its own password, so this needs no superuser; the password stays the same,
    only the stored salt changes, which lets PgBouncer hold the *identical* verifier. PostgreSQL
    stores an already-hashed value as is (https://www.postgresql.org/docs/15/sql-createrole.html).
    """
    if not verifier.startswith("SCRAM-SHA-256$"):
        raise ValueError("not a SCRAM-SHA-256 verifier")
    conn.execute(sql.SQL("ALTER ROLE CURRENT_USER PASSWORD {}").format(sql.Literal(verifier)))
