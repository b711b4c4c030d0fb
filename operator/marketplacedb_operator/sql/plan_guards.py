"""Why an index can be neither swapped nor dropped (pure): constraints that need it."""

from __future__ import annotations

from .catalog import IndexInfo
from .steps import DesiredIndex


def bound(info: IndexInfo) -> str:
    """Why the index can be neither renamed nor dropped ('' when it can): it implements a constraint
    (a DBA's `ADD CONSTRAINT ... USING INDEX`: a rename renames the constraint, DROP INDEX fails with
    2BP01) or foreign keys depend on it."""
    if info.constraint is not None:
        return f"it implements constraint {info.constraint}"
    if info.foreign_keys:
        return f"foreign key constraint(s) {', '.join(info.foreign_keys)} depend on it"
    return ""


def fk_conflict(d: DesiredIndex, existing: IndexInfo, why: str) -> str:
    if existing.constraint is not None:
        return (f"{d.field}: index {existing.schema}.{existing.name} must be replaced ({why}) but it implements "
                f"constraint {existing.constraint}: a swap would rename the constraint and the old index could "
                "never be dropped: left as it is. To change it, drop the constraint by hand (ALTER TABLE ... DROP "
                "CONSTRAINT) or declare the new index under another name")
    return (f"{d.field}: index {existing.schema}.{existing.name} must be replaced ({why}) but foreign key "
            f"constraint(s) {', '.join(existing.foreign_keys)} depend on it: left as it is. To change it, drop "
            "and re-create those constraints by hand after declaring the new index under another name")
