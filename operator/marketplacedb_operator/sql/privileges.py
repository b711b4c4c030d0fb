"""What the database role must be allowed to do, per feature, and the SQL that grants it (pure).

    checks(spec, facts) -> list[Check]

`facts` is what the server said (gateways/postgres/privileges.py reads it); nothing here does I/O.
The needs are PostgreSQL 15's (verified in tests/test_doctor.py against a real server):

- an index: own the table (or be a member of its owner) and have CREATE on its schema
  ("permission denied for schema" otherwise, even for the table's owner);
- a materialized view: CREATE on its schema, SELECT on what the query reads, and ownership of the
  view once it exists (only the owner may REFRESH, rename or drop it);
- anything declared: the operator's schema `marketplacedb` holds the ownership records (which
  objects are the resource's, by OID) and the refresh state; the operator runs
  `CREATE SCHEMA IF NOT EXISTS` before any DDL (and before the first refresh), which PostgreSQL
  checks against CREATE on the database even when the schema exists: so CREATE on the database;
- `spec.database.settings`: `ALTER DATABASE ... SET` needs the database's owner;
- optional: `pg_read_all_stats` to name the sessions that block an index build, and for
  skip-if-unchanged to see other roles' sessions (sql/refresh_stats.py: hidden ones refuse a skip).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from psycopg import sql

from .. import naming
from ..api.v1alpha1 import MarketplaceDBSpec

Level = Literal["ok", "missing", "advice"]


@dataclasses.dataclass(frozen=True)
class RoleFacts:
    role: str
    database: str
    superuser: bool
    database_owner: bool
    create_on_database: bool
    read_all_stats: bool


@dataclasses.dataclass(frozen=True)
class SchemaFacts:
    exists: bool
    usage: bool = False
    create: bool = False


@dataclasses.dataclass(frozen=True)
class RelationFacts:
    exists: bool
    owned: bool = False  # the role is the owner or has its privileges (membership with INHERIT)
    owner: str = ""
    owner_is_superuser: bool = False


@dataclasses.dataclass(frozen=True)
class Facts:
    role: RoleFacts
    schemas: dict[str, SchemaFacts]
    relations: dict[tuple[str, str], RelationFacts]
    view_query_errors: dict[str, str]  # view name -> the server's error for its query (LIMIT 0)


@dataclasses.dataclass(frozen=True)
class Check:
    feature: str  # the spec field the need comes from
    need: str
    level: Level
    grant: sql.Composable | None = None  # what an administrator runs to grant it (None when ok)


def needed_relations(spec: MarketplaceDBSpec) -> list[tuple[str, str]]:
    return sorted({(i.schema_name, i.table) for i in spec.indexes}
                  | {(v.schema_name, v.name) for v in spec.materialized_views})


def needed_schemas(spec: MarketplaceDBSpec) -> list[str]:
    return sorted({i.schema_name for i in spec.indexes} | {v.schema_name for v in spec.materialized_views})


def _schema_check(feature: str, schema: str, facts: Facts) -> Check:
    found = facts.schemas.get(schema, SchemaFacts(exists=False))
    need = f"USAGE and CREATE on schema {schema}"
    if not found.exists:
        return Check(feature, f"schema {schema} exists", "missing",
                     sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                         sql.Identifier(schema), sql.Identifier(facts.role.role)))
    if found.usage and found.create:
        return Check(feature, need, "ok")
    return Check(feature, need, "missing", sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(
        sql.Identifier(schema), sql.Identifier(facts.role.role)))


# The one keyword spliced with sql.SQL below: typed to these two, never a caller's string.
RelationKind = Literal["TABLE", "MATERIALIZED VIEW"]


def _ownership_grant(kind: RelationKind, schema: str, name: str, found: RelationFacts, role: str) -> sql.Composable:
    if found.owner and not found.owner_is_superuser:
        # Membership in the owning role: the owner's privileges without moving the table's ownership.
        return sql.SQL("GRANT {} TO {}").format(sql.Identifier(found.owner), sql.Identifier(role))
    return sql.SQL("ALTER {} {} OWNER TO {}").format(sql.SQL(kind), sql.Identifier(schema, name), sql.Identifier(role))


def _index_checks(spec: MarketplaceDBSpec, facts: Facts) -> list[Check]:
    out = []
    for number, index in enumerate(spec.indexes):
        feature = f"spec.indexes[{number}] ({index.name})"
        table = facts.relations.get((index.schema_name, index.table), RelationFacts(exists=False))
        need = f"own table {index.schema_name}.{index.table} (CREATE INDEX needs its owner)"
        if not table.exists:
            out.append(Check(feature, f"table {index.schema_name}.{index.table} exists and is visible", "missing"))
        elif table.owned:
            out.append(Check(feature, need, "ok"))
        else:
            out.append(Check(feature, need, "missing",
                             _ownership_grant("TABLE", index.schema_name, index.table, table, facts.role.role)))
        out.append(_schema_check(feature, index.schema_name, facts))
    return out


def _view_checks(spec: MarketplaceDBSpec, facts: Facts) -> list[Check]:
    out = []
    for number, view in enumerate(spec.materialized_views):
        feature = f"spec.materializedViews[{number}] ({view.name})"
        out.append(_schema_check(feature, view.schema_name, facts))
        error = facts.view_query_errors.get(view.name)
        if error:
            out.append(Check(feature, f"SELECT on what the query reads: {error}", "missing"))
        else:
            out.append(Check(feature, "SELECT on what the query reads", "ok"))
        existing = facts.relations.get((view.schema_name, view.name), RelationFacts(exists=False))
        if existing.exists and not existing.owned:
            out.append(Check(feature, f"own the existing {view.schema_name}.{view.name} (REFRESH needs its owner)",
                             "missing", _ownership_grant("MATERIALIZED VIEW", view.schema_name, view.name,
                                                         existing, facts.role.role)))
    return out


def _state_check(spec: MarketplaceDBSpec, facts: Facts) -> list[Check]:
    if not (spec.indexes or spec.materialized_views or spec.database.settings):
        return []
    role = facts.role
    need = (f"CREATE on database {role.database} (the operator's schema {naming.STATE_SCHEMA}: ownership "
            "records and refresh state)")
    if role.create_on_database:
        return [Check("spec (ownership records, refresh state)", need, "ok")]
    return [Check("spec (ownership records, refresh state)", need, "missing",
                  sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                      sql.Identifier(role.database), sql.Identifier(role.role)))]


def _settings_check(spec: MarketplaceDBSpec, facts: Facts) -> list[Check]:
    if not spec.database.settings:
        return []
    role = facts.role
    need = f"own database {role.database} (ALTER DATABASE ... SET needs its owner)"
    if role.database_owner:
        return [Check("spec.database.settings", need, "ok")]
    return [Check("spec.database.settings", need, "missing", sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
        sql.Identifier(role.database), sql.Identifier(role.role)))]


def checks(spec: MarketplaceDBSpec, facts: Facts) -> list[Check]:
    """Every need of `spec` against `facts`, in spec order; a superuser passes them all."""
    if facts.role.superuser:
        return [Check("spec.database.credentialsSecretRef", "a superuser can do everything; a dedicated "
                      "non-superuser role is recommended (docs/install.md#3-the-database-role)", "advice")]
    out = [*_index_checks(spec, facts), *_view_checks(spec, facts), *_state_check(spec, facts),
           *_settings_check(spec, facts)]
    if spec.indexes and not facts.role.read_all_stats:
        out.append(Check("spec.indexes", "pg_read_all_stats (optional): name the state and age of sessions that "
                         "block an index build, not only their pid", "advice",
                         sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(facts.role.role))))
    skipping = any(v.refresh is None or v.refresh.skip_if_unchanged for v in spec.materialized_views)
    if skipping and not facts.role.read_all_stats:
        # sql/refresh_stats.py: another role's session is hidden, so its unreported writes cannot be ruled out.
        out.append(Check("spec.materializedViews", "pg_read_all_stats (or pg_monitor): skip-if-unchanged skips only "
                         "when no other role's session may hold unreported writes, which it cannot see without it",
                         "advice", sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(facts.role.role))))
    # A schema shared by several objects is one need: report it once, under the first object.
    seen: set[tuple[str, str]] = set()
    unique = []
    for check in out:
        if (check.need, check.level) not in seen:
            seen.add((check.need, check.level))
            unique.append(check)
    return unique
