"""Red team (issue 16): volatile-function refusal and skip-if-unchanged, attacked on PostgreSQL 15.

Every attack runs as the database's owner role (not a superuser) unless a DBA action is the point
(a statistics reset). A failing test here is a hole: a side-effecting function ran although the
plan did not refuse the view, or a refresh was skipped while the view's query returned other rows.
"""

from __future__ import annotations

import functools
import secrets
import threading
from typing import Any

import psycopg
import pytest
from psycopg import sql

import refresh_kit
from marketplacedb_operator.refresh import RefreshOptions
from refresh_kit import OPTIONS, apply, connect, created, refresh, rows, side_effects, stale, view, wait_for_lock_wait

SETUP = """
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE prices (product_id int PRIMARY KEY, price numeric NOT NULL);
CREATE TABLE audit (at timestamptz NOT NULL DEFAULT now());
CREATE SEQUENCE s_ids;
INSERT INTO products SELECT g, 'p' || g FROM generate_series(1, 20) AS g;
INSERT INTO prices SELECT g, g * 10 FROM generate_series(1, 20) AS g;
-- the side effect every attack aims at: an audit row and the sequence moved
CREATE FUNCTION touch(p int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit DEFAULT VALUES; PERFORM setval('s_ids', 1000); RETURN p; END $$;
"""

# Every statement this file runs asks for its write counts to be reported at once, as its setup
# does (flush=True): the attacks need current counters. The one about unreported counts writes in a
# session still running (a procedure), which the request does not reach before it goes idle.
run = functools.partial(refresh_kit.run, flush=True)


@pytest.fixture
def shop(fresh_db: Any) -> Any:
    with fresh_db.connect() as conn:
        conn.execute(SETUP)
        conn.execute("SELECT pg_stat_force_next_flush()")
    return fresh_db


def assert_refused_and_nothing_ran(db: Any, query: str, before: tuple[Any, ...]) -> None:
    the_plan, outcomes, _ = apply(db, view("mv", query))
    ran = side_effects(db) != before
    assert not ran, f"the volatile function ran at creation (audit rows, sequence): {before} -> {side_effects(db)}"
    assert len(the_plan.conflicts) == 1 and "refused" in the_plan.conflicts[0], (the_plan.conflicts, outcomes)
    assert not rows(db, "SELECT to_regclass('public.mv') IS NOT NULL")[0][0]


# --- side effects despite the refusal -----------------------------------------------------------


def test_an_aggregate_with_a_volatile_transition_function_is_refused(shop: Any) -> None:
    """CREATE AGGREGATE stores the aggregate in pg_proc as IMMUTABLE whatever its functions are:
    the rule's :aggfnoid names an 'immutable, not built-in' function, the sfunc is never looked at,
    and touch() runs once per row at creation and at every refresh."""
    run(shop, "CREATE FUNCTION bump_step(s int, v int) RETURNS int LANGUAGE plpgsql VOLATILE AS "
              "$$ BEGIN PERFORM touch(v); RETURN s + v; END $$",
        "CREATE AGGREGATE bump_sum(int) (SFUNC = bump_step, STYPE = int, INITCOND = '0')")
    before = side_effects(shop)
    assert_refused_and_nothing_ran(shop, "SELECT 1 AS id, bump_sum(id) AS total FROM products", before)


def test_an_aggregate_with_a_volatile_final_function_used_as_a_window_is_refused(shop: Any) -> None:
    run(shop, "CREATE FUNCTION bump_final(s int) RETURNS int LANGUAGE plpgsql VOLATILE AS "
              "$$ BEGIN RETURN touch(s); END $$",
        "CREATE AGGREGATE quiet_sum(int) (SFUNC = int4pl, STYPE = int, FINALFUNC = bump_final, INITCOND = '0')")
    before = side_effects(shop)
    assert_refused_and_nothing_ran(shop, "SELECT id, quiet_sum(id) OVER (ORDER BY id) AS running FROM products",
                                   before)


def test_a_default_argument_calling_a_volatile_function_is_refused(shop: Any) -> None:
    """The stored rule holds the call as written (f(id)); PostgreSQL inserts the default argument
    expressions at planning, i.e. at every REFRESH: the STABLE function is all the analysis sees."""
    run(shop, "CREATE FUNCTION tagged(p int, audit_it int DEFAULT touch(0)) RETURNS int LANGUAGE plpgsql STABLE "
              "AS 'BEGIN RETURN p; END'")
    before = side_effects(shop)
    assert_refused_and_nothing_ran(shop, "SELECT id, tagged(id) AS t FROM products", before)


def test_a_domain_check_calling_a_volatile_function_is_refused(shop: Any) -> None:
    """README says domain CHECK constraints are not inspected; the CoerceToDomain node names the
    domain (:resulttype), whose pg_constraint.conbin can be read like a rule."""
    run(shop, "CREATE FUNCTION approve(p int) RETURNS boolean LANGUAGE plpgsql AS "
              "$$ BEGIN PERFORM touch(p); RETURN true; END $$",
        "CREATE DOMAIN checked_int AS int CHECK (approve(VALUE))")
    before = side_effects(shop)
    assert_refused_and_nothing_ran(shop, "SELECT id::checked_int AS id FROM products", before)


def test_a_row_level_security_policy_calling_a_volatile_function_is_refused(shop: Any) -> None:
    """README says RLS policies are not inspected; pg_policy.polqual of each base table with
    relrowsecurity can be read like a rule (FORCE: the owner's own REFRESH applies the policy)."""
    run(shop, "CREATE TABLE secrets (id int PRIMARY KEY, v text)",
        "INSERT INTO secrets SELECT g, 'v' FROM generate_series(1, 5) AS g",
        "CREATE FUNCTION allow_row(p int) RETURNS boolean LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM touch(p); RETURN true; END $$",
        "ALTER TABLE secrets ENABLE ROW LEVEL SECURITY", "ALTER TABLE secrets FORCE ROW LEVEL SECURITY",
        "CREATE POLICY p ON secrets USING (allow_row(id))")
    before = side_effects(shop)
    assert_refused_and_nothing_ran(shop, "SELECT id, v FROM secrets", before)


XML_DUMPS = {
    # The relation named at run time (text -> regclass): no pg_depend entry, no rule to read.
    "table_to_xml": "SELECT 1 AS id, table_to_xml(('public.' || 'touched')::regclass, true, false, '') AS doc",
    "schema_to_xml": "SELECT 1 AS id, schema_to_xml('public', true, false, '') AS doc",
}


@pytest.mark.parametrize("function", sorted(XML_DUMPS))
def test_a_stable_built_in_that_runs_a_view_calling_a_volatile_function_is_refused(shop: Any, function: str) -> None:
    """table_to_xml/schema_to_xml/database_to_xml are STABLE built-ins that run `SELECT * FROM` a
    relation chosen at run time: a plain view calling touch() runs at creation and every refresh,
    while the analysis sees only stable built-ins (skip-if-unchanged off, nothing refused)."""
    run(shop, "CREATE VIEW touched AS SELECT id, touch(id) AS t FROM products")
    before = side_effects(shop)
    assert_refused_and_nothing_ran(shop, XML_DUMPS[function], before)


def test_a_refresh_reads_sql_standard_bodies_as_the_plan_does(shop: Any) -> None:
    """The plan and the creating transaction read BEGIN ATOMIC bodies recursively; the refresh-time
    check reads only the view's rules. A STABLE SQL-standard function replaced after creation by one
    whose body calls setval() runs it at the next refresh (the plan would refuse the same view)."""
    run(shop, "CREATE FUNCTION plain_id(p int) RETURNS bigint LANGUAGE sql STABLE BEGIN ATOMIC SELECT p; END")
    created(shop, view("mv", "SELECT id, plain_id(id) AS n FROM products"))
    run(shop, "CREATE OR REPLACE FUNCTION plain_id(p int) RETURNS bigint LANGUAGE sql STABLE "
              "BEGIN ATOMIC SELECT setval('s_ids', 4242); END")
    before = side_effects(shop)
    outcome = refresh(shop, "mv", force=True)
    assert side_effects(shop) == before, "setval() ran at refresh: the sequence moved"
    assert outcome.outcome == "failed" and "setval" in outcome.reason, outcome


def test_a_plain_view_replaced_while_the_refresh_waits_for_its_lock_is_refused(shop: Any) -> None:
    """The refresh checks in one transaction and REFRESHes in another. Whoever may replace a plain view
    the materialized view reads opens a transaction, CREATE OR REPLACE VIEW (calling touch()), and
    keeps it open: the check reads the committed (harmless) rule and passes, the REFRESH waits for the
    plain view's lock, the replacement commits, and the REFRESH runs touch(). Not 'milliseconds': the
    window is as long as the lock is held (views, unlike functions, can be locked first)."""
    run(shop, "CREATE VIEW listed AS SELECT id, name FROM products")
    created(shop, view("mv_listed", "SELECT id, name FROM listed"))
    assert refresh(shop, "mv_listed").outcome.startswith("refreshed")
    before = side_effects(shop)
    result: list[Any] = []
    with connect(shop) as hostile:
        hostile.execute("BEGIN")
        hostile.execute("CREATE OR REPLACE VIEW listed AS SELECT id, name || touch(id)::text AS name FROM products")
        worker = threading.Thread(target=lambda: result.append(refresh(shop, "mv_listed", force=True)))
        worker.start()
        try:
            with connect(shop) as probe:  # until the REFRESH waits for the plain view's lock
                for _ in range(600):
                    if probe.execute("SELECT count(*) FROM pg_locks WHERE relation = 'public.listed'::regclass "
                                     "AND NOT granted").fetchone() == (1,) or not worker.is_alive():
                        break
                    probe.execute("SELECT pg_sleep(0.05)")
        finally:
            hostile.execute("COMMIT")
            worker.join(60)
    assert side_effects(shop) == before, "touch() ran at refresh although the check passed the old rule"
    assert result and result[0].outcome == "failed", result


def test_a_failing_first_refresh_in_the_creating_transaction_names_no_row_value(shop: Any) -> None:
    """The creating transaction populates the view with REFRESH; when the query fails on a row,
    PostgreSQL's primary message quotes the value (22P02: invalid input syntax ... "tok_..."). The
    refresh gateway reports SQLSTATE and object names only; the creating transaction's outcome (CLI
    apply output, Events, status) carries the primary message, and with it the row's secret."""
    token = "tok_live_5f3a9c1e"
    run(shop, "CREATE TABLE api_keys (id int PRIMARY KEY, api_key text NOT NULL)")
    with connect(shop) as conn:
        conn.execute("INSERT INTO api_keys VALUES (1, %s)", [token])
    _, outcomes, _ = apply(shop, view("mv_keys", "SELECT id, api_key::int AS k FROM api_keys"))
    assert len(outcomes) == 1 and not outcomes[0].ok, outcomes
    assert "22P02" in outcomes[0].message, outcomes[0].message
    assert token not in outcomes[0].message, "a row value (an API key) in the apply outcome"


# --- skip-if-unchanged skipping a view that would change ----------------------------------------


def skipped_while_stale(db: Any, name: str, query: str) -> tuple[str, bool]:
    """(outcome, stale): refresh once and compare the view with its query."""
    outcome = refresh(db, name).outcome
    return outcome, stale(db, name, query)


def changed_then_refreshed(db: Any, name: str, query: str, options: RefreshOptions = OPTIONS) -> tuple[str, bool]:
    """(outcome, stale_after) of one refresh, after asserting the setup changed the query's result
    (compared before the refresh: a refresh that runs makes view and query equal again)."""
    assert stale(db, name, query), "the setup did not change the query's result"
    outcome = refresh(db, name, options).outcome
    return outcome, stale(db, name, query)


def test_a_sequence_read_in_from_is_tracked(shop: Any) -> None:
    """A sequence (relkind 'S') read in FROM is left out of the base relations: nextval() elsewhere
    changes last_value with no table write, and the view is skipped with the old value."""
    query = "SELECT p.id, s.last_value FROM products AS p CROSS JOIN s_ids AS s"
    created(shop, view("mv_seq", query))
    assert refresh(shop, "mv_seq").outcome.startswith("refreshed")
    run(shop, "SELECT nextval('s_ids')", "SELECT nextval('s_ids')")
    outcome, stale = skipped_while_stale(shop, "mv_seq", query)
    assert not (outcome == "skipped-unchanged" and stale), f"{outcome}: the view kept the old last_value"


def test_an_enum_label_cast_to_text_is_not_skipped_after_a_rename(shop: Any) -> None:
    """`status::text` is a CoerceViaIO node (enum_out, STABLE): no :funcid in the rule, so the view
    is 'on (tables: ...)'. ALTER TYPE ... RENAME VALUE writes no row and keeps every filenode."""
    run(shop, "CREATE TYPE order_status AS ENUM ('new', 'paid')",
        "CREATE TABLE orders (id int PRIMARY KEY, status order_status NOT NULL)",
        "INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 10) AS g")
    query = "SELECT id, status::text AS status FROM orders"
    created(shop, view("mv_orders", query))
    assert refresh(shop, "mv_orders").outcome.startswith("refreshed")
    run(shop, "ALTER TYPE order_status RENAME VALUE 'new' TO 'fresh'")
    outcome, stale = skipped_while_stale(shop, "mv_orders", query)
    assert not (outcome == "skipped-unchanged" and stale), f"{outcome}: the view still says 'new'"


def test_a_whole_row_cast_to_text_is_not_skipped_after_add_column(shop: Any) -> None:
    """`p::text` (record_out through CoerceViaIO) includes every column; ADD COLUMN ... DEFAULT
    rewrites nothing and counts no write, so the view keeps the old rows."""
    query = "SELECT p.id, p::text AS doc FROM products AS p"
    created(shop, view("mv_doc", query))
    assert refresh(shop, "mv_doc").outcome.startswith("refreshed")
    run(shop, "ALTER TABLE products ADD COLUMN tag text NOT NULL DEFAULT 'sale'")
    outcome, stale = skipped_while_stale(shop, "mv_doc", query)
    assert not (outcome == "skipped-unchanged" and stale), f"{outcome}: the view's doc lacks the new column"


def test_a_time_value_read_through_a_text_cast_is_time_dependent(shop: Any) -> None:
    """('now'::text)::timestamptz calls timestamptz_in at run time through CoerceViaIO: the view moves
    with the clock, but the rule says skip-if-unchanged is on."""
    run(shop, "ALTER TABLE products ADD COLUMN created_at timestamptz NOT NULL DEFAULT now()")
    # timestamptz - timestamptz and interval < interval are IMMUTABLE: only the cast reads the clock.
    query = "SELECT id FROM products WHERE ('now'::text)::timestamptz - created_at < interval '1 day'"
    statuses = created(shop, view("mv_recent", query))
    rule = statuses[0].refresh_rule
    assert rule is not None and not rule.startswith("skip-if-unchanged: on"), rule


def test_a_statistics_reset_does_not_make_a_changed_view_skip(shop: Any) -> None:
    """The check compares the sum of write counters for equality. pg_stat_reset_single_table_counters
    (a DBA, or PostgreSQL itself after crash recovery, which discards all counters) sets them back;
    as many writes as were counted before bring the sum back to the recorded value: skipped, stale."""
    query = "SELECT p.id, x.price FROM products AS p JOIN prices AS x ON x.product_id = p.id"
    created(shop, view("mv_join", query))
    assert refresh(shop, "mv_join").outcome.startswith("refreshed")
    assert refresh(shop, "mv_join").outcome == "skipped-unchanged"
    counted = rows(shop, "SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relname = 'prices'")
    with psycopg.connect(shop.superuser_dsn, autocommit=True) as dba:
        dba.execute("SELECT pg_stat_reset_single_table_counters('public.prices'::regclass)")
    with connect(shop) as conn:  # exactly as many writes as were counted before the reset
        conn.execute("UPDATE prices SET price = price + 1 WHERE product_id <= %s", [int(counted[0][0])])
        conn.execute("SELECT pg_stat_force_next_flush()")
    outcome, stale = changed_then_refreshed(shop, "mv_join", query)
    assert outcome != "skipped-unchanged" and not stale, "skipped after a statistics reset: old prices served"


def test_a_write_committed_inside_a_running_procedure_is_not_skipped(shop: Any) -> None:
    """Statistics are flushed when a backend goes idle, not at COMMIT. A procedure (an ETL batch)
    that commits an UPDATE and keeps running holds its counts for as long as it runs: every refresh
    meanwhile was skipped with the old prices. Fixed: a session that committed inside its running
    statement (xact_start > query_start) refuses the skip (sql/refresh_stats.py)."""
    query = "SELECT p.id, x.price FROM products AS p JOIN prices AS x ON x.product_id = p.id"
    created(shop, view("mv_join", query))
    assert refresh(shop, "mv_join").outcome.startswith("refreshed")
    run(shop, "CREATE PROCEDURE batch() LANGUAGE plpgsql AS $$ BEGIN "
              "UPDATE prices SET price = price * 2; COMMIT; PERFORM pg_advisory_lock(4242); END $$")
    with connect(shop) as holder:
        holder.execute("SELECT pg_advisory_lock(4242)")
        batch = threading.Thread(target=run, args=(shop, "CALL batch()"))
        batch.start()
        try:
            wait_for_lock_wait(shop, 4242)  # until the UPDATE is committed (visible), no clock involved
            assert rows(shop, "SELECT price FROM prices WHERE product_id = 1") == [(20,)]
            outcome, stale = changed_then_refreshed(shop, "mv_join", query)
        finally:
            holder.execute("SELECT pg_advisory_unlock(4242)")
            batch.join(60)
    assert outcome != "skipped-unchanged" and not stale, \
        "skipped while a committed UPDATE was unflushed: old prices served"


def test_a_plain_view_redefined_between_refreshes_is_not_skipped(shop: Any) -> None:
    """The view reads a plain view; CREATE OR REPLACE VIEW changes its WHERE. Same base table, same
    filenode, no write: the signature (base oids and filenodes) and the counters match, skipped."""
    run(shop, "CREATE VIEW cheap AS SELECT product_id AS id, price FROM prices WHERE price <= 50")
    query = "SELECT id, price FROM cheap"
    created(shop, view("mv_cheap", query))
    assert refresh(shop, "mv_cheap").outcome.startswith("refreshed")
    run(shop, "CREATE OR REPLACE VIEW cheap AS SELECT product_id AS id, price FROM prices WHERE price <= 150")
    outcome, stale = changed_then_refreshed(shop, "mv_cheap", query)
    assert outcome != "skipped-unchanged" and not stale, "skipped after its plain view was redefined"


def test_a_function_redefined_between_refreshes_is_not_skipped_with_depends_on(shop: Any) -> None:
    """dependsOn declares the tables the function reads; CREATE OR REPLACE FUNCTION changes what it
    computes with no write to them: skipped with the old prices until maxStaleness."""
    run(shop, "CREATE FUNCTION price_of(p int) RETURNS numeric LANGUAGE sql STABLE "
              "AS 'SELECT price FROM prices WHERE product_id = p'")
    query = "SELECT id, price_of(id) AS price FROM products"
    declared = RefreshOptions(max_staleness=3600, depends_on=("prices",))
    created(shop, view("mv_priced", query))
    assert refresh(shop, "mv_priced", declared).outcome.startswith("refreshed")
    run(shop, "CREATE OR REPLACE FUNCTION price_of(p int) RETURNS numeric LANGUAGE sql STABLE "
              "AS 'SELECT price * 1.19 FROM prices WHERE product_id = p'")
    outcome, stale = changed_then_refreshed(shop, "mv_priced", query, declared)
    assert outcome != "skipped-unchanged" and not stale, "skipped after the function was replaced: no VAT"


def test_a_row_level_security_policy_changed_between_refreshes_is_not_skipped(shop: Any) -> None:
    """ALTER POLICY on a read table (FORCE ROW LEVEL SECURITY, so the owner's REFRESH applies it)
    changes which rows the query returns with no write and no new filenode: skipped."""
    run(shop, "CREATE TABLE listings (id int PRIMARY KEY, visible_to int NOT NULL)",
        "INSERT INTO listings SELECT g, g FROM generate_series(1, 10) AS g",
        "ALTER TABLE listings ENABLE ROW LEVEL SECURITY", "ALTER TABLE listings FORCE ROW LEVEL SECURITY",
        "CREATE POLICY p ON listings USING (visible_to <= 3)")
    query = "SELECT id FROM listings"
    created(shop, view("mv_listings", query))
    assert refresh(shop, "mv_listings").outcome.startswith("refreshed")
    run(shop, "ALTER POLICY p ON listings USING (visible_to <= 8)")
    outcome, stale = changed_then_refreshed(shop, "mv_listings", query)
    assert outcome != "skipped-unchanged" and not stale, "skipped after the policy changed: rows missing"


def test_a_time_dependent_sql_standard_function_is_not_skipped_with_depends_on(shop: Any) -> None:
    """plan reads BEGIN ATOMIC bodies and says 'time-dependent (now())'; the refresh-time check does
    not, sees a stable function trusted through dependsOn, and skips: the view keeps yesterday's
    rows while the plan and status promise the schedule alone drives it."""
    run(shop, "ALTER TABLE products ADD COLUMN created_at timestamptz NOT NULL DEFAULT now()",
        "CREATE FUNCTION is_new(at timestamptz) RETURNS boolean LANGUAGE sql STABLE "
        "BEGIN ATOMIC SELECT at > now() - interval '1 day'; END")
    query = "SELECT id FROM products WHERE is_new(created_at)"
    statuses = created(shop, view("mv_new", query, refresh={"schedule": "*/5 * * * *",
                                                           "dependsOn": ["products"]}))
    rule = statuses[0].refresh_rule
    assert rule is not None and "time-dependent" in rule, rule  # what plan and status promise
    declared = RefreshOptions(max_staleness=3600, depends_on=("products",))
    assert refresh(shop, "mv_new", declared).outcome.startswith("refreshed")
    outcome = refresh(shop, "mv_new", declared)
    assert outcome.outcome != "skipped-unchanged", f"{outcome}: the plan said {rule!r}"


@pytest.fixture
def planter(shop: Any) -> Any:
    """Another login role with CREATE on the database (an application role), dropped afterwards."""
    name, password = f"{shop.name}_app", secrets.token_urlsafe(16)
    shop.server.create_role(name, password)
    shop.server.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(shop.name),
                                                                           sql.Identifier(name)))
    try:
        yield name, shop.server.dsn(shop.name, name, password)
    finally:
        shop.server.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)), dbname=shop.name)
        shop.server.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(sql.Identifier(shop.name),
                                                                               sql.Identifier(name)))
        shop.server.drop_role(name)


def test_a_check_function_planted_by_another_role_is_not_called(shop: Any, planter: Any) -> None:
    """Another role with CREATE on the database creates schema marketplacedb and a function
    refresh_check_v3 with the expected signature before the operator's schema exists. The schema
    engine refuses such a schema ('cannot be trusted (its schema is owned by another role)'); the
    refresh path does not: ensure_state_table() keeps what exists (by signature, whoever owns it),
    and every refresh (the CronJob entrypoint, a human's `marketplacedb refresh`) calls the planted
    function with its own role (SECURITY INVOKER: here it grants itself the role's table) and trusts
    its 'skipped' answer, so the view is never refreshed again."""
    role, dsn = planter
    run(shop, "CREATE MATERIALIZED VIEW mv_join AS SELECT p.id, x.price FROM products AS p "
              "JOIN prices AS x ON x.product_id = p.id", "CREATE UNIQUE INDEX ON mv_join (id)")
    body = sql.SQL(
        "BEGIN EXECUTE pg_catalog.format('GRANT SELECT ON public.prices TO %I', {role}); "
        "RETURN QUERY SELECT true, true, 0::double precision; END"
    ).format(role=sql.Literal(role)).as_string(None)
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute("CREATE SCHEMA marketplacedb")
        app.execute(sql.SQL(
            "CREATE FUNCTION marketplacedb.refresh_check_v3(p_schema text, p_name text, p_key integer, "
            "p_now timestamptz, p_max_staleness double precision, p_skip boolean, p_force boolean, "
            "p_depends text[], p_allow_volatile boolean, p_history integer) "
            "RETURNS TABLE (locked boolean, skipped boolean, age double precision) LANGUAGE plpgsql AS {}"
        ).format(sql.Literal(body)))
        app.execute("GRANT USAGE ON SCHEMA marketplacedb TO PUBLIC")
    run(shop, "UPDATE prices SET price = 0")
    outcome = refresh(shop, "mv_join")
    with connect(shop) as conn:
        granted = conn.execute("SELECT has_table_privilege(%s, 'public.prices', 'SELECT')", [role]).fetchone()
    assert granted is not None
    assert not granted[0], f"the planted function ran with the operator's role ({outcome.outcome})"
    assert outcome.outcome != "skipped-unchanged", "the planted function's answer was trusted: old prices served"


def test_a_function_shadowed_in_the_user_schema_does_not_run_at_refresh(shop: Any, planter: Any) -> None:
    """PostgreSQL 15 runs REFRESH with the refreshing session's search_path ("$user", public): a
    function body that is a SQL string resolves its names then. Another role with CREATE on the
    database creates the schema named after the operator's role ("$user", searched first) and a
    VOLATILE helper() there; the view's STABLE price_of() calls helper() unqualified, so the planted
    function runs with the operator's role at every refresh, while the check saw only STABLE
    price_of(). (PostgreSQL 17 runs REFRESH with search_path pg_catalog, pg_temp for this reason.)"""
    role, dsn = planter
    run(shop, "CREATE FUNCTION helper(p int) RETURNS int LANGUAGE sql STABLE AS 'SELECT p'",
        "CREATE FUNCTION price_of(p int) RETURNS int LANGUAGE sql STABLE AS 'SELECT helper(p)'")
    created(shop, view("mv_priced", "SELECT id, price_of(id) AS n FROM products"))
    body = sql.SQL("BEGIN EXECUTE pg_catalog.format('GRANT SELECT ON public.prices TO %I', {role}); "
                   "RETURN p; END").format(role=sql.Literal(role)).as_string(None)
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(shop.owner)))
        app.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(sql.Identifier(shop.owner)))
        app.execute(sql.SQL("CREATE FUNCTION {}(p int) RETURNS int LANGUAGE plpgsql VOLATILE AS {}").format(
            sql.Identifier(shop.owner, "helper"), sql.Literal(body)))
    outcome = refresh(shop, "mv_priced", force=True)
    with connect(shop) as conn:
        granted = conn.execute("SELECT has_table_privilege(%s, 'public.prices', 'SELECT')", [role]).fetchone()
    assert granted is not None
    assert not granted[0], f"the planted helper() ran with the operator's role at refresh ({outcome.outcome})"


def test_a_function_shadowed_in_the_user_schema_is_not_what_the_view_calls(shop: Any, planter: Any) -> None:
    """The view's own query is resolved with the operator session's search_path ("$user", public):
    a STABLE price_of(int) planted in the schema named after the operator's role (by another role
    with CREATE on the database) wins over public.price_of; the plan accepts it (stable: skip off,
    the rule names the planted schema) and the creating transaction runs it with the operator's role.
    Its body calls a VOLATILE grab() (invisible: a body is not read), which grants itself a table."""
    role, dsn = planter
    run(shop, "CREATE FUNCTION price_of(p int) RETURNS int LANGUAGE sql STABLE AS 'SELECT p'")
    grab = sql.SQL("BEGIN EXECUTE pg_catalog.format('GRANT SELECT ON public.prices TO %I', {role}); "
                   "RETURN p; END").format(role=sql.Literal(role)).as_string(None)
    stable = sql.SQL("BEGIN RETURN {}(p); END").format(sql.Identifier(shop.owner, "grab")).as_string(None)
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(shop.owner)))
        app.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(sql.Identifier(shop.owner)))
        app.execute(sql.SQL("CREATE FUNCTION {}(p int) RETURNS int LANGUAGE plpgsql VOLATILE AS {}").format(
            sql.Identifier(shop.owner, "grab"), sql.Literal(grab)))
        app.execute(sql.SQL("CREATE FUNCTION {}(p int) RETURNS int LANGUAGE plpgsql STABLE AS {}").format(
            sql.Identifier(shop.owner, "price_of"), sql.Literal(stable)))
    _, outcomes, statuses = apply(shop, view("mv_priced", "SELECT id, price_of(id) AS n FROM products"))
    with connect(shop) as conn:
        granted = conn.execute("SELECT has_table_privilege(%s, 'public.prices', 'SELECT')", [role]).fetchone()
    assert granted is not None
    assert not granted[0], f"the planted price_of() ran at creation; rule: {statuses[0].refresh_rule}"


# --- held: kept as regressions ------------------------------------------------------------------


def test_held_a_shadowing_function_earlier_in_search_path_is_refused(shop: Any) -> None:
    """public.lower(text) VOLATILE, with public before pg_catalog in the role's search_path: the
    server resolves `lower` to it, and the analysis reads the resolved oid."""
    run(shop, "CREATE FUNCTION public.lower(t text) RETURNS text LANGUAGE plpgsql VOLATILE AS "
              "$$ BEGIN PERFORM touch(1); RETURN t; END $$")
    with connect(shop) as conn:
        role = conn.execute("SELECT current_user").fetchone()
        assert role is not None
        conn.execute(sql.SQL("ALTER ROLE {} SET search_path = public, pg_catalog").format(sql.Identifier(role[0])))
    before = side_effects(shop)
    assert_refused_and_nothing_ran(shop, "SELECT id, lower(name) AS n FROM products", before)


def test_held_truncate_of_a_read_table_refreshes(shop: Any) -> None:
    query = "SELECT p.id, x.price FROM products AS p JOIN prices AS x ON x.product_id = p.id"
    created(shop, view("mv_join", query))
    assert refresh(shop, "mv_join").outcome.startswith("refreshed")
    run(shop, "TRUNCATE prices")
    outcome, stale = skipped_while_stale(shop, "mv_join", query)
    assert outcome.startswith("refreshed") and not stale, outcome


def test_held_a_write_to_a_partition_of_a_read_table_refreshes(shop: Any) -> None:
    run(shop, "CREATE TABLE sales (id int, region text, amount int) PARTITION BY LIST (region)",
        "CREATE TABLE sales_eu PARTITION OF sales FOR VALUES IN ('eu')",
        "INSERT INTO sales SELECT g, 'eu', 1 FROM generate_series(1, 5) AS g")
    query = "SELECT id, amount FROM sales"
    created(shop, view("mv_sales", query))
    assert refresh(shop, "mv_sales").outcome.startswith("refreshed")
    run(shop, "CREATE TABLE sales_us PARTITION OF sales FOR VALUES IN ('us')",
        "INSERT INTO sales_us VALUES (6, 'us', 9)")
    outcome, stale = skipped_while_stale(shop, "mv_sales", query)
    assert outcome.startswith("refreshed") and not stale, outcome
    run(shop, "UPDATE sales_eu SET amount = 7 WHERE id = 1")
    outcome, stale = skipped_while_stale(shop, "mv_sales", query)
    assert outcome.startswith("refreshed") and not stale, outcome


def test_held_a_plain_view_redefined_to_call_a_volatile_function_fails_the_next_refresh(shop: Any) -> None:
    run(shop, "CREATE VIEW listed AS SELECT id, name FROM products")
    created(shop, view("mv_listed", "SELECT id, name FROM listed"))
    assert refresh(shop, "mv_listed").outcome.startswith("refreshed")
    run(shop, "CREATE OR REPLACE VIEW listed AS SELECT id, name || touch(id)::text AS name FROM products")
    before = side_effects(shop)
    outcome = refresh(shop, "mv_listed", force=True)
    assert outcome.outcome == "failed" and "public.touch" in outcome.reason, outcome
    assert side_effects(shop) == before


@pytest.mark.parametrize("concurrently", [True, False], ids=["concurrently", "plain"])
def test_held_a_view_over_a_refreshed_materialized_view_refreshes(shop: Any, concurrently: bool) -> None:
    query = "SELECT id, price FROM mv_inner"
    created(shop, view("mv_inner", "SELECT product_id AS id, price FROM prices"), view("mv_outer", query))
    assert refresh(shop, "mv_outer").outcome.startswith("refreshed")
    assert refresh(shop, "mv_outer").outcome == "skipped-unchanged"
    run(shop, "UPDATE prices SET price = price + 1")
    inner = "REFRESH MATERIALIZED VIEW CONCURRENTLY mv_inner" if concurrently else "REFRESH MATERIALIZED VIEW mv_inner"
    run(shop, inner)
    outcome, stale = skipped_while_stale(shop, "mv_outer", query)
    assert outcome.startswith("refreshed") and not stale, outcome


def test_held_an_immutable_function_that_reads_a_table_turns_skip_off(shop: Any) -> None:
    run(shop, "CREATE FUNCTION price_fixed(p int) RETURNS numeric LANGUAGE sql IMMUTABLE "
              "AS 'SELECT price FROM prices WHERE product_id = p'")
    query = "SELECT id, price_fixed(id) AS price FROM products"
    statuses = created(shop, view("mv_fixed", query))
    assert statuses[0].refresh_rule is not None and "off" in statuses[0].refresh_rule
    assert refresh(shop, "mv_fixed").outcome.startswith("refreshed")
    run(shop, "UPDATE prices SET price = 1 WHERE product_id = 1")
    outcome, stale = skipped_while_stale(shop, "mv_fixed", query)
    assert outcome.startswith("refreshed") and not stale, outcome


def test_held_a_cast_through_a_volatile_function_is_refused(shop: Any) -> None:
    run(shop, "CREATE TYPE pair AS (a int, b int)",
        "CREATE FUNCTION to_pair(p int) RETURNS pair LANGUAGE plpgsql VOLATILE AS "
        "$$ BEGIN PERFORM touch(p); RETURN ROW(p, p)::pair; END $$",
        "CREATE CAST (int AS pair) WITH FUNCTION to_pair(int) AS IMPLICIT")
    before = side_effects(shop)
    assert_refused_and_nothing_ran(shop, "SELECT id, (id::pair).a AS a FROM products", before)
