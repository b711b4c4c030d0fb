"""The only module that opens PostgreSQL connections.

The database is reached directly, never through the managed PgBouncer: session advisory locks,
`SET lock_timeout` and `CREATE INDEX CONCURRENTLY` need a real session. Connections are in
autocommit (CONCURRENTLY cannot run inside a transaction block).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import psycopg

APPLICATION_NAME = "marketplacedb-operator"


class DatabaseUnreachable(Exception):
    """The server could not be reached or refused the login; the message carries no secret."""


@dataclasses.dataclass(frozen=True)
class ConnInfo:
    """Where and as whom to connect. The password never appears in repr or messages."""

    host: str
    port: int
    dbname: str
    user: str
    password: str = dataclasses.field(default="", repr=False)
    sslmode: str = "prefer"
    application_name: str = APPLICATION_NAME
    connect_timeout: int = 5

    @classmethod
    def from_dsn(cls, dsn: str, **overrides: Any) -> ConnInfo:
        """From a libpq DSN (key=value or URI); missing parts fall back to libpq's defaults."""
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        values: dict[str, Any] = {
            "host": str(params.get("host", "localhost")),
            "port": int(params.get("port", 5432) or 5432),
            "dbname": str(params.get("dbname", "postgres")),
            "user": str(params.get("user", "postgres")),
            "password": str(params.get("password", "")),
            "sslmode": str(params.get("sslmode", "prefer")),
        }
        values.update(overrides)
        return cls(**values)

    def kwargs(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.user,
            "password": self.password,
            "sslmode": self.sslmode,
            "application_name": self.application_name,
            "connect_timeout": self.connect_timeout,
        }

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"


def scrub(text: str, *secrets: str) -> str:
    """Remove secrets (and any password=... fragment) from a message before it goes anywhere."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", text, flags=re.IGNORECASE)


def connect(info: ConnInfo) -> psycopg.Connection[Any]:
    """An autocommit connection; DatabaseUnreachable (scrubbed) when it cannot be opened."""
    try:
        return psycopg.connect(autocommit=True, **info.kwargs())
    except psycopg.OperationalError as exc:
        reason = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, info.password)
        raise DatabaseUnreachable(f"cannot connect to {info.describe()}: {reason}") from None
