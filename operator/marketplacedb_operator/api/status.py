"""MarketplaceDB status: written by the operator, read back by it and by `kubectl`."""

from __future__ import annotations

import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import (
    ConfigDict,
    Field,
)
from pydantic.alias_generators import to_camel

from .conditions import Condition
from .types import Model, list_map

# --- status -----------------------------------------------------------------------------------

IndexState = Literal["Valid", "Building", "Invalid", "Missing", "Drifted", "Failed", "Conflict", "Pending", "Adopted"]


class StatusModel(Model):
    """Status parts: written by the operator, so spec bounds are not applied when it builds them."""

    model_config = ConfigDict(strict=False)  # timestamps arrive as strings
    checked_as_spec: ClassVar[bool] = False


class IndexStatus(StatusModel):
    """One declared index as found in the database."""

    name: str
    """Index name."""
    state: IndexState
    """Valid, Building, Invalid (a failed CONCURRENTLY build), Missing, Drifted (differs from the spec),
    Failed, Conflict (a same-named object this resource does not own) or Pending (awaiting approval)."""
    message: str = ""
    """Why the index is not Valid."""


class DDLProgress(StatusModel):
    """DDL running in the background for this resource right now (an index build, a view swap)."""

    steps: int = Field(ge=0)
    """Plan steps being executed."""
    phase: str = Field(max_length=100)
    """pg_stat_progress_create_index phase of the running build (e.g. 'waiting for old snapshots'),
    or queued/running outside an index build."""
    index: str | None = Field(default=None, max_length=200)
    """The index being built."""
    blocks_done: int | None = Field(default=None, ge=0)
    """Blocks processed in the current phase."""
    blocks_total: int | None = Field(default=None, ge=0)
    """Blocks to process in the current phase."""
    since: datetime.datetime
    """When the work started (or was queued). A timestamp, not an age: an age would change the
    status, and cost a write, at every look."""


class ViewStatus(StatusModel):
    """One declared materialized view and its last refresh."""

    name: str
    """View name."""
    populated: bool = False
    """The view holds data (a first refresh ran)."""
    last_refresh_time: datetime.datetime | None = None
    """When the last refresh finished."""
    last_refresh_seconds: float | None = None
    """How long the last refresh took."""
    last_result: str | None = None
    """Outcome of the last refresh attempt: refreshed, refreshed-plain, skipped-busy, skipped-unchanged or failed."""
    stale: bool = False
    """Older than refresh.maxStaleness."""
    message: str = ""
    """Why the view is not as declared, or why the last refresh failed."""
    recent_outcomes: list[str] = Field(default_factory=list)
    """The last refresh outcomes (at most 5), newest first, whatever ran them."""
    refresh_rule: str | None = None
    """Which skip-if-unchanged rule applies to the view, and why (at most 512 characters)."""
    first_seen_time: datetime.datetime | None = None
    """When the operator first saw the view declared: a view never refreshed is stale from here."""


class PoolerBudget(StatusModel):
    """How the pooler's server connections fit under the database's max_connections."""

    max_connections: int
    """The server's max_connections."""
    headroom: int
    """Connections kept free for the operator, refresh jobs and administrators."""
    replicas: int
    """PgBouncer pods."""
    pool_size: int
    """Server connections per pod (default_pool_size)."""
    reserve_pool_size: int
    """Extra connections per pod under load (reserve_pool_size)."""
    max_db_connections: int
    """Per-pod cap on server connections to the database (max_db_connections)."""
    oversubscribed: bool = False
    """The pods could open more connections than available."""
    superuser_reserved_connections: int = 0
    """The server's superuser_reserved_connections."""
    budgeted_pods: int = 0
    """Pods that may hold server connections at once: replicas + 1 (a surge or draining pod)."""
    available: int = 0
    """max_connections - superuser_reserved_connections - headroom: what the pooler pods may share."""
    message: str = ""
    """How the budget was derived, or why it does not fit."""


class PoolerStatus(StatusModel):
    """The pooler Deployment as observed."""

    ready_replicas: int = 0
    """Ready PgBouncer pods."""
    endpoint: str | None = None
    """host:port applications connect to."""
    config_hash: str | None = None
    """Hash of the rendered pgbouncer.ini and userlist (pods roll when it changes)."""
    budget: PoolerBudget | None = None
    """How the pooler's server connections fit under the database's max_connections."""
    paused: bool = False
    """spec.pooler.paused as last applied (the agents PAUSE/RESUME)."""
    pgbouncer_version: str | None = None
    """The PgBouncer release the image tag names."""
    unsupported_parameters: list[str] = Field(default_factory=list)
    """spec.pooler.parameters newer than that release: left out of pgbouncer.ini."""


class OwnedObject(StatusModel):
    """A Kubernetes object the operator created (or adopted) for this resource: its proof of
    ownership, since users cannot write status and cannot choose a uid."""

    api_version: str
    """apiVersion of the object."""
    kind: str
    """Kind of the object."""
    name: str
    """Name of the object (in the resource's namespace)."""
    uid: str
    """metadata.uid from the operator's own create response."""


class BlockingSession(StatusModel):
    """A database session that holds up an index build (an older snapshot or a lock)."""

    pid: int
    """Backend process id."""
    state: str
    """pg_stat_activity.state (e.g. idle in transaction)."""
    age_seconds: float
    """Seconds since its transaction started."""
    query: str = ""
    """The statement's first keyword only (never its text: it may hold row values)."""


class PlanStatus(StatusModel):
    """The DDL plan awaiting approval (ddl.approval: Manual) or last executed."""

    hash: str
    """Hash of the plan's steps: approve with the annotation marketplacedb.io/approve-plan set to it."""
    steps: list[str] = Field(default_factory=list)
    """The steps in order, as SQL or a short description."""
    approved: bool = False
    """The hash was approved."""


class Summary(StatusModel):
    """One-line summary for `kubectl get`."""

    indexes: str = "0/0"
    """Valid indexes / declared indexes."""
    views: str = "0/0"
    """Populated views / declared views."""
    pooler: str = "-"
    """Ready pooler pods / replicas, or - without a pooler."""


class MarketplaceDBStatus(StatusModel):
    """Observed state, written by the operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    conditions: Annotated[list[Condition], Field(json_schema_extra=list_map("type"))] = Field(default_factory=list)
    """Ready, DatabaseReachable, SchemaApplied, RefreshScheduled, PoolerAvailable, ProbesApplied, Stale, Drifted."""
    indexes: Annotated[list[IndexStatus], Field(json_schema_extra=list_map("name"))] = Field(default_factory=list)
    """Each declared index."""
    materialized_views: Annotated[list[ViewStatus], Field(json_schema_extra=list_map("name"))] = Field(
        default_factory=list
    )
    """Each declared materialized view."""
    pooler: PoolerStatus | None = None
    """The pooler, when enabled."""
    plan: PlanStatus | None = None
    """The DDL plan (published for approval with ddl.approval: Manual)."""
    blocking_sessions: list[BlockingSession] = Field(default_factory=list)
    """Sessions that hold up an index build (pid, state, age; no query text)."""
    progress: DDLProgress | None = None
    """DDL running in the background right now, and how far it got."""
    advice: list[str] = Field(default_factory=list)
    """Suggestions the operator does not act on (server-wide settings, sizing)."""
    summary: Summary | None = None
    """Counts shown by `kubectl get`."""
    managed_settings: list[str] = Field(default_factory=list)
    """Database settings this resource set (reset when removed from the spec)."""
    probed_deployments: list[str] = Field(default_factory=list)
    """Deployments whose probes this resource patched (released when removed from the spec)."""
    handled_refresh_request: str | None = None
    """The last marketplacedb.io/refresh-now annotation value acted upon."""
    owned_objects: list[OwnedObject] = Field(default_factory=list)
    """Kubernetes objects the operator created for this resource (uid): only these are updated."""
