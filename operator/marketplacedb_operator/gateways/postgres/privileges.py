"""Read what the connected role may do (sql/privileges.Facts): catalog reads only, nothing changes.

Every question is asked of PostgreSQL's own privilege functions (has_*_privilege, pg_has_role), so
the answer includes what the role holds through membership, exactly as the server will judge the
DDL. View queries are checked with LIMIT 0 in a READ ONLY transaction (schema.check_view_columns).
"""

from __future__ import annotations

from typing import Any

import psycopg

from ...api.v1alpha1 import MarketplaceDBSpec
from ...sql.privileges import Facts, RelationFacts, RoleFacts, SchemaFacts, needed_relations, needed_schemas
from .schema import check_view_columns, describe_error

_ROLE = """
SELECT current_user, r.rolsuper, pg_catalog.pg_has_role(current_user, d.datdba, 'USAGE'),
       pg_catalog.has_database_privilege(current_database(), 'CREATE'),
       pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'), current_database()
  FROM pg_catalog.pg_roles r, pg_catalog.pg_database d
 WHERE r.rolname = current_user AND d.datname = current_database()
"""
_SCHEMA = """
SELECT pg_catalog.has_schema_privilege(oid, 'USAGE'), pg_catalog.has_schema_privilege(oid, 'CREATE')
  FROM pg_catalog.pg_namespace WHERE nspname = %s
"""
_RELATION = """
SELECT pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE'), o.rolname, o.rolsuper
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
 WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'm')
"""


def read_facts(conn: psycopg.Connection[Any], spec: MarketplaceDBSpec) -> Facts:
    row = conn.execute(_ROLE).fetchone()
    assert row is not None  # current_user and current_database() always exist
    role = RoleFacts(role=row[0], superuser=row[1], database_owner=row[2], create_on_database=row[3],
                     read_all_stats=row[4], database=row[5])
    schemas = {}
    for name in needed_schemas(spec):
        found = conn.execute(_SCHEMA, [name]).fetchone()
        schemas[name] = SchemaFacts(exists=False) if found is None else SchemaFacts(True, found[0], found[1])
    relations = {}
    for schema, name in needed_relations(spec):
        found = conn.execute(_RELATION, [schema, name]).fetchone()
        relations[(schema, name)] = (RelationFacts(exists=False) if found is None
                                     else RelationFacts(True, found[0], found[1], found[2]))
    errors = {}
    for view in spec.materialized_views:
        try:
            check_view_columns(conn, view.query)
        except Exception as exc:  # the server's reason, one line, per view
            errors[view.name] = describe_error(exc)
    return Facts(role=role, schemas=schemas, relations=relations, view_query_errors=errors)
