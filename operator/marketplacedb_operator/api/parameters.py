"""Allow-listed settings with typed values: PgBouncer parameters and per-database GUCs.

Anything not listed here is rejected at validation time, so a typo or an injection attempt never
reaches a config file or an `ALTER DATABASE`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Literal

_INT_MAX = 2**31 - 1
Kind = Literal["int", "bool", "memory", "float", "duration_ms", "enum", "names"]


@dataclasses.dataclass(frozen=True)
class Param:
    kind: Kind
    minimum: int = 0
    maximum: int = 2**31 - 1
    # PgBouncer: True when `RELOAD` applies it to a running process without a restart.
    reload_safe: bool = True
    choices: tuple[str, ...] = ()
    # memory: the size of one unit of a unit-less value, in kB (PostgreSQL's GUC_UNIT_KB or
    # GUC_UNIT_BLOCKS); minimum/maximum are in those units, as pg_settings reports them.
    unit_kb: int = 1
    # PgBouncer: the release that introduced it. Older releases refuse to start on an unknown key,
    # so the renderer leaves newer ones out (specs/pgbouncer.render_ini) and status lists them.
    since: tuple[int, int] = (1, 0)


# https://www.pgbouncer.org/config.html (1.18 as shipped by Debian 12). pool_mode, max_client_conn
# and default_pool_size are explicit fields of the pooler spec; listen_*, auth_* and TLS
# are the operator's (a parameter must not re-route or unlock the pooler).
PGBOUNCER_PARAMETERS: dict[str, Param] = {
    "application_name_add_host": Param("bool"),
    "client_idle_timeout": Param("int"),
    "client_login_timeout": Param("int", maximum=86400),
    "idle_transaction_timeout": Param("int"),
    "log_connections": Param("bool"),
    "log_disconnections": Param("bool"),
    "log_pooler_errors": Param("bool"),
    "log_stats": Param("bool"),
    "max_db_connections": Param("int", maximum=100000),
    "max_packet_size": Param("int", minimum=9, maximum=2**31 - 1),
    "max_user_connections": Param("int", maximum=100000),
    "min_pool_size": Param("int", maximum=10000),
    "query_timeout": Param("int"),
    "query_wait_timeout": Param("int"),
    "reserve_pool_size": Param("int", maximum=10000),
    "reserve_pool_timeout": Param("int", maximum=3600),
    "server_check_delay": Param("int"),
    "server_connect_timeout": Param("int", minimum=1, maximum=3600),
    "server_idle_timeout": Param("int"),
    "server_lifetime": Param("int"),
    "server_login_retry": Param("int", maximum=3600),
    "server_round_robin": Param("bool"),
    "stats_period": Param("int", minimum=1, maximum=86400),
    "tcp_keepalive": Param("bool"),
    "tcp_keepcnt": Param("int", maximum=1000),
    "tcp_keepidle": Param("int", maximum=86400),
    "tcp_keepintvl": Param("int", maximum=86400),
    "verbose": Param("int", maximum=3),
    "tcp_user_timeout": Param("int", maximum=2**31 - 1, since=(1, 13)),
    "server_reset_query": Param("enum", choices=("discard all", "deallocate all", "")),
    "server_reset_query_always": Param("bool"),
    # Newer than Debian 12's 1.18 (the tests' binary): rendered, and reported by the agent when the
    # running PgBouncer does not know them. https://www.pgbouncer.org/changelog.html
    "track_extra_parameters": Param("names", since=(1, 20)),
    "max_prepared_statements": Param("int", maximum=100000, since=(1, 21)),
    "max_db_client_connections": Param("int", maximum=1000000, since=(1, 24)),
    "max_user_client_connections": Param("int", maximum=1000000, since=(1, 24)),
    # Read only at start-up: a change rolls the pods (through the restart hash).
    "listen_backlog": Param("int", minimum=1, maximum=65535, reload_safe=False),
    "pkt_buf": Param("int", minimum=512, maximum=2**20, reload_safe=False),
    "sbuf_loopcnt": Param("int", maximum=10000, reload_safe=False),
    "tcp_defer_accept": Param("int", maximum=3600, reload_safe=False),
    "tcp_socket_buffer": Param("int", maximum=2**24, reload_safe=False),
}

# Per-database settings applied with ALTER DATABASE ... SET (https://www.postgresql.org/docs/15/runtime-config.html).
DATABASE_SETTINGS: dict[str, Param] = {
    # Bounds are PostgreSQL 15's (pg_settings.min_val/max_val on 64-bit Linux): the server refuses
    # values outside them, so the spec does too, before anything is sent.
    "work_mem": Param("memory", minimum=64, maximum=_INT_MAX),
    "maintenance_work_mem": Param("memory", minimum=1024, maximum=_INT_MAX),
    "temp_buffers": Param("memory", minimum=100, maximum=_INT_MAX // 2, unit_kb=8),
    "effective_cache_size": Param("memory", minimum=1, maximum=_INT_MAX, unit_kb=8),
    "random_page_cost": Param("float"),
    "seq_page_cost": Param("float"),
    "cpu_tuple_cost": Param("float"),
    "effective_io_concurrency": Param("int", maximum=1000),
    "default_statistics_target": Param("int", minimum=1, maximum=10000),
    "statement_timeout": Param("duration_ms", maximum=_INT_MAX),
    "lock_timeout": Param("duration_ms", maximum=_INT_MAX),
    "idle_in_transaction_session_timeout": Param("duration_ms", maximum=_INT_MAX),
    "jit": Param("bool"),
    "enable_seqscan": Param("bool"),
    "enable_nestloop": Param("bool"),
    "enable_partitionwise_join": Param("bool"),
    "enable_partitionwise_aggregate": Param("bool"),
    "default_transaction_isolation": Param("enum", choices=("read committed", "repeatable read", "serializable")),
}

# Server-wide settings: reported as advice, never changed (they need a restart or superuser).
SERVER_SETTINGS = ("max_connections", "shared_buffers", "max_wal_size", "wal_buffers", "max_worker_processes")

_MEMORY = re.compile(r"^([0-9]{1,20}) ?(B|kB|MB|GB|TB)?$")
_MEMORY_KB = {"B": 1 / 1024, "kB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}
_DURATION_MS = re.compile(r"^([0-9]{1,20}) ?(us|ms|s|min|h|d)?$")
_DURATION_IN_MS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_FLOAT = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,20})?$")
_BOOLS = {"0": "0", "1": "1", "true": "1", "false": "0", "on": "1", "off": "0"}


def _in_range(param: Param, amount: float, text: str, unit: str) -> None:
    if not param.minimum <= amount <= param.maximum:
        raise ValueError(f"{text} is outside {param.minimum}..{param.maximum} {unit}")


def check_value(param: Param, value: object) -> str:
    """The canonical text of `value` for `param`; ValueError naming the expectation otherwise."""
    text = str(value).strip().lower() if isinstance(value, bool) else str(value).strip()
    if param.kind == "bool":
        if text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        raise ValueError(f"{value!r} is not a boolean (0/1, true/false)")
    if param.kind == "int":
        if not re.fullmatch(r"[0-9]{1,20}", text):
            raise ValueError(f"{value!r} is not a whole number")
        _in_range(param, int(text), text, "")
        return str(int(text))
    if param.kind == "memory":
        match = _MEMORY.fullmatch(text)
        if not match:
            raise ValueError(f"{value!r} is not a memory size (a number with B, kB, MB, GB or TB)")
        kilobytes = int(match[1]) * (_MEMORY_KB[match[2]] if match[2] else param.unit_kb)
        # PostgreSQL rounds to its unit (rint), then checks the range.
        _in_range(param, round(kilobytes / param.unit_kb), text, "kB" if param.unit_kb == 1 else f"x {param.unit_kb}kB")
        return text
    if param.kind == "duration_ms":
        match = _DURATION_MS.fullmatch(text)
        if not match:
            raise ValueError(f"{value!r} is not a duration (a number with us, ms, s, min, h or d)")
        _in_range(param, round(int(match[1]) * _DURATION_IN_MS[match[2] or "ms"]), text, "ms")
        return text
    if param.kind == "float":
        if not _FLOAT.fullmatch(text):
            raise ValueError(f"{value!r} is not a non-negative number")
        return text
    if param.kind == "names":
        if not re.fullmatch(r"[a-z_][a-z0-9_]*(,[a-z_][a-z0-9_]*)*", text.lower()):
            raise ValueError(f"{value!r} is not a comma-separated list of parameter names")
        return text.lower()
    if text.lower() in param.choices:
        return text.lower()
    raise ValueError(f"{value!r} is not one of {', '.join(param.choices)}")


def check_named(table: dict[str, Param], name: str, value: object, what: str) -> str:
    param = table.get(name)
    if param is None:
        raise ValueError(f"{name!r} is not an allowed {what} (allowed: {', '.join(sorted(table))})")
    return check_value(param, value)


# PgBouncer settings the pooler spec has fields for: a parameter may not set them behind the fields' back.
POOLER_FIELDS = ("pool_mode", "max_client_conn", "default_pool_size")


def check_pooler_parameters(values: Mapping[str, object]) -> dict[str, str]:
    """spec.pooler.parameters checked by name, sorted; ValueError "<name>: why" for the first bad one.
    Used by the model and again by the renderer (defence in depth: a model may be built unvalidated)."""
    checked: dict[str, str] = {}
    for name, raw in values.items():
        if name in POOLER_FIELDS:
            raise ValueError(f"{name}: {name!r} is a field of the pooler (poolMode, maxClientConn, defaultPoolSize)")
        try:
            checked[name] = check_named(PGBOUNCER_PARAMETERS, name, raw, "pooler parameter")
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return dict(sorted(checked.items()))
