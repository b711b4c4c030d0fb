"""MarketplaceDB spec, database side: the database, the DDL policy, indexes and materialized views."""

from __future__ import annotations

import zoneinfo
from typing import Annotated, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..durations import parse_duration
from ..querydeps import volatile_calls
from ..sqlcheck import SqlCheckError, normalize_predicate, normalize_select
from .bounds import cel
from .parameters import DATABASE_SETTINGS, SERVER_SETTINGS, check_named
from .types import CRON_PATTERN, DnsName, Duration, Identifier, Model, check_cron, check_unique, in_list, unique_rule


def _not_temporary(value: str) -> str:
    # The schema engine builds replacements as <name>__new, parks replaced indexes as <name>__old and
    # names a view's unique index <view>__key: a declared name of that form would collide with another
    # declared object's temporary name.
    for suffix in ("__new", "__old", "__key"):
        if value.endswith(suffix):
            raise ValueError(f"{value!r} ends in {suffix!r}, reserved for the operator's temporary names")
    return value


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

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!(has(self.caSecretRef) && has(self.caConfigMapRef))",
                "set one of caSecretRef and caConfigMapRef, not both",
            )
        )
    )

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
            (f"self.all(k, k in {in_list(DATABASE_SETTINGS)})", "settings: only the allow-listed names"),
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
    _name_not_temporary = field_validator("name")(_not_temporary)
    table: Identifier = Field(description="Table name.")
    schema_name: Identifier = Field("public", alias="schema", description="Schema of the table.")
    columns: list[IndexColumn] = Field(
        min_length=1,
        max_length=32,
        description="Key columns in order.",
        json_schema_extra=cel(unique_rule(".name", "columns must not repeat a column")),
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
        json_schema_extra=cel(unique_rule("", "include must not repeat a column")),
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
        check_unique(self.columns, "name", "column")
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

    model_config = ConfigDict(json_schema_extra=cel(
        ("has(self.schedule) != has(self.every)", "set exactly one of schedule and every"),
        ("!has(self.every) || self.mode == 'Operator'", "every needs mode: Operator"),
    ))

    schedule: str | None = Field(
        None,
        max_length=128,
        description="Cron schedule: five fields (minute hour day-of-month month day-of-week) or a macro "
        "(@hourly, @daily, @weekly, @monthly, @yearly); required unless `every` is set.",
        json_schema_extra={"pattern": CRON_PATTERN},
    )
    mode: Literal["CronJob", "Operator"] = Field(
        "CronJob", description="CronJob: a Kubernetes CronJob per view; Operator: the operator's own timer."
    )
    every: Duration | None = Field(
        None, max_length=16,
        description="mode Operator only: refresh at this interval instead of a cron schedule, from 5s to 24h "
        "(e.g. 30s: the option when one minute is too coarse).",
    )
    time_zone: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_+\-/]+$",
        description="IANA time zone the schedule is read in (e.g. Europe/Berlin); default Etc/UTC. Passed to "
        "the CronJob and honoured by mode Operator.",
    )
    skip_if_unchanged: bool = Field(True, description="Skip when the base tables saw no writes since the last refresh.")
    depends_on: list[Annotated[str, Field(max_length=127, pattern=r"^[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)?$")]] = (
        Field(
            default_factory=list, max_length=64,
            description="Tables (table in the view's schema, or schema.table) whose writes count for skipIfUnchanged "
            "besides those the "
            "view reads directly: declare the tables its functions read, else a view calling a non-built-in, "
            "stable or volatile function is refreshed on every schedule.",
        )
    )
    history_limit: int = Field(20, ge=1, le=1000, description="Runs kept in the refresh history of this view.")
    max_staleness: Duration = Field("1h", description="Refresh anyway after this long; beyond it the view is Stale.")
    timeout: Duration = Field("5m", description="statement_timeout of one refresh (and the Job's deadline).")
    suspend: bool = Field(False, description="Pause scheduled refreshes.")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("time_zone")
    @classmethod
    def _time_zone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timeZone {value!r} is not an IANA time zone name (e.g. Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _when(self) -> RefreshPolicy:
        if self.every is not None:
            if self.mode != "Operator":
                raise ValueError("every needs mode: Operator (a CronJob cannot run more often than once a minute)")
            if not 5 <= parse_duration(self.every) <= 86400:
                raise ValueError(f"every {self.every!r} must be between 5s and 24h")
            if self.schedule is not None:
                raise ValueError("set either schedule or every, not both")
        elif self.schedule is None:
            raise ValueError("schedule is required (or every, with mode: Operator)")
        return self


class MaterializedViewSpec(Model):
    """A materialized view with the unique index that REFRESH ... CONCURRENTLY needs."""

    name: Identifier = Field(description="View name.")
    _name_not_temporary = field_validator("name")(_not_temporary)
    schema_name: Identifier = Field("public", alias="schema", description="Schema.")
    allow_volatile_functions: bool = Field(
        False,
        description="DANGEROUS: accept calls to volatile functions (setval, nextval, lo_*, pg_terminate_backend, "
        "random, ...) in the query. They run with the role's full rights when the view is created and at every "
        "refresh; refused by default, with the function named.",
    )
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
        json_schema_extra=cel(unique_rule("", "uniqueKey must not repeat a column")),
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
    def _query(cls, value: str, info: ValidationInfo) -> str:
        try:
            query = normalize_select(value)
        except SqlCheckError as exc:
            raise ValueError(f"query {exc}") from None
        calls = [] if info.data.get("allow_volatile_functions") else volatile_calls(query)
        if calls:
            raise ValueError(
                f"query calls volatile function(s) {', '.join(calls)}: they can write or act on every refresh; "
                "set allowVolatileFunctions: true to accept (dangerous)"
            )
        return query

    @field_validator("unique_key")
    @classmethod
    def _key(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("uniqueKey has duplicate columns")
        return value
