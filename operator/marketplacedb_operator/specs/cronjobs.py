"""Refresh CronJobs: one per materialized view with `refresh.mode: CronJob` (pure builder).

The pod runs `marketplacedb refresh --view NAME --schema SCHEMA` plus the view's policy flags, so
it needs no manifest file; it connects with libpq's environment variables, the credentials coming
from the Secret through secretKeyRef (never in args: a command line is visible to anyone who can
read the Pod). Overlap is prevented twice: `concurrencyPolicy: Forbid` here, and the refresh's own
advisory lock (which also covers the operator's timer and humans).
https://kubernetes.io/docs/concepts/workloads/controllers/cron-jobs/
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from croniter import croniter

from .. import naming
from ..api.v1alpha1 import MarketplaceDBSpec, MaterializedViewSpec, RefreshPolicy
from ..durations import parse_duration
from ..settings import Settings
from . import db_tls
from .meta import image_pull_secrets, object_meta, restricted_container_security, restricted_pod_security

COMPONENT = "refresh"
# Time for the pod to start, connect and take its lock on top of the refresh's statement_timeout.
DEADLINE_MARGIN_SECONDS = 60
# A run that could not start within this window is skipped (the next one will run); also keeps
# the controller from giving up after 100 missed schedules.
MAX_STARTING_DEADLINE_SECONDS = 300
MIN_STARTING_DEADLINE_SECONDS = 10
RESOURCES = {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
_REFERENCE_TIME = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)  # determinism: no clock


def refresh_args(view: MaterializedViewSpec, policy: RefreshPolicy) -> list[str]:
    """The pod's arguments: names and policy only, never a DSN or a credential."""
    return [
        "refresh",
        "--view", view.name,
        "--schema", view.schema_name,
        "--max-staleness", policy.max_staleness,
        "--timeout", policy.timeout,
        "--skip-if-unchanged" if policy.skip_if_unchanged else "--no-skip-if-unchanged",
        *[arg for table in policy.depends_on for arg in ("--depends-on", table)],
        *(["--allow-volatile-functions"] if view.allow_volatile_functions else []),
        "--history-limit", str(policy.history_limit),
        "-o", "json",
    ]


def connection_env(spec: MarketplaceDBSpec) -> list[dict[str, Any]]:
    """libpq's own variables: psycopg (libpq) reads them, nothing is parsed by us."""
    database = spec.database
    secret = database.credentials_secret_ref
    return [
        {"name": "PGHOST", "value": database.host},
        {"name": "PGPORT", "value": str(database.port)},
        {"name": "PGDATABASE", "value": database.dbname},
        {"name": "PGSSLMODE", "value": database.ssl_mode},
        {"name": "PGAPPNAME", "value": "marketplacedb-refresh"},
        {"name": "PGCONNECT_TIMEOUT", "value": "10"},
        {"name": "PGUSER", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.username_key}}},
        {"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.password_key}}},
        *db_tls.env(database),
    ]


def starting_deadline(schedule: str) -> int:
    """Half the schedule's interval, within [10s, 300s]: a late run never overlaps the next."""
    times = croniter(schedule, _REFERENCE_TIME)
    first: datetime.datetime = times.get_next(datetime.datetime)
    second: datetime.datetime = times.get_next(datetime.datetime)
    half = int((second - first).total_seconds() // 2)
    return max(MIN_STARTING_DEADLINE_SECONDS, min(MAX_STARTING_DEADLINE_SECONDS, half))


def _pod_spec(view: MaterializedViewSpec, policy: RefreshPolicy, spec: MarketplaceDBSpec,
              settings: Settings) -> dict[str, Any]:
    return {
        "restartPolicy": "Never",
        # The refresh talks to PostgreSQL only: no Kubernetes API token in the pod.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": restricted_pod_security(),
        **image_pull_secrets(settings),
        "containers": [
            {
                "name": COMPONENT,
                "image": settings.operator_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["marketplacedb"],
                "args": refresh_args(view, policy),
                "env": connection_env(spec),
                "resources": RESOURCES,
                "securityContext": restricted_container_security(),
                # Read-only root filesystem: Python and libpq may still want a scratch /tmp.
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *db_tls.volume_mounts(spec.database)],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}, *db_tls.volumes(spec.database)],
    }


def build_cronjob(resource: dict[str, Any], view: MaterializedViewSpec, spec: MarketplaceDBSpec,
                  settings: Settings) -> dict[str, Any]:
    policy = view.refresh
    if policy is None or policy.schedule is None:
        raise ValueError(f"view {view.name} has no refresh schedule")
    name = naming.refresh_cronjob_name(resource["metadata"]["name"], view.name)
    labels = naming.labels(resource["metadata"]["name"], COMPONENT)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": object_meta(resource, name, COMPONENT),
        "spec": {
            "schedule": policy.schedule,
            "timeZone": policy.time_zone or "Etc/UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": starting_deadline(policy.schedule),
            "suspend": policy.suspend,
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels},
                "spec": {
                    # One retry: a failed refresh is recorded; the next schedule tries again anyway.
                    "backoffLimit": 1,
                    "activeDeadlineSeconds": math.ceil(parse_duration(policy.timeout)) + DEADLINE_MARGIN_SECONDS,
                    "template": {"metadata": {"labels": labels}, "spec": _pod_spec(view, policy, spec, settings)},
                },
            },
        },
    }


def build_cronjobs(resource: dict[str, Any], spec: MarketplaceDBSpec, settings: Settings) -> list[dict[str, Any]]:
    """One CronJob per view refreshed by `mode: CronJob`, in spec order."""
    return [
        build_cronjob(resource, view, spec, settings)
        for view in spec.materialized_views
        if view.refresh is not None and view.refresh.mode == "CronJob"
    ]
