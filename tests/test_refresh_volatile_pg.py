"""Volatile functions in a view query, as the server resolves it, on a real PostgreSQL 15.

Issue 16: built-in volatile functions are refused by the parser at validation; user-defined ones
(any schema, any overload, behind an operator) only the catalog knows. The plan refuses such a
view before any DDL, the creating transaction re-checks (a function made VOLATILE after the plan),
and every refresh re-checks (one made VOLATILE after the view was created). `plan` says for every
view which skip-if-unchanged rule applies and why.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh, analyze_query
from marketplacedb_operator.refresh import RefreshOptions, ViewTarget, refresh_view
from marketplacedb_operator.sql import report
from marketplacedb_operator.sql.plan import desired_state, plan
from refresh_kit import FAST, OWNER, connect, side_effects, spec, view

SETUP = """
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE prices (product_id int PRIMARY KEY, price numeric NOT NULL);
CREATE TABLE audit (at timestamptz NOT NULL DEFAULT now());
CREATE SEQUENCE s_ids;
INSERT INTO products (id, name) SELECT g, 'p' || g FROM generate_series(1, 20) AS g;
INSERT INTO prices SELECT g, g * 10 FROM generate_series(1, 20) AS g;
-- a plpgsql function that writes: INSERT and setval
CREATE FUNCTION touch(p int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit DEFAULT VALUES; PERFORM setval('s_ids', 1000); RETURN p; END $$;
-- a SQL function wrapping setval (VOLATILE is CREATE FUNCTION's default)
CREATE FUNCTION reset_ids() RETURNS bigint LANGUAGE sql AS $$ SELECT setval('s_ids', 500) $$;
-- a volatile function in another schema, reached by its qualified name
CREATE SCHEMA ops;
CREATE FUNCTION ops.kick(p int) RETURNS int LANGUAGE sql VOLATILE AS $$ SELECT p $$;
-- overloads: price_of(int) is STABLE, price_of(text) is VOLATILE
CREATE FUNCTION price_of(p int) RETURNS numeric LANGUAGE sql STABLE
  AS $$ SELECT price FROM prices WHERE product_id = p $$;
CREATE FUNCTION price_of(p text) RETURNS numeric LANGUAGE sql VOLATILE AS $$ SELECT setval('s_ids', 7)::numeric $$;
-- an operator whose function is volatile
CREATE FUNCTION bump_add(a int, b int) RETURNS int LANGUAGE sql VOLATILE AS $$ SELECT a + b $$;
CREATE OPERATOR #+# (FUNCTION = bump_add, LEFTARG = int, RIGHTARG = int);
-- declared STABLE, but its SQL-standard body (stored parsed) calls setval through another function
CREATE FUNCTION reset_to(p int) RETURNS bigint LANGUAGE sql STABLE BEGIN ATOMIC SELECT setval('s_ids', p); END;
CREATE FUNCTION wrapped(p int) RETURNS bigint LANGUAGE sql STABLE BEGIN ATOMIC SELECT reset_to(p); END;
"""

REFUSED = [
    ("plpgsql INSERT and setval", "SELECT id, touch(id) AS t FROM products", "public.touch(integer)"),
    ("SQL function wrapping setval", "SELECT id, reset_ids() AS r FROM products", "public.reset_ids()"),
    ("another schema", "SELECT id, ops.kick(id) AS k FROM products", "ops.kick(integer)"),
    ("the volatile overload", "SELECT id, price_of(name) AS p FROM products", "public.price_of(text)"),
    ("an operator", "SELECT id, id #+# 1 AS n FROM products", "public.bump_add(integer, integer)"),
    ("through a plain view", "SELECT id, t FROM touched", "public.touch(integer)"),
    ("inside a STABLE SQL-standard function", "SELECT id, wrapped(id) AS w FROM products", "setval(regclass, bigint)"),
]


@pytest.fixture
def shop(fresh_db: Any) -> Any:
    with fresh_db.connect() as conn:
        conn.execute(SETUP)
        conn.execute("CREATE VIEW touched AS SELECT id, touch(id) AS t FROM products")
    return fresh_db


def exists(db: Any, name: str) -> bool:
    with connect(db) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"public.{name}"]).fetchone()
        return bool(row and row[0])


@pytest.mark.parametrize(("case", "query", "function"), REFUSED, ids=[c for c, _, _ in REFUSED])
def test_a_view_calling_a_user_defined_volatile_function_is_refused_before_any_ddl(
        shop: Any, case: str, query: str, function: str) -> None:
    before = side_effects(shop)
    desired = desired_state(spec(view("mv", query), view("mv_ok", "SELECT id, name FROM products")), OWNER)
    with connect(shop) as conn:
        observed = gateway.observe(conn, desired)
        the_plan = plan(desired, observed)
        outcomes = gateway.execute(conn, the_plan, FAST)
    assert [s for s in the_plan.steps if s.object == "view/public.mv"] == []  # no DDL for it at all
    assert len(the_plan.conflicts) == 1, the_plan.conflicts
    refusal = the_plan.conflicts[0]
    assert refusal.startswith("spec.materializedViews[0].query: refused: calls volatile function(s)")
    assert function in refusal and "allowVolatileFunctions: true" in refusal
    statuses = {s.name: s for s in report.view_statuses(desired, observed)}
    assert statuses["mv"].message.startswith("Refused: ") and function in statuses["mv"].message
    assert statuses["mv"].refresh_rule is not None and "(refused)" in statuses["mv"].refresh_rule
    assert [o.object for o in outcomes] == ["view/public.mv_ok"] and outcomes[0].ok  # the others go on
    assert not exists(shop, "mv") and exists(shop, "mv_ok")
    assert side_effects(shop) == before  # the function never ran: no audit row, sequence untouched


def test_the_stable_overload_is_not_refused(shop: Any) -> None:
    desired = desired_state(spec(view("mv", "SELECT id, price_of(id) AS p FROM products")), OWNER)
    with connect(shop) as conn:
        observed = gateway.observe(conn, desired)
    assert plan(desired, observed).conflicts == ()
    calls = observed.calls_of("public", "mv")
    assert calls is not None and calls.volatile == () and calls.untracked == ("public.price_of(integer) (stable)",)


def test_allow_volatile_functions_opts_in(shop: Any) -> None:
    desired = desired_state(spec(view("mv", "SELECT id, touch(id) AS t FROM products",
                                      allowVolatileFunctions=True)), OWNER)
    with connect(shop) as conn:
        the_plan = plan(desired, gateway.observe(conn, desired))
        outcomes = gateway.execute(conn, the_plan, FAST)
    assert the_plan.conflicts == () and all(o.ok for o in outcomes), outcomes
    assert exists(shop, "mv")
    assert side_effects(shop) == (20, 1000, True)  # it ran, as the user accepted: once per row


def test_a_function_made_volatile_after_the_plan_fails_the_creating_transaction(shop: Any) -> None:
    """The plan saw a STABLE function; ALTER FUNCTION ... VOLATILE lands before apply: the creating
    transaction re-checks after CREATE ... WITH NO DATA, before anything runs, and rolls back."""
    with connect(shop) as conn:
        conn.execute("CREATE FUNCTION sneaky(p int) RETURNS int LANGUAGE plpgsql STABLE AS "
                     "$$ BEGIN PERFORM setval('s_ids', 42); RETURN p; END $$")
    before = side_effects(shop)
    desired = desired_state(spec(view("mv", "SELECT id, sneaky(id) AS s FROM products")), OWNER)
    with connect(shop) as conn:
        the_plan = plan(desired, gateway.observe(conn, desired))
        assert the_plan.conflicts == () and the_plan.steps  # STABLE: accepted (skip rule off, see below)
        conn.execute("ALTER FUNCTION sneaky(int) VOLATILE")
        outcomes = gateway.execute(conn, the_plan, FAST)
    assert len(outcomes) == 1 and not outcomes[0].ok
    assert "refused: spec.materializedViews[0].query calls volatile function(s) public.sneaky(integer)" \
        in outcomes[0].message
    assert not exists(shop, "mv") and side_effects(shop) == before


def test_what_is_not_guaranteed_a_stable_function_body_is_trusted(shop: Any) -> None:
    """The documented limit: PostgreSQL lets a STABLE plpgsql function call setval(); a function's
    body is not read, so such a view is accepted (skip-if-unchanged off), and runs it."""
    with connect(shop) as conn:
        conn.execute("CREATE FUNCTION liar(p int) RETURNS int LANGUAGE plpgsql STABLE AS "
                     "$$ BEGIN PERFORM setval('s_ids', 99); RETURN p; END $$")
    desired = desired_state(spec(view("mv", "SELECT id, liar(id) AS s FROM products")), OWNER)
    with connect(shop) as conn:
        observed = gateway.observe(conn, desired)
        the_plan = plan(desired, observed)
        assert the_plan.conflicts == ()
        assert all(o.ok for o in gateway.execute(conn, the_plan, FAST))
    rule = report.view_statuses(desired, observed)[0].refresh_rule
    assert rule == ("skip-if-unchanged: off: calls function(s) public.liar(integer) (stable) whose reads are not "
                    "tracked (declare refresh.dependsOn)")
    assert side_effects(shop)[1:] == (99, True)


def test_a_function_made_volatile_after_the_view_exists_is_refused_at_the_next_refresh(shop: Any) -> None:
    """ALTER FUNCTION ... VOLATILE or CREATE OR REPLACE ... VOLATILE after creation: every refresh
    re-reads the catalog first and refuses (failed, function named); the function does not run."""
    desired = desired_state(spec(view("mv", "SELECT id, price_of(id) AS p FROM products")), OWNER)
    with connect(shop) as conn:
        assert all(o.ok for o in gateway.execute(conn, plan(desired, gateway.observe(conn, desired)), FAST))
    options = RefreshOptions(max_staleness=3600, timeout=30, lock_timeout=5)
    now = datetime.datetime.now(datetime.UTC)
    with connect(shop) as conn:
        assert refresh_view(PostgresRefresh(conn), ViewTarget("public", "mv"), options, now).outcome == "refreshed"
        conn.execute("CREATE OR REPLACE FUNCTION price_of(p int) RETURNS numeric LANGUAGE sql VOLATILE AS "
                     "$$ SELECT setval('s_ids', 321)::numeric $$")
    before = side_effects(shop)
    with connect(shop) as conn:
        outcome = refresh_view(PostgresRefresh(conn), ViewTarget("public", "mv"), options, now, force=True)
        observed = gateway.observe(conn, desired)
    assert outcome.outcome == "failed" and "public.price_of" in outcome.reason
    assert "allowVolatileFunctions" in outcome.reason
    assert side_effects(shop) == before
    # The plan has nothing to do for the existing view, and says why refreshes now fail.
    assert plan(desired, observed).steps == ()
    rule = report.view_statuses(desired, observed)[0].refresh_rule
    assert rule == "skip-if-unchanged: off: calls volatile function(s) public.price_of(integer) (refused)"


def test_analyze_query_resolves_without_running_or_leaving_anything(shop: Any) -> None:
    with connect(shop) as conn:
        calls = analyze_query(conn, "SELECT p.id, touch(p.id) AS t FROM products AS p WHERE p.created_at < now()")
        left = conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'mdb_probe%'").fetchone()
    assert calls.volatile == ("public.touch(integer)",) and calls.time == ("now()",)
    assert calls.tables == ("public.products",) and left == (0,)
    assert side_effects(shop) == (0, 1, False)


def write_manifest(tmp_path: Path, db: Any, views: list[dict[str, Any]]) -> Path:
    document = {"apiVersion": "marketplacedb.io/v1alpha1", "kind": "MarketplaceDB",
                "metadata": {"name": "shop", "namespace": "default"},
                "spec": {"database": {"host": "h", "dbname": db.name, "credentialsSecretRef": {"name": "s"}},
                         "materializedViews": views}}
    path = tmp_path / "mdb.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


RULES = [
    view("mv_join", "SELECT p.id, x.price FROM products AS p JOIN prices AS x ON x.product_id = p.id"),
    view("mv_priced", "SELECT id, price_of(id) AS price FROM products"),
    view("mv_priced_declared", "SELECT id, price_of(id) AS price FROM products",
         refresh={"schedule": "*/5 * * * *", "dependsOn": ["prices"]}),
    view("mv_new", "SELECT id, name FROM products WHERE created_at > now() - interval '1 day'"),
    view("mv_today", "SELECT id FROM products WHERE created_at::date = current_date"),
    view("mv_always", "SELECT id, name FROM products", refresh={"schedule": "*/5 * * * *", "skipIfUnchanged": False}),
]

EXPECTED = {
    "mv_join": "skip-if-unchanged: on (tables: public.prices, public.products)",
    "mv_priced": "skip-if-unchanged: off: calls function(s) public.price_of(integer) (stable) whose reads are not "
                 "tracked (declare refresh.dependsOn)",
    "mv_priced_declared": "skip-if-unchanged: on (tables: public.products; dependsOn declared: prices, trusted for "
                          "public.price_of(integer) (stable))",
    "mv_new": "skip-if-unchanged: off: time-dependent (now()): the schedule alone drives it",
    "mv_today": "skip-if-unchanged: off: time-dependent (current_date): the schedule alone drives it",
    "mv_always": "skip-if-unchanged: off (refresh.skipIfUnchanged: false): always refreshed",
}


def test_plan_says_which_skip_rule_applies_to_every_view_and_why(shop: Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from marketplacedb_operator.cli import main

    manifest = str(write_manifest(tmp_path, shop, RULES))
    capsys.readouterr()
    assert main(["plan", "-f", manifest, "--dsn", shop.dsn]) == 0
    text = capsys.readouterr().out
    for name, rule in EXPECTED.items():
        assert f"  view {name}: {rule}\n" in text, text
    assert main(["plan", "-f", manifest, "--dsn", shop.dsn, "-o", "json"]) == 0
    views = json.loads(capsys.readouterr().out)["resources"][0]["materializedViews"]
    assert {v["name"]: v["refreshRule"] for v in views} == EXPECTED
    # Created, the views keep their rule in status (read from the live views, no probe).
    assert main(["apply", "-f", manifest, "--dsn", shop.dsn, "-o", "json"]) == 0
    applied = json.loads(capsys.readouterr().out)["resources"][0]["materializedViews"]
    assert {v["name"]: v["refreshRule"] for v in applied} == EXPECTED
