"""One materialized-view refresh: lock, decide, refresh, record. Used by every scheduler.

The CronJob entrypoint (`marketplacedb refresh`), the operator's own timer (`mode: Operator`) and
the `marketplacedb.io/refresh-now` annotation all call `refresh_view()` (or `run_refresh()` with a
spec), so they share one behaviour and one truth, the state table:

1. `pg_try_advisory_lock` on the view's key: another refresh running means `skipped-busy` (never
   queued behind it, unlike pg_cron, and never waiting: the lock is *tried*).
2. One catalog round trip (`observe`) and a pure `decide()`: skip when the base tables' write
   counters equal those recorded at the last success, unless `maxStaleness` passed,
   `skipIfUnchanged` is false or the refresh was forced.
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
    decide,
    due,
    is_stale,
    lock_key,
    options_for,
)

__all__ = [
    "Decision", "Observation", "RefreshDatabase", "RefreshOptions", "RefreshOutcome", "RefreshState", "ViewTarget",
    "decide", "due", "is_stale", "lock_key", "options_for", "refresh_view", "run_refresh",
]


class RefreshDatabase(Protocol):
    """The session-level operations one refresh needs (one dedicated, direct session)."""

    def try_lock(self, key: tuple[int, int]) -> bool: ...

    def unlock(self, key: tuple[int, int]) -> None: ...

    def observe(self, target: ViewTarget) -> Observation: ...

    def refresh(self, target: ViewTarget, concurrently: bool, options: RefreshOptions,
                update: StateUpdate) -> StateUpdate: ...

    def record(self, target: ViewTarget, update: StateUpdate) -> None: ...

    def record_busy(self, target: ViewTarget) -> None: ...


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
    try:
        if not db.try_lock(key):
            _best_effort(db.record_busy, target)
            return outcome("skipped-busy", "another refresh of this view holds its advisory lock")
    except RefreshDatabaseError as exc:
        return outcome("failed", "could not take the advisory lock", error=str(exc))
    try:
        return _locked(db, target, options, now, force, outcome)
    finally:
        db.unlock(key)


def _locked(db: RefreshDatabase, target: ViewTarget, options: RefreshOptions, now: datetime.datetime, force: bool,
            outcome: Callable[..., RefreshOutcome]) -> RefreshOutcome:
    decision: Decision | None = None
    try:
        observed = db.observe(target)
        decision = decide(observed, options, now, force)
        if decision.action == "fail":
            db.record(target, StateUpdate("failed", now, decision.reason, options.max_staleness, error=decision.reason))
            return outcome("failed", decision.reason, error=decision.reason)
        if decision.action == "skip":
            db.record(target, StateUpdate("skipped-unchanged", now, decision.reason, options.max_staleness))
            return outcome("skipped-unchanged", decision.reason)
        kind: Outcome = "refreshed" if decision.concurrently else "refreshed-plain"
        reason = decision.reason if decision.concurrently else f"{decision.reason}; plain: {decision.plain_reason}"
        update = StateUpdate(kind, now, reason, options.max_staleness,
                             counters=observed.counters, signature=observed.signature)
        done = db.refresh(target, decision.concurrently, options, update)
        return outcome(kind, reason, rows=done.rows, refresh_seconds=done.seconds)
    except RefreshDatabaseError as exc:
        why = decision.reason if decision is not None else "catalog check"
        failed = StateUpdate("failed", now, f"refresh failed ({why})", options.max_staleness, error=str(exc))
        _best_effort(db.record, target, failed)
        return outcome("failed", failed.reason, error=str(exc))


def _best_effort(action: Callable[..., None], *args: Any) -> None:
    """Recording must not turn an outcome into a crash: the outcome itself is still reported."""
    try:
        action(*args)
    except RefreshDatabaseError:
        pass
