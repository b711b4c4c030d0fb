"""The schema engine against the real throwaway PostgreSQL 15 with the reference workload."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from harness.postgres import FreshDatabase
from marketplacedb_operator import workload
from marketplacedb_operator.api.v1alpha1 import MarketplaceDB, MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import ConnInfo, connect
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.sql import ddl, report
from marketplacedb_operator.sql.catalog import Catalog
from marketplacedb_operator.sql.plan import Desired, ExecutionPolicy, desired_state, plan, teardown_plan
from schema_fixtures import REFERENCE_INDEXES, reference_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "marketplacedb.yaml"
OWNER = "default/shop"
FAST = ExecutionPolicy(lock_timeout_seconds=2.0, statement_timeout_seconds=120.0, index_lock_timeout_seconds=20.0,
                       retries=2, retry_base_seconds=0.1)

INDEXES = REFERENCE_INDEXES  # the name the modules importing from here use


def reference_document(**spec_overrides: Any) -> dict[str, Any]:
    """examples/marketplacedb.yaml when it exists (the DSN overrides its connection), else the same
    resource built from docs/architecture.md#reference-workload and marketplacedb_operator.workload."""
    if EXAMPLE.exists() and not spec_overrides:
        docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d and d.get("kind") == "MarketplaceDB"]
        return dict(docs[0])
    database = {"host": "postgres.prod.svc", "dbname": "marketplace", "credentialsSecretRef": {"name": "owner"},
                "settings": {"work_mem": "64MB", "random_page_cost": "1.1", "effective_cache_size": "6GB"}}
    spec = reference_spec(database, refresh={"schedule": "*/5 * * * *"},
                          **{"ddl": {"lockTimeout": "2s"}, **spec_overrides})
    return {"apiVersion": "marketplacedb.io/v1alpha1", "kind": "MarketplaceDB",
            "metadata": {"name": "shop", "namespace": "default"}, "spec": spec}


def write_manifest(tmp_path: Path, document: dict[str, Any], name: str = "mdb.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def the_spec(**overrides: Any) -> MarketplaceDBSpec:
    return MarketplaceDBSpec.model_validate(reference_document(**overrides)["spec"])


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from marketplacedb_operator.cli import main  # the whole command, as a user runs it

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def observe(db: FreshDatabase, d: Desired | None = None) -> Catalog:
    """What the engine sees for `d` (default: the reference resource owned by OWNER)."""
    with db.connect() as conn:
        return gateway.observe(conn, d or desired_state(the_spec(), OWNER))


def apply(db: FreshDatabase, d: Desired, policy: ExecutionPolicy = FAST, **kw: Any) -> list[Any]:
    with db.connect() as conn:
        return gateway.execute(conn, plan(d, gateway.observe(conn, d)), policy, **kw)


def one(db: FreshDatabase, query: str, *params: Any) -> Any:
    with db.connect() as conn:
        row = conn.execute(query, params or None).fetchone()
        return row[0] if row else None


def index_oid(db: FreshDatabase, name: str) -> int | None:
    return one(db, "SELECT to_regclass(%s)::oid", f"public.{name}")  # type: ignore[no-any-return]


def assert_reference_state(cat: Catalog, owner: str) -> None:
    for spec in INDEXES:
        info = cat.index("public", spec["name"])
        assert info is not None and info.valid and info.ready, spec["name"]
        assert info.marker is not None and info.marker.owner == owner and info.marker.def_hash == info.def_hash
    for name, key in workload.VIEW_UNIQUE_KEYS.items():
        view = cat.view("public", name)
        assert view is not None and view.populated and view.marker is not None and view.marker.owner == owner
        key_index = cat.index("public", ddl.view_key_name(name))
        assert key_index is not None and key_index.valid and key_index.unique and key_index.key_columns == key
    assert not [i.name for i in cat.indexes if not i.valid]


# --- the reference resource, end to end through the CLI ----------------------------------------------


def test_apply_reference_then_nothing_more_to_do(workload_db: FreshDatabase, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    document = reference_document()
    owner = f"{document['metadata'].get('namespace', 'default')}/{document['metadata']['name']}"
    manifest = str(write_manifest(tmp_path, document))
    monkeypatch.setenv("MARKETPLACEDB_DSN", workload_db.dsn)  # not on the command line

    code, out, _ = cli(capsys, "plan", "-f", manifest, "-o", "json")
    assert code == 0
    first = json.loads(out)["resources"][0]
    assert first["database"] == workload_db.name
    built = {s["object"] for s in first["plan"]["steps"] if s["kind"] in ("create-index", "create-index-parent")}
    assert len(built) == len(document["spec"]["indexes"])  # a partitioned table's: one build per partition
    assert all("CONCURRENTLY" in s["sql"] for s in first["plan"]["steps"] if s["kind"] == "create-index")
    assert observe(workload_db).indexes == observe(workload_db).indexes  # plan executed nothing
    assert observe(workload_db).index("public", INDEXES[0]["name"]) is None

    code, out, err = cli(capsys, "apply", "-f", manifest, "-o", "json")
    assert code == 0, err
    applied = json.loads(out)["resources"][0]
    assert all(o["ok"] for o in applied["outcomes"]) and len(applied["outcomes"]) >= 7
    assert {s["state"] for s in applied["indexes"]} == {"Valid"}
    cat = observe(workload_db)
    assert_reference_state(cat, owner)
    assert workload_db.owner_password not in out + err

    # A second plan is empty, byte for byte the same each time; a second apply runs no DDL.
    code, out1, _ = cli(capsys, "plan", "-f", manifest, "-o", "json")
    code2, out2, _ = cli(capsys, "plan", "-f", manifest, "-o", "json")
    assert code == code2 == 0 and out1 == out2
    assert json.loads(out1)["resources"][0]["plan"]["steps"] == []
    code, out, _ = cli(capsys, "apply", "-f", manifest, "-o", "json")
    assert code == 0 and json.loads(out)["resources"][0]["outcomes"] == []
    after = observe(workload_db)
    assert [(i.name, i.def_hash, i.comment) for i in after.indexes] == \
        [(i.name, i.def_hash, i.comment) for i in cat.indexes]
    assert [index_oid(workload_db, s["name"]) for s in INDEXES] == \
        [index_oid(workload_db, s["name"]) for s in INDEXES]

    code, text, _ = cli(capsys, "plan", "-f", manifest)
    assert code == 0 and "no step(s)" in text and "advice: max_connections is" in text


def test_plan_json_is_byte_identical_on_a_fresh_database(workload_db: FreshDatabase, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    manifest = str(write_manifest(tmp_path, reference_document()))
    outputs = {cli(capsys, "plan", "-f", manifest, "--dsn", workload_db.dsn, "-o", "json")[1] for _ in range(3)}
    assert len(outputs) == 1
    steps = json.loads(outputs.pop())["resources"][0]["plan"]["steps"]
    assert len(steps) >= 12


def test_manual_approval_needs_the_plan_hash(workload_db: FreshDatabase, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    manifest = str(write_manifest(tmp_path, reference_document(ddl={"approval": "Manual", "lockTimeout": "2s"})))
    code, out, _ = cli(capsys, "plan", "-f", manifest, "--dsn", workload_db.dsn, "-o", "json")
    plan_hash = json.loads(out)["resources"][0]["plan"]["hash"]
    code, out, _ = cli(capsys, "apply", "-f", manifest, "--dsn", workload_db.dsn)
    assert code == 3 and f"--approve {plan_hash}" in out
    code, _, _ = cli(capsys, "apply", "-f", manifest, "--dsn", workload_db.dsn, "--approve", "0" * 64)
    assert code == 3
    assert observe(workload_db).index("public", INDEXES[0]["name"]) is None  # nothing ran
    code, out, _ = cli(capsys, "apply", "-f", manifest, "--dsn", workload_db.dsn, "--approve", plan_hash)
    assert code == 0, out
    assert observe(workload_db).index("public", INDEXES[0]["name"]) is not None


# --- drift ------------------------------------------------------------------------------------------


def test_drift_is_repaired_and_foreign_objects_left_alone(workload_db: FreshDatabase) -> None:
    d = desired_state(the_spec(), OWNER)
    assert all(o.ok for o in apply(workload_db, d))
    su = workload_db.superuser_dsn

    # Dropped by hand: recreated.
    run(su, "DROP INDEX idx_search_history_user_recent")
    p = plan(d, observe(workload_db))
    assert [s.kind for s in p.steps] == ["intent", "create-index", "mark"]
    assert all(o.ok for o in apply(workload_db, d))

    # Redefined by hand: a storage parameter on our very index is drift (replaced); a drop and
    # re-create that copies the marker comment is someone else's index (left alone, finding 1).
    before = index_oid(workload_db, "idx_popular_searches_ranking")
    run(su, "ALTER INDEX idx_popular_searches_ranking SET (fillfactor = 50)")
    marker = one(workload_db, "SELECT obj_description('idx_seller_orders_seller_status'::regclass)")
    run(su, "DROP INDEX idx_seller_orders_seller_status")
    run(su, "CREATE INDEX idx_seller_orders_seller_status ON seller_orders (status)")
    run(su, sql.SQL("COMMENT ON INDEX idx_seller_orders_seller_status IS {}").format(sql.Literal(marker)))
    copied = index_oid(workload_db, "idx_seller_orders_seller_status")
    statuses = {s.name: s for s in report.index_statuses(d, observe(workload_db))}
    assert statuses["idx_popular_searches_ranking"].state == "Drifted"
    assert statuses["idx_seller_orders_seller_status"].state == "Conflict"
    assert "copied or forged" in statuses["idx_seller_orders_seller_status"].message
    outcomes = apply(workload_db, d)
    assert [o.object for o in outcomes] == ["index/public.idx_popular_searches_ranking"]
    assert all(o.ok for o in outcomes), outcomes
    cat = observe(workload_db)
    assert index_oid(workload_db, "idx_popular_searches_ranking") != before
    assert "fillfactor" not in cat.index("public", "idx_popular_searches_ranking").definition  # type: ignore[union-attr]
    assert index_oid(workload_db, "idx_seller_orders_seller_status") == copied  # untouched
    assert not [i.name for i in cat.indexes if i.name.endswith(("__new", "__old"))]
    left = plan(d, cat)
    assert left.empty and "adopt: Replace" in left.conflicts[0]

    # Made by someone else under a declared name: a conflict, untouched.
    run(su, "DROP INDEX idx_search_history_user_recent")
    run(su, "CREATE INDEX idx_search_history_user_recent ON search_history (query)")
    oid = index_oid(workload_db, "idx_search_history_user_recent")
    p = plan(d, observe(workload_db))
    assert p.empty and "not created or adopted by this operator" in p.conflicts[1]
    assert apply(workload_db, d) == [] and index_oid(workload_db, "idx_search_history_user_recent") == oid


def run(dsn: str, query: str | sql.Composable) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query)  # type: ignore[arg-type]


def test_view_swap_while_a_reader_loops(workload_db: FreshDatabase, pg: Any) -> None:
    d = desired_state(the_spec(), OWNER)
    assert all(o.ok for o in apply(workload_db, d))
    reader = f"{workload_db.name}_reader"
    pg.create_role(reader, "reader-pw")
    try:
        run(workload_db.dsn, sql.SQL("GRANT SELECT ON mv_hot_products TO {}").format(sql.Identifier(reader)))
        latencies: list[float] = []
        errors: list[str] = []
        stop = threading.Event()

        def read() -> None:
            with psycopg.connect(pg.dsn(workload_db.name, reader, "reader-pw"), autocommit=True) as conn:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        conn.execute("SELECT count(*) FROM mv_hot_products").fetchone()
                    except psycopg.Error as exc:
                        errors.append(str(exc))
                    latencies.append(time.monotonic() - started)

        thread = threading.Thread(target=read)
        thread.start()
        time.sleep(0.3)
        changed = the_spec()
        changed.materialized_views[0].query = workload.VIEW_QUERIES["mv_hot_products"].replace("LIMIT 100", "LIMIT 50")
        d2 = desired_state(changed, OWNER)
        p = plan(d2, observe(workload_db))
        assert [s.kind for s in p.steps] == ["create-view", "swap-view"]
        outcomes = apply(workload_db, d2)
        time.sleep(0.3)
        stop.set()
        thread.join()
    finally:
        run(workload_db.superuser_dsn, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(reader)))
        pg.drop_role(reader)
    assert all(o.ok for o in outcomes), outcomes
    assert errors == []
    assert len(latencies) > 20
    # No read waited longer than the swap's lock may be held (its lock_timeout).
    assert max(latencies) < FAST.lock_timeout_seconds
    print(f"view swap: {len(latencies)} reads, max {max(latencies) * 1000:.1f} ms")
    assert one(workload_db, "SELECT count(*) FROM mv_hot_products") == 50
    cat = observe(workload_db)
    assert cat.view("public", "mv_hot_products__new") is None and plan(d2, cat).empty
    assert_reference_state(cat, OWNER)


# --- INVALID indexes ----------------------------------------------------------------------------------


def test_failed_unique_build_leaves_nothing_and_is_rebuilt(workload_db: FreshDatabase) -> None:
    run(workload_db.dsn, "CREATE TABLE dupes (id int PRIMARY KEY, code int)")
    run(workload_db.dsn, "INSERT INTO dupes SELECT g, g % 10 FROM generate_series(1, 100) g")
    unique = {"name": "idx_dupes_code", "table": "dupes", "columns": [{"name": "code"}], "unique": True}
    d = desired_state(the_spec(indexes=[unique], materializedViews=[]), OWNER)
    outcomes = apply(workload_db, d)
    failed = [o for o in outcomes if not o.ok]
    assert [o.object for o in failed] == ["index/public.idx_dupes_code"]
    assert "could not create unique index" in failed[0].message and "23505" in failed[0].message
    assert all(o.ok for o in outcomes if o.object.startswith("setting/"))  # one failure does not stop the others
    cat = observe(workload_db)
    assert cat.index("public", "idx_dupes_code") is None  # the INVALID leftover was dropped CONCURRENTLY
    assert report.index_statuses(d, cat, outcomes)[0].state == "Failed"
    run(workload_db.dsn, "DELETE FROM dupes WHERE id > 10")
    assert all(o.ok for o in apply(workload_db, d))
    info = observe(workload_db).index("public", "idx_dupes_code")
    assert info is not None and info.valid and info.unique


def _cancelled_build(db: FreshDatabase, name: str, columns: str = "user_id") -> None:
    """A CREATE INDEX CONCURRENTLY on search_history cancelled by a lock timeout: INVALID `name`."""
    with psycopg.connect(db.superuser_dsn, autocommit=True) as blocker, \
            psycopg.connect(db.dsn, autocommit=True) as hand:
        blocker.execute("BEGIN")
        blocker.execute("UPDATE search_history SET results_count = results_count WHERE id = 1")
        hand.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            hand.execute(sql.SQL("CREATE INDEX CONCURRENTLY {} ON search_history ({})").format(
                sql.Identifier(name), sql.SQL(columns)))
        blocker.execute("COMMIT")


def test_someone_elses_cancelled_build_is_left_alone_until_replace(workload_db: FreshDatabase) -> None:
    d = desired_state(the_spec(materializedViews=[]), OWNER)
    _cancelled_build(workload_db, "idx_search_history_user_recent")
    oid = index_oid(workload_db, "idx_search_history_user_recent")
    cat = observe(workload_db, d)
    info = cat.index("public", "idx_search_history_user_recent")
    assert info is not None and not info.valid and info.record is None
    status = {s.name: s for s in report.index_statuses(d, cat)}["idx_search_history_user_recent"]
    assert status.state == "Conflict"
    p = plan(d, cat)
    assert not [s for s in p.steps if s.object == "index/public.idx_search_history_user_recent"]
    assert any("INVALID" in c and "adopt: Replace" in c for c in p.conflicts)
    assert all(o.ok for o in apply(workload_db, d))
    assert index_oid(workload_db, "idx_search_history_user_recent") == oid  # never dropped

    # The user opts in: built under a temporary name, swapped in, the old one dropped.
    replace = [{**i, "adopt": "Replace"} if i["name"] == "idx_search_history_user_recent" else i for i in INDEXES]
    d2 = desired_state(the_spec(materializedViews=[], indexes=replace), OWNER)
    steps = [s.kind for s in plan(d2, observe(workload_db, d2)).steps
             if s.object == "index/public.idx_search_history_user_recent"]
    assert steps == ["intent", "create-index", "swap-index", "drop-index"]
    assert all(o.ok for o in apply(workload_db, d2))
    info = observe(workload_db, d2).index("public", "idx_search_history_user_recent")
    assert info is not None and info.valid and info.owned_by(OWNER) and info.oid != oid
    assert "(user_id, created_at DESC)" in info.definition


def test_our_interrupted_build_is_recognised_by_its_intent_record(workload_db: FreshDatabase) -> None:
    """The operator dies during its CONCURRENTLY build: the INVALID `__new` it leaves is bound to
    the intent record written before the build (younger catalog row, same table), so it is dropped
    and rebuilt; the same name made by someone before the intent is not."""
    only = [i for i in INDEXES if i["name"] == "idx_search_history_user_recent"]
    d = desired_state(the_spec(materializedViews=[], indexes=only), OWNER)
    tmp = "idx_search_history_user_recent__new"
    intent = [s for s in plan(d, observe(workload_db, d)).steps if s.kind == "intent"][0]
    with workload_db.connect() as conn:
        gateway.ensure_records(conn, FAST)
        with conn.transaction():
            for statement in intent.statements:
                conn.execute(statement)
    _cancelled_build(workload_db, tmp, "user_id, created_at DESC")
    cat = observe(workload_db, d)
    leftover = cat.index("public", tmp)
    assert leftover is not None and not leftover.valid and leftover.owned_by(OWNER)
    assert [s.kind for s in plan(d, cat).steps if s.object.startswith("index/")] == \
        ["drop-index", "intent", "create-index", "mark"]
    assert all(o.ok for o in apply(workload_db, d))
    cat = observe(workload_db, d)
    assert cat.index("public", tmp) is None and cat.index("public", only[0]["name"]).owned_by(OWNER)  # type: ignore[union-attr]

    # Someone's own `__new` made while no build of ours is pending: never ours, never dropped.
    run(workload_db.superuser_dsn, "DROP INDEX idx_search_history_user_recent")
    run(workload_db.dsn, f"CREATE INDEX {tmp} ON search_history (query)")
    oid = index_oid(workload_db, tmp)
    p = plan(d, observe(workload_db, d))
    assert not p.steps and any(tmp in c and "temporary name" in c for c in p.conflicts)
    assert any(n.startswith(f"left alone: index public.{tmp}") for n in p.notes)
    apply(workload_db, d)
    assert index_oid(workload_db, tmp) == oid


# --- blocking sessions, locks, write load -----------------------------------------------------------


def _operator_sessions(db: FreshDatabase) -> list[Any]:
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT a.pid, l.locktype, l.mode FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid "
            "WHERE a.datname = %s AND a.application_name = 'marketplacedb-operator'", [db.name]).fetchall()


def grant_stats(db: FreshDatabase) -> None:
    """Other roles' session state and transaction age are visible with pg_read_all_stats (documented
    requirement for the operator's role; without it only the blocking pid is reported)."""
    run(db.superuser_dsn, sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(db.owner)))


def test_idle_in_transaction_session_is_waited_for_and_reported(workload_db: FreshDatabase) -> None:
    grant_stats(workload_db)
    info = ConnInfo.from_dsn(workload_db.dsn)
    only = {"name": "idx_seller_orders_seller_status", "table": "seller_orders",
            "columns": [{"name": "seller_id"}, {"name": "status"}, {"name": "created_at", "order": "desc"}]}
    d = desired_state(the_spec(indexes=[only], materializedViews=[], database=the_spec().database.model_copy(
        update={"settings": {}})), OWNER)
    with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as idle:
        idle.execute("BEGIN")
        idle.execute("UPDATE seller_orders SET status = status WHERE id = 1")
        idle_pid = idle.info.backend_pid
        result: list[Any] = []
        with connect(info) as conn:
            the_plan = plan(d, gateway.observe(conn, d))
            worker = threading.Thread(target=lambda: result.extend(
                gateway.execute(conn, the_plan, FAST, watch=lambda: connect(info))))
            worker.start()
            time.sleep(1.5)
            with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as observer:
                seen = gateway.blocking_sessions(observer, min_age_seconds=1.0)
            assert idle_pid in [s.pid for s in seen]
            assert worker.is_alive()  # the build waits within its policy (20 s)
            idle.execute("COMMIT")
            worker.join(timeout=30)
        assert not worker.is_alive()
    [outcome] = result
    assert outcome.ok, outcome
    blocker = {s.pid: s for s in outcome.blocking}[idle_pid]
    assert blocker.age_seconds >= 1.0 and blocker.state.startswith("idle in transaction")
    assert f"pid {idle_pid}" in outcome.message
    cat = observe(workload_db)
    assert not [i.name for i in cat.indexes if not i.valid]
    assert cat.index("public", "idx_seller_orders_seller_status").valid  # type: ignore[union-attr]
    assert _operator_sessions(workload_db) == []


def test_build_gives_up_within_its_policy_and_leaves_nothing(workload_db: FreshDatabase) -> None:
    only = {"name": "idx_search_history_user_recent", "table": "search_history",
            "columns": [{"name": "user_id"}, {"name": "created_at", "order": "desc"}]}
    d = desired_state(the_spec(indexes=[only], materializedViews=[]), OWNER)
    grant_stats(workload_db)
    tight = ExecutionPolicy(lock_timeout_seconds=1, statement_timeout_seconds=60, index_lock_timeout_seconds=0.5,
                            retries=1, retry_base_seconds=0.05)
    with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as idle:
        idle.execute("BEGIN")
        idle.execute("UPDATE search_history SET results_count = results_count WHERE id = 1")
        started = time.monotonic()
        outcomes = apply(workload_db, d, tight)
        elapsed = time.monotonic() - started
        idle_pid = idle.info.backend_pid
        idle.execute("COMMIT")
    failed = {o.object: o for o in outcomes}["index/public.idx_search_history_user_recent"]
    assert not failed.ok and "lock timeout" in failed.message
    assert "could not be dropped yet" in failed.message  # the same blocker holds the cleanup drop
    assert idle_pid in [s.pid for s in failed.blocking]
    assert elapsed < 30
    # Once the blocker is gone, the next run leaves exactly one valid index and nothing else.
    assert all(o.ok for o in apply(workload_db, d, tight))
    cat = observe(workload_db)
    assert not [i.name for i in cat.indexes if not i.valid]
    assert cat.index("public", "idx_search_history_user_recent").valid  # type: ignore[union-attr]
    assert _operator_sessions(workload_db) == []


def test_writes_are_never_blocked_while_every_index_is_built(workload_db: FreshDatabase) -> None:
    d = desired_state(the_spec(), OWNER)
    latencies: list[float] = []
    errors: list[str] = []
    stop = threading.Event()
    writes = [
        "UPDATE ai_accounts SET sold_count = sold_count + 1 WHERE id = %s",
        "UPDATE seller_products SET sold_count = sold_count + 1, is_available = true WHERE id = %s",
        "UPDATE seller_orders SET status = 'paid' WHERE id = %s",
        "INSERT INTO search_history (user_id, query) VALUES (%s, 'load')",
        "UPDATE popular_searches SET search_count = search_count + 1 WHERE id = %s",
    ]

    def write() -> None:
        with psycopg.connect(workload_db.dsn, autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    conn.execute(writes[n % len(writes)], [1 + n % 100])  # type: ignore[call-overload]
                except psycopg.Error as exc:
                    errors.append(str(exc))
                latencies.append(time.monotonic() - started)

    threads = [threading.Thread(target=write) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    outcomes = apply(workload_db, d)
    build_seconds = time.monotonic() - started
    time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join()
    assert all(o.ok for o in outcomes), outcomes
    assert errors == [] and len(latencies) > 100
    assert max(latencies) < FAST.lock_timeout_seconds
    print(f"write load: {len(latencies)} writes during {build_seconds:.2f}s of DDL, "
          f"max {max(latencies) * 1000:.1f} ms")
    assert_reference_state(observe(workload_db), OWNER)


# --- settings, teardown -------------------------------------------------------------------------------


def test_database_settings_and_advice(workload_db: FreshDatabase) -> None:
    d = desired_state(the_spec(indexes=[], materializedViews=[]), OWNER)
    assert all(o.ok for o in apply(workload_db, d))
    assert one(workload_db, "SHOW work_mem") == "64MB"
    assert one(workload_db, "SHOW random_page_cost") == "1.1"
    cat = observe(workload_db)
    assert dict(cat.database_settings)["effective_cache_size"] == "6GB"
    assert plan(d, cat).empty
    advice = report.advice(d, cat)
    assert any(a.startswith("max_connections is ") for a in advice)
    assert one(workload_db, "SELECT setting FROM pg_settings WHERE name = 'max_connections'") == \
        cat.server["max_connections"]  # reported, not changed
    # Dropping a setting from the spec resets it (only because this resource applied it).
    fewer = desired_state(the_spec(indexes=[], materializedViews=[], database={
        **reference_document()["spec"]["database"], "settings": {"work_mem": "64MB"}}), OWNER,
        previously_managed_settings=["work_mem", "random_page_cost", "effective_cache_size"])
    assert all(o.ok for o in apply(workload_db, fewer))
    assert dict(observe(workload_db).database_settings) == {"work_mem": "64MB"}


def test_teardown_drops_only_what_this_resource_created(workload_db: FreshDatabase) -> None:
    spec = the_spec(ddl={"deletionPolicy": "Drop", "lockTimeout": "2s"})
    d = desired_state(spec, OWNER)
    assert all(o.ok for o in apply(workload_db, d))
    marker = one(workload_db, "SELECT obj_description('idx_ai_accounts_available_category'::regclass)")
    su = workload_db.superuser_dsn
    run(su, "CREATE INDEX idx_dba_own ON ai_accounts (name)")
    run(su, "CREATE SCHEMA IF NOT EXISTS marketplacedb")
    run(su, "CREATE TABLE marketplacedb.refresh_state (view_name text PRIMARY KEY)")
    run(su, "CREATE INDEX state_idx ON marketplacedb.refresh_state (view_name)")
    run(su, sql.SQL("COMMENT ON INDEX marketplacedb.state_idx IS {}").format(sql.Literal(marker)))
    with workload_db.connect() as conn:
        teardown = teardown_plan(d, gateway.observe(conn, d))
        outcomes = gateway.execute(conn, teardown, FAST)
    assert all(o.ok for o in outcomes), outcomes
    cat = observe(workload_db)
    assert not [i for i in cat.indexes if i.marker is not None]
    assert cat.views == ()
    assert index_oid(workload_db, "idx_dba_own") is not None
    with psycopg.connect(su) as conn:
        assert conn.execute("SELECT to_regclass('marketplacedb.state_idx') IS NOT NULL").fetchone() == (True,)
    assert "work_mem" not in dict(cat.database_settings)
    assert teardown_plan(desired_state(the_spec(), OWNER), cat).empty  # Retain never drops


def test_view_key_must_be_a_returned_column(workload_db: FreshDatabase) -> None:
    doc = reference_document(materializedViews=[{"name": "mv_bad", "query": "SELECT id, name FROM categories",
                                                 "uniqueKey": ["slug"]}], indexes=[])
    d = desired_state(MarketplaceDB.model_validate(doc).spec, OWNER)
    outcomes = apply(workload_db, d)
    [bad] = [o for o in outcomes if o.object == "view/public.mv_bad"]
    assert not bad.ok and "spec.materializedViews[0].uniqueKey" in bad.message and "'slug'" in bad.message
    assert observe(workload_db).view("public", "mv_bad") is None
    with workload_db.connect() as conn:
        assert gateway.check_view_columns(conn, "SELECT id, name AS label FROM categories") == ["id", "label"]
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_lock_timeout_retries_wait_by_the_shared_backoff_policy(workload_db: FreshDatabase) -> None:
    """A DROP that times out on a reader's lock is retried after backoff.delay(): the step capped by
    nothing but the retry count, jittered between half of it and all of it (the reconcile backoff's
    policy), never the 1.5x overshoot the runner had on its own."""
    import random

    from marketplacedb_operator import backoff

    views = [{"name": "mv_category_counts", "query": workload.VIEW_QUERIES["mv_category_counts"],
              "uniqueKey": list(workload.VIEW_UNIQUE_KEYS["mv_category_counts"])}]
    d = desired_state(the_spec(indexes=[], materializedViews=views, ddl={"deletionPolicy": "Drop"}), OWNER)
    assert all(o.ok for o in apply(workload_db, d))
    policy = ExecutionPolicy(lock_timeout_seconds=0.2, statement_timeout_seconds=30, index_lock_timeout_seconds=1,
                             retries=3, retry_base_seconds=1.0)
    slept: list[float] = []
    with psycopg.connect(workload_db.superuser_dsn) as reader, workload_db.connect() as conn:
        reader.execute("SELECT count(*) FROM public.mv_category_counts")  # ACCESS SHARE until rollback
        outcomes = gateway.execute(conn, teardown_plan(d, gateway.observe(conn, d)), policy,
                                   sleep=slept.append, rng=random.Random(20))
        reader.rollback()
    failed = [o for o in outcomes if not o.ok]
    assert failed and "lock" in failed[0].message.lower() and failed[0].attempts == 4, outcomes
    expected = random.Random(20)
    assert slept == [backoff.delay(1.0, attempt, rng=expected) for attempt in range(3)]
    assert all(2**attempt / 2 <= pause <= 2**attempt for attempt, pause in enumerate(slept))
