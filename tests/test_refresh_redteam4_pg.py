"""Red team 4 (issue 16): skip-if-unchanged after the unreported-statistics rule (sql/refresh_stats.py)
and the cached call analysis (sql/refresh_cache.py), attacked on PostgreSQL 15.

The verdict of every test: after a change that alters what the view's query returns (or makes it
move with the clock), a refresh is not `skipped-unchanged` while the view differs from its query.
A failing test here is a hole; the tests named `test_held_*` pass (the code holds) and are kept as
regressions for promises nothing else tested.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from harness.postgres import FreshDatabase
from marketplacedb_operator.refresh import RefreshOptions
from refresh_kit import (
    JOIN,
    OPTIONS,
    SHOP_TABLES,
    apply,
    connect,
    created,
    own_server,
    refresh,
    rows,
    run,
    stale,
    view,
    wait_for_lock_wait,
)


def load(db: Any) -> Any:
    run(db, SHOP_TABLES)
    return db


@pytest.fixture
def shop(fresh_db: Any) -> Any:
    return load(fresh_db)


# --- unreported write statistics ----------------------------------------------------------------


def test_a_write_held_by_a_logical_replication_connection_is_not_skipped(shop: Any) -> None:
    """refresh_stats.ACTIVITY leaves walsenders out ("replication connections stream, they do not
    write"). A logical replication connection (replication=database: what CDC tools open, any role
    with REPLICATION) runs plain SQL through exec_simple_query, with the same flush rules as a
    client backend: a message that commits an UPDATE and keeps running holds the counts, the check
    sees no session that could hold them, and skips with the old prices. The operator's role has
    pg_read_all_stats, as documented, so the session is not 'hidden'."""
    shop.server.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(shop.owner)))
    run(shop, f"CREATE MATERIALIZED VIEW mv_join AS {JOIN}", "CREATE UNIQUE INDEX ON mv_join (id)")
    message = ("SELECT pg_advisory_lock_shared(4261); UPDATE prices SET price = price + 1; COMMIT; "
               "SELECT pg_advisory_lock(4262)")
    replication = psycopg.connect(shop.superuser_dsn + " replication=database", autocommit=True)
    first = connect(shop)
    first.execute("SELECT pg_advisory_lock(4261)")
    with connect(shop) as second:
        second.execute("SELECT pg_advisory_lock(4262)")
        worker = threading.Thread(target=lambda: replication.execute(message))
        worker.start()
        try:
            wait_for_lock_wait(shop, 4261, shop.superuser_dsn)  # the message runs, nothing committed yet
            time.sleep(1.2)  # the holders' last activity is older than the baseline by more than the margin
            assert refresh(shop, "mv_join", force=True).outcome == "refreshed"  # baseline (counters_at)
            first.close()  # its session ends: the message goes on, commits the UPDATE, waits for 4262
            wait_for_lock_wait(shop, 4262, shop.superuser_dsn)
            backend = rows(shop, "SELECT backend_type FROM pg_stat_activity WHERE wait_event = 'advisory'")
            assert backend == [("walsender",)], backend
            assert stale(shop, "mv_join", JOIN), "the setup did not commit a change the view misses"
            outcome = refresh(shop, "mv_join")
            still_stale = stale(shop, "mv_join", JOIN)
        finally:
            second.execute("SELECT pg_advisory_unlock(4262)")
            worker.join(60)
            replication.close()
    assert not (outcome.outcome == "skipped-unchanged" and still_stale), \
        f"{outcome.outcome} ({outcome.reason}): the replication connection's committed UPDATE was unflushed"


@pytest.fixture
def crashable() -> Iterator[FreshDatabase]:
    """A server of this test's own: it is crashed (immediate stop) and restarted."""
    with own_server(max_connections=20) as db:
        yield db


def test_counters_discarded_by_crash_recovery_do_not_make_a_changed_view_skip(crashable: Any) -> None:
    """After an immediate shutdown (a crash, an OOM kill, a failover restart of the same data
    directory) PostgreSQL 15 discards the cumulative statistics: every counter starts again at 0
    and pg_stat_database.stats_reset stays NULL (no reset was asked for), so the signature's reset
    time does not change. As many writes as were counted before bring the sum back to the recorded
    value: skipped, old prices served (redteam3 covered pg_stat_reset_*; this is the other way the
    counters go back, named in that test's docstring and not covered by its fix)."""
    db = load(crashable)
    run(db, f"CREATE MATERIALIZED VIEW mv_join AS {JOIN}", "CREATE UNIQUE INDEX ON mv_join (id)")
    assert refresh(db, "mv_join", force=True).outcome == "refreshed"
    counted = rows(db, "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del)::int FROM pg_stat_user_tables "
                       "WHERE relname IN ('products', 'prices')")[0][0]
    with psycopg.connect(db.superuser_dsn, autocommit=True) as dba:
        dba.execute("CHECKPOINT")  # the recorded state survives; only the statistics are lost
    db.server.stop(mode="immediate")
    db.server.start()
    after = rows(db, "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del)::int FROM pg_stat_user_tables "
                     "WHERE relname IN ('products', 'prices')")[0][0]
    assert after == 0, f"the counters survived the crash ({after}): nothing is shown here"
    assert counted % 20 == 0, counted
    with connect(db) as conn:  # exactly as many writes as were counted before the crash
        for _ in range(counted // 20):
            conn.execute("UPDATE prices SET price = price + 1")
    assert stale(db, "mv_join", JOIN)
    outcome = refresh(db, "mv_join")
    still_stale = stale(db, "mv_join", JOIN)
    assert not (outcome.outcome == "skipped-unchanged" and still_stale), \
        f"{outcome.outcome}: skipped after crash recovery discarded the counters, old prices served"


# --- the call analysis (cached, and its bound) ----------------------------------------------------


def test_a_clock_read_deeper_than_the_analysis_bound_is_time_dependent(shop: Any) -> None:
    """CALLS walks function bodies to depth < 16 and stops silently: a chain of SQL-standard
    (BEGIN ATOMIC) functions whose 17th reads now() is analysed as 'stable, untracked' only; with
    dependsOn the view is skipped forever while the plan's own analysis (same CALLS) missed that it
    moves with the clock. Cut at the bound, the analysis should say 'undetermined' and turn skip
    off (or refuse), never report less than the view calls."""
    run(shop, "ALTER TABLE products ADD COLUMN created_at timestamptz NOT NULL DEFAULT now()")
    depth = 20
    run(shop, "CREATE FUNCTION is_new_0(at timestamptz) RETURNS boolean LANGUAGE sql STABLE "
              "BEGIN ATOMIC SELECT at > now() - interval '1 day'; END")
    for level in range(1, depth):
        run(shop, f"CREATE FUNCTION is_new_{level}(at timestamptz) RETURNS boolean LANGUAGE sql STABLE "
                  f"BEGIN ATOMIC SELECT is_new_{level - 1}(at); END")
    query = sql.SQL("SELECT id FROM products WHERE {}(created_at)").format(
        sql.Identifier(f"is_new_{depth - 1}")).as_string(None)
    declared = RefreshOptions(max_staleness=3600, depends_on=("products",))
    statuses = created(shop, view("mv_new", query, refresh={"schedule": "*/5 * * * *",
                                                           "dependsOn": ["products"]}))
    assert refresh(shop, "mv_new", declared).outcome.startswith("refreshed")
    outcome = refresh(shop, "mv_new", declared)
    assert outcome.outcome != "skipped-unchanged", \
        f"skipped: now() at depth {depth} was not seen; the plan said {statuses[0].refresh_rule!r}"


def skipped_once_cached(db: Any, name: str, options: RefreshOptions) -> None:
    """Refresh, then skip once: the check function stores its analysis only when it skips."""
    assert refresh(db, name, options, force=True).outcome.startswith("refreshed")
    time.sleep(1.2)  # sessions of the setup are older than that refresh by more than the margin
    assert refresh(db, name, options, force=True).outcome.startswith("refreshed")
    skipped = refresh(db, name, options)
    assert skipped.outcome == "skipped-unchanged", skipped
    cached = rows(db, "SELECT analysis IS NOT NULL FROM marketplacedb.refresh_state WHERE view_name = %s", [name])
    assert cached == [(True,)], "no analysis was cached: the cache is not exercised"


PRICED = {"schedule": "*/5 * * * *", "dependsOn": ["prices"]}


def test_held_a_callee_of_a_callee_replaced_after_a_cached_skip_refreshes(shop: Any) -> None:
    """The key covers every analysed function, not only those the rule names: price_of() (trusted
    through dependsOn) calls vat() (BEGIN ATOMIC); replacing vat() changes the prices."""
    run(shop, "CREATE FUNCTION vat(p numeric) RETURNS numeric LANGUAGE sql IMMUTABLE BEGIN ATOMIC SELECT p; END",
        "CREATE FUNCTION price_of(p int) RETURNS numeric LANGUAGE sql STABLE "
        "BEGIN ATOMIC SELECT vat(price) FROM prices WHERE product_id = p; END")
    query = "SELECT id, price_of(id) AS price FROM products"
    declared = RefreshOptions(max_staleness=3600, depends_on=("prices",))
    created(shop, view("mv_priced", query, refresh=PRICED))
    skipped_once_cached(shop, "mv_priced", declared)
    run(shop, "CREATE OR REPLACE FUNCTION vat(p numeric) RETURNS numeric LANGUAGE sql IMMUTABLE "
              "BEGIN ATOMIC SELECT p * 1.19; END")
    assert stale(shop, "mv_priced", query)
    outcome = refresh(shop, "mv_priced", declared)
    assert outcome.outcome.startswith("refreshed") and not stale(shop, "mv_priced", query), outcome


def test_held_row_security_enabled_over_an_existing_policy_after_a_cached_skip_is_seen(shop: Any) -> None:
    """A policy created while row security was off is outside the key (policies of RLS-enabled tables
    only); ENABLE + FORCE brings it in, and its clock read turns skip off from then on."""
    run(shop, "CREATE POLICY recent ON products USING (now() > '2000-01-01' AND id <= 10)")
    query = "SELECT id, name FROM products"
    created(shop, view("mv_products", query))
    skipped_once_cached(shop, "mv_products", OPTIONS)
    run(shop, "ALTER TABLE products ENABLE ROW LEVEL SECURITY", "ALTER TABLE products FORCE ROW LEVEL SECURITY")
    assert stale(shop, "mv_products", query)
    first = refresh(shop, "mv_products")
    assert first.outcome.startswith("refreshed") and not stale(shop, "mv_products", query), first
    second = refresh(shop, "mv_products")
    assert second.outcome != "skipped-unchanged" and "time-dependent" in second.reason, second


def test_held_a_function_search_path_changed_after_a_cached_skip_refreshes(shop: Any) -> None:
    """ALTER FUNCTION ... SET search_path changes which rate() a SQL-string body resolves (no body,
    no rule, no table changes): pg_proc.proconfig, in the key's row version and the signature."""
    run(shop, "CREATE SCHEMA low", "CREATE SCHEMA high",
        "CREATE FUNCTION low.rate() RETURNS numeric LANGUAGE sql IMMUTABLE AS 'SELECT 1.0'",
        "CREATE FUNCTION high.rate() RETURNS numeric LANGUAGE sql IMMUTABLE AS 'SELECT 1.19'",
        "CREATE FUNCTION price_of(p int) RETURNS numeric LANGUAGE sql STABLE SET search_path = low, pg_catalog "
        "AS 'SELECT price * rate() FROM public.prices WHERE product_id = p'")
    query = "SELECT id, price_of(id) AS price FROM products"
    declared = RefreshOptions(max_staleness=3600, depends_on=("prices",))
    created(shop, view("mv_priced", query, refresh=PRICED))
    skipped_once_cached(shop, "mv_priced", declared)
    run(shop, "ALTER FUNCTION price_of(int) SET search_path = high, pg_catalog")
    assert stale(shop, "mv_priced", query)
    outcome = refresh(shop, "mv_priced", declared)
    assert outcome.outcome.startswith("refreshed") and not stale(shop, "mv_priced", query), outcome


def test_a_text_search_configuration_changed_between_refreshes_is_not_skipped(shop: Any) -> None:
    """to_tsvector(regconfig, text) is an IMMUTABLE built-in, so a search view over it is 'on
    (tables: ...)'; but what it returns is read from the catalog at run time (pg_ts_config_map,
    the dictionaries' options). ALTER TEXT SEARCH CONFIGURATION ... ALTER/DROP MAPPING changes every
    document with no write, no new filenode, no rule, function or policy changed: skipped, and the
    search view keeps the old lexemes (the reference workload's search is built this way)."""
    run(shop, "CREATE TEXT SEARCH CONFIGURATION shop_ts (COPY = pg_catalog.simple)")
    query = "SELECT id, to_tsvector('shop_ts', name) AS doc FROM products"
    statuses = created(shop, view("mv_search", query))
    assert refresh(shop, "mv_search").outcome.startswith("refreshed")
    run(shop, "ALTER TEXT SEARCH CONFIGURATION shop_ts DROP MAPPING FOR numword")  # 'p1', 'p2', ...
    assert stale(shop, "mv_search", query), "the setup did not change the documents"
    outcome = refresh(shop, "mv_search")
    still_stale = stale(shop, "mv_search", query)
    assert not (outcome.outcome == "skipped-unchanged" and still_stale), \
        f"{outcome.outcome}: old lexemes served; the plan said {statuses[0].refresh_rule!r}"


def test_a_volatile_function_deeper_than_the_analysis_bound_is_refused(shop: Any) -> None:
    """The same bound on the refusal side: a chain of 20 STABLE SQL-standard functions whose last
    calls setval() is accepted by the plan (stable, untracked) and setval() runs at creation and at
    every refresh (issue 16 item 3)."""
    run(shop, "CREATE SEQUENCE s_ids",
        "CREATE FUNCTION bump_0(p int) RETURNS bigint LANGUAGE sql STABLE "
        "BEGIN ATOMIC SELECT setval('s_ids', 4242); END")
    for level in range(1, 20):
        run(shop, f"CREATE FUNCTION bump_{level}(p int) RETURNS bigint LANGUAGE sql STABLE "
                  f"BEGIN ATOMIC SELECT bump_{level - 1}(p); END")
    the_plan, outcomes, statuses = apply(shop, view("mv_bump", "SELECT id, bump_19(id) AS n FROM products"))
    moved = rows(shop, "SELECT last_value FROM s_ids")[0][0]
    assert moved != 4242, \
        f"setval() ran at creation; plan conflicts {the_plan.conflicts}, rule {statuses[0].refresh_rule}"
    assert the_plan.conflicts and "refused" in the_plan.conflicts[0], (the_plan.conflicts, outcomes)


def test_writes_of_a_role_with_track_counts_off_are_not_skipped(shop: Any) -> None:
    """track_counts is a superuser setting, but a DBA may set it per role (ALTER ROLE etl SET
    track_counts = off, to spare a bulk loader the bookkeeping): that role's writes are never
    counted, its sessions end and flush nothing, and every refresh after its nightly load is
    skipped with yesterday's prices. pg_db_role_setting (readable by every role) says so; the check
    does not look."""
    etl = f"{shop.owner}_etl"
    shop.server.create_role(etl, "pw-etl-1")
    try:
        shop.server.execute(sql.SQL("ALTER ROLE {} SET track_counts = off").format(sql.Identifier(etl)))
        run(shop, sql.SQL("GRANT SELECT, UPDATE ON prices TO {}").format(sql.Identifier(etl)).as_string(None),
            f"CREATE MATERIALIZED VIEW mv_join AS {JOIN}", "CREATE UNIQUE INDEX ON mv_join (id)")
        shop.server.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(shop.owner)))
        assert refresh(shop, "mv_join", force=True).outcome == "refreshed"
        with connect(shop, shop.server.dsn(shop.name, etl, "pw-etl-1")) as loader:
            loader.execute("UPDATE prices SET price = price * 2")
        assert stale(shop, "mv_join", JOIN)
        outcome = refresh(shop, "mv_join")
        still_stale = stale(shop, "mv_join", JOIN)
    finally:
        shop.server.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(etl)), dbname=shop.name)
        shop.server.drop_role(etl)
    assert not (outcome.outcome == "skipped-unchanged" and still_stale), \
        f"{outcome.outcome}: the loader's writes were never counted, old prices served"


def test_a_plain_view_switched_to_security_invoker_between_refreshes_is_not_skipped(shop: Any) -> None:
    """Row security depends on whose rights a plain view reads with: its owner's, or with
    security_invoker (PostgreSQL 15) the refreshing role's. The plain view `visible` of another
    role reads the operator's table `listings` (RLS enabled, not forced: its owner bypasses it), so
    the policy applies. ALTER VIEW ... SET (security_invoker = true) by the plain view's owner is a
    pg_class reloption: no rule, policy, base table, filenode or write changes, and every row of
    `listings` is now visible to the REFRESH: skipped with 5 of 20 rows (ALTER VIEW ... OWNER TO,
    or ALTER ROLE ... BYPASSRLS, do the same)."""
    app = f"{shop.owner}_app"
    shop.server.create_role(app, "pw-app-4")
    try:
        app_dsn = shop.server.dsn(shop.name, app, "pw-app-4")
        run(shop, "CREATE TABLE listings (id int PRIMARY KEY)",
            "INSERT INTO listings SELECT g FROM generate_series(1, 20) AS g",
            "ALTER TABLE listings ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY few ON listings USING (id <= 5)",
            sql.SQL("GRANT SELECT ON listings TO {}").format(sql.Identifier(app)).as_string(None),
            sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(app)).as_string(None))
        with connect(shop, app_dsn) as conn:
            conn.execute("CREATE VIEW visible AS SELECT id FROM listings")
            conn.execute(sql.SQL("GRANT SELECT ON visible TO {}").format(sql.Identifier(shop.owner)))
        query = "SELECT id FROM visible"
        run(shop, f"CREATE MATERIALIZED VIEW mv_visible AS {query}", "CREATE UNIQUE INDEX ON mv_visible (id)")
        shop.server.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(shop.owner)))
        assert refresh(shop, "mv_visible", force=True).outcome == "refreshed"
        assert rows(shop, "SELECT count(*) FROM mv_visible") == [(5,)]
        with connect(shop, app_dsn) as conn:
            conn.execute("ALTER VIEW visible SET (security_invoker = true)")
        assert stale(shop, "mv_visible", query), "the setup did not change what the query returns"
        outcome = refresh(shop, "mv_visible")
        still_stale = stale(shop, "mv_visible", query)
    finally:
        shop.server.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(app)), dbname=shop.name)
        shop.server.drop_role(app)
    assert not (outcome.outcome == "skipped-unchanged" and still_stale), \
        f"{outcome.outcome}: 5 of 20 rows served after the plain view switched to security_invoker"
