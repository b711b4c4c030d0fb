"""Rows of the refresh SQL as the types of sql/refresh.py (pure: no I/O)."""

from __future__ import annotations

from decimal import Decimal
from typing import Final

from .refresh import STATE_COLUMNS, HistoryEntry, Observation, RefreshState
from .refresh_stats import OWN


def state_from_row(row: tuple[object, ...]) -> RefreshState:
    """A RefreshState from the STATE_COLUMNS of a row (in that order)."""
    values = dict(zip(STATE_COLUMNS, row, strict=True))
    outcomes = values["outcomes"] if isinstance(values["outcomes"], dict) else {}
    recent = values["recent"] if isinstance(values["recent"], list) else []
    return RefreshState(
        schema=str(values["view_schema"]),
        name=str(values["view_name"]),
        last_attempt=values["last_attempt"],  # type: ignore[arg-type]
        last_success=values["last_success"],  # type: ignore[arg-type]
        last_seconds=values["last_seconds"],  # type: ignore[arg-type]
        rows=values["row_count"],  # type: ignore[arg-type]
        counters=values["counters"],  # type: ignore[arg-type]
        signature=values["signature"],  # type: ignore[arg-type]
        result=values["result"],  # type: ignore[arg-type]
        reason=values["reason"],  # type: ignore[arg-type]
        error=values["error"],  # type: ignore[arg-type]
        consecutive_failures=int(values["consecutive_failures"] or 0),  # type: ignore[call-overload]
        max_staleness=values["max_staleness_seconds"],  # type: ignore[arg-type]
        outcomes={str(k): int(v) for k, v in outcomes.items()},
        rule=values["rule"],  # type: ignore[arg-type]
        recent=tuple(str(r) for r in recent),
        counters_at=values["counters_at"],  # type: ignore[arg-type]
    )


OBSERVE_FIXED_COLUMNS: Final = 16


def _names(value: object) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def observation_from_row(row: tuple[object, ...], unreported: object = None) -> Observation:
    """The OBSERVE row, and the ACTIVITY row's kinds (read after it: sql/refresh_stats.py)."""
    fixed, rest = row[:OBSERVE_FIXED_COLUMNS], row[OBSERVE_FIXED_COLUMNS:]
    (exists, populated, owned, index, base, untracked, counters, signature, volatile, clock, functions, missing,
     observed_at, own, _key, _analysis) = fixed
    kinds = (OWN,) if own else ()
    state = state_from_row(rest) if rest[0] is not None else None
    return Observation(
        exists=bool(exists),
        populated=bool(populated),
        owned=bool(owned),
        unique_index=str(index) if index is not None else None,
        base_tables=int(base),  # type: ignore[call-overload]
        untracked=int(untracked),  # type: ignore[call-overload]
        counters=Decimal(str(counters)),
        signature=str(signature) if signature is not None else None,
        volatile_functions=_names(volatile),
        time_functions=_names(clock),
        untracked_functions=_names(functions),
        missing_depends=_names(missing),
        state=state,
        observed_at=observed_at,  # type: ignore[arg-type]
        unreported=kinds + _names(unreported),
    )


def history_from_row(row: tuple[object, ...]) -> HistoryEntry:
    schema, name, attempt, outcome, reason, seconds, rows, error = row
    return HistoryEntry(str(schema), str(name), attempt, str(outcome), reason, seconds, rows, error)  # type: ignore[arg-type]
