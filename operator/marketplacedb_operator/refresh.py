"""One materialized-view refresh: lock, decide, refresh, record. Used by every scheduler.

The CronJob entrypoint (`marketplacedb refresh`), the operator's own timer (`mode: Operator`) and
the `marketplacedb.io/refresh-now` annotation all call `refresh_view()` (or `run_refresh()` with a
spec), so they share one behaviour and one truth, the state table:

1. One round trip for the common case (`check`, a server-side function): try the view's advisory
   lock (another refresh running means `skipped-busy`: never queued, never waiting), read the
   catalog and, when nothing the view depends on changed, record the skip and unlock.
2. Otherwise (lock held) the catalog check again and a pure `decide()`: skip when the tracked
   tables' write counters equal those recorded at the last success, unless `maxStaleness` passed,
   `skipIfUnchanged` is false, the refresh was forced, or the view calls functions whose reads
   are not tracked / depends on the time (then it is always refreshed, and says why).
3. `REFRESH ... CONCURRENTLY` when the view is populated and has a usable unique index, otherwise
   a plain refresh whose outcome says why; success is recorded in the same transaction.
4. A failure rolls back (the view keeps its old rows) and is recorded with its error.

I/O goes through the `RefreshDatabase` port (implemented by gateways/postgres/refresh.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from typing import Any, Protocol

from .api.v1alpha1 import MaterializedViewSpec
from .sql.refresh import (
    Decision,
    Observation,
    Outcome,
    RefreshDatabaseError,
    RefreshOptions,
    RefreshState,
    StateUpdate,
    ViewTarget,
    ago,
    decide,
    due,
    is_stale,
    lock_key,
    options_for,
    rule_for,
)
from .sql.refresh_check import SKIP_REASON

__all__ = [
    "Decision", "Observation", "RefreshDatabase", "RefreshOptions", "RefreshOutcome", "RefreshState", "ViewTarget",
    "decide", "due", "explain_view", "is_stale", "lock_key", "options_for", "refresh_view", "run_refresh",
]


class RefreshDatabase(Protocol):
    """The session-level operations one refresh needs (one dedicated, direct session)."""

    def check(self, target: ViewTarget, key: tuple[int, int], options: RefreshOptions, now: datetime.datetime,
              force: bool) -> tuple[bool, bool, float | None]: ...

    def try_lock(self, key: tuple[int, int]) -> bool: ...

    def unlock(self, key: tuple[int, int]) -> None: ...

    def observe(self, target: ViewTarget, depends_on: tuple[str, ...] = ()) -> Observation: ...

    def refresh(self, target: ViewTarget, concurrently: bool, options: RefreshOptions,
                update: StateUpdate, previous_rows: int | None = None) -> StateUpdate: ...

    def record(self, target: ViewTarget, update: StateUpdate) -> None: ...

    def record_busy(self, target: ViewTarget, update: StateUpdate) -> None: ...


@dataclasses.dataclass(frozen=True)
class RefreshOutcome:
    """What one run did. `seconds` is the whole run (lock, check, refresh, record)."""

    schema: str
    view: str
    outcome: Outcome
    reason: str
    seconds: float
    rows: int | None = None
    refresh_seconds: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"

    def to_json(self) -> dict[str, Any]:
        """One JSON object per view for `-o json` (no secrets: names, outcome, figures)."""
        data: dict[str, Any] = {
            "view": self.view,
            "schema": self.schema,
            "outcome": self.outcome,
            "reason": self.reason,
            "seconds": round(self.seconds, 6),
        }
        if self.rows is not None:
            data["rows"] = self.rows
        if self.refresh_seconds is not None:
            data["refreshSeconds"] = round(self.refresh_seconds, 6)
        if self.error is not None:
            data["error"] = self.error
        return data


def run_refresh(db: RefreshDatabase, view: MaterializedViewSpec, now: datetime.datetime, force: bool = False,
                *, lock_timeout: float | None = None) -> RefreshOutcome:
    """Refresh a view declared in a MarketplaceDB spec (the operator's entry point)."""
    options = options_for(view) if lock_timeout is None else options_for(view, lock_timeout)
    return refresh_view(db, ViewTarget(view.schema_name, view.name), options, now, force)


def refresh_view(db: RefreshDatabase, target: ViewTarget, options: RefreshOptions, now: datetime.datetime,
                 force: bool = False, *, clock: Callable[[], float] = time.perf_counter) -> RefreshOutcome:
    """Lock, decide, refresh, record; never raises for database errors (outcome `failed`)."""
    started = clock()

    def outcome(kind: Outcome, reason: str, **extra: Any) -> RefreshOutcome:
        return RefreshOutcome(target.schema, target.name, kind, reason, clock() - started, **extra)

    key = lock_key(target)
    busy = "another refresh of this view holds its advisory lock"
    try:
        locked, skipped, age = db.check(target, key, options, now, force)
    except RefreshDatabaseError:
        # No check function (a role that may not create it), or it failed after taking the lock
        # (session advisory locks survive the statement's rollback): release it, then the same
        # steps one round trip each.
        db.unlock(key)
        try:
            locked, skipped, age = db.try_lock(key), False, None
        except RefreshDatabaseError as exc:
            return outcome("failed", "could not take the advisory lock", error=str(exc))
        if not locked:
            _best_effort(db.record_busy, target, StateUpdate("skipped-busy", now, busy, options.max_staleness,
                                                             history_limit=options.history_limit))
    if not locked:
        return outcome("skipped-busy", busy)
    if skipped:
        return outcome("skipped-unchanged", f"{SKIP_REASON} ({ago(age or 0.0)} ago)")
    try:
        return _locked(db, target, options, now, force, outcome)
    finally:
        db.unlock(key)


def _locked(db: RefreshDatabase, target: ViewTarget, options: RefreshOptions, now: datetime.datetime, force: bool,
            outcome: Callable[..., RefreshOutcome]) -> RefreshOutcome:
    decision: Decision | None = None
    rule: str | None = None
    limit = options.history_limit
    try:
        observed = db.observe(target, options.depends_on)
        rule = rule_for(observed, options)
        decision = decide(observed, options, now, force)
        if decision.action == "fail":
            db.record(target, StateUpdate("failed", now, decision.reason, options.max_staleness,
                                          error=decision.reason, rule=rule, history_limit=limit))
            return outcome("failed", decision.reason, error=decision.reason)
        if decision.action == "skip":
            db.record(target, StateUpdate("skipped-unchanged", now, decision.reason, options.max_staleness,
                                          rule=rule, history_limit=limit))
            return outcome("skipped-unchanged", decision.reason)
        kind: Outcome = "refreshed" if decision.concurrently else "refreshed-plain"
        reason = decision.reason if decision.concurrently else f"{decision.reason}; plain: {decision.plain_reason}"
        update = StateUpdate(kind, now, reason, options.max_staleness, counters=observed.counters,
                             signature=observed.signature, rule=rule, history_limit=limit,
                             counters_at=observed.observed_at)
        previous = observed.state.rows if observed.state is not None else None
        done = db.refresh(target, decision.concurrently, options, update, previous)
        return outcome(kind, reason, rows=done.rows, refresh_seconds=done.seconds)
    except RefreshDatabaseError as exc:
        why = decision.reason if decision is not None else "catalog check"
        failed = StateUpdate("failed", now, f"refresh failed ({why})", options.max_staleness, error=str(exc),
                             rule=rule, history_limit=limit)
        _best_effort(db.record, target, failed)
        return outcome("failed", failed.reason, error=str(exc))


def explain_view(db: RefreshDatabase, target: ViewTarget, options: RefreshOptions, now: datetime.datetime,
                 force: bool = False) -> tuple[str, Decision]:
    """The rule that applies to the view and what a run would do now; no lock, nothing recorded."""
    observed = db.observe(target, options.depends_on)
    return rule_for(observed, options), decide(observed, options, now, force)


def _best_effort(action: Callable[..., None], *args: Any) -> None:
    """Recording must not turn an outcome into a crash: the outcome itself is still reported."""
    try:
        action(*args)
    except RefreshDatabaseError:
        pass
