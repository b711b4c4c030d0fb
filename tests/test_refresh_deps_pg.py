"""Refresh truth on a real PostgreSQL 15: what a view depends on, what it may call, its history.

Issue 16 findings 1-5 and issue 13 finding 6 (no row value, no password in refresh errors).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import statistics
import time
from typing import Any

import psycopg
import pytest
import yaml
from pydantic import ValidationError

from marketplacedb_operator.api.v1alpha1 import MaterializedViewSpec
from marketplacedb_operator.cli import main
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh, read_history, read_refresh_states
from marketplacedb_operator.refresh import RefreshOptions, ViewTarget, refresh_view
from marketplacedb_operator.sql import refresh_truth
from refresh_kit import OPTIONS, connect, refresh, rows, run


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def write(db: Any, statement: str) -> None:
    """The write's counts are reported at once (flush=True): these tests are on the skip rules."""
    run(db, statement, flush=True)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def prices_db(fresh_db: Any) -> Any:
    """products and prices; a view reading prices only through a function (issue 16 finding 1)."""
    with fresh_db.connect() as conn:
        conn.execute("""
            CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL);
            CREATE TABLE prices (product_id int PRIMARY KEY, price numeric NOT NULL);
            INSERT INTO products SELECT g, 'p' || g, now() - g * interval '1 hour' FROM generate_series(1, 48) AS g;
            INSERT INTO prices SELECT g, g * 10 FROM generate_series(1, 48) AS g;
            CREATE FUNCTION price_of(p int) RETURNS numeric LANGUAGE sql STABLE
              AS 'SELECT price FROM prices WHERE product_id = p';
            CREATE MATERIALIZED VIEW mv_priced AS SELECT id, price_of(id) AS price FROM products;
            CREATE UNIQUE INDEX ON mv_priced (id);
            CREATE MATERIALIZED VIEW mv_new_arrivals AS
              SELECT id, name FROM products WHERE created_at > now() - interval '1 day';
            CREATE UNIQUE INDEX ON mv_new_arrivals (id);
            CREATE MATERIALIZED VIEW mv_today AS SELECT id FROM products WHERE created_at::date = current_date;
            CREATE UNIQUE INDEX ON mv_today (id);
            CREATE MATERIALIZED VIEW mv_join AS
              SELECT p.id, p.name, x.price FROM products AS p JOIN prices AS x ON x.product_id = p.id;
            CREATE UNIQUE INDEX ON mv_join (id);
        """)
        conn.execute("SELECT pg_stat_force_next_flush()")
    return fresh_db


# --- finding 1: tables read through functions -------------------------------------------------


def test_function_case_refreshes_and_says_why(prices_db: Any) -> None:
    assert refresh(prices_db, "mv_priced").outcome == "refreshed"
    write(prices_db, "UPDATE prices SET price = 999 WHERE product_id = 1")
    outcome = refresh(prices_db, "mv_priced")
    assert outcome.outcome == "refreshed", outcome
    assert "public.price_of" in outcome.reason and "dependsOn" in outcome.reason
    # The view returns what the query returns (before: the old price, skipped-unchanged).
    assert rows(prices_db, "SELECT price FROM mv_priced WHERE id = 1") == [(999,)]
    with connect(prices_db) as conn:
        state = {s.name: s for s in read_refresh_states(conn)}["mv_priced"]
    assert state.rule is not None and "public.price_of" in state.rule and "always refreshed" in state.rule


def test_depends_on_makes_the_function_case_skip_correctly(prices_db: Any) -> None:
    declared = RefreshOptions(max_staleness=3600, depends_on=("prices",))
    assert refresh(prices_db, "mv_priced", declared).outcome == "refreshed"
    skipped = refresh(prices_db, "mv_priced", declared)
    assert skipped.outcome == "skipped-unchanged", skipped
    write(prices_db, "UPDATE prices SET price = 7 WHERE product_id = 2")
    again = refresh(prices_db, "mv_priced", declared)
    assert again.outcome == "refreshed" and "written since the last refresh" in again.reason, again
    assert rows(prices_db, "SELECT price FROM mv_priced WHERE id = 2") == [(7,)]
    assert refresh(prices_db, "mv_priced", declared).outcome == "skipped-unchanged"
    missing = refresh(prices_db, "mv_priced", RefreshOptions(depends_on=("no_such_table",)))
    assert missing.outcome == "refreshed" and "no_such_table" in missing.reason


# --- finding 2: time-dependent views -----------------------------------------------------------


@pytest.mark.parametrize(("view", "what"), [("mv_new_arrivals", "now()"), ("mv_today", "current_date")])
def test_time_dependent_views_never_skip(prices_db: Any, view: str, what: str) -> None:
    assert refresh(prices_db, view).outcome == "refreshed"
    outcome = refresh(prices_db, view, RefreshOptions(max_staleness=3600, depends_on=("products",)))
    assert outcome.outcome == "refreshed", outcome
    assert "time-dependent" in outcome.reason and what in outcome.reason and "schedule alone" in outcome.reason


def test_a_plain_join_still_skips_when_nothing_changed(prices_db: Any) -> None:
    assert refresh(prices_db, "mv_join").outcome == "refreshed"
    outcome = refresh(prices_db, "mv_join")
    assert outcome.outcome == "skipped-unchanged", outcome
    with connect(prices_db) as conn:
        state = {s.name: s for s in read_refresh_states(conn)}["mv_join"]
    assert state.rule == "skipped when unchanged: write counters of 2 table(s) tracked"
    write(prices_db, "UPDATE prices SET price = 1 WHERE product_id = 3")
    assert refresh(prices_db, "mv_join").outcome == "refreshed"


def test_explain_says_which_rule_applies_and_records_nothing(prices_db: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("PGPASSWORD", prices_db.owner_password)
    dsn = prices_db.server.dsn(prices_db.name, prices_db.owner, "")
    code, out, _ = run_cli(["refresh", "--explain", "--view", "mv_priced", "--view", "mv_new_arrivals",
                            "--view", "mv_join", "--dsn", dsn, "-o", "json"])
    lines = {line["view"]: line for line in map(json.loads, out.splitlines())}
    assert code == 0, out
    assert "public.price_of" in lines["mv_priced"]["rule"] and lines["mv_priced"]["action"] == "refresh"
    assert "time-dependent (now())" in lines["mv_new_arrivals"]["rule"]
    assert lines["mv_join"]["rule"] == "skipped when unchanged: write counters of 2 table(s) tracked"
    code, out, _ = run_cli(["refresh", "--explain", "--view", "mv_priced", "--depends-on", "prices", "--dsn", dsn])
    assert code == 0 and "trusted through dependsOn" in out
    with connect(prices_db) as conn:  # rolled back: not even the operator's schema stayed
        assert conn.execute("SELECT to_regnamespace('marketplacedb')").fetchone() == (None,)


# --- finding 3: a "plain SELECT" that writes ---------------------------------------------------

SIDE_EFFECTS = {
    "setval": "SELECT setval('products_id_seq', 1) AS id",
    "lo_from_bytea": "SELECT lo_from_bytea(0, 'x') AS id",
    "pg_terminate_backend": "SELECT pg_terminate_backend(pid) AS id FROM pg_stat_activity",
}


@pytest.mark.parametrize("function", sorted(SIDE_EFFECTS))
def test_side_effect_functions_are_refused_at_validation(function: str) -> None:
    spec = {"name": "mv_x", "query": SIDE_EFFECTS[function], "uniqueKey": ["id"]}
    with pytest.raises(ValidationError) as caught:
        MaterializedViewSpec.model_validate(spec)
    assert f"volatile function(s) {function}" in str(caught.value) and "allowVolatileFunctions" in str(caught.value)
    assert MaterializedViewSpec.model_validate({**spec, "allowVolatileFunctions": True}).allow_volatile_functions


def test_volatile_functions_found_in_the_catalog_are_refused_at_refresh(prices_db: Any) -> None:
    """A user-defined volatile function (invisible to the parser) or an existing view: the refresh
    refuses before running the query, names the function, and the sequence stays untouched."""
    with connect(prices_db) as conn:
        conn.execute("CREATE SEQUENCE s_ids")
        conn.execute("CREATE FUNCTION bump() RETURNS bigint LANGUAGE sql AS $$ SELECT nextval('s_ids') $$")
        conn.execute("CREATE MATERIALIZED VIEW mv_bump AS SELECT id, bump() AS n FROM products WITH NO DATA")
        conn.execute("CREATE MATERIALIZED VIEW mv_lo AS SELECT lo_from_bytea(0, 'x') AS id WITH NO DATA")
    for view, function in (("mv_bump", "public.bump"), ("mv_lo", "lo_from_bytea")):
        outcome = refresh(prices_db, view)
        assert outcome.outcome == "failed" and f"volatile function(s) {function}" in outcome.reason, outcome
    with connect(prices_db) as conn:
        assert conn.execute("SELECT last_value, is_called FROM s_ids").fetchone() == (1, False)
        assert conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone() == (0,)
    allowed = refresh(prices_db, "mv_bump", RefreshOptions(allow_volatile=True))
    assert allowed.outcome == "refreshed-plain", allowed
    with connect(prices_db) as conn:
        state = {s.name: s for s in read_refresh_states(conn)}["mv_bump"]
    assert state.rule is not None and "volatile function(s) public.bump" in state.rule


# --- issue 13 finding 6: no row value, no password in refresh errors ---------------------------


def test_refresh_errors_carry_sqlstate_and_names_never_row_values(prices_db: Any) -> None:
    token = "tok_live_5f3a9c1e"
    with connect(prices_db) as conn:
        conn.execute("CREATE TABLE api_keys (id int PRIMARY KEY, api_key text)")
        conn.execute("INSERT INTO api_keys VALUES (1, '42')")
        conn.execute("CREATE MATERIALIZED VIEW mv_keys AS SELECT id, api_key::int AS k FROM api_keys")
        conn.execute("CREATE UNIQUE INDEX ON mv_keys (id)")
        conn.execute("INSERT INTO api_keys VALUES (2, %s)", [token])
    outcome = refresh(prices_db, "mv_keys", RefreshOptions(skip_if_unchanged=False))
    assert outcome.outcome == "failed" and outcome.error.startswith("22P02 invalid_text_representation"), outcome
    with connect(prices_db) as conn:
        stored = json.dumps([vars(s) for s in read_refresh_states(conn)], default=str)
        stored += json.dumps([vars(h) for h in read_history(conn)], default=str)
    assert token not in json.dumps(outcome.to_json()) and token not in stored


@pytest.mark.parametrize("dsn", ["postgresql://u:pa%ss@h/db", "host=h password=Secr3tPw missing",
                                 "host=h foo=Secr3tPw"])
def test_malformed_dsn_is_a_usage_error_without_the_password(dsn: str) -> None:
    code, out, err = run_cli(["refresh", "--view", "mv", "--dsn", dsn])
    assert code == 2 and "not a valid libpq connection string" in err
    assert "pa%ss" not in out + err and "Secr3tPw" not in out + err and "Traceback" not in err


# --- finding 4: history ------------------------------------------------------------------------


def test_25_runs_leave_20_rows_printed_by_the_cli_and_shown_in_status(prices_db: Any, tmp_path: Any,
                                                                      monkeypatch: Any) -> None:
    start = utcnow()
    for i in range(25):
        assert refresh(prices_db, "mv_join", now=start + datetime.timedelta(seconds=i)).ok
    with connect(prices_db) as conn:
        history = read_history(conn, "mv_join")
        states = refresh_truth.by_key(read_refresh_states(conn))
    assert len(history) == 20
    assert [h.outcome for h in history[:3]] == ["skipped-unchanged"] * 3 and history[-1].outcome != "refreshed"
    assert history[0].attempt_at == start + datetime.timedelta(seconds=24)
    short = RefreshOptions(history_limit=3)
    refresh(prices_db, "mv_join", short)
    with connect(prices_db) as conn:
        assert len(read_history(conn, "mv_join")) == 3  # retention follows the configured limit

    manifest = {"apiVersion": "marketplacedb.io/v1alpha1", "kind": "MarketplaceDB",
                "metadata": {"name": "shop", "namespace": "prod"},
                "spec": {"database": {"host": prices_db.server.host, "port": prices_db.server.port,
                                      "dbname": prices_db.name, "sslMode": "disable",
                                      "credentialsSecretRef": {"name": "db"}},
                         "materializedViews": [{"name": "mv_join", "query": "SELECT 1 AS id", "uniqueKey": ["id"],
                                                "refresh": {"schedule": "* * * * *"}}]}}
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(manifest))
    monkeypatch.setenv("PGUSER", prices_db.owner)
    monkeypatch.setenv("PGPASSWORD", prices_db.owner_password)
    code, out, _ = run_cli(["history", "-f", str(path), "--view", "mv_join", "-o", "json"])
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 3 and {line["view"] for line in lines} == {"mv_join"}
    assert all({"attemptAt", "outcome", "reason"} <= set(line) for line in lines)
    code, text, _ = run_cli(["history", "-f", str(path)])
    assert code == 0 and "public.mv_join: skipped-unchanged" in text

    spec = MaterializedViewSpec.model_validate(manifest["spec"]["materializedViews"][0])  # type: ignore[index]
    truth = refresh_truth.assess([spec], [], states, {}, utcnow())
    assert truth.views[0].recent_outcomes == ["skipped-unchanged"] * 5
    assert truth.views[0].refresh_rule and "tracked" in truth.views[0].refresh_rule


# --- finding 5: one round trip, measured beside a primary-key lookup ----------------------------


def test_the_common_check_is_one_round_trip_measured_beside_a_primary_key_lookup(prices_db: Any) -> None:
    assert refresh(prices_db, "mv_join").outcome == "refreshed"
    checks, lookups = [], []
    with connect(prices_db) as conn:
        db = PostgresRefresh(conn)
        for _ in range(200):
            started = time.perf_counter()
            outcome = refresh_view(db, ViewTarget("public", "mv_join"), OPTIONS, utcnow())
            checks.append(time.perf_counter() - started)
            assert outcome.outcome == "skipped-unchanged"
            started = time.perf_counter()
            conn.execute("SELECT name FROM products WHERE id = %s", [7]).fetchone()
            lookups.append(time.perf_counter() - started)

    def p(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100)[q - 1] * 1000

    print(f"\n[measured] skip check p50 {p(checks, 50):.3f} ms p99 {p(checks, 99):.3f} ms; "
          f"primary-key lookup p50 {p(lookups, 50):.3f} ms p99 {p(lookups, 99):.3f} ms (same session, 200 each)")


def test_a_query_is_analyzed_from_the_catalog_before_the_view_exists(prices_db: Any) -> None:
    """For plan time: user-defined volatile functions are invisible to the parser, not to the catalog."""
    from marketplacedb_operator.gateways.postgres.refresh import analyze_query

    with connect(prices_db) as conn:
        conn.execute("CREATE SEQUENCE s_ids")
        conn.execute("CREATE FUNCTION bump() RETURNS bigint LANGUAGE sql AS $$ SELECT nextval('s_ids') $$")
        bumped = analyze_query(conn, "SELECT id, bump() AS n FROM products")
        priced = analyze_query(conn, "SELECT id, price_of(id) AS p FROM products WHERE created_at < now()")
        plain = analyze_query(conn, "SELECT p.id, x.price FROM products AS p JOIN prices AS x ON x.product_id = p.id")
        assert conn.execute("SELECT last_value, is_called FROM s_ids").fetchone() == (1, False)  # never ran
        assert conn.execute("SELECT to_regnamespace('marketplacedb')").fetchone() == (None,)  # nothing created
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'mdb_probe%'").fetchone() == (0,)
    assert bumped.volatile == ("public.bump()",)
    assert priced.untracked == ("public.price_of(integer) (stable)",) and priced.time == ("now()",)
    assert (plain.volatile, plain.time, plain.untracked) == ((), (), ())
    assert plain.tables == ("public.prices", "public.products")


def test_row_count_after_a_refresh_does_not_rescan_the_view(prices_db: Any) -> None:
    statements: list[str] = []

    class Logging(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            statements.append(query.as_string(self.connection) if hasattr(query, "as_string") else str(query))
            return super().execute(query, params, **kwargs)

    def counted(options: RefreshOptions = OPTIONS) -> Any:
        with psycopg.connect(prices_db.dsn, autocommit=True, cursor_factory=Logging) as conn:
            return refresh_view(PostgresRefresh(conn), ViewTarget("public", "mv_join"), options, utcnow())

    first = counted()
    assert first.outcome == "refreshed" and first.rows == 48  # reltuples, set exactly by the index build
    write(prices_db, "INSERT INTO products SELECT g, 'n' || g, now() FROM generate_series(49, 60) AS g; "
                     "INSERT INTO prices SELECT g, 1 FROM generate_series(49, 60) AS g; "
                     "DELETE FROM prices WHERE product_id IN (1, 2, 3)")
    second = counted()
    assert second.outcome == "refreshed" and second.rows == 57, second  # 48 + 12 - 3, from the diff
    assert rows(prices_db, "SELECT count(*) FROM mv_join") == [(57,)]
    assert not [s for s in statements if "FROM \"public\".\"mv_join\"" in s or "FROM mv_join" in s], statements


def test_a_check_failing_after_the_lock_does_not_leak_the_lock(prices_db: Any) -> None:
    """Session advisory locks survive a statement's rollback: a check function that fails after
    taking the lock (here: its skip record is refused) must not leave the view locked."""
    assert refresh(prices_db, "mv_join").outcome == "refreshed"
    with psycopg.connect(prices_db.superuser_dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE marketplacedb.refresh_history OWNER TO postgres")
        admin.execute("REVOKE INSERT ON marketplacedb.refresh_history FROM PUBLIC")
    with connect(prices_db) as conn:
        outcome = refresh_view(PostgresRefresh(conn), ViewTarget("public", "mv_join"), OPTIONS, utcnow())
        assert outcome.outcome == "failed" and outcome.error.startswith("42501 insufficient_privilege"), outcome
        held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        assert held.fetchone() == (0,)


def test_the_server_side_skip_agrees_with_decide(prices_db: Any) -> None:
    """The check function's skip predicate and decide() (the source of every reason) side by side."""
    from marketplacedb_operator.refresh import decide, lock_key

    now = utcnow()
    declared = RefreshOptions(max_staleness=3600, depends_on=("prices",))
    for view, options in (("mv_join", OPTIONS), ("mv_priced", declared), ("mv_new_arrivals", declared)):
        assert refresh(prices_db, view, options, now=now).ok
    write(prices_db, "UPDATE products SET name = name WHERE id = 5")
    assert refresh(prices_db, "mv_join", OPTIONS, now=now).outcome == "refreshed"  # the write is seen
    assert refresh(prices_db, "mv_priced", declared, now=now).outcome == "refreshed"
    later = now + datetime.timedelta(minutes=1)
    cases = [
        ("mv_join", OPTIONS, later, False), ("mv_join", OPTIONS, later, True),
        ("mv_join", RefreshOptions(skip_if_unchanged=False), later, False),
        ("mv_join", OPTIONS, now + datetime.timedelta(hours=2), False),
        ("mv_priced", declared, later, False), ("mv_priced", OPTIONS, later, False),
        ("mv_priced", RefreshOptions(depends_on=("nope",)), later, False),
        ("mv_new_arrivals", declared, later, False), ("mv_today", OPTIONS, later, False),
    ]
    skips = []
    with connect(prices_db) as conn:
        db = PostgresRefresh(conn)
        for view, options, at, force in cases:
            target = ViewTarget("public", view)
            expected = decide(db.observe(target, options.depends_on), options, at, force).action == "skip"
            locked, skipped, _ = db.check(target, lock_key(target), options, at, force)
            if not skipped:
                db.unlock(lock_key(target))
            assert locked and skipped == expected, (view, options, at, force, expected)
            skips.append(skipped)
    assert skips == [True, False, False, False, True, False, False, False, False]


def test_names_given_to_to_regclass_are_quoted_by_psycopg_not_by_hand(fresh_db: Any) -> None:
    """A schema with capitals and a view name with a double quote: the regclass text of the row count
    and of an unqualified dependsOn table is the identifiers as psycopg quotes them (an f-string
    `"{schema}"."{name}"` broke on the quote, and `{schema}.{table}` folded "Shop" to shop)."""
    with fresh_db.connect() as conn:
        conn.execute("""
            CREATE SCHEMA "Shop";
            CREATE TABLE "Shop".products (id int PRIMARY KEY);
            CREATE TABLE "Shop".prices (product_id int PRIMARY KEY, price numeric NOT NULL);
            INSERT INTO "Shop".products SELECT generate_series(1, 9);
            INSERT INTO "Shop".prices SELECT generate_series(1, 9), 5;
            CREATE FUNCTION "Shop".price_of(p int) RETURNS numeric LANGUAGE sql STABLE
              AS 'SELECT price FROM "Shop".prices WHERE product_id = p';
            CREATE MATERIALIZED VIEW "Shop"."mv""q" AS SELECT id, "Shop".price_of(id) AS price FROM "Shop".products;
            CREATE UNIQUE INDEX ON "Shop"."mv""q" (id);
        """)
    target = ViewTarget("Shop", 'mv"q')
    options = RefreshOptions(max_staleness=3600, timeout=60, lock_timeout=5, depends_on=("prices",))
    with connect(fresh_db) as conn:
        first = refresh_view(PostgresRefresh(conn), target, options, utcnow())
        assert first.outcome == "refreshed" and first.rows == 9, first
        conn.execute("SELECT pg_stat_force_next_flush()")
        second = refresh_view(PostgresRefresh(conn), target, options, utcnow())
    assert second.outcome == "skipped-unchanged", second  # "Shop".prices found: dependsOn honoured
