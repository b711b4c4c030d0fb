"""Every operator knob, read from the environment (MARKETPLACEDB_*) once at start-up."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

PREFIX = "MARKETPLACEDB_"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# A Secret's name (RFC 1123 subdomain); naming.py is a sibling layer, so the pattern is repeated here.
_SECRET_NAME = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"


@dataclasses.dataclass(frozen=True)
class Settings:
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
    pooler_allowed_images: tuple[str, ...] = ()
    # The uid every pooler container runs as: PgBouncer admits the agent to its admin
    # socket without a password only for its own uid. 998 is `pgbouncer` in the default image
    # (CloudNativePG's Dockerfile: `useradd -r --uid 998 --gid 996 pgbouncer`); set it for an image
    # whose PgBouncer runs as another uid.
    pooler_run_as_uid: int = 998
    # Applied to every pod the operator creates (refresh CronJobs, poolers), in the application's
    # namespace: a private registry's pull Secret must exist there under these names. Comma-separated.
    image_pull_secrets: tuple[str, ...] = ()
    image_pull_policy: str = "IfNotPresent"
    # Watch scope: empty means all namespaces.
    namespaces: tuple[str, ...] = ()
    # Periodic drift detection; also the level-based safety net for missed events.
    resync_seconds: float = 300.0
    # Connections kept free on the server for the operator, refresh jobs and superusers when
    # sizing the pooler: max(headroom_min, headroom_fraction * max_connections).
    headroom_min_connections: int = 10
    headroom_fraction: float = 0.1
    # Index builds wait for older snapshots; they get their own, longer lock policy.
    index_lock_timeout_seconds: float = 60.0
    ddl_retries: int = 3
    ddl_retry_base_seconds: float = 0.5
    connect_timeout_seconds: float = 5.0
    # Temporary errors (unreachable database, missing Secret) retry after base, 2x base, 4x base...
    # (with jitter) up to max_backoff_seconds.
    retry_base_seconds: float = 5.0
    max_backoff_seconds: float = 300.0
    # How often each resource's timer wakes to see whether a reconcile is due (no I/O when not).
    tick_seconds: float = 5.0
    # Deletion is bounded: when teardown (deletionPolicy Drop) still cannot finish this long after
    # the deletionTimestamp (database unreachable, Secret deleted with the namespace), the
    # finalizer is released with a Warning Event listing what was retained.
    teardown_timeout_seconds: float = 600.0
    # HA (`run --peering NAME`): a replica that stops renewing its peering entry for this long is
    # presumed dead and the standby takes over, so a SIGKILLed leader is replaced within it.
    peering_lifetime_seconds: int = 60
    # Long DDL and operator-mode refreshes run in background threads, never on kopf's handler
    # threads: at most this many at once overall, and per database.
    max_background_jobs: int = 8
    max_background_jobs_per_database: int = 2
    # While background DDL runs, how often its progress is written to status.
    progress_seconds: float = 10.0
    # Database hosts a MarketplaceDB may name: host-name patterns (fnmatch, e.g. `*.db.internal`)
    # and IP networks (`10.20.0.0/16`). Empty: any host. A host outside the list is refused before
    # any Secret is read or connection made (README "Security model").
    allowed_database_hosts: tuple[str, ...] = ()
    metrics_port: int = 9090
    health_port: int = 8080
    log_format: str = "json"
    # Validating admission webhook (webhook.py): off at port 0; the chart mounts the certificate.
    webhook_port: int = 0
    webhook_addr: str = "0.0.0.0"
    webhook_certfile: str = "/etc/marketplacedb/webhook/tls.crt"
    webhook_keyfile: str = "/etc/marketplacedb/webhook/tls.key"

    def __post_init__(self) -> None:
        # Checked here so a bad chart value stops the operator at start-up with the variable's name,
        # not later as a Pod the API server rejects in some application namespace.
        if self.image_pull_policy not in PULL_POLICIES:
            raise ValueError(f"{PREFIX}IMAGE_PULL_POLICY={self.image_pull_policy!r}: one of {', '.join(PULL_POLICIES)}")
        for name in self.image_pull_secrets:
            if not re.fullmatch(_SECRET_NAME, name):
                raise ValueError(f"{PREFIX}IMAGE_PULL_SECRETS: {name!r} not a Secret name (lower-case DNS subdomain)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build from MARKETPLACEDB_<FIELD> variables; unknown or malformed values fail loudly."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(PREFIX + field.name.upper())
            if raw is None:
                continue
            try:
                values[field.name] = _convert(field.type, raw)
            except ValueError as exc:
                raise ValueError(f"{PREFIX}{field.name.upper()}={raw!r}: {exc}") from None
        return cls(**values)


def _convert(annotation: Any, raw: str) -> Any:
    kind = str(annotation)
    if kind == "float":
        return float(raw)
    if kind == "int":
        return int(raw)
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw
