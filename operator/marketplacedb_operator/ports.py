"""What reconcile() needs from the outside world, as Protocols; gateways implement them.

reconcile.py imports only this module for I/O, so it runs against the real gateways in the
operator and the CLI, and tests can hand it real gateways pointed at throwaway servers.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg

from .api.v1alpha1 import MaterializedViewSpec
from .background import Background
from .settings import Settings
from .sql.catalog import Catalog
from .sql.plan import Desired, ExecutionPolicy, Plan, StepOutcome
from .sql.refresh import RefreshState

APPLICATION_NAME = "marketplacedb-operator"


@dataclasses.dataclass(frozen=True)
class TLSMaterial:
    """PEM texts from spec.database.tls: libpq wants files, the gateway writes them per connection."""

    ca: str | None = dataclasses.field(default=None, repr=False)
    cert: str | None = dataclasses.field(default=None, repr=False)
    key: str | None = dataclasses.field(default=None, repr=False)


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
    # File paths (a --dsn's sslrootcert=..., or "system" for the system CA store) ...
    sslrootcert: str = ""
    sslcert: str = ""
    sslkey: str = ""
    # ... or PEM texts from the cluster (the operator), written to private files at connect time.
    tls: TLSMaterial | None = dataclasses.field(default=None, repr=False)
    # libpq's require_auth (e.g. "!password": never send a cleartext password); empty: libpq's default.
    require_auth: str = ""

    @classmethod
    def from_dsn(cls, dsn: str, **overrides: Any) -> ConnInfo:
        """From a libpq DSN (key=value or URI); missing parts fall back to libpq's defaults."""
        params = psycopg.conninfo.conninfo_to_dict(dsn)  # parsing only, no connection
        values: dict[str, Any] = {
            "host": str(params.get("host", "localhost")),
            "port": int(params.get("port", 5432) or 5432),
            "dbname": str(params.get("dbname", "postgres")),
            "user": str(params.get("user", "postgres")),
            "password": str(params.get("password", "")),
            "sslmode": str(params.get("sslmode", "prefer")),
            **{key: str(params[key]) for key in ("sslrootcert", "sslcert", "sslkey") if params.get(key)},
        }
        values.update(overrides)
        return cls(**values)

    def kwargs(self) -> dict[str, Any]:
        files = {key: getattr(self, key) for key in ("sslrootcert", "sslcert", "sslkey", "require_auth")
                 if getattr(self, key)}
        return files | {
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
        """Where, never as whom: the user name comes from a Secret and is not shown."""
        return f"{self.host}:{self.port}/{self.dbname}"


class RefreshResult(Protocol):
    """One refresh's outcome (refresh.RefreshOutcome)."""

    @property
    def view(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def ok(self) -> bool: ...


@dataclasses.dataclass(frozen=True)
class BuildProgress:
    """One row of pg_stat_progress_create_index for the session building an index."""

    phase: str
    blocks_done: int | None
    blocks_total: int | None
    index: str | None


class Database(Protocol):
    """One reconcile's session with the managed database (direct, autocommit, never the pooler).

    A background job opens its own Database and runs `execute` or `refresh` on it; `backend_pid`
    names its session so that another session can read `build_progress(pid)`, and `cancel()`
    (callable from another thread) terminates that session so a deleted resource's build stops.
    """

    def observe(self, desired: Desired) -> Catalog: ...
    def execute(self, plan: Plan, policy: ExecutionPolicy) -> list[StepOutcome]: ...
    def server_limits(self) -> tuple[int, int]: ...  # max_connections, superuser_reserved_connections
    def scram_verifier(self, role: str) -> str | None: ...
    def lookup_function_exists(self, function: str) -> bool: ...  # spec.pooler.authQuery.function
    def refresh_states(self) -> list[RefreshState]: ...
    def refresh(self, view: MaterializedViewSpec, now: datetime.datetime, force: bool) -> RefreshResult: ...
    def close(self) -> None: ...
    def backend_pid(self) -> int: ...
    def build_progress(self, pid: int) -> BuildProgress | None: ...
    def cancel(self) -> None: ...


class Kube(Protocol):
    """The Kubernetes API as reconcile uses it (gateways.kube.KubeGateway)."""

    writes: int

    def apply(self, obj: dict[str, Any], *, field_manager: str = ..., force: bool = True) -> dict[str, Any]: ...
    def create(self, obj: dict[str, Any]) -> dict[str, Any]: ...
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...
    def list(self, api_version: str, kind: str, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]: ...
    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool: ...
    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class Deps:
    """Everything reconcile() touches outside itself, built once at start-up."""

    kube: Kube
    open_database: Callable[[ConnInfo], Database]
    settings: Settings
    # Long DDL and refreshes run here, off kopf's handler threads (None: inline, e.g. the CLI).
    background: Background | None = None
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)
    monotonic: Callable[[], float] = time.monotonic
