"""What the analysis of a view's query (sql/view_calls.py) counts as called, on PostgreSQL 15.

Beyond the red team's cases (tests/test_refresh_redteam3_pg.py): a row-level security policy that
reads another relation, and the precision side: an I/O conversion through IMMUTABLE functions
(`id::text`) keeps skip-if-unchanged on, so the rule is not "any cast turns it off".
"""

from __future__ import annotations

from typing import Any

import psycopg

from marketplacedb_operator.gateways.postgres.refresh import analyze_query

SETUP = """
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE allowed (id int PRIMARY KEY);
INSERT INTO products SELECT g, 'p' || g FROM generate_series(1, 5) AS g;
"""


def analyze(db: Any, query: str, *setup: str) -> Any:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(SETUP)
        for statement in setup:
            conn.execute(statement)
        return analyze_query(conn, query)


def test_a_row_level_security_policy_reading_another_table_is_untracked(fresh_db: Any) -> None:
    """Writes to `allowed` change what the view returns (the policy filters by it), yet no rule of
    the view reads `allowed`: counted as untracked, skip-if-unchanged off unless dependsOn."""
    calls = analyze(fresh_db, "SELECT id, name FROM products",
                    "ALTER TABLE products ENABLE ROW LEVEL SECURITY",
                    "ALTER TABLE products FORCE ROW LEVEL SECURITY",
                    "CREATE POLICY only_allowed ON products USING (id IN (SELECT a.id FROM allowed AS a))")
    assert calls.untracked == ("row-level security policy only_allowed on products (reads other relations)",)
    assert calls.volatile == () and calls.tables == ("public.products",)


def test_an_io_conversion_through_immutable_functions_keeps_skip_on(fresh_db: Any) -> None:
    """int4out and textin are IMMUTABLE built-ins: `id::text` adds nothing untracked."""
    calls = analyze(fresh_db, "SELECT id, id::text AS label, name::varchar AS n FROM products")
    assert (calls.volatile, calls.untracked, calls.time) == ((), (), ())
    assert calls.tables == ("public.products",)


def test_a_nested_io_conversion_is_reported_as_undetermined(fresh_db: Any) -> None:
    """The argument of the outer conversion is itself a conversion: its type is not in the tree's
    text where the analysis looks, so it errs on the side of refreshing."""
    calls = analyze(fresh_db, "SELECT id, ((id::text)::int)::text AS t FROM products")
    assert calls.untracked == ("an I/O conversion (::text-style cast) of an expression of undetermined type",)
