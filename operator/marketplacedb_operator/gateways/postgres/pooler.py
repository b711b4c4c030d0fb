"""What the pooler needs to know from the database beyond sizing: the auth_query lookup function."""

from __future__ import annotations

from typing import Any

import psycopg

_LOOKUP = """
SELECT EXISTS (
  SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname = %s AND p.proname = %s AND p.pronargs = 1
    AND p.proargtypes[0] = 'pg_catalog.text'::pg_catalog.regtype
)
"""


def lookup_function_exists(conn: psycopg.Connection[Any], function: str) -> bool:
    """True when `schema.name(text)` exists (spec.pooler.authQuery.function, validated by the model).

    Read from the catalogs, which every role may read: to_regprocedure raises "permission denied"
    for a schema the operator has no USAGE on, and the lookup schema is rightly not the owner's.
    """
    schema, name = function.split(".", 1)
    row = conn.execute(_LOOKUP, [schema, name]).fetchone()
    return bool(row and row[0])
