"""Every operator knob, read from the environment (MARKETPLACEDB_*) once at start-up.

pydantic-settings reads the variables and pydantic types them (the API models' style: one annotated
field per knob, a default, bounds where a wrong value would misbehave). What it replaced: a loop over
dataclass fields converting with float()/int() by the annotation's name, so a negative resync
interval or port 99999 was accepted. Two choices keep the old contract:

- Only `Settings.from_env(environ)` reads variables. `Settings()` and `Settings(field=...)` are the
  defaults plus the arguments (pydantic-settings would read os.environ on every construction; the
  chart's defaults in install.py and every test build Settings without looking at the environment).
  from_env reads the mapping it is given (os.environ in `run`, a rendered Deployment's env in tests
  and in the docs checker) through pydantic-settings' own env source.
- A bad value is a ValueError (SettingsError) naming the variable and the value, one line, never a
  pydantic traceback: `MARKETPLACEDB_RESYNC_SECONDS='abc': Input should be a valid number...`.
  Lists are comma-separated, as the chart writes them (NoDecode: not JSON).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

PREFIX = "MARKETPLACEDB_"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# A Secret's name (RFC 1123 subdomain); naming.py is a sibling layer, so the pattern is repeated here.
_SECRET_NAME = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"
# A comma-separated list in one variable (`a, b,` -> ("a", "b")).
Names = Annotated[tuple[str, ...], NoDecode]
Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[float, Field(gt=0)]


class SettingsError(ValueError):
    """A variable with a value the operator cannot use; the message names it."""


class Settings(BaseSettings):
    # Images. The operator's own image runs the refresh CronJobs (`marketplacedb refresh`).
    operator_image: str = "ghcr.io/marketplacedb/marketplacedb-operator:0.1.0"
    # A tag with public evidence: CloudNativePG's image definition (cloudnative-pg/pgbouncer-containers,
    # docker-bake.hcl, pgBouncerVersion "1.25.2-1.pgdg13+1") publishes ghcr.io/cloudnative-pg/pgbouncer
    # tagged with the plain version, and public manifests pull `:1.25.2`; CloudNativePG 1.28.1 itself
    # defaults to `:1.25.1` (pkg/versions/versions.go, DefaultPgbouncerImage). No digest published by
    # the project was found, so none is pinned here. 1.25.x is affected by CVE-2026-107350 (fixed in
    # 1.26.1): with several users in the auth file, see README "Pooler".
    pgbouncer_image: str = "ghcr.io/cloudnative-pg/pgbouncer:1.25.2"
    # Image repositories `spec.pooler.image` may name (the pod gets the auth file and, through it, the
    # users' credentials). Empty: only the repository of pgbouncer_image.
    pooler_allowed_images: Names = ()
    # The uid every pooler container runs as: PgBouncer admits the agent to its admin
    # socket without a password only for its own uid. 998 is `pgbouncer` in the default image
    # (CloudNativePG's Dockerfile: `useradd -r --uid 998 --gid 996 pgbouncer`); set it for an image
    # whose PgBouncer runs as another uid.
    pooler_run_as_uid: Annotated[int, Field(ge=0)] = 998
    # Applied to every pod the operator creates (refresh CronJobs, poolers), in the application's
    # namespace: a private registry's pull Secret must exist there under these names. Comma-separated.
    image_pull_secrets: Names = ()
    image_pull_policy: str = "IfNotPresent"
    # Watch scope: empty means all namespaces.
    namespaces: Names = ()
    # Periodic drift detection; also the level-based safety net for missed events.
    resync_seconds: Positive = 300.0
    # Connections kept free on the server for the operator, refresh jobs and superusers when
    # sizing the pooler: max(headroom_min, headroom_fraction * max_connections).
    headroom_min_connections: Annotated[int, Field(ge=0)] = 10
    headroom_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Index builds wait for older snapshots; they get their own, longer lock policy.
    index_lock_timeout_seconds: Positive = 60.0
    ddl_retries: Annotated[int, Field(ge=0)] = 3
    ddl_retry_base_seconds: Positive = 0.5
    connect_timeout_seconds: Positive = 5.0
    # Every Kubernetes API call (not kopf's watch) gives up after this long (connect, then the
    # answer): a request the API server or a half-open connection never answers holds a thread,
    # and the scheduler's reads of due resources run on a few (scheduler.py).
    kube_connect_timeout_seconds: Positive = 10.0
    kube_request_timeout_seconds: Positive = 30.0
    # Temporary errors (unreachable database, missing Secret) retry after base, 2x base, 4x base...
    # (with jitter) up to max_backoff_seconds.
    retry_base_seconds: Positive = 5.0
    max_backoff_seconds: Positive = 300.0
    # How often each resource's timer wakes to see whether a reconcile is due (no I/O when not).
    tick_seconds: Positive = 5.0
    # Deletion is bounded: when teardown (deletionPolicy Drop) still cannot finish this long after
    # the deletionTimestamp (database unreachable, Secret deleted with the namespace), the
    # finalizer is released with a Warning Event listing what was retained.
    teardown_timeout_seconds: Positive = 600.0
    # HA (`run --peering NAME`): a replica that stops renewing its peering entry for this long is
    # presumed dead and the standby takes over, so a SIGKILLed leader is replaced within it.
    peering_lifetime_seconds: Annotated[int, Field(ge=1)] = 60
    # Long DDL and operator-mode refreshes run in background threads, never on kopf's handler
    # threads: at most this many at once overall, and per database.
    max_background_jobs: Annotated[int, Field(ge=1)] = 8
    max_background_jobs_per_database: Annotated[int, Field(ge=1)] = 2
    # While background DDL runs, how often its progress is written to status.
    progress_seconds: Positive = 10.0
    # Database hosts a MarketplaceDB may name: host-name patterns (fnmatch, e.g. `*.db.internal`)
    # and IP networks (`10.20.0.0/16`). Empty: any host. A host outside the list is refused before
    # any Secret is read or connection made (README "Security model").
    allowed_database_hosts: Names = ()
    metrics_port: Port = 9090
    health_port: Port = 8080
    log_format: str = "json"
    # Validating admission webhook (webhook.py): off at port 0; the chart mounts the certificate.
    webhook_port: Port = 0
    webhook_addr: str = "0.0.0.0"
    webhook_certfile: str = "/etc/marketplacedb/webhook/tls.crt"
    webhook_keyfile: str = "/etc/marketplacedb/webhook/tls.key"


    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="forbid")

    @field_validator("pooler_allowed_images", "image_pull_secrets", "namespaces", "allowed_database_hosts",
                     mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    # Checked here so a bad chart value stops the operator at start-up with the variable's name,
    # not later as a Pod the API server rejects in some application namespace.
    @field_validator("image_pull_policy")
    @classmethod
    def _pull_policy(cls, value: str) -> str:
        if value not in PULL_POLICIES:
            raise ValueError(f"{PREFIX}IMAGE_PULL_POLICY={value!r}: one of {', '.join(PULL_POLICIES)}")
        return value

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.fullmatch(_SECRET_NAME, name):
                raise ValueError(f"{PREFIX}IMAGE_PULL_SECRETS: {name!r} not a Secret name (lower-case DNS subdomain)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Construction reads no environment and no .env file: only from_env does, from its mapping.
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build from MARKETPLACEDB_<FIELD> variables; a malformed value is a SettingsError naming it."""
        return cls.checked(**_Variables(cls, environ)())

    @classmethod
    def checked(cls, **values: Any) -> Settings:
        """Settings(**values), with a bad value as a one-line SettingsError naming its variable."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(_explain(exc, values)) from None


class _Variables(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Variable names as the process environment has them (case-insensitive, like the default).
        return {key.lower(): value for key, value in self._environ.items()}


def _explain(exc: ValidationError, values: Mapping[str, Any]) -> str:
    """The first problem, one line: the variable, its value, and what was wrong."""
    error = exc.errors(include_url=False)[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if message.startswith(PREFIX):  # our own validators already name the variable
        return message
    return f"{PREFIX}{field.upper()}={values.get(field)!r}: {message}"
