"""Per-object status and server-wide advice from desired + observed state (pure).

The outcomes of an execution, when given, override what the catalog says for the objects that
failed (a failed build leaves nothing behind, so the catalog alone would only say "Missing").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..api.v1alpha1 import BlockingSession, IndexStatus, ViewStatus
from . import view_calls
from .catalog import Catalog, SessionInfo
from .plan_views import view_key
from .steps import Desired, StepOutcome, foreign_reason, index_drift, view_drift


def _failures(outcomes: Iterable[StepOutcome]) -> Mapping[str, StepOutcome]:
    return {o.object: o for o in outcomes if not o.ok}


def index_statuses(desired: Desired, observed: Catalog, outcomes: Iterable[StepOutcome] = ()) -> list[IndexStatus]:
    failed = _failures(outcomes)
    result = []
    for d in desired.indexes:
        schema, name = d.spec.schema_name, d.spec.name
        info = observed.index(schema, name)
        if d.object in failed:
            result.append(IndexStatus(name=name, state="Failed", message=failed[d.object].message))
        elif observed.other_relation(schema, name) or observed.view(schema, name):
            result.append(IndexStatus(name=name, state="Conflict", message=f"{schema}.{name} is not an index"))
        elif info is None:
            result.append(IndexStatus(name=name, state="Missing", message="will be built CONCURRENTLY"))
        elif not info.owned_by(desired.owner):
            reason = foreign_reason(info, desired.owner)
            expected = observed.expected_of(schema, name)
            if info.record is None and info.building_pid is None and info.valid and expected \
                    and info.signature == expected and (info.table_schema, info.table) == (schema, d.spec.table):
                result.append(IndexStatus(name=name, state="Pending",
                                          message=f"{reason}; its definition equals the declared one: will be adopted"))
            else:
                result.append(IndexStatus(name=name, state="Conflict",
                                          message=f"an index of this name exists, {reason}; left alone"))
        elif not info.valid:
            result.append(IndexStatus(name=name, state="Invalid",
                                      message="INVALID (failed or cancelled build): will be dropped and rebuilt"))
        elif drift := index_drift(d, info):
            result.append(IndexStatus(name=name, state="Drifted", message=f"{drift}: will be replaced"))
        elif info.record is not None and info.record.how == "adopted":
            result.append(IndexStatus(name=name, state="Adopted", message="existed before; adopted, never rebuilt"))
        else:
            result.append(IndexStatus(name=name, state="Valid"))
    return result


def view_statuses(desired: Desired, observed: Catalog, outcomes: Iterable[StepOutcome] = ()) -> list[ViewStatus]:
    failed = _failures(outcomes)
    result = []
    for d in desired.views:
        schema, name = d.spec.schema_name, d.spec.name
        info = observed.view(schema, name)
        populated = bool(info and info.populated)
        if d.object in failed:
            message = f"Failed: {failed[d.object].message}"
        elif info is None:
            message = "Conflict: name taken" if observed.other_relation(schema, name) else "Missing: will be created"
        elif not info.owned_by(desired.owner):
            expected = observed.expected_of(schema, name)
            if info.record is None and expected and expected == info.def_hash:
                message = "Pending: its query equals the declared one: will be adopted"
            else:
                message = f"Conflict: {foreign_reason(info, desired.owner)}"
        elif drift := view_drift(d, info):
            message = f"Drifted: {drift}: will be rebuilt and swapped"
        elif view_key(info, observed, d.spec.unique_key) is None:
            message = "no unique index: will be built"
        elif not populated:
            message = "not populated: will be refreshed"
        else:
            message = "Ready" if info.record is None or info.record.how != "adopted" else "Ready (adopted)"
        calls = observed.calls_of(schema, name)
        refused = view_calls.refusal(d.spec, d.field, calls)
        if refused and info is None and d.object not in failed:
            message = f"Refused: {refused}"
        rule = view_calls.skip_rule(d.spec, calls) if calls is not None else None
        # status.materializedViews[].refreshRule has maxLength 512 in the CRD.
        rule = rule if rule is None or len(rule) <= 512 else rule[:509] + "..."
        result.append(ViewStatus(name=name, populated=populated, message=message, refresh_rule=rule))
    return result


def blocking_status(sessions: Iterable[SessionInfo]) -> list[BlockingSession]:
    return [BlockingSession(pid=s.pid, state=s.state, age_seconds=s.age_seconds, query=s.verb) for s in sessions]


_UNITS = {"kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _bytes(text: str | None) -> int | None:
    match = re.fullmatch(r"\s*([0-9]+)\s*(kB|MB|GB|TB)?\s*", text or "")
    if not match:
        return None
    return int(match.group(1)) * _UNITS.get(match.group(2) or "", 1)


def advice(desired: Desired, observed: Catalog) -> list[str]:
    """Server-wide facts worth a human's attention. Reported, never changed: they need a restart
    or a superuser, and belong to whoever runs the server."""
    server = observed.server
    declared = dict(desired.settings)
    notes = []
    max_connections = server.get("max_connections")
    shared_buffers = server.get("shared_buffers")
    if max_connections:
        notes.append(f"max_connections is {max_connections} (server-wide, not changed): the pooler's pool sizes "
                     "are derived from it")
    buffers = _bytes(shared_buffers)
    if shared_buffers and buffers is not None and buffers < 128 * 1024**2:
        notes.append(f"shared_buffers is {shared_buffers} (server-wide, not changed): below PostgreSQL's 128MB "
                     "default; about 25% of the server's memory is the usual starting point")
    cache = _bytes(declared.get("effective_cache_size") or server.get("effective_cache_size"))
    if cache is not None and buffers is not None and cache < buffers:
        notes.append("effective_cache_size is smaller than shared_buffers: the planner will undervalue indexes")
    work_mem = _bytes(declared.get("work_mem"))
    if work_mem is not None and max_connections and max_connections.isdigit():
        worst = work_mem * int(max_connections)
        if buffers is not None and worst > 8 * max(buffers, 1):
            notes.append(f"work_mem {declared['work_mem']} x max_connections {max_connections} is "
                         f"{worst // 1024**2}MB per sort or hash step at full load: keep the pooler in front")
    return notes
