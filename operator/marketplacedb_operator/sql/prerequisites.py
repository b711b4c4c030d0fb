"""What declared indexes need before they can be built: extensions providing their operator classes.

Pure. An index whose extension is missing is blocked (a conflict naming the exact statement a DBA
must run), unless `spec.database.extensions` lists the extension and the role may create it: then
the plan creates it first (IF NOT EXISTS, transactional, before any index). The operator never
creates an extension nobody asked for: an extension runs code inside the database.
"""

from __future__ import annotations

from psycopg import sql

from . import ddl
from .catalog import Catalog
from .steps import Desired, DesiredIndex, Step


def create_extension(name: str) -> sql.Composed:
    return sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(name))


def prerequisites(desired: Desired, cat: Catalog) -> tuple[list[Step], list[str], set[str]]:
    """(steps creating extensions, conflicts, objects of the blocked indexes)."""
    steps: list[Step] = []
    conflicts: list[str] = []
    blocked: set[str] = set()
    created: set[str] = set()
    for d in desired.indexes:
        missing = [e for e in d.spec.extensions if e not in cat.extensions]
        for extension in missing:
            if extension in desired.extensions and extension in cat.creatable_extensions:
                if extension not in created:
                    created.add(extension)
                    steps.append(Step("create-extension", f"extension/{extension}",
                                      f"create extension {extension} (listed in spec.database.extensions; "
                                      f"needed by {d.spec.schema_name}.{d.spec.name})",
                                      (create_extension(extension),), transactional=True))
                continue
            blocked.add(d.object)
            conflicts.append(_blocked(d, extension, desired, cat))
    return steps, conflicts, blocked


def _blocked(d: DesiredIndex, extension: str, desired: Desired, cat: Catalog) -> str:
    statement = ddl.render(create_extension(extension))
    if extension not in desired.extensions:
        why = f"list {extension} in spec.database.extensions to let the operator create it"
    elif extension not in cat.creatable_extensions:
        why = "the operator's role may not create it (not available, or not trusted and no superuser)"
    else:  # pragma: no cover - handled by the caller
        why = ""
    opclasses = ", ".join(sorted({c.opclass for c in d.spec.columns if c.opclass}))
    return (f"{d.field}: blocked: index {d.spec.schema_name}.{d.spec.name} needs extension {extension} "
            f"(operator class {opclasses}), which is not installed in database {cat.database}; a DBA must run: "
            f"{statement}; ({why}). Retried on the next reconcile")
