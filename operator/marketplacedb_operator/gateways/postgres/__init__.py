"""The only module that opens PostgreSQL connections.

The database is reached directly, never through the managed PgBouncer: session advisory locks,
`SET lock_timeout` and `CREATE INDEX CONCURRENTLY` need a real session. Connections are in
autocommit (CONCURRENTLY cannot run inside a transaction block).
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

from ...ports import ConnInfo

__all__ = ["ConnInfo", "DatabaseUnreachable", "connect", "scrub"]

class DatabaseUnreachable(Exception):
    """The server could not be reached or refused the login; the message carries no secret."""


def scrub(text: str, *secrets: str) -> str:
    """Remove secrets (and any password=... fragment) from a message before it goes anywhere."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", text, flags=re.IGNORECASE)


# Set in the startup packet, so they override ALTER DATABASE/ROLE ... SET from the first statement
# on: a database-level `statement_timeout = 1` cannot lock the operator out of its own sessions.
# Every statement that may legitimately take longer sets its own limit (DDL steps, refreshes).
SESSION_OPTIONS = "-c statement_timeout=60s -c lock_timeout=5s -c idle_in_transaction_session_timeout=0"


def connect(info: ConnInfo) -> psycopg.Connection[Any]:
    """An autocommit connection; DatabaseUnreachable (scrubbed) when it cannot be opened."""
    try:
        return psycopg.connect(autocommit=True, options=SESSION_OPTIONS, **info.kwargs())
    except psycopg.OperationalError as exc:
        reason = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, info.password)
        raise DatabaseUnreachable(f"cannot connect to {info.describe()}: {reason}") from None
