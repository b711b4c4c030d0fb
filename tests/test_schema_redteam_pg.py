"""Issue 12, second round: the red team's attacks on ownership records, on a real PostgreSQL 15.

Each test reproduces one finding (numbered as in the red-team report) and asserts the observable
effect: the DBA's object still exists with the same OID, the refusal names the reason, the message
does not suggest a rebuild."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import psycopg.sql
import pydantic
import pytest

from harness.postgres import FreshDatabase
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.sql import ownership
from marketplacedb_operator.sql.plan import ExecutionPolicy, Plan, StepOutcome, desired_state, plan, teardown_plan

OWNER = "default/shop"
FAST = ExecutionPolicy(lock_timeout_seconds=1.0, statement_timeout_seconds=60.0, index_lock_timeout_seconds=1.0,
                       retries=0, retry_base_seconds=0.1)


def spec(indexes: list[dict[str, Any]], views: list[dict[str, Any]] | None = None, policy: str = "Drop") -> Any:
    return MarketplaceDBSpec.model_validate({
        "database": {"host": "h", "dbname": "d", "credentialsSecretRef": {"name": "s"}},
        "ddl": {"lockTimeout": "1s", "deletionPolicy": policy},
        "indexes": indexes, "materializedViews": views or []})


def run(dsn: str, query: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query)  # type: ignore[arg-type]


def one(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None


def do_plan(db: FreshDatabase, d: Any) -> Plan:
    with db.connect() as conn:
        return plan(d, gateway.observe(conn, d))


def do_apply(db: FreshDatabase, d: Any) -> tuple[Plan, list[StepOutcome]]:
    with db.connect() as conn:
        p = plan(d, gateway.observe(conn, d))
        return p, gateway.execute(conn, p, FAST)


def records(db: FreshDatabase) -> list[tuple[str, str, int | None]]:
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT name, how, oid::int FROM marketplacedb.owned_objects ORDER BY name").fetchall()
    return [(str(n), str(h), o) for n, h, o in rows]


INDEX = [{"name": "idx", "table": "t", "columns": [{"name": "a"}]}]


# --- finding 1: a stale "building" intent never makes a valid index ours -------------------------


def test_failed_build_forgets_its_intent(fresh_db: FreshDatabase) -> None:
    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int); INSERT INTO t SELECT g, g FROM generate_series(1, 1000) g")
    d = desired_state(spec(INDEX), OWNER)
    blocker = psycopg.connect(db.superuser_dsn)  # an old snapshot: the build gives up after lockTimeout
    try:
        blocker.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        blocker.execute("SELECT count(*) FROM pg_class")
        time.sleep(1.5)
        _, out = do_apply(db, d)
    finally:
        blocker.rollback()
        blocker.close()
    assert not out[0].ok
    assert one(db.dsn, "SELECT to_regclass('idx__new')") is None  # the build left nothing...
    assert records(db) == []  # ...and no intent row that could bind an index made there later


def test_stale_intent_never_binds_a_valid_index(fresh_db: FreshDatabase) -> None:
    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int)")
    d = desired_state(spec(INDEX), OWNER)
    with db.connect() as conn:  # a stale intent (e.g. a crash right after it was written)
        assert gateway.ensure_records(conn, FAST) == ""
        conn.execute(ownership.intent(OWNER, "public", "idx__new", "public", "t", "h"))
    run(db.superuser_dsn, "CREATE INDEX dba_b ON t (b); ALTER INDEX dba_b RENAME TO idx__new")
    oid = one(db.dsn, "SELECT 'idx__new'::regclass::oid")
    p = do_plan(db, d)
    assert not any("idx__new CONCURRENTLY" in s for s in p.descriptions() if s.startswith("drop")), p.descriptions()
    assert any("temporary name idx__new is taken" in c for c in p.conflicts), p.conflicts
    do_apply(db, d)
    with db.connect() as conn:
        p = teardown_plan(d, gateway.observe(conn, d))
        gateway.execute(conn, p, FAST)
    assert one(db.dsn, "SELECT to_regclass('idx__new')::oid") == oid


def test_a_build_that_finishes_after_the_operator_died_is_ours_by_its_pinned_oid(fresh_db: FreshDatabase) -> None:
    """The other side of finding 1: the operator is SIGKILLed while its CREATE INDEX CONCURRENTLY
    waits; the orphaned backend finishes the build, leaving a *valid* index at the temporary name.
    The build's watcher pinned that index's OID on the intent (ownership.pin_build, read from the
    build's own pg_stat_progress_create_index row), so the next plan sweeps and rebuilds it instead
    of a permanent "temporary name taken" conflict (found by tests/reliability/test_rel_kill.py)."""
    import threading

    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int); INSERT INTO t SELECT g, g FROM generate_series(1, 1000) g")
    d = desired_state(spec(INDEX), OWNER)
    with db.connect() as conn:
        assert gateway.ensure_records(conn, FAST) == ""
        conn.execute(ownership.intent(OWNER, "public", "idx__new", "public", "t", "h"))
    snapshot = psycopg.connect(db.superuser_dsn)  # the build's wait phase waits for this snapshot
    snapshot.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    snapshot.execute("SELECT count(*) FROM pg_class")
    builder = psycopg.connect(db.dsn, autocommit=True)  # plays the build of the operator that dies
    build = threading.Thread(target=builder.execute, args=("CREATE INDEX CONCURRENTLY idx__new ON t (a)",))
    try:
        build.start()
        deadline = time.monotonic() + 60
        pinned = 0
        while not pinned and time.monotonic() < deadline:  # what the executor's watcher does
            with db.connect() as watcher:
                pinned = watcher.execute(ownership.pin_build(builder.info.backend_pid)).rowcount
            time.sleep(0.1)
        assert pinned == 1
    finally:
        snapshot.rollback()
        snapshot.close()
        build.join(60)
        builder.close()
    assert one(db.dsn, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx__new'::regclass")
    p = do_plan(db, d)
    assert not p.conflicts, p.conflicts
    assert any(s.startswith("drop") and "idx__new" in s for s in p.descriptions()), p.descriptions()
    _, out = do_apply(db, d)
    assert all(o.ok for o in out), out
    assert one(db.dsn, "SELECT to_regclass('idx__new')") is None
    assert one(db.dsn, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx'::regclass")


@pytest.mark.parametrize("columns,finished", [("a", True), ("b", False)])
def test_an_unpinned_build_that_finished_is_completed_only_when_identical(
        fresh_db: FreshDatabase, columns: str, finished: bool) -> None:
    """The operator died before its watcher pinned the OID, and the orphaned build finished: the
    valid index at the temporary name, bound by our intent for this very spec, is completed (renamed
    into place, no rebuild) when the server deparses it exactly as the declared index; anything else
    there (a DBA's index on another column) stays a conflict, left alone."""
    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int)")
    d = desired_state(spec(INDEX), OWNER)
    with db.connect() as conn:
        assert gateway.ensure_records(conn, FAST) == ""
        conn.execute(ownership.intent(OWNER, "public", "idx__new", "public", "t", d.indexes[0].hash))
    run(db.dsn, f"CREATE INDEX CONCURRENTLY idx__new ON t ({columns})")
    oid = one(db.dsn, "SELECT 'idx__new'::regclass::oid")
    p, out = do_apply(db, d)
    if finished:
        assert not p.conflicts and all(o.ok for o in out), (p.conflicts, out)
        assert not any(s.startswith(("build", "drop")) for s in p.descriptions()), p.descriptions()
        assert one(db.dsn, "SELECT 'idx'::regclass::oid") == oid
        assert ("idx", "created", oid) in records(db)
    else:
        assert any("temporary name idx__new is taken" in c for c in p.conflicts), p.conflicts
        assert one(db.dsn, "SELECT to_regclass('idx__new')::oid") == oid


def test_a_dba_index_at_the_temporary_name_is_never_pinned(fresh_db: FreshDatabase) -> None:
    """pin_build binds only the index that backend `pid` is building right now."""
    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int)")
    with db.connect() as conn:
        assert gateway.ensure_records(conn, FAST) == ""
        conn.execute(ownership.intent(OWNER, "public", "idx__new", "public", "t", "h"))
        run(db.superuser_dsn, "CREATE INDEX idx__new ON t (b)")
        assert conn.execute(ownership.pin_build(conn.info.backend_pid)).rowcount == 0
    assert records(db) == [("idx__new", "building", None)]


# --- finding 2: declared names that are another declared object's temporary name -----------------


@pytest.mark.parametrize("name", ["x__new", "x__old", "v__key"])
def test_temporary_suffixes_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        spec([{"name": "x", "table": "t", "columns": [{"name": "a"}]},
              {"name": name, "table": "t", "columns": [{"name": "b"}]}])
    assert "indexes.1.name" in str(caught.value) and "reserved for the operator's temporary names" in str(caught.value)
    with pytest.raises(pydantic.ValidationError, match="materializedViews.0.name"):
        spec([], [{"name": name, "query": "SELECT 1 AS a", "uniqueKey": ["a"]}])


def test_intent_never_overwrites_a_live_objects_record(fresh_db: FreshDatabase) -> None:
    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int)")
    _, out = do_apply(db, desired_state(spec(INDEX), OWNER))
    assert all(o.ok for o in out)
    oid = one(db.dsn, "SELECT 'idx'::regclass::oid")
    with db.connect() as conn:
        conn.execute(ownership.intent(OWNER, "public", "idx", "public", "t", "h"))
    assert records(db) == [("idx", "created", oid)]


# --- findings 3 and 4: an ownership table another role can write is refused ---------------------


FORGED_TABLE = (
    "CREATE SCHEMA marketplacedb; "
    "CREATE TABLE marketplacedb.owned_objects (schema_name text NOT NULL, name text NOT NULL, "
    "kind text NOT NULL, owner text NOT NULL, oid oid, table_oid oid, spec_hash text NOT NULL DEFAULT '', "
    "def_hash text NOT NULL DEFAULT '', how text NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now(), "
    "PRIMARY KEY (schema_name, name)); GRANT ALL ON SCHEMA marketplacedb TO PUBLIC; "
    "GRANT ALL ON marketplacedb.owned_objects TO PUBLIC")


def _refused(db: FreshDatabase, d: Any) -> str:
    with db.connect() as conn, pytest.raises(gateway.ObservationFailed) as caught:
        gateway.observe(conn, d)
    message = str(caught.value)
    assert "cannot be trusted" in message and db.owner not in message
    return message


def test_precreated_forged_records_table_is_refused(fresh_db: FreshDatabase) -> None:
    db = fresh_db
    mallory = f"mallory_{db.name}"
    run(db.dsn, "CREATE TABLE t (a int, b int); CREATE INDEX dba_idx ON t (b)")
    oid, toid = one(db.dsn, "SELECT 'dba_idx'::regclass::oid"), one(db.dsn, "SELECT 't'::regclass::oid")
    run(db.superuser_dsn, f"CREATE ROLE {mallory}; GRANT CREATE ON DATABASE {db.name} TO {mallory}")
    try:
        with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(mallory)))
            conn.execute(FORGED_TABLE)
            conn.execute("INSERT INTO marketplacedb.owned_objects VALUES ('public', 'dba_idx', 'index', %s, %s, %s, "
                         "'', '', 'created', now())", [OWNER, oid, toid])
        d = desired_state(spec(INDEX), OWNER)
        message = _refused(db, d)
        assert "schema is owned by another role" in message and "one operator role per database" in message
        with db.connect() as conn:  # execution checks it again before the first step
            assert "cannot be trusted" in gateway.ensure_records(conn, FAST)
        assert one(db.dsn, "SELECT to_regclass('dba_idx')::oid") == oid
    finally:
        run(db.superuser_dsn, f"DROP OWNED BY {mallory} CASCADE; DROP ROLE {mallory}")


@pytest.mark.parametrize("tamper, reason", [
    ("GRANT INSERT ON marketplacedb.owned_objects TO PUBLIC", "another role may write to it"),
    ("GRANT UPDATE (owner, oid) ON marketplacedb.owned_objects TO PUBLIC", "another role may write to it"),
    ("CREATE FUNCTION public.f() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'; "
     "CREATE TRIGGER tr BEFORE INSERT ON marketplacedb.owned_objects FOR EACH ROW EXECUTE FUNCTION public.f()",
     "it has triggers"),
    ("CREATE RULE r AS ON INSERT TO marketplacedb.owned_objects DO ALSO NOTIFY x", "it has rules"),
    ("ALTER TABLE marketplacedb.owned_objects ENABLE ROW LEVEL SECURITY", "row security"),
    ("ALTER TABLE marketplacedb.owned_objects OWNER TO postgres", "it is owned by another role"),
])
def test_tampered_records_table_is_refused(fresh_db: FreshDatabase, tamper: str, reason: str) -> None:
    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int)")
    d = desired_state(spec(INDEX), OWNER)
    _, out = do_apply(db, d)
    assert all(o.ok for o in out)
    run(db.superuser_dsn, tamper)
    assert reason in _refused(db, d)


def test_second_operator_role_gets_a_clear_refusal(fresh_db: FreshDatabase) -> None:
    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int)")
    _, out = do_apply(db, desired_state(spec(INDEX), OWNER))
    assert all(o.ok for o in out)
    team2 = f"team2_{db.name}"
    run(db.superuser_dsn, f"CREATE ROLE {team2} LOGIN PASSWORD 'pw'; GRANT CREATE ON DATABASE {db.name} TO {team2}; "
                          f"GRANT ALL ON SCHEMA public TO {team2}")
    try:
        run(db.superuser_dsn, f"SET ROLE {team2}; CREATE TABLE public.t2 (a int)")
        dsn2 = db.dsn.replace(db.owner, team2, 1).replace(db.owner_password, "pw")
        d2 = desired_state(spec([{"name": "idx2", "table": "t2", "columns": [{"name": "a"}]}]), "team2/other")
        with psycopg.connect(dsn2, autocommit=True) as conn, pytest.raises(gateway.ObservationFailed) as caught:
            gateway.observe(conn, d2)
        assert "one operator role per database" in str(caught.value) and team2 not in str(caught.value)
    finally:
        run(db.superuser_dsn, f"DROP OWNED BY {team2} CASCADE; DROP ROLE {team2}")


# --- finding 5: an owned index a DBA turned into a constraint -----------------------------------


def test_index_backing_a_constraint_is_never_swapped_nor_dropped(fresh_db: FreshDatabase) -> None:
    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int); INSERT INTO t SELECT g, g FROM generate_series(1, 100) g")
    unique = [{"name": "idx", "table": "t", "columns": [{"name": "a"}], "unique": True}]
    _, out = do_apply(db, desired_state(spec(unique), OWNER))
    assert all(o.ok for o in out)
    run(db.superuser_dsn, "ALTER TABLE t ADD CONSTRAINT idx UNIQUE USING INDEX idx")
    oid = one(db.dsn, "SELECT 'idx'::regclass::oid")
    changed = [{**unique[0], "columns": [{"name": "a", "order": "desc"}]}]
    p, out = do_apply(db, desired_state(spec(changed), OWNER))
    assert p.steps == () and any("implements constraint idx" in c and "DROP CONSTRAINT" in c for c in p.conflicts)
    assert one(db.dsn, "SELECT conname FROM pg_constraint WHERE conindid = 'idx'::regclass") == "idx"
    gone = desired_state(spec([]), OWNER)
    with db.connect() as conn:
        p = teardown_plan(gone, gateway.observe(conn, gone))
        out = gateway.execute(conn, p, FAST)
    assert all(o.ok for o in out), out  # teardown still finishes
    assert any("idx: it implements constraint idx" in n for n in p.notes), p.notes
    assert one(db.dsn, "SELECT to_regclass('idx')::oid") == oid


# --- finding 7: an adoption that could not be compared never suggests a rebuild -----------------


def test_uncomparable_adoption_does_not_suggest_replace(fresh_db: FreshDatabase) -> None:
    db = fresh_db
    run(db.dsn, "CREATE TABLE t (a int, b int); CREATE INDEX idx ON t (a)")
    run(db.superuser_dsn, f"ALTER DATABASE {db.name} SET default_transaction_read_only = on")
    try:
        p = do_plan(db, desired_state(spec(INDEX), OWNER))
    finally:
        run(db.superuser_dsn, f"BEGIN READ WRITE; ALTER DATABASE {db.name} RESET default_transaction_read_only; "
                              "COMMIT")
    assert p.steps == ()
    [conflict] = p.conflicts
    assert "could not be compared" in conflict and "read-only transaction" in conflict
    assert "Replace" not in conflict and "differs" not in conflict


# --- finding 6: a view swap keeps the exact ACL, carries comments, refuses what it would lose ---

VIEW_STATE = (
    "SELECT json_build_object('acl', (SELECT relacl::text FROM pg_class WHERE oid = 'v'::regclass), "
    "'comments', (SELECT json_agg(json_build_array(c.relname, obj_description(c.oid, 'pg_class')) ORDER BY c.relname) "
    "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'v'::regclass))")


VIEW_TABLE = "CREATE TABLE t (a int PRIMARY KEY, b int); INSERT INTO t SELECT g, g % 7 FROM generate_series(1, 50) g"


def run_ids(dsn: str, template: str, **names: str) -> None:
    """`template` with {name} placeholders filled in as identifiers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL(template).format(  # type: ignore[arg-type]
            **{k: psycopg.sql.Identifier(v) for k, v in names.items()}))


def _view(query: str) -> Any:
    return desired_state(spec([], [{"name": "v", "query": query, "uniqueKey": ["a"]}]), OWNER)


def test_view_swap_keeps_the_exact_acl_and_index_comments(fresh_db: FreshDatabase) -> None:
    db = fresh_db
    reader = f"reader_{db.name}"
    run(db.dsn, VIEW_TABLE)
    _, out = do_apply(db, _view("SELECT a, b FROM t"))
    assert all(o.ok for o in out)
    run(db.superuser_dsn, f"CREATE ROLE {reader}")
    try:
        run_ids(db.dsn, "CREATE INDEX dba_v_b ON v (b); COMMENT ON INDEX dba_v_b IS 'dba: hot path'; "
                        "GRANT SELECT ON v TO {reader}; REVOKE SELECT ON v FROM {reader}; "
                        "ALTER DEFAULT PRIVILEGES GRANT SELECT, UPDATE ON TABLES TO {reader}; "
                        "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC", reader=reader)
        before = one(db.dsn, VIEW_STATE)
        _, out = do_apply(db, _view("SELECT a, b, a + b AS c FROM t"))
        assert all(o.ok for o in out), out
        assert one(db.dsn, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'v'::regclass AND attname = 'c'") == 1
        assert one(db.dsn, VIEW_STATE) == before  # no privilege added by default privileges, comment kept
    finally:
        run_ids(db.dsn, "ALTER DEFAULT PRIVILEGES REVOKE ALL ON TABLES FROM {reader}; "
                        "ALTER DEFAULT PRIVILEGES REVOKE SELECT ON TABLES FROM PUBLIC; DROP MATERIALIZED VIEW v",
                        reader=reader)
        run(db.superuser_dsn, f"DROP ROLE {reader}")


@pytest.mark.parametrize("change, lost", [
    ("CREATE STATISTICS v_stats (ndistinct) ON a, b FROM v", "extended statistics v_stats"),
    ("ALTER MATERIALIZED VIEW v ALTER COLUMN b SET STATISTICS 1000", "column(s) b"),
    ("ALTER MATERIALIZED VIEW v ALTER COLUMN b SET (n_distinct = 7)", "column(s) b"),
    ("CREATE INDEX dba_v_b ON v (b); ALTER MATERIALIZED VIEW v CLUSTER ON dba_v_b", "CLUSTER ON mark of index dba_v_b"),
    ("ALTER MATERIALIZED VIEW v SET TABLESPACE {ts}", "its tablespace"),
    ("CREATE INDEX dba_v_b ON v (b) TABLESPACE {ts}", "the tablespace of index dba_v_b"),
])
def test_view_swap_refuses_what_it_would_lose(fresh_db: FreshDatabase, change: str, lost: str) -> None:
    import os
    import shutil
    import subprocess

    db = fresh_db
    space, where = f"ts_{db.name}", f"/tmp/mdb_ts_{db.name}"
    run(db.dsn, VIEW_TABLE)
    _, out = do_apply(db, _view("SELECT a, b FROM t"))
    assert all(o.ok for o in out)
    uses_space = "{ts}" in change
    if uses_space:
        os.makedirs(where, exist_ok=True)
        subprocess.run(["chown", "postgres", where], check=False)
        run(db.superuser_dsn, f"CREATE TABLESPACE {space} LOCATION '{where}'")
        run(db.superuser_dsn, f"GRANT CREATE ON TABLESPACE {space} TO {db.owner}")
    try:
        run(db.dsn, change.format(ts=space))
        oid = one(db.dsn, "SELECT 'v'::regclass::oid")
        p, out = do_apply(db, _view("SELECT a, b, a + b AS c FROM t"))
        assert not any(s.kind in ("create-view", "swap-view") for s in p.steps)
        assert any("the swap would lose" in c and lost in c for c in p.conflicts), p.conflicts
        assert one(db.dsn, "SELECT 'v'::regclass::oid") == oid
    finally:
        if uses_space:
            run(db.dsn, "DROP MATERIALIZED VIEW v")
            run(db.superuser_dsn, f"DROP TABLESPACE {space}")
            shutil.rmtree(where, ignore_errors=True)
