"""The check function's cached call analysis (sql/refresh_cache.py) on a real PostgreSQL 15: used
while the catalog rows it was computed from are unchanged, never after one of them changed.

Each case: a view that skips (the server-side check stores the analysis on its skip, then skips
again from it), one catalog change that writes no table row, then the server-side check must not
skip, agreeing with decide() on the live analysis. With a key that never changes, four of the six
cases skip with the old analysis (the signature, computed from the cached function definitions,
does not see a domain constraint, an aggregate's new support function, a function's new volatility
or body); a policy and a plain view's rule are also in the signature itself.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import pytest

from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh
from marketplacedb_operator.refresh import RefreshOptions, ViewTarget, decide, lock_key, refresh_view
from refresh_kit import connect

MV = ViewTarget("public", "mv")
DECLARED = RefreshOptions(skip_if_unchanged=True, max_staleness=3600, timeout=60, lock_timeout=5,
                          depends_on=("products",))

SETUP = """
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO products SELECT g, 'p' || g FROM generate_series(1, 20) AS g;
CREATE FUNCTION approve(p int) RETURNS boolean LANGUAGE plpgsql VOLATILE AS 'BEGIN RETURN true; END';
"""

# name: (setup, view query, the change: no table write)
CASES = {
    "function made volatile": (
        "CREATE FUNCTION f(p int) RETURNS int LANGUAGE sql STABLE AS 'SELECT p'",
        "SELECT id, f(id) AS n FROM products",
        "ALTER FUNCTION f(int) VOLATILE"),
    "sql-standard body replaced": (
        "CREATE FUNCTION g(p int) RETURNS int LANGUAGE sql STABLE BEGIN ATOMIC SELECT p; END",
        "SELECT id, g(id) AS n FROM products",
        "CREATE OR REPLACE FUNCTION g(p int) RETURNS int LANGUAGE sql STABLE "
        "BEGIN ATOMIC SELECT p + 0 * extract(epoch FROM now())::int; END"),
    "aggregate replaced": (
        "CREATE FUNCTION step(s int, v int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT s + v';"
        "CREATE FUNCTION vstep(s int, v int) RETURNS int LANGUAGE plpgsql VOLATILE AS 'BEGIN RETURN s + v; END';"
        "CREATE AGGREGATE total(int) (SFUNC = step, STYPE = int, INITCOND = '0')",
        "SELECT 1 AS id, total(id) AS t FROM products",
        "CREATE OR REPLACE AGGREGATE total(int) (SFUNC = vstep, STYPE = int, INITCOND = '0')"),
    "domain constraint added": (
        "CREATE FUNCTION positive(p int) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT p > 0';"
        "CREATE DOMAIN checked AS int CHECK (positive(VALUE))",
        "SELECT id::checked AS id FROM products",
        "ALTER DOMAIN checked ADD CONSTRAINT approved CHECK (approve(VALUE))"),
    "policy added": (
        "ALTER TABLE products ENABLE ROW LEVEL SECURITY; ALTER TABLE products FORCE ROW LEVEL SECURITY;"
        "CREATE POLICY everyone ON products USING (true)",
        "SELECT id, name FROM products",
        "CREATE POLICY approved ON products USING (approve(id))"),
    "plain view redefined": (
        "CREATE VIEW listed AS SELECT id, name FROM products",
        "SELECT id, name FROM listed",
        "CREATE OR REPLACE VIEW listed AS SELECT id, name || (now() > '2000-01-01')::text AS name FROM products"),
}


@pytest.fixture
def shop(fresh_db: Any) -> Iterator[Any]:
    with fresh_db.connect() as conn:
        conn.execute(SETUP)
    yield fresh_db


def create(db: Any, setup: str, query: str) -> None:
    with db.connect() as conn:
        conn.execute(setup)
        conn.execute(f"CREATE MATERIALIZED VIEW mv AS {query}")
        conn.execute("CREATE UNIQUE INDEX ON mv (id)")


def refresh(db: Any) -> Any:
    with connect(db) as conn:
        return refresh_view(PostgresRefresh(conn), MV, DECLARED, datetime.datetime.now(datetime.UTC))


def server_skips(db: Any) -> tuple[bool, str]:
    """(the server-side check skipped, what decide() says on the live analysis)."""
    with connect(db) as conn:
        gateway = PostgresRefresh(conn)
        now = datetime.datetime.now(datetime.UTC)
        locked, skipped, _ = gateway.check(MV, lock_key(MV), DECLARED, now, False)
        assert locked
        if not skipped:
            gateway.unlock(lock_key(MV))
        return skipped, decide(gateway.observe(MV, DECLARED.depends_on), DECLARED, now).action


def cached_key(db: Any) -> Any:
    with connect(db) as conn:
        row = conn.execute("SELECT analysis_key FROM marketplacedb.refresh_state WHERE view_name = 'mv'").fetchone()
        return row[0] if row else None


def skipping_from_the_cache(db: Any) -> None:
    assert refresh(db).outcome == "refreshed"
    assert server_skips(db) == (True, "skip")  # analysed, stored with the skip
    key = cached_key(db)
    assert key is not None
    assert server_skips(db) == (True, "skip")  # from the stored analysis
    assert cached_key(db) == key


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_changed_catalog_row_invalidates_the_cached_analysis(shop: Any, case: str) -> None:
    setup, query, change = CASES[case]
    create(shop, setup, query)
    skipping_from_the_cache(shop)
    with shop.connect() as conn:
        conn.execute(change)
    skipped, live = server_skips(shop)
    assert live != "skip", f"{case}: the live analysis should refuse the skip"
    assert not skipped, f"{case}: the server-side check skipped with a stale cached analysis"


def test_the_cached_analysis_is_what_the_check_uses(shop: Any) -> None:
    """Shown by editing the stored analysis (the key left as is): the check believes it."""
    create(shop, *CASES["function made volatile"][:2])
    skipping_from_the_cache(shop)
    with connect(shop) as conn:
        conn.execute("UPDATE marketplacedb.refresh_state SET analysis = jsonb_set(analysis, '{fn,0,volatile}', "
                     "'true') WHERE view_name = 'mv'")
    assert server_skips(shop) == (False, "skip")
    # The client path (decide() on the live analysis) never reads the cache: it skips.
    assert refresh(shop).outcome == "skipped-unchanged"
