"""Indexes on partitioned tables, without blocking writes (pure).

PostgreSQL 15 has no CREATE INDEX CONCURRENTLY on a partitioned table. The documented way instead:
`CREATE INDEX ... ON ONLY parent` (an INVALID parent index, instant: the parent holds no rows), then
`CREATE INDEX CONCURRENTLY` on each partition, then `ALTER INDEX parent ATTACH PARTITION child`; the
parent index becomes valid by itself once every partition has one attached. A partition added
later has no attached index (the parent is INVALID again when it was created with ... ON ONLY, or
valid when PostgreSQL built one itself): the next reconcile builds and attaches what is missing.
Each partition's index is recorded as owned (ownership.py), with an intent record before its build.
"""

from __future__ import annotations

from .. import naming
from . import ddl, ownership
from .catalog import Catalog, IndexInfo
from .steps import DesiredIndex, Step, index_drift


def partition_index_name(name: str, partition: str) -> str:
    """`<partition>_<index>`, kept within 63 bytes (a hash replaces what does not fit)."""
    full = f"{partition}_{name}"
    if len(full.encode()) <= naming.MAX_IDENTIFIER_BYTES:
        return full
    return f"{full[: naming.MAX_IDENTIFIER_BYTES - 9]}_{naming.short_hash(full, length=8)}"


def _partition_steps(d: DesiredIndex, owner: str, cat: Catalog, schema: str, partition: str) -> list[Step]:
    spec = d.spec
    child = partition_index_name(spec.name, partition)
    return [
        Step("intent", d.object, f"record the intent to build {schema}.{child} (what a crash leaves is ours)",
             (ownership.intent(owner, schema, child, schema, partition, d.hash),), transactional=True,
             cleanup=(ownership.forget_intent(owner, schema, child),)),
        Step("create-index", d.object, f"build index {schema}.{child} on partition {partition} CONCURRENTLY",
             (ddl.create_index_on(spec, child, table=partition, schema=schema),), transactional=False,
             lock_policy="index", verify_index=(schema, child), cleanup_index=(schema, child),
             cleanup=(ddl.drop_index(schema, child), ownership.forget(owner, schema, child)),
             build_table=(schema, partition)),
        Step("attach-index", d.object, f"attach {schema}.{child} to {spec.schema_name}.{spec.name}, record it as "
             f"owned by {owner}",
             (ddl.attach_index(spec.schema_name, spec.name, schema, child),
              *ownership.record(owner, "index", schema, child, d.hash, "created")), transactional=True),
    ]


def partitioned_index_steps(d: DesiredIndex, owner: str, cat: Catalog,
                            existing: IndexInfo | None) -> tuple[list[Step], list[str]]:
    """(steps, conflicts) for a declared index whose table is partitioned."""
    spec = d.spec
    schema, name = spec.schema_name, spec.name
    if existing is not None and not existing.owned_by(owner):
        return [], [f"{d.field}: index {schema}.{name} on partitioned table {spec.table} exists and is not this "
                    "resource's; left alone (adoption of partitioned indexes is not supported)"]
    if existing is not None and existing.valid and index_drift(d, existing):
        return [], [f"{d.field}: index {schema}.{name} is on partitioned table {spec.table} and "
                    f"{index_drift(d, existing)}: rebuilding a partitioned index is not supported; declare the "
                    "new definition under another name, then remove this one"]
    steps: list[Step] = []
    conflicts: list[str] = []
    if existing is None:
        steps.append(Step(
            "create-index-parent", d.object,
            f"create index {schema}.{name} ON ONLY {spec.table} (INVALID until every partition's index is attached; "
            "instant: a partitioned table holds no rows itself)",
            (ddl.create_index_on(spec, name, concurrently=False, only=True),
             ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash)),
             *ownership.record(owner, "index", schema, name, d.hash, "created")), transactional=True))
    attached = {(p_schema, partition) for p_schema, partition in cat.attached_partitions(schema, name)}
    for p_schema, partition, kind in cat.partitions_of(schema, spec.table):
        if (p_schema, partition) in attached:
            continue
        if kind != "r":
            conflicts.append(f"{d.field}: partition {p_schema}.{partition} of {spec.table} is a "
                             f"{'partitioned table' if kind == 'p' else 'foreign table'}: not supported, its "
                             f"index is not built and {schema}.{name} stays INVALID")
            continue
        steps += _partition_steps(d, owner, cat, p_schema, partition)
    if steps:
        # Re-recorded once all are attached: the definition of a valid parent loses its ON ONLY.
        steps.append(Step("mark", d.object, f"record {schema}.{name} (valid once every partition is attached)",
                          (ddl.mark("INDEX", schema, name, ddl.marker_prefix(owner, d.hash)),
                           *ownership.record(owner, "index", schema, name, d.hash, "created")),
                          transactional=True))
    return steps, conflicts
