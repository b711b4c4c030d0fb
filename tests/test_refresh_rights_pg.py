"""Skip-if-unchanged after red team 4 (issue 16), on a real PostgreSQL 15: whose rights a view's
relations are read with (owners, BYPASSRLS, policy roles), settings that keep writes from being
counted, the call analysis without a depth bound, and a streaming replication connection.

The verdict of the `test_*_is_not_skipped` tests, as in tests/test_refresh_redteam4_pg.py: after a
change that alters what the view's query returns, a refresh is not `skipped-unchanged` while the view
differs from its query (each was skipped with old rows before the fix). The others show what the
fix must keep: a skip still happens when nothing changed (a CDC tool streaming), the analysis of a
cycle of functions ends.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from harness.postgres import FreshDatabase
from marketplacedb_operator.gateways.postgres.refresh import analyze_query
from marketplacedb_operator.refresh import RefreshOptions
from refresh_kit import JOIN, OPTIONS, SHOP_TABLES, connect, own_server, refresh, rows, run, stale


def not_skipped_while_stale(db: Any, name: str, query: str, options: RefreshOptions = OPTIONS) -> Any:
    assert stale(db, name, query), "the setup did not change what the query returns"
    outcome = refresh(db, name, options=options)
    assert not (outcome.outcome == "skipped-unchanged" and stale(db, name, query)), \
        f"{outcome.outcome} ({outcome.reason}): old rows served"
    return outcome


@pytest.fixture
def shop(fresh_db: Any) -> Any:
    run(fresh_db, SHOP_TABLES)
    fresh_db.server.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(fresh_db.owner)))
    return fresh_db


@pytest.fixture
def app(shop: Any) -> Iterator[str]:
    """Another role owning the plain view `visible` over the operator's `listings` (RLS enabled, not
    forced: the table's owner bypasses it, `app` sees ids 1-5); the view `mv_visible` reads it."""
    role = f"{shop.owner}_app"
    shop.server.create_role(role, "pw-app-5")
    try:
        run(shop, "CREATE TABLE listings (id int PRIMARY KEY)",
            "INSERT INTO listings SELECT g FROM generate_series(1, 20) AS g",
            "ALTER TABLE listings ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY few ON listings USING (id <= 5)",
            sql.SQL("GRANT SELECT ON listings TO {}").format(sql.Identifier(role)),
            sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        dsn = shop.server.dsn(shop.name, role, "pw-app-5")
        run(shop, "CREATE VIEW visible AS SELECT id FROM listings",
            sql.SQL("GRANT SELECT ON visible TO {}").format(sql.Identifier(shop.owner)), dsn=dsn)
        run(shop, "CREATE MATERIALIZED VIEW mv_visible AS SELECT id FROM visible",
            "CREATE UNIQUE INDEX ON mv_visible (id)")
        assert refresh(shop, "mv_visible", force=True).outcome == "refreshed"
        assert rows(shop, "SELECT count(*) FROM mv_visible") == [(5,)]
        yield role
    finally:
        shop.server.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)), dbname=shop.name)
        shop.server.drop_role(role)


def test_a_plain_view_given_to_the_tables_owner_between_refreshes_is_not_skipped(shop: Any, app: str) -> None:
    """ALTER VIEW ... OWNER TO the table's owner: the view now reads with rights that bypass the
    policy (20 rows instead of 5); only pg_class.relowner of the plain view changed."""
    shop.server.execute(sql.SQL("ALTER VIEW visible OWNER TO {}").format(sql.Identifier(shop.owner)),
                        dbname=shop.name)
    not_skipped_while_stale(shop, "mv_visible", "SELECT id FROM visible")


def test_a_role_given_bypassrls_between_refreshes_is_not_skipped(shop: Any, app: str) -> None:
    """ALTER ROLE ... BYPASSRLS of the plain view's owner: every row of `listings` is visible; no
    relation, rule or policy changed."""
    shop.server.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(app)))
    not_skipped_while_stale(shop, "mv_visible", "SELECT id FROM visible")


def test_a_policy_role_granted_between_refreshes_is_not_skipped(shop: Any, app: str) -> None:
    """A policy for the members of `readers` only: `app` (not a member) sees no row; GRANT readers
    TO app (pg_auth_members, no relation or policy changed) makes the policy apply: 5 rows."""
    readers = f"{shop.owner}_readers"
    shop.server.create_role(readers, "pw-readers-5")
    try:
        run(shop, "DROP POLICY few ON listings",
            sql.SQL("CREATE POLICY few ON listings TO {} USING (id <= 5)").format(sql.Identifier(readers)))
        assert refresh(shop, "mv_visible", force=True).outcome == "refreshed"
        assert rows(shop, "SELECT count(*) FROM mv_visible") == [(0,)]
        shop.server.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(readers), sql.Identifier(app)))
        not_skipped_while_stale(shop, "mv_visible", "SELECT id FROM visible")
    finally:
        shop.server.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(readers)), dbname=shop.name)
        shop.server.drop_role(readers)


def test_a_security_definer_function_given_to_the_tables_owner_is_not_skipped(shop: Any, app: str) -> None:
    """A SECURITY DEFINER function of `app` reads `listings` with app's rights (5 rows), trusted
    through dependsOn; ALTER FUNCTION ... OWNER TO the table's owner changes no body: 20 rows."""
    declared = RefreshOptions(max_staleness=3600, depends_on=("listings",))
    run(shop, "CREATE FUNCTION visible_ids() RETURNS SETOF int LANGUAGE sql STABLE SECURITY DEFINER "
              "AS 'SELECT id FROM public.listings'", dsn=shop.server.dsn(shop.name, app, "pw-app-5"))
    query = "SELECT v.id FROM visible_ids() AS v (id)"
    run(shop, f"CREATE MATERIALIZED VIEW mv_ids AS {query}", "CREATE UNIQUE INDEX ON mv_ids (id)")
    assert refresh(shop, "mv_ids", force=True, options=declared).outcome == "refreshed"
    assert rows(shop, "SELECT count(*) FROM mv_ids") == [(5,)]
    shop.server.execute(sql.SQL("ALTER FUNCTION visible_ids() OWNER TO {}").format(sql.Identifier(shop.owner)),
                        dbname=shop.name)
    not_skipped_while_stale(shop, "mv_ids", query, declared)


def test_writes_while_track_counts_is_off_for_the_database_are_not_skipped(shop: Any) -> None:
    """ALTER DATABASE ... SET track_counts = off: no write of any new session is counted (the
    refreshing session's own setting is off too); the reason says so."""
    run(shop, f"CREATE MATERIALIZED VIEW mv_join AS {JOIN}", "CREATE UNIQUE INDEX ON mv_join (id)")
    assert refresh(shop, "mv_join", force=True).outcome == "refreshed"
    shop.server.execute(sql.SQL("ALTER DATABASE {} SET track_counts = off").format(sql.Identifier(shop.name)))
    run(shop, "UPDATE prices SET price = price * 2")
    outcome = not_skipped_while_stale(shop, "mv_join", JOIN)
    assert "track_counts is off" in outcome.reason, outcome


def test_a_base_table_below_forty_nested_views_is_tracked(shop: Any) -> None:
    """The dependency walk had a depth bound (32) too: `prices` read 40 plain views down was not a
    base table, and with `products` read directly the view was 'tracked' and skipped after an
    UPDATE of prices."""
    run(shop, "CREATE VIEW chain_0 AS SELECT product_id, price FROM prices",
        *(sql.SQL("CREATE VIEW {} AS SELECT product_id, price FROM {}").format(
            sql.Identifier(f"chain_{n}"), sql.Identifier(f"chain_{n - 1}")) for n in range(1, 40)))
    query = "SELECT p.id, c.price FROM products AS p JOIN chain_39 AS c ON c.product_id = p.id"
    run(shop, f"CREATE MATERIALIZED VIEW mv_chain AS {query}", "CREATE UNIQUE INDEX ON mv_chain (id)")
    assert refresh(shop, "mv_chain", force=True).outcome == "refreshed"
    with connect(shop) as conn:
        calls = analyze_query(conn, query)
    assert calls.tables == ("public.prices", "public.products"), calls
    run(shop, "UPDATE prices SET price = price + 1")  # its session ends: counted (flushed at exit)
    not_skipped_while_stale(shop, "mv_chain", query)


def test_the_analysis_of_functions_calling_each_other_ends(shop: Any) -> None:
    """No depth bound: a cycle (SQL-standard bodies replaced to call each other) is read once per
    function; the clock read inside it is found."""
    run(shop, "CREATE FUNCTION ping(n int) RETURNS int LANGUAGE sql STABLE BEGIN ATOMIC SELECT 0; END",
        "CREATE FUNCTION pong(n int) RETURNS int LANGUAGE sql STABLE BEGIN ATOMIC "
        "SELECT CASE WHEN n <= 0 THEN extract(year FROM now())::int ELSE ping(n - 1) END; END",
        "CREATE OR REPLACE FUNCTION ping(n int) RETURNS int LANGUAGE sql STABLE BEGIN ATOMIC "
        "SELECT CASE WHEN n <= 0 THEN 0 ELSE pong(n - 1) END; END")
    with connect(shop) as conn:
        calls = analyze_query(conn, "SELECT id, ping(id) AS n FROM products")
    assert calls.time == ("now()",), calls
    assert "public.ping(integer) (stable)" in calls.untracked and "public.pong(integer) (stable)" in calls.untracked


@pytest.fixture
def logical_server() -> Iterator[FreshDatabase]:
    """A server of this test's own with wal_level = logical (a replication slot can stream)."""
    with own_server(max_connections=20, extra_conf={"wal_level": "logical"}) as db:
        yield db


def test_a_streaming_logical_replication_connection_does_not_stop_skipping(logical_server: Any) -> None:
    """A CDC tool's walsender streams for days (state 'active' for START_REPLICATION): counted like
    a running statement, no view of the database could ever skip. Streaming since before the last
    refresh, it holds no write: an unchanged view is skipped."""
    db = logical_server
    run(db, SHOP_TABLES, f"CREATE MATERIALIZED VIEW mv_join AS {JOIN}", "CREATE UNIQUE INDEX ON mv_join (id)")
    db.server.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(db.owner)))
    conninfo = make_conninfo(host=db.server.host, port=db.server.port, dbname=db.name, user="postgres")
    env = {**os.environ, "PGPASSWORD": db.server.superuser_password}
    streamer = subprocess.Popen([str(db.server.bindir / "pg_recvlogical"), "-d", conninfo, "--slot", "cdc",
                                 "--create-slot", "--start", "-P", "test_decoding", "-f", "/dev/null"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with psycopg.connect(db.superuser_dsn, autocommit=True) as probe:
            for _ in range(600):
                if probe.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                                 ).fetchone() == (1,):
                    break
                assert streamer.poll() is None, streamer.communicate()[1]
                probe.execute("SELECT pg_sleep(0.05)")
            else:
                raise AssertionError("pg_recvlogical never streamed")
        time.sleep(1.2)  # streaming started before the baseline by more than the margin
        assert refresh(db, "mv_join", force=True).outcome == "refreshed"
        skipped = refresh(db, "mv_join")
        assert skipped.outcome == "skipped-unchanged", skipped
    finally:
        streamer.terminate()
        streamer.wait(30)
        with psycopg.connect(db.superuser_dsn, autocommit=True) as dba:
            dba.execute("SELECT pg_drop_replication_slot('cdc') FROM pg_replication_slots WHERE slot_name = 'cdc'")
