"""What every part of a reconcile shares: the Context, opening the database, and scrubbing errors.

reconcile.py runs the parts (reconcile_database.py: schema and refreshes; reconcile_objects.py:
CronJobs, the pooler, probes) and composes status; teardown.py reuses the database opening.
No kopf here.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

from pydantic import ValidationError

from . import credentials as creds
from . import jobs, naming
from .api.v1alpha1 import MarketplaceDBSpec, MarketplaceDBStatus
from .background import Job
from .owned import Record
from .ports import ConnInfo, Database, Deps
from .redact import UNREACHABLE, describe_db_error
from .status import Problem

log = logging.getLogger(__name__)


class DatabaseUnavailable(Exception):
    """Credentials or connection problem; carries the Problem to report (never a secret)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclasses.dataclass
class Context:
    body: dict[str, Any]
    spec: MarketplaceDBSpec
    previous: MarketplaceDBStatus | None
    deps: Deps
    now: datetime.datetime
    password: str = ""  # kept only to mask it in messages
    info: ConnInfo | None = None  # how this reconcile connected (background jobs connect alike)
    # status.ownedObjects: what proves a Kubernetes object is ours (owned.py); updated by sync_owned.
    owned: Record = dataclasses.field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def owner(self) -> str:
        return naming.owner_key(self.namespace, self.name)

    def annotation(self, key: str) -> str:
        return str((self.body["metadata"].get("annotations") or {}).get(key, ""))


def previous_status(body: dict[str, Any]) -> MarketplaceDBStatus | None:
    """The status as last written, keeping every top-level field that still parses: a field of an
    older release's shape (e.g. progress.seconds before progress.since) or written by someone else
    is dropped, not the whole status (teardown needs probedDeployments to release the probes)."""
    status = dict(body.get("status") or {})
    for _ in range(len(status) + 1):
        try:
            return MarketplaceDBStatus.model_validate(status)
        except ValidationError as exc:
            broken = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
            if not broken & status.keys():
                return None  # not a field's fault: recompute from scratch
            for key in broken:
                status.pop(key, None)
    return None


def close_quietly(database: Database) -> None:
    try:
        database.close()
    except Exception:  # closing a cut session must not turn a reported problem into an escape
        log.debug("closing the database session failed", exc_info=True)


def scrubbed(exc: BaseException, ctx: Context) -> str:
    """A database failure as SQLSTATE and object names (redact.py): never server text or row values."""
    return describe_db_error(exc)


def conn_info(ctx: Context) -> ConnInfo:
    try:
        return creds.conn_info(ctx.deps.kube, ctx.namespace, ctx.spec.database, ctx.deps.settings, ctx.name)
    except creds.CredentialsRefused as exc:
        raise DatabaseUnavailable(exc.problem) from None


def open_database(ctx: Context) -> Database:
    info = conn_info(ctx)
    ctx.password, ctx.info = info.password, info
    try:
        return ctx.deps.open_database(info)
    except Exception as exc:  # the gateway raises DatabaseUnreachable: a class, no server text
        message = str(exc).replace(info.password, "***") if info.password else str(exc)
        raise DatabaseUnavailable(Problem(getattr(exc, "reason", UNREACHABLE), message)) from None


def pooler_login(ctx: Context, ref: Any, field: str) -> tuple[str, str]:
    """A pooler login's Secret (spec.pooler.users[], authQuery), read under the owner's opt-in rule."""
    try:
        found = creds.read_ref(ctx.deps.kube, ctx.namespace, ref, field, ctx.name)
    except creds.CredentialsRefused as exc:
        raise DatabaseUnavailable(exc.problem) from None
    return found.user, found.password


def owner_uid(ctx: Context) -> str | None:
    uid = ctx.body["metadata"].get("uid")
    return str(uid) if uid else None


def background_job(ctx: Context, kind: str) -> tuple[Job | None, Job | None]:
    """(the running job, the finished one not yet reported) of this resource and kind."""
    background = ctx.deps.background
    if background is None:
        return None, None
    job_key = jobs.key(ctx.namespace, ctx.name, kind)
    current = background.get(job_key)
    if current is not None and current.running:
        return current, None
    return None, background.take(job_key)
