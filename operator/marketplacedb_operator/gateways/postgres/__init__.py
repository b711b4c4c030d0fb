"""The only module that opens PostgreSQL connections.

The database is reached directly, never through the managed PgBouncer: session advisory locks,
`SET lock_timeout` and `CREATE INDEX CONCURRENTLY` need a real session. Connections are in
autocommit (CONCURRENTLY cannot run inside a transaction block).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any

import psycopg

from ...ports import ConnInfo, TLSMaterial
from ...redact import connect_failure

__all__ = ["ConnInfo", "DatabaseUnreachable", "connect", "scrub"]


class DatabaseUnreachable(Exception):
    """The server could not be reached or refused the login. The message is fixed text per class
    (redact.EXPLANATIONS): no server text, no user name, no password."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    """An autocommit connection; DatabaseUnreachable (classified, no server text) when it cannot
    be opened."""
    tls_dir = _write_tls(info.tls) if info.tls is not None else None
    try:
        kwargs = info.kwargs()
        if tls_dir is not None:
            kwargs.update(_tls_paths(tls_dir, info.tls))
        kwargs["options"] = f"{kwargs['options']} {SESSION_OPTIONS}" if kwargs.get("options") else SESSION_OPTIONS
        return psycopg.connect(autocommit=True, **kwargs)
    except (psycopg.Error, ValueError) as exc:  # ValueError: libpq refused a parameter value
        reason, message = connect_failure(exc, info.describe())
        raise DatabaseUnreachable(message, reason) from None
    finally:
        # libpq reads the CA, certificate and key during the handshake only: no file outlives it.
        if tls_dir is not None:
            shutil.rmtree(tls_dir, ignore_errors=True)


_TLS_FILES = (("ca", "root.crt", "sslrootcert"), ("cert", "client.crt", "sslcert"), ("key", "client.key", "sslkey"))


def _write_tls(tls: TLSMaterial) -> str:
    """A private (0700) directory with the PEM files; libpq refuses a key readable by others."""
    path = tempfile.mkdtemp(prefix="marketplacedb-conn-tls-")
    for attr, filename, _ in _TLS_FILES:
        text = getattr(tls, attr)
        if text:
            fd = os.open(os.path.join(path, filename), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
    return path


def _tls_paths(path: str, tls: TLSMaterial | None) -> dict[str, str]:
    return {param: os.path.join(path, filename) for attr, filename, param in _TLS_FILES if getattr(tls, attr, None)}
