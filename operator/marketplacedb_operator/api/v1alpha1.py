"""MarketplaceDB v1alpha1: the resource's spec and status as pydantic v2 models.

These models are the single source of truth: the CRD's OpenAPI schema is generated from them
(`marketplacedb crd`), the CLI validates manifests with them, and the reconciler reads them.
Field descriptions become `kubectl explain` text and the README's resource reference.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

from croniter import croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .. import naming
from ..durations import DURATION_PATTERN, parse_duration
from ..sqlcheck import SqlCheckError, normalize_predicate, normalize_select
from .conditions import Condition
from .parameters import DATABASE_SETTINGS, PGBOUNCER_PARAMETERS, SERVER_SETTINGS, check_named


class Model(BaseModel):
    """camelCase on the wire, unknown fields rejected, snake_case in Python."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _identifier(value: str) -> str:
    size = len(value.encode())
    if size > naming.MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"{value[:20]!r}... is {size} bytes: PostgreSQL identifiers are at most "
            f"{naming.MAX_IDENTIFIER_BYTES} bytes (longer ones are silently truncated)"
        )
    if not naming.is_identifier(value):
        raise ValueError(
            f"{value!r} is not a safe PostgreSQL identifier: use lower-case letters, digits and "
            f"underscores, starting with a letter or underscore, at most {naming.MAX_IDENTIFIER_BYTES} bytes"
        )
    return value


def _duration(value: str) -> str:
    parse_duration(value)
    return value


def _cron(value: str) -> str:
    # Kubernetes CronJobs take five fields or a macro (@hourly, ...); croniter parses both.
    fields = value.split()
    if not (value.startswith("@") and len(fields) == 1) and len(fields) != 5:
        raise ValueError(f"{value!r} is not a cron schedule: five fields (min hour dom month dow) or @hourly")
    if not croniter.is_valid(value):
        raise ValueError(f"{value!r} is not a valid cron schedule")
    return value


# Patterns go to the CRD schema through json_schema_extra; in Python the validators below check
# the same rules and say in words what is wrong (a bare regex mismatch helps nobody).
Identifier = Annotated[
    str,
    Field(json_schema_extra={"pattern": naming.IDENTIFIER_PATTERN, "maxLength": naming.MAX_IDENTIFIER_BYTES}),
    AfterValidator(_identifier),
]
Duration = Annotated[str, Field(json_schema_extra={"pattern": DURATION_PATTERN}), AfterValidator(_duration)]
DnsName = Annotated[str, Field(pattern=naming.DNS_LABEL_PATTERN, max_length=63)]


def _list_map(key: str) -> dict[str, Any]:
    """A list keyed by `key` (x-kubernetes-list-type: map): merged per item by server-side apply."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


def _unique(items: list[Any], key: str, what: str) -> None:
    seen: set[str] = set()
    for item in items:
        value = getattr(item, key)
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


# --- database ---------------------------------------------------------------------------------


class SecretRef(Model):
    """A Secret in the resource's namespace holding the database owner's credentials."""

    name: DnsName = Field(description="Secret name.")
    username_key: str = Field("username", description="Key holding the user name.")
    password_key: str = Field("password", description="Key holding the password.")


class DatabaseSpec(Model):
    """The existing PostgreSQL database this resource manages (reached directly, never via the pooler)."""

    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.\-:\[\]]+$", description="Host name or IP.")
    port: int = Field(5432, ge=1, le=65535, description="Port.")
    dbname: Identifier = Field(description="Database name.")
    ssl_mode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        "prefer", description="libpq sslmode for the operator, refresh jobs and the pooler's upstream."
    )
    credentials_secret_ref: SecretRef = Field(description="Owner credentials (keys username, password).")
    settings: dict[str, str] = Field(
        default_factory=dict,
        description="Per-database settings applied with ALTER DATABASE ... SET (allow-listed, typed). "
        "Server-wide settings such as max_connections are reported, never changed.",
    )

    @field_validator("settings")
    @classmethod
    def _settings(cls, value: dict[str, str]) -> dict[str, str]:
        checked = {}
        for name, raw in value.items():
            if name in SERVER_SETTINGS:
                raise ValueError(f"{name!r} is server-wide: it cannot be set per database (reported in status)")
            try:
                checked[name] = check_named(DATABASE_SETTINGS, name, raw, "database setting")
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return dict(sorted(checked.items()))


class DDLPolicy(Model):
    """How DDL is run against the database."""

    lock_timeout: Duration = Field("5s", description="lock_timeout for ordinary DDL; failures retry with jitter.")
    statement_timeout: Duration = Field("30m", description="statement_timeout for every DDL statement.")
    deletion_policy: Literal["Retain", "Drop"] = Field(
        "Retain",
        description="On delete: Retain keeps database objects; Drop removes only objects this resource created.",
    )
    approval: Literal["Automatic", "Manual"] = Field(
        "Automatic",
        description="Manual: the plan is published in status and executed only once its hash is approved "
        "(annotation marketplacedb.io/approve-plan).",
    )


# --- indexes ----------------------------------------------------------------------------------


class IndexColumn(Model):
    name: Identifier = Field(description="Column name.")
    order: Literal["asc", "desc"] = Field("asc", description="Sort order.")
    nulls: Literal["first", "last"] | None = Field(None, description="NULLS FIRST/LAST (default: PostgreSQL's).")


class IndexSpec(Model):
    """A b-tree index, built and dropped CONCURRENTLY; partial (where) and covering (include)."""

    name: Identifier = Field(description="Index name (unique in the schema).")
    table: Identifier = Field(description="Table name.")
    schema_name: Identifier = Field("public", alias="schema", description="Schema of the table.")
    columns: list[IndexColumn] = Field(min_length=1, max_length=32, description="Key columns in order.")
    where: str | None = Field(None, max_length=4096, description="Partial-index predicate (a boolean expression).")
    include: list[Identifier] = Field(default_factory=list, max_length=32, description="Covering (INCLUDE) columns.")
    unique: bool = Field(False, description="UNIQUE index.")

    @field_validator("where")
    @classmethod
    def _where(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return normalize_predicate(value)
        except SqlCheckError as exc:
            raise ValueError(f"predicate {exc}") from None

    @model_validator(mode="after")
    def _columns(self) -> IndexSpec:
        _unique(self.columns, "name", "column")
        keys = {c.name for c in self.columns}
        clash = sorted(keys.intersection(self.include))
        if clash:
            raise ValueError(f"include repeats key columns {clash}")
        if len(set(self.include)) != len(self.include):
            raise ValueError("include has duplicate columns")
        return self


# --- materialized views -----------------------------------------------------------------------


class RefreshPolicy(Model):
    """When and how a materialized view is refreshed (never overlapping)."""

    schedule: str = Field(description="Cron schedule (five fields or @hourly-style macro).")
    mode: Literal["CronJob", "Operator"] = Field(
        "CronJob", description="CronJob: a Kubernetes CronJob per view; Operator: the operator's own timer."
    )
    skip_if_unchanged: bool = Field(True, description="Skip when the base tables saw no writes since the last refresh.")
    max_staleness: Duration = Field("1h", description="Refresh anyway after this long; beyond it the view is Stale.")
    timeout: Duration = Field("5m", description="statement_timeout of one refresh (and the Job's deadline).")
    suspend: bool = Field(False, description="Pause scheduled refreshes.")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        return _cron(value)


class MaterializedViewSpec(Model):
    """A materialized view with the unique index that REFRESH ... CONCURRENTLY needs."""

    name: Identifier = Field(description="View name.")
    schema_name: Identifier = Field("public", alias="schema", description="Schema.")
    query: str = Field(
        min_length=1, max_length=65536, description="Exactly one SELECT (checked by PostgreSQL's parser)."
    )
    unique_key: list[Identifier] = Field(
        min_length=1, max_length=32, description="Columns of the unique index (plain columns the view returns)."
    )
    refresh: RefreshPolicy | None = Field(None, description="Refresh schedule; none means refresh only on demand.")

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        try:
            return normalize_select(value)
        except SqlCheckError as exc:
            raise ValueError(f"query {exc}") from None

    @field_validator("unique_key")
    @classmethod
    def _key(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("uniqueKey has duplicate columns")
        return value


# --- pooler -----------------------------------------------------------------------------------


class PoolerMetrics(Model):
    enabled: bool = Field(False, description="Run a pgbouncer exporter sidecar.")
    service_monitor: bool = Field(False, description="Create a Prometheus Operator ServiceMonitor.")


class PoolerSpec(Model):
    """A PgBouncer Deployment in front of the database."""

    enabled: bool = Field(False, description="Run the pooler.")
    replicas: int = Field(2, ge=1, le=50, description="PgBouncer pods.")
    pool_mode: Literal["transaction", "session"] = Field("transaction", description="Pooling mode.")
    max_client_conn: int = Field(5000, ge=1, le=100000, description="Client connections per pod.")
    default_pool_size: int | Literal["auto"] = Field(
        "auto", description="Server connections per pod; auto derives it from max_connections and replicas."
    )
    image: str | None = Field(None, max_length=512, description="PgBouncer image (default: operator setting).")
    parameters: dict[str, int | str] = Field(
        default_factory=dict, description="Extra pgbouncer.ini [pgbouncer] parameters (allow-listed, typed)."
    )
    metrics: PoolerMetrics = Field(default_factory=PoolerMetrics, description="Exporter sidecar.")
    resources: dict[str, dict[str, str]] | None = Field(None, description="Container resources (requests/limits).")

    @field_validator("default_pool_size")
    @classmethod
    def _pool_size(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 10000:
            raise ValueError("defaultPoolSize must be 1..10000 or auto")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        checked: dict[str, int | str] = {}
        for name, raw in value.items():
            if name in ("pool_mode", "max_client_conn", "default_pool_size"):
                raise ValueError(f"{name!r} is a field of the pooler (poolMode, maxClientConn, defaultPoolSize)")
            try:
                checked[name] = check_named(PGBOUNCER_PARAMETERS, name, raw, "pooler parameter")
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return dict(sorted(checked.items()))


# --- health probes ----------------------------------------------------------------------------


class HTTPGetAction(Model):
    path: str = Field("/", pattern=r"^/[A-Za-z0-9/._~%!$&'()*+,;=:@-]*$", max_length=1024)
    port: int | str = Field(description="Port number or name.")
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"


class TCPSocketAction(Model):
    port: int | str


class GRPCAction(Model):
    port: int = Field(ge=1, le=65535)
    service: str | None = None


class Probe(Model):
    """A Kubernetes probe limited to httpGet, tcpSocket or grpc (exec is not allowed)."""

    http_get: HTTPGetAction | None = None
    tcp_socket: TCPSocketAction | None = None
    grpc: GRPCAction | None = None
    initial_delay_seconds: int | None = Field(None, ge=0, le=3600)
    period_seconds: int | None = Field(None, ge=1, le=3600)
    timeout_seconds: int | None = Field(None, ge=1, le=3600)
    success_threshold: int | None = Field(None, ge=1, le=100)
    failure_threshold: int | None = Field(None, ge=1, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _no_exec(cls, data: Any) -> Any:
        if isinstance(data, dict) and "exec" in data:
            raise ValueError("exec probes are not allowed: use httpGet, tcpSocket or grpc")
        return data

    @model_validator(mode="after")
    def _one_handler(self) -> Probe:
        handlers = [n for n in ("http_get", "tcp_socket", "grpc") if getattr(self, n) is not None]
        if len(handlers) != 1:
            raise ValueError("a probe needs exactly one of httpGet, tcpSocket, grpc (exec is not allowed)")
        return self


class HealthProbeSpec(Model):
    """Probes patched (server-side apply, only these fields) onto an application Deployment."""

    deployment: DnsName = Field(description="Deployment in the resource's namespace.")
    container: str | None = Field(None, description="Container name (default: the only container).")
    readiness: Probe | None = None
    liveness: Probe | None = None
    startup: Probe | None = None


# --- the resource -----------------------------------------------------------------------------


class MarketplaceDBSpec(Model):
    database: DatabaseSpec = Field(description="The database (reached directly, never through the pooler).")
    ddl: DDLPolicy = Field(default_factory=DDLPolicy, description="How DDL runs: timeouts, deletion, approval.")
    indexes: Annotated[list[IndexSpec], Field(json_schema_extra=_list_map("name"))] = Field(
        default_factory=list, max_length=200, description="B-tree indexes, built and dropped CONCURRENTLY."
    )
    materialized_views: Annotated[list[MaterializedViewSpec], Field(json_schema_extra=_list_map("name"))] = Field(
        default_factory=list, max_length=50, description="Materialized views and their refresh schedules."
    )
    pooler: PoolerSpec = Field(default_factory=PoolerSpec, description="The PgBouncer pooler.")
    health_probes: Annotated[list[HealthProbeSpec], Field(json_schema_extra=_list_map("deployment"))] = Field(
        default_factory=list, max_length=100, description="Probes to patch onto application Deployments."
    )

    @model_validator(mode="after")
    def _names(self) -> MarketplaceDBSpec:
        _unique(self.indexes, "name", "index name")
        _unique(self.materialized_views, "name", "materialized view name")
        _unique(self.health_probes, "deployment", "healthProbes deployment")
        # Indexes and views share the relation namespace of their schema.
        relations = [(i.schema_name, i.name) for i in self.indexes]
        relations += [(v.schema_name, v.name) for v in self.materialized_views]
        if len(set(relations)) != len(relations):
            raise ValueError("an index and a materialized view share a name")
        return self


# --- status -----------------------------------------------------------------------------------

IndexState = Literal["Valid", "Building", "Invalid", "Missing", "Drifted", "Failed", "Conflict", "Pending"]


class IndexStatus(Model):
    name: str
    state: IndexState
    message: str = ""


class DDLProgress(Model):
    """Long DDL running in the background for this resource (an index build, a view swap)."""

    steps: int = Field(description="Plan steps being executed.", ge=0, le=10000)
    phase: str = Field(
        description="pg_stat_progress_create_index phase of the running build (e.g. 'waiting for old "
        "snapshots'), or 'queued'/'running' outside an index build.",
        max_length=100,
    )
    index: str | None = Field(default=None, description="The index being built.", max_length=200)
    blocks_done: int | None = Field(default=None, description="Blocks processed in the current phase.", ge=0)
    blocks_total: int | None = Field(default=None, description="Blocks to process in the current phase.", ge=0)
    seconds: float = Field(description="Seconds since the work started (or was queued).", ge=0)


class ViewStatus(Model):
    name: str
    populated: bool = False
    last_refresh_time: datetime.datetime | None = None
    last_refresh_seconds: float | None = None
    last_result: str | None = None
    stale: bool = False
    message: str = ""


class PoolerBudget(Model):
    max_connections: int
    headroom: int
    replicas: int
    pool_size: int
    reserve_pool_size: int
    max_db_connections: int
    oversubscribed: bool = False
    superuser_reserved_connections: int = 0
    # Pods that may hold server connections at once: replicas + 1 (a surge or draining pod).
    budgeted_pods: int = 0
    # max_connections - superuser_reserved_connections - headroom: what the pooler pods may share.
    available: int = 0
    message: str = ""


class PoolerStatus(Model):
    ready_replicas: int = 0
    endpoint: str | None = None
    config_hash: str | None = None
    budget: PoolerBudget | None = None


class BlockingSession(Model):
    pid: int
    state: str
    age_seconds: float
    query: str = ""


class PlanStatus(Model):
    hash: str
    steps: list[str] = Field(default_factory=list)
    approved: bool = False


class Summary(Model):
    indexes: str = "0/0"
    views: str = "0/0"
    pooler: str = "-"


class MarketplaceDBStatus(Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    observed_generation: int | None = None
    conditions: Annotated[list[Condition], Field(json_schema_extra=_list_map("type"))] = Field(default_factory=list)
    indexes: Annotated[list[IndexStatus], Field(json_schema_extra=_list_map("name"))] = Field(default_factory=list)
    materialized_views: Annotated[list[ViewStatus], Field(json_schema_extra=_list_map("name"))] = Field(
        default_factory=list
    )
    pooler: PoolerStatus | None = None
    plan: PlanStatus | None = None
    blocking_sessions: list[BlockingSession] = Field(default_factory=list)
    progress: DDLProgress | None = Field(
        default=None, description="DDL running in the background right now, and how far it got."
    )
    advice: list[str] = Field(default_factory=list)
    summary: Summary | None = None
    # What this resource changed outside its own objects, so that removals can be undone.
    managed_settings: list[str] = Field(default_factory=list)
    probed_deployments: list[str] = Field(default_factory=list)
    # The last marketplacedb.io/refresh-now annotation value acted upon.
    handled_refresh_request: str | None = None


class MarketplaceDB(Model):
    """A MarketplaceDB: indexes, materialized views, refreshes, a pooler and probes for one database."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    api_version: Literal["marketplacedb.io/v1alpha1"] = naming.API_VERSION  # type: ignore[assignment]
    kind: Literal["MarketplaceDB"] = naming.KIND  # type: ignore[assignment]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: MarketplaceDBSpec
    status: MarketplaceDBStatus | None = None
