"""MarketplaceDB v1alpha1: the resource's spec and status as pydantic v2 models.

These models are the single source of truth: the CRD's OpenAPI schema is generated from them
(`marketplacedb crd`), the CLI validates manifests with them, and the reconciler reads them.
Field descriptions become `kubectl explain` text and the README's resource reference.
"""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Any, ClassVar, Literal

from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .. import naming
from ..durations import DURATION_PATTERN, parse_duration
from ..sqlcheck import SqlCheckError, normalize_predicate, normalize_select
from . import bounds
from .bounds import cel
from .conditions import Condition
from .parameters import DATABASE_SETTINGS, PGBOUNCER_PARAMETERS, SERVER_SETTINGS, check_named


class Model(BaseModel):
    """camelCase on the wire, unknown fields rejected, snake_case in Python.

    Attribute docstrings become field descriptions (`kubectl explain`). Every spec field is
    bounded (its own max_length, or the defaults in api/bounds.py that the CRD carries too) and
    refuses NUL bytes, whoever adds it.
    """

    # strict: types as the API server takes them (no `true` for 1, no "5" for 5, no 0 for false).
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        strict=True,
    )
    # Status models are written by the operator, not by users: no spec bounds on them.
    checked_as_spec: ClassVar[bool] = True

    @field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        if cls.checked_as_spec and info.field_name is not None:
            bounds.check_field(value, cls.model_fields[info.field_name])
        return value


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


def _cron_field(number: str, names: bool = False) -> str:
    atom = f"({number}{'|[A-Za-z]{3}' if names else ''})"
    item = rf"(\*|{atom}(-{atom})?)(/[0-9]{{1,2}})?"
    return f"{item}(,{item})*"


# Kubernetes CronJobs take five fields or a macro (robfig/cron's standard parser). The pattern
# goes to the CRD as is, so the API server refuses `every 5 minutes` or `61 * * * *` at apply.
CRON_PATTERN = (
    r"^(@(yearly|annually|monthly|weekly|daily|hourly|midnight)|"
    + r" +".join(
        [
            _cron_field("[0-5]?[0-9]"),
            _cron_field("[01]?[0-9]|2[0-3]"),
            _cron_field("0?[1-9]|[12][0-9]|3[01]|\\?"),
            _cron_field("0?[1-9]|1[0-2]", names=True),
            _cron_field("[0-7]|\\?", names=True),
        ]
    )
    + ")$"
)


def _cron(value: str) -> str:
    if not re.fullmatch(CRON_PATTERN, value):
        raise ValueError(
            f"{value[:64]!r} is not a cron schedule: five fields (minute 0-59, hour 0-23, day 1-31, "
            "month 1-12, weekday 0-7) or @hourly/@daily/@weekly/@monthly/@yearly"
        )
    if not croniter.is_valid(value):
        raise ValueError(f"{value[:64]!r} is not a valid cron schedule")
    return value


# Patterns go to the CRD schema through json_schema_extra; in Python the validators below check
# the same rules and say in words what is wrong (a bare regex mismatch helps nobody).
Identifier = Annotated[
    str,
    Field(json_schema_extra={"pattern": naming.IDENTIFIER_PATTERN, "maxLength": naming.MAX_IDENTIFIER_BYTES}),
    AfterValidator(_identifier),
]
Duration = Annotated[
    str, Field(max_length=32, json_schema_extra={"pattern": DURATION_PATTERN}), AfterValidator(_duration)
]
DnsName = Annotated[str, Field(pattern=naming.DNS_LABEL_PATTERN, max_length=63)]


def _port_name(value: int | str) -> int | str:
    """A container port: a number 1..65535 or an IANA service name, as Kubernetes accepts it."""
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError(f"{value} is not a port: use 1..65535 or a port name")
    elif not (re.fullmatch(PORT_NAME_PATTERN, value) and re.search("[a-z]", value)):
        raise ValueError(f"{value[:20]!r} is not a port name: 1-15 lower-case letters, digits, '-', with a letter")
    return value


# IANA_SVC_NAME (k8s.io/apimachinery validation.IsValidPortName), checked in CEL with the same words.
PORT_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$"
_PORT_RULE = (
    "type(self) == int ? (self >= 1 && self <= 65535) : "
    f"(self.matches('{PORT_NAME_PATTERN}') && self.matches('[a-z]'))",
    "must be a port number 1..65535 or a port name (1-15 lower-case letters, digits, '-', with a letter)",
)
PortNumberOrName = Annotated[
    int | str, Field(json_schema_extra=cel(_PORT_RULE) | {"maxLength": 15}), AfterValidator(_port_name)
]


def _list_map(key: str) -> dict[str, Any]:
    """A list keyed by `key` (x-kubernetes-list-type: map): merged per item by server-side apply."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


def _in_list(names: Any) -> str:
    """A CEL list literal of allowed names."""
    return "[" + ", ".join(f"'{name}'" for name in sorted(names)) + "]"


def _unique_rule(expression: str, message: str) -> tuple[str, str]:
    """CEL: every item's `expression` occurs once (lists are bounded, so the n^2 cost is too)."""
    return f"self.all(a, self.exists_one(b, b{expression} == a{expression}))", message


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
    username_key: str = Field(
        "username",
        description="Key holding the user name; must be the key the Secret declares "
        "(annotation marketplacedb.io/username-key, default username).",
    )
    password_key: str = Field(
        "password",
        description="Key holding the password; must be the key the Secret declares "
        "(annotation marketplacedb.io/password-key, default password).",
    )


# Per-database timeouts below this cancel nearly every statement of every session (a value without
# a unit is milliseconds: statement_timeout "1" is 1 ms). The operator's own sessions set their own
# timeouts, but such a value would break the applications: refused (0, meaning off, is allowed).
TIMEOUT_SETTINGS_FLOOR_MS = 1000
_UNIT_MS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60000, "h": 3600000, "d": 86400000}


def _timeout_floor(name: str, value: str) -> None:
    if name not in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"):
        return
    number = value.rstrip("usminhd")
    milliseconds = int(number) * _UNIT_MS.get(value[len(number):] or "ms", 1)
    if 0 < milliseconds < TIMEOUT_SETTINGS_FLOOR_MS:
        raise ValueError(f"{value!r} is below 1s (a bare number is milliseconds): it would cancel almost every "
                         "statement of every session; use 0 (off) or at least 1s")


# A key of a Secret's or ConfigMap's data (https://kubernetes.io/docs/concepts/configuration/secret/).
DataKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]


class KeyRef(Model):
    """One key of a Secret or ConfigMap in the resource's namespace."""

    name: DnsName = Field(description="Object name.")
    key: DataKey = Field("ca.crt", description="Key holding the PEM text.")


class ClientCertRef(Model):
    """A Secret (opted in like the credentials Secret) with a client certificate and its key."""

    name: DnsName = Field(
        description="Secret name (label marketplacedb.io/credentials: \"true\", annotation "
        "marketplacedb.io/credentials-for naming this MarketplaceDB)."
    )
    cert_key: DataKey = Field("tls.crt", description="Key holding the PEM certificate.")
    key_key: DataKey = Field("tls.key", description="Key holding the PEM private key.")


class DatabaseTLS(Model):
    """TLS to the database: the CA that verifies the server (verify-ca, verify-full) and an optional
    client certificate. Used by the operator and mounted into refresh CronJob pods."""

    ca_secret_ref: KeyRef | None = Field(
        None,
        description="CA certificate(s) from a Secret (label marketplacedb.io/credentials: \"true\", annotation "
        "marketplacedb.io/credentials-for naming this MarketplaceDB).",
    )
    ca_config_map_ref: KeyRef | None = Field(None, description="CA certificate(s) from a ConfigMap.")
    client_cert_secret_ref: ClientCertRef | None = Field(None, description="Client certificate and key.")

    @model_validator(mode="after")
    def _one_ca(self) -> DatabaseTLS:
        if self.ca_secret_ref is not None and self.ca_config_map_ref is not None:
            raise ValueError("set one of caSecretRef and caConfigMapRef, not both")
        return self


class DatabaseSpec(Model):
    """The existing PostgreSQL database this resource manages (reached directly, never via the pooler)."""

    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.\-:\[\]]+$", description="Host name or IP.")
    port: int = Field(5432, ge=1, le=65535, description="Port.")
    dbname: Identifier = Field(description="Database name.")
    ssl_mode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        "prefer", description="libpq sslmode for the operator, refresh jobs and the pooler's upstream."
    )
    credentials_secret_ref: SecretRef = Field(
        description="Owner credentials (keys username, password). The Secret must carry the label "
        'marketplacedb.io/credentials: "true" and the annotation marketplacedb.io/credentials-for naming '
        'this MarketplaceDB (README "Security model").'
    )
    tls: DatabaseTLS | None = Field(
        None,
        description="CA and client certificate for TLS to the database. Without a CA, verify-ca and "
        "verify-full use the system CA store.",
    )
    settings: dict[str, str] = Field(
        default_factory=dict,
        max_length=len(DATABASE_SETTINGS),
        description="Per-database settings applied with ALTER DATABASE ... SET (allow-listed, typed, "
        f"range-checked against PostgreSQL 15's bounds): {', '.join(sorted(DATABASE_SETTINGS))}. "
        "Server-wide settings such as max_connections are reported, never changed.",
        json_schema_extra=cel(
            (f"self.all(k, k in {_in_list(DATABASE_SETTINGS)})", "settings: only the allow-listed names"),
        ),
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
                _timeout_floor(name, checked[name])
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


AdoptPolicy = Literal["IfIdentical", "Replace"]


class IndexColumn(Model):
    """One key column of an index."""

    name: Identifier = Field(description="Column name.")
    order: Literal["asc", "desc"] = Field("asc", description="Sort order.")
    nulls: Literal["first", "last"] | None = Field(None, description="NULLS FIRST/LAST (default: PostgreSQL's).")


class IndexSpec(Model):
    """A b-tree index, built and dropped CONCURRENTLY; partial (where) and covering (include)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.include) || self.include.all(n, !self.columns.exists(c, c.name == n))",
                "include must not repeat key columns",
            ),
        )
    )

    name: Identifier = Field(description="Index name (unique in the schema).")
    table: Identifier = Field(description="Table name.")
    schema_name: Identifier = Field("public", alias="schema", description="Schema of the table.")
    columns: list[IndexColumn] = Field(
        min_length=1,
        max_length=32,
        description="Key columns in order.",
        json_schema_extra=cel(_unique_rule(".name", "columns must not repeat a column")),
    )
    where: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Partial-index predicate: one boolean expression (e.g. `is_active = true`), checked by "
        "PostgreSQL's parser; no subqueries, parameters or trailing clauses. Nested at most about 45 operators deep.",
    )
    include: list[Identifier] = Field(
        default_factory=list,
        max_length=32,
        description="Covering (INCLUDE) columns.",
        json_schema_extra=cel(_unique_rule("", "include must not repeat a column")),
    )
    unique: bool = Field(False, description="UNIQUE index.")
    adopt: AdoptPolicy = Field(
        "IfIdentical",
        description="An existing index of this name that the operator did not create: IfIdentical adopts it "
        "only when its definition equals this one (else Conflict, left alone); Replace rebuilds it "
        "CONCURRENTLY under a temporary name, swaps it in and drops the old one.",
    )

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

    schedule: str = Field(
        max_length=128,
        description="Cron schedule: five fields (minute hour day-of-month month day-of-week) or a macro "
        "(@hourly, @daily, @weekly, @monthly, @yearly).",
        json_schema_extra={"pattern": CRON_PATTERN},
    )
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
        min_length=1,
        max_length=65536,
        description="Exactly one SELECT (checked by PostgreSQL's parser): no INTO, FOR UPDATE, parameters or "
        "data-modifying statements. Nested at most about 45 operators deep.",
    )
    unique_key: list[Identifier] = Field(
        min_length=1,
        max_length=32,
        description="Columns of the unique index (plain columns the view returns); at least one.",
        json_schema_extra=cel(_unique_rule("", "uniqueKey must not repeat a column")),
    )
    refresh: RefreshPolicy | None = Field(None, description="Refresh schedule; none means refresh only on demand.")
    adopt: AdoptPolicy = Field(
        "IfIdentical",
        description="An existing materialized view of this name that the operator did not create: IfIdentical "
        "adopts it only when its query equals this one (else Conflict, left alone); Replace builds the "
        "declared view under a temporary name and swaps it in (privileges, owner, options, comments and "
        "indexes carried over).",
    )

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
    """Prometheus metrics of the pooler."""

    enabled: bool = Field(False, description="Run a pgbouncer exporter sidecar.")
    service_monitor: bool = Field(False, description="Create a Prometheus Operator ServiceMonitor.")


class PoolerSpec(Model):
    """A PgBouncer Deployment in front of the database."""

    enabled: bool = Field(False, description="Run the pooler.")
    replicas: int = Field(2, ge=1, le=50, description="PgBouncer pods.")
    pool_mode: Literal["transaction", "session"] = Field("transaction", description="Pooling mode.")
    max_client_conn: int = Field(5000, ge=1, le=100000, description="Client connections per pod.")
    default_pool_size: int | Literal["auto"] = Field(
        "auto",
        description="Server connections per pod, 1..10000; auto derives it from max_connections and replicas.",
        json_schema_extra=cel(
            (
                "type(self) == int ? (self >= 1 && self <= 10000) : self == 'auto'",
                "defaultPoolSize must be 1..10000 or auto",
            )
        )
        | {"maxLength": 4},
    )
    image: str | None = Field(None, max_length=512, description="PgBouncer image (default: operator setting).")
    parameters: dict[str, int | str] = Field(
        default_factory=dict,
        max_length=len(PGBOUNCER_PARAMETERS),
        description="Extra pgbouncer.ini [pgbouncer] parameters (allow-listed, typed, range-checked): "
        f"{', '.join(sorted(PGBOUNCER_PARAMETERS))}.",
        json_schema_extra=cel(
            (f"self.all(k, k in {_in_list(PGBOUNCER_PARAMETERS)})", "parameters: only the allow-listed names")
        ),
    )
    metrics: PoolerMetrics = Field(default_factory=PoolerMetrics, description="Exporter sidecar.")
    resources: dict[str, dict[str, str]] | None = Field(
        None,
        max_length=2,
        description="Container resources: requests and limits, e.g. {requests: {cpu: 100m, memory: 64Mi}}.",
        json_schema_extra=cel(("self.all(k, k in ['limits', 'requests'])", "resources: only requests and limits")),
    )

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]] | None:
        unknown = sorted(set(value or {}) - {"limits", "requests"})
        if unknown:
            raise ValueError(f"only requests and limits, not {unknown}")
        return value

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
    """An HTTP GET probe."""

    path: str = Field(
        "/", pattern=r"^/[A-Za-z0-9/._~%!$&'()*+,;=:@-]*$", max_length=1024, description="Path, starting with /."
    )
    port: PortNumberOrName = Field(description="Container port: a number 1..65535 or a port name.")
    scheme: Literal["HTTP", "HTTPS"] = Field("HTTP", description="HTTP or HTTPS (certificate not verified).")


class TCPSocketAction(Model):
    """A TCP connect probe."""

    port: PortNumberOrName = Field(description="Container port: a number 1..65535 or a port name.")


class GRPCAction(Model):
    """A gRPC health-checking probe."""

    port: int = Field(ge=1, le=65535, description="Port number 1..65535.")
    service: str | None = Field(
        None, max_length=256, description="Service name sent in the health check request (default: the server)."
    )


_ONE_HANDLER = (
    "(has(self.httpGet) ? 1 : 0) + (has(self.tcpSocket) ? 1 : 0) + (has(self.grpc) ? 1 : 0) == 1",
    "a probe needs exactly one of httpGet, tcpSocket, grpc (exec is not allowed)",
)


class Probe(Model):
    """A Kubernetes probe limited to httpGet, tcpSocket or grpc (exec is not allowed)."""

    model_config = ConfigDict(json_schema_extra=cel(_ONE_HANDLER))

    http_get: HTTPGetAction | None = Field(None, description="HTTP GET handler.")
    tcp_socket: TCPSocketAction | None = Field(None, description="TCP connect handler.")
    grpc: GRPCAction | None = Field(None, description="gRPC health-check handler.")
    initial_delay_seconds: int | None = Field(None, ge=0, le=3600, description="Seconds before the first probe.")
    period_seconds: int | None = Field(None, ge=1, le=3600, description="Seconds between probes.")
    timeout_seconds: int | None = Field(None, ge=1, le=3600, description="Seconds before a probe times out.")
    success_threshold: int | None = Field(
        None, ge=1, le=100, description="Consecutive successes to count as healthy (1 for liveness and startup)."
    )
    failure_threshold: int | None = Field(None, ge=1, le=1000, description="Consecutive failures to count as failed.")

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
            raise ValueError(_ONE_HANDLER[1])
        return self


class HealthProbeSpec(Model):
    """Probes patched (server-side apply, only these fields) onto an application Deployment."""

    deployment: DnsName = Field(description="Deployment in the resource's namespace.")
    container: str | None = Field(
        None,
        pattern=naming.DNS_LABEL_PATTERN,
        max_length=63,
        description="Container name (default: the only container).",
    )
    readiness: Probe | None = Field(None, description="Readiness probe (none: left as it is).")
    liveness: Probe | None = Field(None, description="Liveness probe (none: left as it is).")
    startup: Probe | None = Field(None, description="Startup probe (none: left as it is).")


# --- the resource -----------------------------------------------------------------------------


_UNIQUE_RELATIONS = (
    "!has(self.indexes) || !has(self.materializedViews) || "
    "self.indexes.all(i, !self.materializedViews.exists(v, v.name == i.name && v.schema == i.schema))",
    "an index and a materialized view share a name",
)


class MarketplaceDBSpec(Model):
    """Desired state: database, DDL policy, indexes, materialized views, pooler, probes."""

    model_config = ConfigDict(json_schema_extra=cel(_UNIQUE_RELATIONS))

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
            raise ValueError(_UNIQUE_RELATIONS[1])
        return self


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
    conditions: Annotated[list[Condition], Field(json_schema_extra=_list_map("type"))] = Field(default_factory=list)
    """Ready, DatabaseReachable, SchemaApplied, RefreshScheduled, PoolerAvailable, ProbesApplied, Stale, Drifted."""
    indexes: Annotated[list[IndexStatus], Field(json_schema_extra=_list_map("name"))] = Field(default_factory=list)
    """Each declared index."""
    materialized_views: Annotated[list[ViewStatus], Field(json_schema_extra=_list_map("name"))] = Field(
        default_factory=list
    )
    """Each declared materialized view."""
    pooler: PoolerStatus | None = None
    """The pooler, when enabled."""
    plan: PlanStatus | None = None
    """The DDL plan (published for approval with ddl.approval: Manual)."""
    blocking_sessions: list[BlockingSession] = Field(default_factory=list)
    """Sessions that hold up an index build (pid, state, age; no query text)."""
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


class MarketplaceDB(Model):
    """A MarketplaceDB: indexes, materialized views, refreshes, a pooler and probes for one database."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    # metadata is the API server's (annotations may be long); the spec checks itself.
    checked_as_spec: ClassVar[bool] = False

    api_version: Literal["marketplacedb.io/v1alpha1"] = naming.API_VERSION  # type: ignore[assignment]
    kind: Literal["MarketplaceDB"] = naming.KIND  # type: ignore[assignment]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: MarketplaceDBSpec
    status: MarketplaceDBStatus | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        # As the API server would (plus: the name is also a label value, so at most 63 characters).
        name = value.get("name")
        if not isinstance(name, str):
            raise ValueError("name is required and must be a string")
        if not re.fullmatch(naming.DNS_LABEL_PATTERN, name):
            raise ValueError(
                f"name {name[:70]!r} must be a DNS-1123 label: at most 63 lower-case letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        namespace = value.get("namespace")
        if namespace is not None and not (
            isinstance(namespace, str) and re.fullmatch(naming.DNS_LABEL_PATTERN, namespace)
        ):
            raise ValueError(f"namespace {str(namespace)[:70]!r} must be a DNS-1123 label")
        return value
