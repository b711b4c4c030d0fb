"""Issue 12 on a real PostgreSQL 15: the schema engine touches only what it provably owns, adopts
what already matches, and swaps without losing anything. Each test names the finding it covers
and checks the observable effect (the foreign object still exists with the same OID; the grant is
still there; no build ran)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from harness.postgres import FreshDatabase
from marketplacedb_operator import workload
from marketplacedb_operator.gateways.postgres import ConnInfo, connect
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.sql import ddl
from marketplacedb_operator.sql.plan import Desired, desired_state, plan, teardown_plan
from test_schema_engine_pg import (
    FAST,
    INDEXES,
    OWNER,
    apply,
    cli,
    grant_stats,
    index_oid,
    observe,
    one,
    reference_document,
    run,
    the_spec,
    write_manifest,
)

DROP = {"deletionPolicy": "Drop", "lockTimeout": "2s"}


def oids(db: FreshDatabase, *names: str) -> dict[str, int | None]:
    return {name: one(db, "SELECT to_regclass(%s)::oid", name) for name in names}


def comment(db: FreshDatabase, name: str) -> str | None:
    return one(db, "SELECT obj_description(to_regclass(%s), 'pg_class')", name)  # type: ignore[no-any-return]


def teardown(db: FreshDatabase, d: Desired) -> list[Any]:
    with db.connect() as conn:
        return gateway.execute(conn, teardown_plan(d, gateway.observe(conn, d)), FAST)


def everything_touched(db: FreshDatabase, d: Desired) -> list[str]:
    """Objects of the plan and of the teardown plan, for `d` (what the engine would touch)."""
    cat = observe(db, d)
    return [s.object for s in plan(d, cat).steps] + [s.object for s in teardown_plan(d, cat).steps]


# --- finding 1: a copied or forged marker confers nothing ------------------------------------------


def test_copied_and_forged_markers_confer_nothing(workload_db: FreshDatabase) -> None:
    d = desired_state(the_spec(ddl=DROP), OWNER)
    assert all(o.ok for o in apply(workload_db, d))
    su = workload_db.superuser_dsn
    run(workload_db.dsn, "CREATE TABLE seller_orders_archive (LIKE seller_orders INCLUDING ALL)")
    copies = [r[0] for r in psycopg.connect(su).execute(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'seller_orders_archive'::regclass")]
    marked_copies = [c for c in copies if (comment(workload_db, c) or "").startswith(ddl.MARKER_PREFIX)]
    assert marked_copies, copies  # LIKE ... INCLUDING ALL copied our marker comment
    run(su, "CREATE INDEX dba_forged ON search_history (query)")
    marker = comment(workload_db, "idx_search_history_user_recent")
    run(su, sql.SQL("COMMENT ON INDEX dba_forged IS {}").format(sql.Literal(marker)))
    foreign = oids(workload_db, *copies, "dba_forged")
    comments = {name: comment(workload_db, name) for name in foreign}

    p = plan(d, observe(workload_db, d))
    assert p.empty, p.descriptions()
    for name in [*marked_copies, "dba_forged"]:
        assert any(n.startswith(f"left alone: index public.{name} carries this resource's marker") for n in p.notes)
    code_outcomes = apply(workload_db, d)
    assert code_outcomes == []
    assert all(o.ok for o in teardown(workload_db, d))
    assert oids(workload_db, *foreign) == foreign
    assert {name: comment(workload_db, name) for name in foreign} == comments
    assert index_oid(workload_db, "idx_search_history_user_recent") is None  # ours went with the teardown


# --- finding 2: look-alike names, INVALID and in-progress indexes of others -------------------------


def test_look_alikes_are_left_alone_under_every_policy(workload_db: FreshDatabase,
                                                        capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    su = workload_db.superuser_dsn
    for statement in (
        "CREATE INDEX idx_search_history_user_recent__old ON search_history (user_id)",
        "COMMENT ON INDEX idx_search_history_user_recent__old IS 'do not drop'",
        "CREATE INDEX idx_popular_searches_ranking__new ON popular_searches (search_count)",
        "CREATE MATERIALIZED VIEW mv_category_counts__new AS SELECT 1 AS id",
        "CREATE TABLE other_table (id int)",
        "CREATE INDEX mv_category_counts__key ON other_table (id)",
    ):
        run(su, statement)
    # A DBA's own cancelled build under a declared name (INVALID, unmarked).
    with psycopg.connect(su, autocommit=True) as blocker, psycopg.connect(su, autocommit=True) as hand:
        blocker.execute("BEGIN")
        blocker.execute("UPDATE seller_orders SET status = status WHERE id = 1")
        hand.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            hand.execute("CREATE INDEX CONCURRENTLY idx_seller_orders_seller_status ON seller_orders (seller_id)")
        blocker.execute("COMMIT")
    names = ("idx_search_history_user_recent__old", "idx_popular_searches_ranking__new", "mv_category_counts__new",
             "mv_category_counts__key", "idx_seller_orders_seller_status")
    foreign = oids(workload_db, *names)
    assert all(foreign.values())

    for policy in ("Retain", "Drop"):
        d = desired_state(the_spec(ddl={"deletionPolicy": policy, "lockTimeout": "2s"}), OWNER)
        outcomes = apply(workload_db, d)
        assert not [o for o in outcomes if not o.ok and "cannot build" not in o.message]
        assert oids(workload_db, *names) == foreign
        teardown(workload_db, d)
        assert oids(workload_db, *names) == foreign
        assert not [o for o in everything_touched(workload_db, d) if o.endswith(names)]
    manifest = str(write_manifest(tmp_path, reference_document(ddl=DROP)))
    code, out, err = cli(capsys, "plan", "-f", manifest, "--dsn", workload_db.dsn)
    assert "Traceback" not in err
    assert code == 1, "a plan with a conflict must not exit as success (a CI gate reads the code)"
    for name in ("idx_search_history_user_recent__old", "idx_popular_searches_ranking__new",
                 "mv_category_counts__new", "mv_category_counts__key"):
        assert f"note: left alone: {'materialized view' if name.endswith('__new') and 'mv_' in name else 'index'} " \
               f"public.{name}" in out, out
    assert "conflict: spec.indexes[2]: index public.idx_seller_orders_seller_status exists" in out
    assert oids(workload_db, *names) == foreign


def test_someone_elses_build_in_progress_is_never_touched(workload_db: FreshDatabase) -> None:
    only = [i for i in INDEXES if i["name"] == "idx_ai_accounts_available_category"]
    d = desired_state(the_spec(indexes=only, materializedViews=[], ddl={**DROP, "lockTimeout": "1s"}), OWNER)
    errors: list[str] = []
    with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as snapshot:
        snapshot.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        snapshot.execute("SELECT 1 FROM categories LIMIT 1")

        def build() -> None:
            try:
                with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as dba:
                    dba.execute("CREATE INDEX CONCURRENTLY idx_ai_accounts_available_category ON ai_accounts (name)")
            except psycopg.Error as exc:
                errors.append(str(exc))

        thread = threading.Thread(target=build)
        thread.start()
        deadline = time.monotonic() + 30
        while index_oid(workload_db, "idx_ai_accounts_available_category") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        oid = index_oid(workload_db, "idx_ai_accounts_available_category")
        cat = observe(workload_db, d)
        info = cat.index("public", "idx_ai_accounts_available_category")
        assert info is not None and info.building_pid is not None and not info.valid
        p = plan(d, cat)
        assert "being built by another session" in p.conflicts[0]
        assert not [s for s in p.steps if s.object.startswith("index/")]
        apply(workload_db, d)
        teardown(workload_db, d)
        assert index_oid(workload_db, "idx_ai_accounts_available_category") == oid
        snapshot.execute("COMMIT")
        thread.join(timeout=30)
    assert errors == [] and index_oid(workload_db, "idx_ai_accounts_available_category") == oid


# --- findings 3 and 4: swap fidelity, indexes on declared views -------------------------------------


def test_view_swap_keeps_privileges_owner_options_comments_and_indexes(workload_db: FreshDatabase, pg: Any) -> None:
    view_index = {"name": "idx_mv_hot_products_price", "table": "mv_hot_products", "columns": [{"name": "price"}]}
    spec = the_spec(indexes=[*INDEXES, view_index])
    d = desired_state(spec, OWNER)
    outcomes = apply(workload_db, d)  # finding 4: the index on the view is planned after the view
    assert all(o.ok for o in outcomes), outcomes
    reader, team = f"{workload_db.name}_reader", f"{workload_db.name}_web"
    pg.create_role(reader, "reader-pw")
    pg.create_role(team, None)
    su = workload_db.superuser_dsn
    try:
        for statement in (
            sql.SQL("GRANT SELECT (id, name) ON mv_hot_products TO {}").format(sql.Identifier(reader)),
            sql.SQL("GRANT {} TO {}").format(sql.Identifier(team), sql.Identifier(workload_db.owner)),
            sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(team)),
            sql.SQL("ALTER MATERIALIZED VIEW mv_hot_products OWNER TO {}").format(sql.Identifier(team)),
            sql.SQL("ALTER MATERIALIZED VIEW mv_hot_products SET (autovacuum_enabled = false)"),
            sql.SQL("COMMENT ON COLUMN mv_hot_products.price IS 'in cents'"),
            sql.SQL("CREATE INDEX dba_hot_by_name ON mv_hot_products (name)"),
        ):
            run(su, statement)
        changed = spec.model_copy(deep=True)
        changed.materialized_views[0].query = workload.VIEW_QUERIES["mv_hot_products"].replace("LIMIT 100", "LIMIT 50")
        d2 = desired_state(changed, OWNER)
        assert [s.kind for s in plan(d2, observe(workload_db, d2)).steps] == ["create-view", "swap-view"]
        outcomes = apply(workload_db, d2)
        assert all(o.ok for o in outcomes), outcomes
        assert one(workload_db, "SELECT count(*) FROM mv_hot_products") == 50
        assert one(workload_db, "SELECT pg_get_userbyid(relowner) FROM pg_class "
                                "WHERE oid = 'mv_hot_products'::regclass") == team
        with psycopg.connect(su) as conn:
            assert conn.execute("SELECT has_column_privilege(%s, 'mv_hot_products', 'name', 'SELECT'), "
                                "has_column_privilege(%s, 'mv_hot_products', 'price', 'SELECT')",
                                [reader, reader]).fetchone() == (True, False)
            assert conn.execute("SELECT reloptions FROM pg_class WHERE oid = 'mv_hot_products'::regclass"
                                ).fetchone() == (["autovacuum_enabled=false"],)
            assert conn.execute("SELECT col_description('mv_hot_products'::regclass, 6)").fetchone() is not None
            defs = dict(conn.execute("SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
                                     "WHERE indrelid = 'mv_hot_products'::regclass").fetchall())
        assert set(defs) == {"mv_hot_products__key", "idx_mv_hot_products_price", "dba_hot_by_name"}
        assert "(name)" in defs["dba_hot_by_name"]
        assert one(workload_db, "SELECT col_description('mv_hot_products'::regclass, "
                                "(SELECT attnum FROM pg_attribute WHERE attrelid = 'mv_hot_products'::regclass "
                                "AND attname = 'price'))") == "in cents"
        cat = observe(workload_db, d2)
        assert plan(d2, cat).empty, plan(d2, cat).descriptions()
        assert cat.index("public", "idx_mv_hot_products_price").owned_by(OWNER)  # type: ignore[union-attr]

        # A view other views depend on is not swapped: a clear conflict, nothing changes.
        run(su, "CREATE VIEW v_hot_names AS SELECT name FROM mv_hot_products")
        before = index_oid(workload_db, "mv_hot_products")
        p = plan(d, observe(workload_db, d))
        assert not p.steps or all(not s.object.startswith("view/public.mv_hot") for s in p.steps)
        assert any("public.v_hot_names depend on it" in c for c in p.conflicts)
        apply(workload_db, d)
        assert index_oid(workload_db, "mv_hot_products") == before
    finally:
        run(su, "DROP VIEW IF EXISTS v_hot_names")
        for role in (reader, team):
            run(su, sql.SQL("REASSIGN OWNED BY {} TO {}").format(sql.Identifier(role),
                                                                 sql.Identifier(workload_db.owner)))
            run(su, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            pg.drop_role(role)


# --- finding 5: a unique index a foreign key depends on -----------------------------------------------


def test_unique_index_with_a_foreign_key_is_reported_not_dropped(workload_db: FreshDatabase) -> None:
    run(workload_db.dsn, "CREATE TABLE codes (id int PRIMARY KEY, code int NOT NULL)")
    run(workload_db.dsn, "INSERT INTO codes SELECT g, g FROM generate_series(1, 50) g")
    run(workload_db.dsn, "CREATE TABLE code_uses (code int)")
    unique = {"name": "idx_codes_code", "table": "codes", "columns": [{"name": "code"}], "unique": True}
    d = desired_state(the_spec(indexes=[unique], materializedViews=[], ddl=DROP), OWNER)
    assert all(o.ok for o in apply(workload_db, d))
    run(workload_db.dsn, "ALTER TABLE code_uses ADD CONSTRAINT code_uses_code_fkey FOREIGN KEY (code) "
                         "REFERENCES codes (code)")
    oid = index_oid(workload_db, "idx_codes_code")
    d2 = desired_state(the_spec(indexes=[{**unique, "include": ["id"]}], materializedViews=[], ddl=DROP), OWNER)
    p = plan(d2, observe(workload_db, d2))
    assert not [s for s in p.steps if s.object.startswith("index/")]
    assert "code_uses_code_fkey on public.code_uses" in p.conflicts[0] and "drop and re-create" in p.conflicts[0]
    assert all(o.ok for o in apply(workload_db, d2))
    with workload_db.connect() as conn:
        down = teardown_plan(d2, gateway.observe(conn, d2))
        outcomes = gateway.execute(conn, down, FAST)
    assert all(o.ok for o in outcomes), outcomes  # teardown finishes
    assert any("left in place" in n and "code_uses_code_fkey" in n for n in down.notes)
    assert index_oid(workload_db, "idx_codes_code") == oid


# --- findings 6 and 10: blocked builds wait instead of rebuilding, within lockTimeout ----------------


def _builds_logged(db: FreshDatabase, pg: Any, since: int, name: str) -> int:
    text = pg.log_text()[since:]
    return sum(1 for line in text.splitlines() if f"@{db.name} " in line and "CREATE INDEX CONCURRENTLY" in line
               and name in line and "statement:" in line)


def _blocked_applies(db: FreshDatabase, pg: Any, stats: bool) -> tuple[list[Any], int]:
    """Two applies while an old REPEATABLE READ snapshot is open, then one after it ends; returns the
    blocked outcomes and the number of CREATE INDEX CONCURRENTLY the server logged meanwhile."""
    run(db.superuser_dsn, sql.SQL("ALTER ROLE {} SET log_statement = 'ddl'").format(sql.Identifier(db.owner)))
    if stats:
        grant_stats(db)
    only = [i for i in INDEXES if i["name"] == "idx_seller_orders_seller_status"]
    d = desired_state(the_spec(indexes=only, materializedViews=[], database={
        **reference_document()["spec"]["database"], "settings": {}}, ddl={"lockTimeout": "2s"}), OWNER)
    since = len(pg.log_text())
    blocked = []
    with psycopg.connect(db.superuser_dsn, autocommit=True) as snapshot:
        snapshot.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        snapshot.execute("SELECT count(*) FROM categories")
        time.sleep(1.2)  # an old snapshot: what stalls the wait phases of CREATE INDEX CONCURRENTLY
        for _ in range(2):
            [outcome] = apply(db, d)
            assert not outcome.ok
            blocked.append((outcome, snapshot.info.backend_pid))
            cat = observe(db, d)  # nothing left behind, blocked or not
            assert cat.index("public", "idx_seller_orders_seller_status__new") is None
            assert cat.index("public", "idx_seller_orders_seller_status") is None
        builds = _builds_logged(db, pg, since, "idx_seller_orders_seller_status__new")
        snapshot.execute("COMMIT")
    assert all(o.ok for o in apply(db, d))
    assert _builds_logged(db, pg, since, "idx_seller_orders_seller_status__new") == builds + 1
    return blocked, builds


def test_a_blocked_build_waits_for_its_blocker_and_never_rebuilds(workload_db: FreshDatabase, pg: Any) -> None:
    """With pg_read_all_stats the old snapshot is seen before building: no build at all, the
    blocker is reported (pid, state, age), within lockTimeout."""
    blocked, builds = _blocked_applies(workload_db, pg, stats=True)
    assert builds == 0
    for outcome, pid in blocked:
        assert "not built" in outcome.message and f"pid {pid}" in outcome.message
        session = {s.pid: s for s in outcome.blocking}[pid]
        assert session.state.startswith("idle in transaction") and session.age_seconds >= 1.0


def test_a_hidden_snapshot_costs_at_most_one_build_per_apply(workload_db: FreshDatabase, pg: Any) -> None:
    """Without pg_read_all_stats another role's snapshot is invisible: the build itself meets it,
    gives up at lockTimeout (no retry, no INVALID index left), once per apply."""
    blocked, builds = _blocked_applies(workload_db, pg, stats=False)
    assert builds == len(blocked) == 2
    assert all("lock timeout" in outcome.message for outcome, _ in blocked)


def test_index_steps_honour_lock_timeout_behind_a_hidden_writer(workload_db: FreshDatabase) -> None:
    """Finding 10: a long transaction of another role holding a write lock on the table (its age
    hidden without pg_read_all_stats): the build is not started, the wait stays within lockTimeout
    (not 60 s x 4 attempts), the blocker is named."""
    only = [i for i in INDEXES if i["name"] == "idx_search_history_user_recent"]
    d = desired_state(the_spec(indexes=only, materializedViews=[], database={
        **reference_document()["spec"]["database"], "settings": {}}, ddl={"lockTimeout": "2s"}), OWNER)
    with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as writer:
        writer.execute("BEGIN")
        writer.execute("UPDATE search_history SET results_count = results_count WHERE id = 1")
        pid = writer.info.backend_pid
        [outcome] = apply(workload_db, d)
        writer.execute("ROLLBACK")
    assert not outcome.ok and "not built" in outcome.message and "55P03" in outcome.message
    assert [s.pid for s in outcome.blocking] == [pid]
    assert outcome.blocking[0].state.startswith("unknown (grant pg_read_all_stats")
    assert outcome.seconds < 30  # lockTimeout 2s plus sampling; it was 200 s before
    cat = observe(workload_db, d)
    assert cat.index("public", "idx_search_history_user_recent__new") is None


# --- finding 7: observation never waits on an undeclared object's lock ------------------------------


def test_locks_on_undeclared_tables_do_not_block_plan_or_apply(workload_db: FreshDatabase, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run(workload_db.superuser_dsn, "CREATE TABLE unrelated (id int PRIMARY KEY, note text)")
    run(workload_db.superuser_dsn, "CREATE INDEX unrelated_note ON unrelated (note)")
    manifest = str(write_manifest(tmp_path, reference_document()))
    with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as other_team:
        other_team.execute("BEGIN")
        other_team.execute("LOCK TABLE unrelated IN ACCESS EXCLUSIVE MODE")
        code, out, err = cli(capsys, "plan", "-f", manifest, "--dsn", workload_db.dsn, "-o", "json")
        assert code == 0 and "Traceback" not in err, err
        code, out, err = cli(capsys, "apply", "-f", manifest, "--dsn", workload_db.dsn, "-o", "json")
        assert code == 0, out + err
        other_team.execute("COMMIT")
    assert {s["state"] for s in json.loads(out)["resources"][0]["indexes"]} == {"Valid"}


# --- finding 8: the reference workload made by a migration is adopted -------------------------------


def _migration_sql() -> list[str]:
    """The reference indexes and views as a team's own migration would have created them."""
    statements = [
        "CREATE INDEX idx_ai_accounts_available_category ON ai_accounts (category_id, sold_count DESC) "
        "WHERE is_available = true",
        "CREATE INDEX idx_seller_products_available_approved ON seller_products (category_id, sold_count DESC) "
        "WHERE is_available = true AND is_approved = true",
        "CREATE INDEX idx_seller_orders_seller_status ON seller_orders (seller_id, status, created_at DESC)",
        "CREATE INDEX idx_search_history_user_recent ON search_history USING btree (user_id, created_at DESC)",
        "CREATE INDEX idx_popular_searches_ranking ON popular_searches (search_count DESC) "
        "INCLUDE (query, is_trending)",
        # issue 18: the search indexes (GIN, trigram and jsonb_path_ops) are adopted alike
        "CREATE EXTENSION IF NOT EXISTS pg_trgm",
        "CREATE INDEX idx_seller_products_name_trgm ON seller_products USING gin (name gin_trgm_ops)",
        "CREATE INDEX idx_seller_products_attributes ON seller_products USING gin (attributes jsonb_path_ops)",
        # and the index on the partitioned order history (a plain CREATE INDEX, as a migration runs it)
        "CREATE INDEX idx_order_events_seller_recent ON seller_order_events (seller_id, created_at DESC)",
    ]
    for name, query in workload.VIEW_QUERIES.items():
        key = ", ".join(workload.VIEW_UNIQUE_KEYS[name])
        statements += [f"CREATE MATERIALIZED VIEW {name} AS {query}",
                       f"CREATE UNIQUE INDEX {name}_uniq ON {name} ({key})"]
    return statements


def test_reference_workload_made_by_sql_is_adopted_with_no_ddl(workload_db: FreshDatabase, pg: Any,
                                                               tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for statement in _migration_sql():
        run(workload_db.dsn, statement)
    document = reference_document()
    for name, value in document["spec"]["database"]["settings"].items():
        run(workload_db.superuser_dsn, sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(workload_db.name), sql.Identifier(name), sql.Literal(value)))
    run(workload_db.superuser_dsn, sql.SQL("ALTER ROLE {} SET log_statement = 'ddl'").format(
        sql.Identifier(workload_db.owner)))
    names = [i["name"] for i in INDEXES] + list(workload.VIEW_QUERIES) + \
        [f"{v}_uniq" for v in workload.VIEW_QUERIES]
    before = oids(workload_db, *names)
    manifest = str(write_manifest(tmp_path, document))
    code, out, _ = cli(capsys, "plan", "-f", manifest, "--dsn", workload_db.dsn, "-o", "json")
    planned = json.loads(out)["resources"][0]["plan"]
    assert code == 0 and {s["kind"] for s in planned["steps"]} == {"adopt"} \
        and len(planned["steps"]) == len(document["spec"]["indexes"]) + len(document["spec"]["materializedViews"])
    assert planned["conflicts"] == []
    since = len(pg.log_text())
    code, out, err = cli(capsys, "apply", "-f", manifest, "--dsn", workload_db.dsn, "-o", "json")
    assert code == 0, out + err
    applied = json.loads(out)["resources"][0]
    assert {s["state"] for s in applied["indexes"]} == {"Adopted"}
    assert {v["message"] for v in applied["materializedViews"]} == {"Ready (adopted)"}
    assert oids(workload_db, *names) == before
    ddl_lines = [line for line in pg.log_text()[since:].splitlines()
                 if f"@{workload_db.name} " in line and "statement:" in line]
    # The ownership table only, besides the adoption probes: temporary objects in a rolled-back
    # transaction (an empty copy of a table's columns, a view of the declared query).
    probes = [line for line in ddl_lines if '"pg_temp".' in line or "CREATE TEMPORARY" in line]
    assert probes and all("marketplacedb" in line for line in ddl_lines if line not in probes), ddl_lines
    code, out, _ = cli(capsys, "plan", "-f", manifest, "--dsn", workload_db.dsn, "-o", "json")
    assert json.loads(out)["resources"][0]["plan"]["steps"] == []
    # Deleting the resource with deletionPolicy Drop keeps what existed before it (released).
    d = desired_state(the_spec(ddl=DROP), "prod/shop")
    with workload_db.connect() as conn:
        down = teardown_plan(d, gateway.observe(conn, d))
        assert all(o.ok for o in gateway.execute(conn, down, FAST))
    assert oids(workload_db, *names) == before
    assert sum(n.startswith("kept: ") for n in down.notes) == len(planned["steps"])  # every adopted object
    assert one(workload_db, "SELECT count(*) FROM marketplacedb.owned_objects") == 0


# --- finding 9: the operator cannot be locked out by database settings -------------------------------


def test_database_timeouts_cannot_lock_the_operator_out(workload_db: FreshDatabase) -> None:
    with pytest.raises(ValueError, match="statement_timeout: '1' is below 1s"):
        the_spec(database={**reference_document()["spec"]["database"], "settings": {"statement_timeout": "1"}})
    for setting in ("statement_timeout", "lock_timeout"):
        run(workload_db.superuser_dsn, sql.SQL("ALTER DATABASE {} SET {} = 1").format(
            sql.Identifier(workload_db.name), sql.Identifier(setting)))
    d = desired_state(the_spec(), OWNER)
    with connect(ConnInfo.from_dsn(workload_db.dsn)) as conn:  # the operator's own sessions
        outcomes = gateway.execute(conn, plan(d, gateway.observe(conn, d)), FAST)
        assert all(o.ok for o in outcomes), outcomes
        assert plan(d, gateway.observe(conn, d)).empty
    with workload_db.connect() as other:  # an ordinary session gets the 1 ms limit
        with pytest.raises(psycopg.errors.QueryCanceled):
            other.execute("SELECT pg_sleep(0.1)")


# --- finding 11: a lost session or a bad DSN: outcomes so far, one clear line, non-zero ----------------


def test_session_lost_mid_apply_reports_outcomes_and_one_line(workload_db: FreshDatabase, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    document = reference_document(ddl={"lockTimeout": "60s"}, materializedViews=[])
    manifest = str(write_manifest(tmp_path, document))
    killed: list[int] = []

    def kill_the_build() -> None:
        with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as admin:
            deadline = time.monotonic() + 60
            while not killed and time.monotonic() < deadline:
                row = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND usename = %s "
                                    "AND query LIKE 'CREATE INDEX CONCURRENTLY%%' AND wait_event_type = 'Lock'",
                                    [workload_db.name, workload_db.owner]).fetchone()
                if row:
                    admin.execute("SELECT pg_terminate_backend(%s)", [row[0]])
                    killed.append(row[0])
                time.sleep(0.05)

    with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as snapshot:
        snapshot.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")  # hidden from the owner: the build starts
        snapshot.execute("SELECT count(*) FROM categories")
        killer = threading.Thread(target=kill_the_build)
        killer.start()
        code, out, err = cli(capsys, "apply", "-f", manifest, "--dsn", workload_db.dsn)
        killer.join()
        snapshot.execute("COMMIT")
    assert killed and code == 1
    assert "Traceback" not in out + err and workload_db.owner_password not in out + err
    assert "FAILED index/public.idx_ai_accounts_available_category" in out
    assert "connection lost before this object" in out  # the objects after it: not attempted
    assert err.strip().splitlines() == [
        "database connection lost: the outcomes above are what ran; run apply again to converge"]
    code, out, err = cli(capsys, "apply", "-f", manifest, "--dsn", workload_db.dsn)
    assert code == 0, out + err  # re-running converges (the INVALID leftover is ours: dropped, rebuilt)
    assert not [i for i in observe(workload_db).indexes if not i.valid]


def test_bad_dsn_is_one_line_and_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = str(write_manifest(tmp_path, reference_document()))
    code, out, err = cli(capsys, "apply", "-f", manifest, "--dsn", "host=127.0.0.1 port=1 dbname=x user=u "
                                                                   "password=s3cret connect_timeout=2")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "s3cret" not in err
    code, out, err = cli(capsys, "plan", "-f", manifest, "--dsn", "host='unterminated password=s3cret")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "s3cret" not in err and "Traceback" not in err
