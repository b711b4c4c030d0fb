"""What declared indexes need before they can be built: extensions providing their operator classes.

Those classes are either named (`opclass: gin_trgm_ops`) or implied: a gin or gist index on a
scalar column without an opclass needs the column type's *default* class for the method, which
btree_gin / btree_gist provide for the b-tree-like types (without them PostgreSQL says "data type
integer has no default operator class for access method gin"). The catalog says which plain
columns have no default class yet (catalog.NO_DEFAULT_OPCLASS).

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


# The types btree_gin / btree_gist give a default operator class (PostgreSQL 15 contrib), by
# pg_type.typname of the column's (base) type; enum columns as anyenum.
_SCALAR = {"int2", "int4", "int8", "float4", "float8", "numeric", "timestamp", "timestamptz", "time", "timetz",
           "date", "interval", "oid", "money", "char", "varchar", "text", "bpchar", "bytea", "bit", "varbit",
           "macaddr", "macaddr8", "inet", "cidr", "uuid", "bool", "anyenum"}
DEFAULT_CLASSES = {"gin": ("btree_gin", _SCALAR | {"name"}), "gist": ("btree_gist", _SCALAR)}


def _implied(d: DesiredIndex, cat: Catalog) -> tuple[dict[str, str], list[str]]:
    """({extension: column description} the index needs for its plain columns, columns no extension
    can help: (type, method) without a default operator class)."""
    needed: dict[str, str] = {}
    hopeless: list[str] = []
    spec = d.spec
    for schema, table, column, method, type_name in cat.no_default_opclass:
        if (schema, table, method) != (spec.schema_name, spec.table, spec.method) \
                or column not in {c.name for c in spec.columns if c.name and not c.opclass}:
            continue
        extension, types = DEFAULT_CLASSES.get(method, ("", set()))
        what = f"column {column} of type {type_name} without an opclass"
        if type_name in types and extension not in cat.extensions:
            needed.setdefault(extension, what)
        else:
            hopeless.append(f"{what}: data type {type_name} has no default operator class for access method "
                            f"{method}")
    return needed, hopeless


def prerequisites(desired: Desired, cat: Catalog) -> tuple[list[Step], list[str], set[str]]:
    """(steps creating extensions, conflicts, objects of the blocked indexes)."""
    steps: list[Step] = []
    conflicts: list[str] = []
    blocked: set[str] = set()
    created: set[str] = set()
    for d in desired.indexes:
        implied, hopeless = _implied(d, cat)
        if hopeless:
            blocked.add(d.object)
            conflicts.append(f"{d.field}: blocked: index {d.spec.schema_name}.{d.spec.name}: {'; '.join(hopeless)}; "
                             "declare an opclass for it (or another method)")
            continue
        missing = [e for e in d.spec.extensions if e not in cat.extensions]
        missing += [e for e in sorted(implied) if e not in missing]
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
            conflicts.append(_blocked(d, extension, desired, cat, implied.get(extension)))
    return steps, conflicts, blocked


def _blocked(d: DesiredIndex, extension: str, desired: Desired, cat: Catalog, implied: str | None) -> str:
    statement = ddl.render(create_extension(extension))
    if extension not in desired.extensions:
        why = f"list {extension} in spec.database.extensions to let the operator create it"
    elif extension not in cat.creatable_extensions:
        why = "the operator's role may not create it (not available, or not trusted and no superuser)"
    else:  # pragma: no cover - handled by the caller
        why = ""
    opclasses = ", ".join(sorted({c.opclass for c in d.spec.columns if c.opclass}))
    because = f"the default {d.spec.method} operator class of {implied}" if implied else f"operator class {opclasses}"
    return (f"{d.field}: blocked: index {d.spec.schema_name}.{d.spec.name} needs extension {extension} "
            f"({because}), which is not installed in database {cat.database}; a DBA must run: "
            f"{statement}; ({why}). Retried on the next reconcile")
