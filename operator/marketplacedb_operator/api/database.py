"""MarketplaceDB spec, database side: the database reached, its TLS, credentials, per-database settings,
allowed extensions, and the DDL policy."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .bounds import cel
from .parameters import DATABASE_SETTINGS, SERVER_SETTINGS, check_named
from .types import DnsName, Duration, Identifier, Model, in_list, unique_rule

# Extensions `spec.database.extensions` may ask the operator to create (all trusted in PostgreSQL 15:
# a database owner may create them without superuser).
EXTENSIONS = ("btree_gin", "btree_gist", "pg_trgm")


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
        "Before applying them the operator confirms each value against the connected server's pg_settings "
        "(type, range, unit, choices): one value the server refuses is a Conflict naming it and the allowed "
        "range, and none is applied. Server-wide settings such as max_connections are reported, never changed.",
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
