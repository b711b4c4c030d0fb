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
from ..sqlcheck import SqlCheckError, normalize_expression, normalize_predicate, normalize_select
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


# Extensions `spec.database.extensions` may ask the operator to create (all trusted in PostgreSQL 15:
# a database owner may create them without superuser).
EXTENSIONS = ("btree_gin", "btree_gist", "pg_trgm")


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

    extensions: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list,
        max_length=3,
        description="Extensions the operator may create (CREATE EXTENSION IF NOT EXISTS) when a declared index "
        "needs one and the role may create it; otherwise such an index is reported as blocked with the "
        "statement a DBA must run. One of: btree_gin, btree_gist, pg_trgm.",
        json_schema_extra=cel(unique_rule("", "extensions must not repeat a name"),
                              ("self.all(e, e in ['btree_gin', 'btree_gist', 'pg_trgm'])",
                               "extensions: only btree_gin, btree_gist, pg_trgm")),
    )

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in EXTENSIONS:
                raise ValueError(f"{name!r} is not one of {', '.join(EXTENSIONS)}")
        if len(set(value)) != len(value):
            raise ValueError("extensions has duplicate names")
        return value

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


IndexMethod = Literal["btree", "hash", "gin", "gist", "brin"]

# Operator classes a spec may name, by index method (an allow-list: an opclass name becomes an SQL
# identifier, and each one listed here is known to PostgreSQL 15 or to the extension named in
# EXTENSION_OF_OPCLASS). Built-in default classes need no opclass at all.
OPCLASSES: dict[str, frozenset[str]] = {
    "btree": frozenset({"text_pattern_ops", "varchar_pattern_ops", "bpchar_pattern_ops"}),
    "hash": frozenset(),
    "gin": frozenset({"jsonb_ops", "jsonb_path_ops", "array_ops", "tsvector_ops", "gin_trgm_ops",
                      "int2_ops", "int4_ops", "int8_ops", "float4_ops", "float8_ops", "numeric_ops",
                      "text_ops", "varchar_ops", "bool_ops", "date_ops", "timestamp_ops", "timestamptz_ops",
                      "uuid_ops"}),
    "gist": frozenset({"gist_trgm_ops", "range_ops", "inet_ops", "tsvector_ops", "point_ops", "box_ops"}),
    "brin": frozenset({"int4_minmax_ops", "int8_minmax_ops", "date_minmax_ops", "timestamp_minmax_ops",
                       "timestamptz_minmax_ops", "numeric_minmax_ops", "int4_minmax_multi_ops",
                       "int8_minmax_multi_ops", "timestamptz_minmax_multi_ops", "timestamptz_bloom_ops",
                       "text_bloom_ops", "uuid_bloom_ops", "int8_bloom_ops", "inet_inclusion_ops",
                       "range_inclusion_ops"}),
}
_ALL_OPCLASSES = sorted(set().union(*OPCLASSES.values()))
# (method, opclass) -> the extension that provides it (a missing one blocks the index, see plan.py).
_BTREE_GIN = {"int2_ops", "int4_ops", "int8_ops", "float4_ops", "float8_ops", "numeric_ops", "text_ops",
              "varchar_ops", "bool_ops", "date_ops", "timestamp_ops", "timestamptz_ops", "uuid_ops"}
EXTENSION_OF_OPCLASS: dict[tuple[str, str], str] = {
    ("gin", "gin_trgm_ops"): "pg_trgm",
    ("gist", "gist_trgm_ops"): "pg_trgm",
    **{("gin", name): "btree_gin" for name in _BTREE_GIN},
}


class IndexColumn(Model):
    """One key column of an index: a column `name` or an `expression`, with an optional operator class."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.name) != has(self.expression)", "set exactly one of name and expression"),
        )
    )

    name: Identifier | None = Field(None, description="Column name (or set expression).")
    expression: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="An expression instead of a column (e.g. `lower(email)`), checked by PostgreSQL's parser; "
        "the deparsed text is what runs. One scalar expression: no subqueries, parameters or clauses.",
    )
    opclass: str | None = Field(
        None,
        max_length=63,
        description="Operator class (e.g. gin_trgm_ops, jsonb_path_ops, text_pattern_ops): one of "
        f"{', '.join(_ALL_OPCLASSES)}; which ones a method accepts is checked. gin_trgm_ops and gist_trgm_ops need "
        "the pg_trgm extension, the scalar gin classes (int4_ops, text_ops...) btree_gin.",
        json_schema_extra=cel((f"self in {in_list(_ALL_OPCLASSES)}", "opclass: only the allow-listed names")),
    )
    order: Literal["asc", "desc"] = Field("asc", description="Sort order (btree only).")
    nulls: Literal["first", "last"] | None = Field(
        None, description="NULLS FIRST/LAST (btree only; default: PostgreSQL's)."
    )

    @field_validator("expression")
    @classmethod
    def _expression(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return normalize_expression(value)
        except SqlCheckError as exc:
            raise ValueError(f"expression {exc}") from None

    @model_validator(mode="after")
    def _one_of(self) -> IndexColumn:
        if (self.name is None) == (self.expression is None):
            raise ValueError("set exactly one of name and expression")
        if self.opclass is not None and self.opclass not in _ALL_OPCLASSES:
            raise ValueError(f"opclass {self.opclass!r} is not one of {', '.join(_ALL_OPCLASSES)}")
        return self

    @property
    def label(self) -> str:
        return self.name if self.name is not None else f"({self.expression})"


class IndexStorage(Model):
    """Index storage parameters that matter (WITH (...)); each applies to some methods only."""

    fillfactor: int | None = Field(None, ge=10, le=100, description="Leaf page fill percentage (btree, hash, gist).")
    pages_per_range: int | None = Field(
        None, ge=1, le=131072, description="Table pages summarised per BRIN range (brin only)."
    )
    fastupdate: bool | None = Field(None, description="GIN pending list for faster inserts (gin only).")


_STORAGE_METHODS = {"fillfactor": ("btree", "hash", "gist"), "pages_per_range": ("brin",), "fastupdate": ("gin",)}


class IndexSpec(Model):
    """An index (btree, hash, gin, gist or brin), built and dropped CONCURRENTLY; partial (where),
    covering (include), on columns or expressions, with operator classes and storage parameters."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.include) || "
                "self.include.all(n, !self.columns.filter(c, has(c.name)).exists(c, c.name == n))",
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
        description="Key columns in order (hash: exactly one).",
        json_schema_extra=cel((
            "self.filter(a, has(a.name)).all(a, self.filter(b, has(b.name)).exists_one(b, b.name == a.name))",
            "columns must not repeat a column",
        )),
    )
    method: IndexMethod = Field(
        "btree",
        description="Index method: btree, hash (equality, one column), gin (jsonb, arrays, trigram search), "
        "gist, brin (large append-only tables).",
    )
    storage: IndexStorage | None = Field(None, description="Storage parameters (WITH (...)).")
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
        check_unique([c for c in self.columns if c.name is not None], "name", "column")
        keys = {c.name for c in self.columns if c.name is not None}
        clash = sorted(keys.intersection(self.include))
        if clash:
            raise ValueError(f"include repeats key columns {clash}")
        if len(set(self.include)) != len(self.include):
            raise ValueError("include has duplicate columns")
        self._method_fits()
        return self

    def _method_fits(self) -> None:
        method = self.method
        if self.unique and method != "btree":
            raise ValueError(f"unique: only btree indexes can be unique, not {method}")
        if self.include and method not in ("btree", "gist"):
            raise ValueError(f"include: {method} indexes have no INCLUDE columns (btree and gist only)")
        if method == "hash" and len(self.columns) != 1:
            raise ValueError("columns: a hash index has exactly one column")
        for number, column in enumerate(self.columns):
            if method != "btree" and (column.order != "asc" or column.nulls is not None):
                raise ValueError(f"columns[{number}]: order and nulls apply to btree only, not {method}")
            if column.opclass is not None and column.opclass not in OPCLASSES[method]:
                raise ValueError(f"columns[{number}].opclass: {column.opclass!r} is not a {method} operator class "
                                 f"(allowed: {', '.join(sorted(OPCLASSES[method])) or 'none'})")
        if self.storage is not None:
            for field, methods in _STORAGE_METHODS.items():
                if getattr(self.storage, field) is not None and method not in methods:
                    raise ValueError(f"storage.{field} applies to {', '.join(methods)} indexes, not {method}")

    @property
    def extensions(self) -> tuple[str, ...]:
        """Extensions the index needs (from its operator classes)."""
        needed = {EXTENSION_OF_OPCLASS.get((self.method, c.opclass or "")) for c in self.columns}
        return tuple(sorted(e for e in needed if e))


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
