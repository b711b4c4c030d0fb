"""reconcile()'s side of background work: start a job, report it while it runs, collect it once.

A job opens its own Database (the reconcile's session closes when the reconcile returns) through
the same port, so it runs the executor's public entry point (`execute`) or `refresh`, nothing
else. reconcile() never waits for a job: it submits, reports "Applying" with the build's
progress, and the reconcile that runs after the job finished (woken by Background.on_done)
reports its outcome.
"""

from __future__ import annotations

import datetime
import json
import zlib
from collections.abc import Sequence
from typing import Any

from .api.v1alpha1 import DDLProgress, MarketplaceDBSpec, MaterializedViewSpec
from .background import Job, Key
from .ports import ConnInfo, Database, Deps, RefreshResult
from .sql import plan as planning
from .sql.plan import Desired, ExecutionPolicy, StepOutcome

SCHEMA, REFRESH = "schema", "refresh"


def key(namespace: str, name: str, kind: str) -> Key:
    return f"{namespace}/{name}", kind


def database_key(info: ConnInfo) -> str:
    return f"{info.host}:{info.port}/{info.dbname}"


def pack(spec: MarketplaceDBSpec, owner: str, previous_settings: Sequence[str]) -> bytes:
    """What a queued schema job needs to build its desired state when it starts, compressed: the
    spec as JSON (~7.5 KB for the example, ~2 KB compressed) instead of the spec model and desired
    state (~43 KiB of objects). At N = 1,000 on one pool ~990 jobs wait: ~42 MiB of the operator's
    peak memory before (bench/REPORT-fleet.md)."""
    text = json.dumps({"spec": spec.model_dump(mode="json", by_alias=True), "owner": owner,
                       "settings": list(previous_settings)}, separators=(",", ":"))
    return zlib.compress(text.encode(), 6)


def unpack(packed: bytes) -> Desired:
    data = json.loads(zlib.decompress(packed))
    spec = MarketplaceDBSpec.model_validate(data["spec"])
    return planning.desired_state(spec, data["owner"], data["settings"])


def submit_schema(deps: Deps, job_key: Key, info: ConnInfo, desired: Desired | bytes, planned: str,
                  policy: ExecutionPolicy, manual: bool) -> Job:
    """Queue the schema work for `desired` (a Desired, or pack()'s bytes), planned afresh when the job starts.

    A queued job keeps the desired state (tens of KiB), not the plan (its composed SQL: ~150 KiB
    for the example): at N = 1,000 resources on one pool most jobs wait, and their plans were
    a large part of the operator's peak memory. While the job waits, each reconcile replaces its
    inputs (the spec and approval as they are now: an index put back in the spec, a switch to
    `approval: Manual`, a new `deletionPolicy`), and it plans when it starts: it runs what the
    database needs then. With `approval: Manual` only the approved plan (`planned`, its hash)
    runs: a changed plan runs nothing, and the next reconcile asks for approval of the new one.
    """
    assert deps.background is not None
    inputs = (desired, planned, policy, manual)

    def work(job: Job) -> list[StepOutcome]:
        wanted, planned, policy, manual = job.inputs
        desired = unpack(wanted) if isinstance(wanted, bytes) else wanted
        database = deps.open_database(info)
        try:
            job.backend_pid, job.cancel = database.backend_pid(), database.cancel
            if job.cancelled:
                return []
            fresh = planning.plan(desired, database.observe(desired))
            if manual and fresh.hash != planned:
                return []
            return database.execute(fresh, policy)
        finally:
            _close(database)

    return deps.background.submit(Job(job_key, database_key(info), work, tag=planned, inputs=inputs))


def submit_refresh(deps: Deps, job_key: Key, info: ConnInfo, views: Sequence[MaterializedViewSpec], force: bool,
                   request: str) -> Job:
    assert deps.background is not None

    def work(job: Job) -> list[RefreshResult]:
        database = deps.open_database(info)
        try:
            results = []
            for view in views:
                if job.cancelled:
                    break
                results.append(database.refresh(view, deps.now(), force))
            return results
        finally:
            _close(database)

    return deps.background.submit(Job(job_key, database_key(info), work, tag=request))


def progress(job: Job, database: Database, steps: int) -> DDLProgress:
    """What the running job does now, read from pg_stat_progress_create_index by its pid."""
    wall = job.started_at if job.started_at is not None else job.submitted_at
    since = datetime.datetime.fromtimestamp(int(wall), datetime.UTC)  # whole seconds: the same at every look
    if job.started is None:
        return DDLProgress(steps=steps, phase="queued", since=since)
    row = database.build_progress(job.backend_pid) if job.backend_pid else None
    if row is None:
        return DDLProgress(steps=steps, phase="running", since=since)
    return DDLProgress(steps=steps, phase=row.phase[:100], index=row.index, blocks_done=row.blocks_done,
                       blocks_total=row.blocks_total, since=since)


def describe(progress: DDLProgress) -> str:
    where = f" of index {progress.index}" if progress.index else ""
    blocks = f", {progress.blocks_done}/{progress.blocks_total} blocks" if progress.blocks_total else ""
    head = f"{progress.steps} step(s) in the background since {progress.since:%Y-%m-%dT%H:%M:%SZ}"
    return f"{head}: {progress.phase}{where}{blocks}"


def _close(database: Any) -> None:
    try:
        database.close()
    except Exception:  # a terminated session: nothing left to close
        pass
