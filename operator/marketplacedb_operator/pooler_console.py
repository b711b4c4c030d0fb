"""PgBouncer's admin console for the pooler agent: commands over the Unix socket, config checks.

Pure apart from `AdminConsole.query` (one psycopg connection per command, as `pgbouncer` over the
socket: PgBouncer admits that name without a password only for a peer with its own uid).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import psycopg

from .specs.pgbouncer import parse_ini

# SHOW CONFIG prints some values differently from the file; everything else must match exactly.
_OCTAL_KEYS = {"unix_socket_mode"}


class AdminError(Exception):
    """The admin console did not answer or refused a command."""


def quote_name(name: str) -> str:
    # The admin console takes a bare word; database names are validated identifiers already.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise AdminError("database name is not a plain identifier")
    return name


@dataclasses.dataclass
class AdminConsole:
    """PgBouncer's admin console over its Unix socket (simple query protocol, autocommit)."""

    socket_dir: str
    port: int
    timeout: int = 3

    def query(self, command: str) -> list[dict[str, Any]]:
        try:
            with psycopg.connect(host=self.socket_dir, port=self.port, dbname="pgbouncer", user="pgbouncer",
                                 autocommit=True, connect_timeout=self.timeout,
                                 cursor_factory=psycopg.ClientCursor) as conn:
                cur = conn.execute(command)
                if cur.description is None:
                    return []
                names = [column.name for column in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        except psycopg.Error as exc:
            raise AdminError(f"{command}: {str(exc).strip() or type(exc).__name__}") from None

    def version(self) -> tuple[int, int]:
        rows = self.query("SHOW VERSION")
        match = re.search(r"([0-9]+)\.([0-9]+)", str(rows[0]["version"])) if rows else None
        if match is None:
            raise AdminError("SHOW VERSION: no version")
        return int(match.group(1)), int(match.group(2))


def _normalize(key: str, value: str) -> str:
    value = value.strip()
    if key in _OCTAL_KEYS and re.fullmatch(r"0[0-7]+", value):
        return str(int(value, 8))
    return value


def config_mismatches(ini_text: str, shown: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """{key: (in the file, running)} for every [pgbouncer] key PgBouncer runs with another value."""
    running = {str(row["key"]): "" if row["value"] is None else str(row["value"]) for row in shown}
    wanted = parse_ini(ini_text).get("pgbouncer", {})
    return {
        key: (value, running[key])
        for key, value in sorted(wanted.items())
        if key in running and _normalize(key, value) != _normalize(key, running[key])
    }


def unknown_keys(ini_text: str, shown: list[dict[str, Any]]) -> list[str]:
    """[pgbouncer] keys of the file the running PgBouncer does not know (absent from SHOW CONFIG)."""
    running = {str(row["key"]) for row in shown}
    return sorted(set(parse_ini(ini_text).get("pgbouncer", {})) - running)


