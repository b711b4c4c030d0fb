"""Status conditions per the Kubernetes API conventions, and a pure set_condition()."""

from __future__ import annotations

import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

READY = "Ready"
DATABASE_REACHABLE = "DatabaseReachable"
SCHEMA_APPLIED = "SchemaApplied"
REFRESH_SCHEDULED = "RefreshScheduled"
POOLER_AVAILABLE = "PoolerAvailable"
PROBES_APPLIED = "ProbesApplied"
STALE = "Stale"
DRIFTED = "Drifted"

# The order conditions are listed in (stable output for kubectl and GitOps diffs).
CONDITION_ORDER = (
    READY,
    DATABASE_REACHABLE,
    SCHEMA_APPLIED,
    REFRESH_SCHEDULED,
    POOLER_AVAILABLE,
    PROBES_APPLIED,
    STALE,
    DRIFTED,
)

Status = Literal["True", "False", "Unknown"]


class Condition(BaseModel):
    """One aspect of the resource's state (metav1.Condition)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", use_attribute_docstrings=True
    )

    type: str = Field(pattern=r"^[A-Z][A-Za-z]*$", max_length=316)
    """Ready, DatabaseReachable, SchemaApplied, RefreshScheduled, PoolerAvailable, ProbesApplied, Stale or Drifted."""
    status: Status
    """True, False or Unknown."""
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    """Why, in one CamelCase word (e.g. InvalidSpec, DatabaseUnreachable)."""
    message: str = Field("", max_length=32768)
    """Details for people (never a secret value or a row value)."""
    last_transition_time: datetime.datetime
    """When status last changed."""
    observed_generation: int | None = None
    """The metadata.generation this condition describes."""


def set_condition(
    conditions: list[Condition],
    new: Condition,
) -> list[Condition]:
    """Conditions with `new` merged in; lastTransitionTime moves only when status changes."""
    result: list[Condition] = []
    replaced = False
    for old in conditions:
        if old.type != new.type:
            result.append(old)
            continue
        replaced = True
        if old.status == new.status:
            new = new.model_copy(update={"last_transition_time": old.last_transition_time})
        result.append(new)
    if not replaced:
        result.append(new)
    order = {name: i for i, name in enumerate(CONDITION_ORDER)}
    return sorted(result, key=lambda c: (order.get(c.type, len(order)), c.type))


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
