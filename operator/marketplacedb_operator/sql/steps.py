"""The data of planning: desired objects, steps, plans, execution policy and outcomes (pure)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Literal

from psycopg import sql

from ..api.v1alpha1 import DDLPolicy, IndexSpec, MaterializedViewSpec
from ..durations import parse_duration
from ..settings import Settings
from . import ddl
from .catalog import IndexInfo, SessionInfo, ViewInfo

LockPolicy = Literal["ddl", "index"]


@dataclasses.dataclass(frozen=True)
class DesiredIndex:
    spec: IndexSpec
    hash: str
    field: str  # where it is declared, for messages: spec.indexes[0]

    @property
    def object(self) -> str:
        return f"index/{self.spec.schema_name}.{self.spec.name}"


@dataclasses.dataclass(frozen=True)
class DesiredView:
    spec: MaterializedViewSpec
    hash: str
    field: str

    @property
    def object(self) -> str:
        return f"view/{self.spec.schema_name}.{self.spec.name}"


@dataclasses.dataclass(frozen=True)
class Desired:
    owner: str
    indexes: tuple[DesiredIndex, ...]
    views: tuple[DesiredView, ...]
    settings: tuple[tuple[str, str], ...]
    reset_settings: tuple[str, ...]
    deletion_policy: str
    approval: str
    extensions: tuple[str, ...] = ()  # spec.database.extensions: the operator may create these


@dataclasses.dataclass(frozen=True)
class ViewCheck:
    """Before a view's DDL: run the query with LIMIT 0 (READ ONLY) and check the unique key."""

    query: str
    unique_key: tuple[str, ...]
    field: str


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str
    object: str
    description: str
    statements: tuple[sql.Composed, ...]
    transactional: bool  # False: must run outside a transaction block (CONCURRENTLY)
    lock_policy: LockPolicy = "ddl"
    verify_index: tuple[str, str] | None = None  # (schema, name): indisvalid checked after the step
    cleanup_index: tuple[str, str] | None = None  # an INVALID index a failure of this step may leave
    cleanup: tuple[sql.Composed, ...] = ()  # undoes this step if a later step of the object fails
    check_view: ViewCheck | None = None
    # A CONCURRENTLY build on this (schema, table): before it starts, wait (with backoff, within the
    # lock timeout) for sessions that would stall its wait phases, instead of building in vain.
    build_table: tuple[str, str] | None = None

    @property
    def sql(self) -> sql.Composed:
        return sql.Composed([sql.SQL(";\n").join(self.statements), sql.SQL(";")])

    @property
    def sql_text(self) -> str:
        return ddl.render(self.sql)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "object": self.object,
            "description": self.description,
            "sql": self.sql_text,
            "transaction": self.transactional,
            "lockPolicy": self.lock_policy,
        }


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = ()
    conflicts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.steps

    @property
    def hash(self) -> str:
        """sha256 of what would run (SQL and transaction mode), for `approval: Manual`."""
        digest = hashlib.sha256()
        for step in self.steps:
            digest.update(f"{'tx' if step.transactional else 'autocommit'}\x1f{step.sql_text}\x1e".encode())
        return digest.hexdigest()

    @property
    def objects(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(step.object for step in self.steps))

    def descriptions(self) -> list[str]:
        return [step.description for step in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "steps": [step.to_dict() for step in self.steps],
            "conflicts": list(self.conflicts),
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """Stable text: same plan, byte-identical output."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """Timeouts and retries. Index steps honour the resource's lockTimeout too (capped by the
    operator's index policy): a build waits for its blockers before it starts, never by rebuilding."""

    lock_timeout_seconds: float = 5.0
    statement_timeout_seconds: float = 1800.0
    index_lock_timeout_seconds: float = 60.0
    retries: int = 3
    retry_base_seconds: float = 0.5

    @classmethod
    def from_spec(cls, policy: DDLPolicy, settings: Settings) -> ExecutionPolicy:
        return cls(
            lock_timeout_seconds=parse_duration(policy.lock_timeout),
            statement_timeout_seconds=parse_duration(policy.statement_timeout),
            index_lock_timeout_seconds=settings.index_lock_timeout_seconds,
            retries=settings.ddl_retries,
            retry_base_seconds=settings.ddl_retry_base_seconds,
        )


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What executing one object's steps did (the executor returns one per object of the plan)."""

    object: str
    ok: bool
    executed: tuple[str, ...] = ()  # descriptions of the steps that completed
    message: str = ""
    blocking: tuple[SessionInfo, ...] = ()
    seconds: float = 0.0
    attempts: int = 0




# --- ownership and drift, shared by plan.py and plan_views.py ----------------------------------------


def foreign_reason(info: IndexInfo | ViewInfo, owner: str) -> str:
    """Why an object is not this resource's, for messages (never a user name or row value)."""
    if info.record is not None and info.record.owner != owner:
        return f"owned by {info.record.owner}"
    if isinstance(info, IndexInfo) and info.building_pid is not None:
        return f"being built by another session (pid {info.building_pid})"
    if info.marker is not None:
        return "its comment carries an owner marker but no ownership record names this object " \
               "(a copied or forged comment)"
    return "not created or adopted by this operator"


def _drift(d: DesiredIndex | DesiredView, existing: IndexInfo | ViewInfo, declared_change: str) -> str:
    """Why an object of ours no longer matches (its record against the spec and the catalog), or ""."""
    record = existing.record
    if record is None:
        return "no ownership record"
    if record.spec_hash != d.hash:
        return declared_change
    if record.def_hash != existing.def_hash:
        return "changed by hand in the database"
    return ""


def index_drift(d: DesiredIndex, existing: IndexInfo) -> str:
    """Why an index of ours no longer matches, or "" when it does."""
    return _drift(d, existing, "definition changed in the resource")


def view_drift(d: DesiredView, existing: ViewInfo) -> str:
    """Why a materialized view of ours no longer matches, or "" when it does."""
    return _drift(d, existing, "query or unique key changed in the resource")


def relkind(kind: str) -> str:
    return {"r": "table", "p": "partitioned table", "v": "view", "S": "sequence", "f": "foreign table",
            "c": "composite type", "i": "index", "I": "partitioned index",
            "m": "materialized view"}.get(kind, kind)
