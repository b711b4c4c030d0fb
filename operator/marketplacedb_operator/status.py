"""Status, computed by one pure function from what a reconcile saw and did.

Conditions follow the Kubernetes API conventions (type/status/reason/message/lastTransitionTime/
observedGeneration); Events are derived from condition *transitions* only, so a steady state
posts nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Literal

from .api import conditions as c
from .api.v1alpha1 import (
    BlockingSession,
    DDLProgress,
    IndexStatus,
    MarketplaceDBStatus,
    PlanStatus,
    PoolerStatus,
    Summary,
    ViewStatus,
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why a part of the reconcile did not reach its goal: a CamelCase reason and a message."""

    reason: str
    message: str


@dataclasses.dataclass
class Report:
    """Everything one reconcile learned; None for a part that did not run."""

    spec_problem: Problem | None = None
    database_problem: Problem | None = None
    schema_problem: Problem | None = None
    refresh_problem: Problem | None = None
    pooler_problem: Problem | None = None
    probes_problem: Problem | None = None
    indexes: list[IndexStatus] = dataclasses.field(default_factory=list)
    views: list[ViewStatus] = dataclasses.field(default_factory=list)
    pooler: PoolerStatus | None = None
    pooler_enabled: bool = False
    pooler_replicas: int = 0
    plan: PlanStatus | None = None
    blocking: list[BlockingSession] = dataclasses.field(default_factory=list)
    advice: list[str] = dataclasses.field(default_factory=list)
    refresh_scheduled: int = 0
    refresh_due_seconds: float | None = None  # mode Operator: when the next refresh is due
    probes_applied: int = 0
    drifted: list[str] = dataclasses.field(default_factory=list)
    progress: DDLProgress | None = None  # background DDL running for this resource
    crashed: list[str] = dataclasses.field(default_factory=list)  # parts that raised (backoff)
    retry_soon: bool = False  # nothing failed, but something must be retried with backoff
    # The refresh-now value this reconcile acted upon (every refresh ran or was refused), if any.
    handled_refresh_request: str | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


# Conditions whose True is bad news (a Warning when they turn True).
_NEGATIVE = {c.STALE, c.DRIFTED}
# Reasons that say work is under way (background DDL): a Normal Event, not a Warning.
_PROGRESS = {"Applying"}


def _condition(type_: str, ok: bool, reason: str, message: str, now: datetime.datetime, gen: int | None) -> c.Condition:
    return c.Condition(
        type=type_,
        status="True" if ok else "False",
        reason=reason,
        message=message[:2000],
        last_transition_time=now,
        observed_generation=gen,
    )


def _part(
    type_: str, problem: Problem | None, ok_reason: str, ok_message: str, now: datetime.datetime, gen: int | None
) -> c.Condition:
    if problem is None:
        return _condition(type_, True, ok_reason, ok_message, now, gen)
    return _condition(type_, False, problem.reason, problem.message, now, gen)


def _conditions(report: Report, now: datetime.datetime, gen: int | None) -> list[c.Condition]:
    upstream = report.spec_problem or report.database_problem
    schema_problem = upstream or report.schema_problem
    valid = sum(1 for i in report.indexes if i.state in ("Valid", "Adopted"))
    populated = sum(1 for v in report.views if v.populated)
    stale = sorted(v.name for v in report.views if v.stale)
    parts = [
        _part(
            c.DATABASE_REACHABLE,
            upstream,
            "Connected",
            "the operator reached the database",
            now,
            gen,
        ),
        _part(
            c.SCHEMA_APPLIED,
            schema_problem,
            "Applied",
            f"{valid} index(es) valid, {populated} view(s) populated",
            now,
            gen,
        ),
        _part(
            c.REFRESH_SCHEDULED,
            report.spec_problem or report.refresh_problem,
            "Scheduled",
            f"{report.refresh_scheduled} view refresh schedule(s) in place",
            now,
            gen,
        ),
        _part(
            c.POOLER_AVAILABLE,
            report.spec_problem or report.pooler_problem,
            "Available" if report.pooler_enabled else "Disabled",
            _pooler_message(report),
            now,
            gen,
        ),
        _part(
            c.PROBES_APPLIED,
            report.spec_problem or report.probes_problem,
            "Applied",
            f"probes applied to {report.probes_applied} Deployment(s)",
            now,
            gen,
        ),
    ]
    parts.append(
        _condition(
            c.STALE, bool(stale), "StaleViews" if stale else "Fresh", ", ".join(stale) or "no view is stale", now, gen
        )
    )
    parts.append(
        _condition(
            c.DRIFTED,
            bool(report.drifted),
            "DriftDetected" if report.drifted else "InSync",
            ", ".join(report.drifted) or "database objects match the spec",
            now,
            gen,
        )
    )
    failing = [p for p in parts if p.type not in _NEGATIVE and p.status != "True"]
    if failing:
        first = failing[0]
        ready = _condition(c.READY, False, first.reason, f"{first.type}: {first.message}", now, gen)
    else:
        ready = _condition(c.READY, True, "Ready", "all parts converged", now, gen)
    return [ready, *parts]


def _pooler_message(report: Report) -> str:
    if not report.pooler_enabled:
        return "pooler disabled"
    ready = report.pooler.ready_replicas if report.pooler else 0
    return f"{ready}/{report.pooler_replicas} pooler replica(s) ready"


def compute(
    previous: MarketplaceDBStatus | None,
    report: Report,
    generation: int | None,
    now: datetime.datetime,
) -> tuple[MarketplaceDBStatus, list[Event]]:
    """The new status and the Events its condition transitions call for."""
    old = previous.conditions if previous else []
    merged: list[c.Condition] = list(old)
    for condition in _conditions(report, now, generation):
        merged = c.set_condition(merged, condition)
    # Parts that did not run keep their last known list rather than blanking it.
    indexes = report.indexes or (previous.indexes if previous and report.database_problem else [])
    views = report.views or (previous.materialized_views if previous and report.database_problem else [])
    status = MarketplaceDBStatus(
        observed_generation=generation,
        conditions=merged,
        indexes=sorted(indexes, key=lambda i: i.name),
        materialized_views=sorted(views, key=lambda v: v.name),
        pooler=report.pooler,
        plan=report.plan,
        blocking_sessions=report.blocking,
        progress=report.progress,
        advice=report.advice,
        summary=Summary(
            indexes=f"{sum(1 for i in indexes if i.state in ('Valid', 'Adopted'))}/{len(indexes)}",
            views=f"{sum(1 for v in views if v.populated)}/{len(views)}",
            pooler=_pooler_summary(report),
        ),
    )
    return status, transitions(old, merged)


def _pooler_summary(report: Report) -> str:
    if not report.pooler_enabled:
        return "-"
    ready = report.pooler.ready_replicas if report.pooler else 0
    return f"{ready}/{report.pooler_replicas}"


def transitions(old: list[c.Condition], new: list[c.Condition]) -> list[Event]:
    events = []
    for condition in new:
        before = c.find(old, condition.type)
        if before is not None and before.status == condition.status:
            continue
        if before is None and condition.status == "True" and condition.type != c.READY:
            continue  # first sighting of a healthy part: Ready=True says it once
        if before is None and condition.type in _NEGATIVE and condition.status == "False":
            continue
        bad = (condition.status == "True") == (condition.type in _NEGATIVE) and condition.reason not in _PROGRESS
        events.append(
            Event(
                type="Warning" if bad else "Normal",
                reason=condition.reason,
                message=f"{condition.type}={condition.status}: {condition.message}",
            )
        )
    return events
