"""Refresh truth for status and metrics, whatever the scheduler (pure: no I/O, no clock).

CronJob pods, the operator's timer and humans all write the same state table; this module turns
the rows of *this resource's declared views* (keyed by schema and name) into view statuses, one
RefreshScheduled problem naming the failing views, the series to export, and when the operator's
own timer (mode Operator) is next due. A declared view with no recorded success is "never
refreshed": its staleness counts from when the operator first saw it declared, so Stale and the
stale-view alert fire after maxStaleness even when nothing could ever be recorded.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping

from ..api.v1alpha1 import MaterializedViewSpec, ViewStatus
from ..durations import parse_duration
from .refresh import RefreshState, seconds_until_due


@dataclasses.dataclass(frozen=True)
class ViewSeries:
    """What metrics.set_view_metrics exports for one declared view."""

    name: str
    max_staleness: float | None
    first_seen: datetime.datetime | None
    state: RefreshState | None


@dataclasses.dataclass(frozen=True)
class Truth:
    views: list[ViewStatus]
    failing: list[str]  # "view: N failed run(s) in a row: SQLSTATE ..." per failing view
    series: list[ViewSeries]
    due_in: float | None  # seconds until the operator's own timer is next due (mode Operator)


def by_key(states: Iterable[RefreshState]) -> dict[tuple[str, str], RefreshState]:
    return {(s.schema, s.name): s for s in states if s.schema}


def limit_of(view: MaterializedViewSpec) -> float | None:
    return parse_duration(view.refresh.max_staleness) if view.refresh else None


def operator_due_in(view: MaterializedViewSpec, state: RefreshState | None, now: datetime.datetime,
                    attempted: bool = False) -> float | None:
    """Seconds until a mode Operator view is due (<= 0: now); None when the operator does not schedule it.

    `attempted`: a run was just tried; when it could record nothing (no state row), count from
    now, so an unwritable state table never turns into a refresh on every tick.
    """
    policy = view.refresh
    if policy is None or policy.mode != "Operator" or policy.suspend:
        return None
    every = parse_duration(policy.every) if policy.every else None
    last = state.last_attempt if state is not None else None
    if attempted and last is None:
        last = now
    return seconds_until_due(policy.schedule, last, now, policy.time_zone, every)


def never_refreshed_age(first_seen: datetime.datetime | None, now: datetime.datetime) -> float:
    return float("inf") if first_seen is None else max(0.0, (now - first_seen).total_seconds())


def assess(views: list[MaterializedViewSpec], statuses: list[ViewStatus],
           states: Mapping[tuple[str, str], RefreshState], previous: Mapping[str, ViewStatus],
           now: datetime.datetime, attempted: frozenset[str] = frozenset()) -> Truth:
    """Status, problems, series and next due time for the declared views (and only those)."""
    by_name = {s.name: s for s in statuses}
    updated: list[ViewStatus] = []
    failing: list[str] = []
    series: list[ViewSeries] = []
    due: list[float] = []
    for view in views:
        state = states.get((view.schema_name, view.name))
        limit = limit_of(view)
        before = previous.get(view.name)
        first_seen = before.first_seen_time if before and before.first_seen_time else now
        status = by_name.get(view.name, ViewStatus(name=view.name))
        updated.append(_status(status, state, limit, first_seen, now))
        series.append(ViewSeries(view.name, limit, first_seen, state))
        if state is not None and state.result == "failed":
            failing.append(f"{view.schema_name}.{view.name}: {state.consecutive_failures} failed run(s) in a row: "
                           f"{state.error or state.reason or 'no detail'}")
        next_run = operator_due_in(view, state, now, view.name in attempted)
        if next_run is not None:
            due.append(next_run)
    known = {v.name for v in views}
    updated += [s for s in statuses if s.name not in known]
    return Truth(updated, failing, series, min(due) if due else None)


def _status(view: ViewStatus, state: RefreshState | None, limit: float | None, first_seen: datetime.datetime,
            now: datetime.datetime) -> ViewStatus:
    if state is None or state.last_success is None:
        never = limit is not None and never_refreshed_age(first_seen, now) > limit
        update: dict[str, object] = {"first_seen_time": first_seen, "stale": never}
        if state is not None:
            update.update(last_result=state.result, recent_outcomes=list(state.recent),
                          refresh_rule=view.refresh_rule or _rule(state))
        if state is not None and state.result == "failed" and state.error:
            failed = f"never refreshed, last attempt failed: {state.error}"
            update["message"] = f"{view.message}; {failed}" if view.message else failed
        return view.model_copy(update=update)
    stale = limit is not None and (now - state.last_success).total_seconds() > limit
    message = view.message
    if state.result == "failed" and state.error:
        message = f"{message}; last refresh failed: {state.error}" if message else f"last refresh failed: {state.error}"
    return view.model_copy(update={
        "last_refresh_time": state.last_success,
        "last_refresh_seconds": state.last_seconds,
        "last_result": state.result,
        "stale": stale,
        "message": message,
        "recent_outcomes": list(state.recent),
        # The rule from this reconcile's analysis of the catalog when there is one; else the last run's.
        "refresh_rule": view.refresh_rule or _rule(state),
        "first_seen_time": first_seen,
    })


def _rule(state: RefreshState) -> str | None:
    # status.materializedViews[].refreshRule has maxLength 512 in the CRD.
    return None if state.rule is None else state.rule if len(state.rule) <= 512 else state.rule[:509] + "..."
