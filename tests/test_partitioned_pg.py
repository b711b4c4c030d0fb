"""Indexes on a partitioned table against real PostgreSQL 15 (issue 18): ON ONLY parent, CONCURRENTLY
on each partition, ATTACH PARTITION; writers keep inserting; every partition ends with a valid
attached index, each recorded as owned; an interrupted build is completed on the next reconcile."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import psycopg
import pytest

from harness.postgres import FreshDatabase
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.sql.plan import Desired, ExecutionPolicy, desired_state, plan, teardown_plan

OWNER = "default/shop"
FAST = ExecutionPolicy(lock_timeout_seconds=2.0, statement_timeout_seconds=120.0, index_lock_timeout_seconds=20.0,
                       retries=3, retry_base_seconds=0.1)
# Generous: what a writer may wait at most while indexes are built (plain-index bound of the bench: the
# DDL lock_timeout). Reported, and only a gross stall fails.
WAIT_BOUND_SECONDS = 5.0

ORDERS = """
CREATE TABLE orders (id bigint NOT NULL, customer_id bigint NOT NULL, status text NOT NULL,
                     created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at);
CREATE TABLE orders_2026_01 PARTITION OF orders FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE orders_2026_02 PARTITION OF orders FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
CREATE TABLE orders_2026_03 PARTITION OF orders FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
INSERT INTO orders SELECT g, g % 500, CASE WHEN g % 3 = 0 THEN 'paid' ELSE 'new' END,
       timestamptz '2026-01-01' + (g % 89) * interval '1 day' + g * interval '1 second'
  FROM generate_series(1, 60000) g;
"""

INDEX = {"name": "ix_orders_customer", "table": "orders",
         "columns": [{"name": "customer_id"}, {"name": "created_at", "order": "desc"}]}


def desired(indexes: list[dict[str, Any]], policy: str = "Retain") -> Desired:
    spec = MarketplaceDBSpec.model_validate({
        "database": {"host": "db", "dbname": "shop", "credentialsSecretRef": {"name": "owner"}},
        "ddl": {"deletionPolicy": policy}, "indexes": indexes})
    return desired_state(spec, OWNER)


def planned(db: FreshDatabase, d: Desired) -> Any:
    with db.connect() as conn:
        return plan(d, gateway.observe(conn, d))


def apply(db: FreshDatabase, d: Desired) -> list[Any]:
    with db.connect() as conn:
        return gateway.execute(conn, plan(d, gateway.observe(conn, d)), FAST)


def rows(db: FreshDatabase, query: str, *params: Any) -> list[Any]:
    with db.connect() as conn:
        return conn.execute(query, params or None).fetchall()


def partition_indexes(db: FreshDatabase, parent_index: str) -> dict[str, tuple[str, bool]]:
    """{partition: (attached index, valid)} for the partitioned index `parent_index`."""
    found = rows(db, """
        SELECT t.relname, c.relname, x.indisvalid FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
          JOIN pg_index x ON x.indexrelid = c.oid JOIN pg_class t ON t.oid = x.indrelid
         WHERE h.inhparent = to_regclass(%s)""", f"public.{parent_index}")
    return {t: (c, v) for t, c, v in found}


def parent_valid(db: FreshDatabase, name: str) -> bool:
    return bool(rows(db, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", f"public.{name}")[0][0])


@pytest.fixture
def orders(fresh_db: FreshDatabase) -> FreshDatabase:
    with fresh_db.connect() as conn:
        conn.execute(ORDERS)
    return fresh_db


def owned(db: FreshDatabase) -> set[str]:
    return {r[0] for r in rows(db, "SELECT name FROM marketplacedb.owned_objects WHERE how = 'created' "
                                   "AND oid IS NOT NULL")}


def test_partitioned_index_is_built_without_blocking_writers(orders: FreshDatabase) -> None:
    d = desired([INDEX])
    p = planned(orders, d)
    kinds = [s.kind for s in p.steps]
    assert kinds[0] == "create-index-parent" and kinds.count("create-index") == 3 and kinds.count("attach-index") == 3
    assert "ON ONLY" in p.steps[0].sql_text and all("CONCURRENTLY" in s.sql_text for s in p.steps
                                                      if s.kind == "create-index")
    waits: list[float] = []
    errors: list[BaseException] = []
    inserted = [0]
    stop = threading.Event()

    def write() -> None:
        try:
            with psycopg.connect(orders.dsn, autocommit=True) as conn:
                n = 10_000_000
                while not stop.is_set():
                    n += 1
                    started = time.monotonic()
                    conn.execute("INSERT INTO orders VALUES (%s, %s, 'new', timestamptz '2026-01-15' "
                                 "+ (%s %% 70) * interval '1 day')", (n, n % 500, n))
                    waits.append(time.monotonic() - started)
                    inserted[0] += 1
        except BaseException as exc:  # reported by the test, never swallowed
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.2)
        outcomes = apply(orders, d)
        time.sleep(0.2)
    finally:
        stop.set()
        writer.join(30)
    assert not errors, errors
    assert all(o.ok for o in outcomes), outcomes
    print(f"\npartitioned build: {inserted[0]} inserts during the build, longest wait {max(waits) * 1000:.1f} ms, "
          f"p50 {sorted(waits)[len(waits) // 2] * 1000:.2f} ms")
    assert inserted[0] > 0 and max(waits) < WAIT_BOUND_SECONDS
    children = partition_indexes(orders, "ix_orders_customer")
    assert set(children) == {"orders_2026_01", "orders_2026_02", "orders_2026_03"}
    assert all(valid for _, valid in children.values())
    assert parent_valid(orders, "ix_orders_customer")
    assert {c for c, _ in children.values()} | {"ix_orders_customer"} <= owned(orders)
    again = planned(orders, d)
    assert not again.steps and not again.conflicts, again
    # A partition added later: PostgreSQL builds and attaches its index itself; nothing left to do.
    with orders.connect() as conn:
        conn.execute("CREATE TABLE orders_2026_04 PARTITION OF orders FOR VALUES FROM ('2026-04-01') TO ('2026-05-01')")
    assert "orders_2026_04" in partition_indexes(orders, "ix_orders_customer")
    assert not planned(orders, d).steps


def test_an_interrupted_build_is_completed_on_the_next_reconcile(orders: FreshDatabase) -> None:
    d = desired([INDEX])
    full = planned(orders, d)
    # Stop after the first partition's index is attached: the parent stays INVALID.
    cut = [s.kind for s in full.steps].index("attach-index") + 1
    with orders.connect() as conn:
        assert all(o.ok for o in gateway.execute(conn, dataclasses.replace(full, steps=full.steps[:cut]), FAST))
    assert not parent_valid(orders, "ix_orders_customer")
    assert len(partition_indexes(orders, "ix_orders_customer")) == 1
    # A partition attached later with ATTACH PARTITION ... gets its index too.
    with orders.connect() as conn:
        conn.execute("CREATE TABLE orders_2026_05 (LIKE orders)")
        conn.execute("ALTER TABLE orders ATTACH PARTITION orders_2026_05 FOR VALUES FROM ('2026-05-01') "
                     "TO ('2026-06-01')")
    rest = planned(orders, d)
    assert "create-index-parent" not in [s.kind for s in rest.steps] and not rest.conflicts, rest
    assert all(o.ok for o in apply(orders, d))
    children = partition_indexes(orders, "ix_orders_customer")
    assert len(children) == 4 and all(v for _, v in children.values())
    assert parent_valid(orders, "ix_orders_customer")
    assert not planned(orders, d).steps


def test_teardown_drops_the_partitioned_index_with_its_partitions(orders: FreshDatabase) -> None:
    d = desired([INDEX], policy="Drop")
    assert all(o.ok for o in apply(orders, d))
    with orders.connect() as conn:
        down = teardown_plan(d, gateway.observe(conn, d))
        assert [s.kind for s in down.steps].count("drop-index") == 1, down  # the children go with the parent
        assert all(o.ok for o in gateway.execute(conn, down, FAST))
    assert rows(orders, "SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%%ix_orders_customer'")[0][0] == 0


def test_teardown_never_drops_an_index_a_dba_attached_to_ours(orders: FreshDatabase) -> None:
    """DROP INDEX on a partitioned index drops every index attached to it; PostgreSQL attaches a
    DBA's matching index when the DBA's table becomes a partition. Teardown leaves ours in place."""
    d = desired([INDEX], policy="Drop")
    assert all(o.ok for o in apply(orders, d))
    with orders.connect() as conn:
        conn.execute("CREATE TABLE orders_2026_04 (LIKE orders)")
        conn.execute("CREATE INDEX dba_orders_04 ON orders_2026_04 (customer_id, created_at DESC)")
        conn.execute("ALTER TABLE orders ATTACH PARTITION orders_2026_04 FOR VALUES FROM ('2026-04-01') "
                     "TO ('2026-05-01')")
    assert is_attached(orders, "dba_orders_04")
    dba = oid_of(orders, "dba_orders_04")
    with orders.connect() as conn:
        down = teardown_plan(d, gateway.observe(conn, d))
        assert "drop-index" not in [s.kind for s in down.steps], down
        assert any("ix_orders_customer" in n and "dba_orders_04" in n for n in down.notes), down.notes
        assert all(o.ok for o in gateway.execute(conn, down, FAST))
    assert oid_of(orders, "dba_orders_04") == dba and oid_of(orders, "ix_orders_customer") is not None


def test_an_index_a_dba_attaches_after_the_plan_stops_the_drop(orders: FreshDatabase) -> None:
    """The check is repeated in the DROP's transaction, under the table's lock: a partition attached
    between plan and execution (a rebuild's drop comes after hours of builds) keeps its index."""
    d = desired([INDEX], policy="Drop")
    assert all(o.ok for o in apply(orders, d))
    with orders.connect() as conn:
        down = teardown_plan(d, gateway.observe(conn, d))
        assert "drop-index" in [s.kind for s in down.steps]
        conn.execute("CREATE TABLE orders_2026_04 (LIKE orders)")
        conn.execute("CREATE INDEX dba_orders_04 ON orders_2026_04 (customer_id, created_at DESC)")
        conn.execute("ALTER TABLE orders ATTACH PARTITION orders_2026_04 FOR VALUES FROM ('2026-04-01') "
                     "TO ('2026-05-01')")
        dba = oid_of(orders, "dba_orders_04")
        outcomes = gateway.execute(conn, down, FAST)
    failed = [o for o in outcomes if not o.ok]
    assert failed and "not this resource's" in failed[0].message, outcomes
    assert oid_of(orders, "dba_orders_04") == dba and oid_of(orders, "ix_orders_customer") is not None


# --- redefinition (issue 18): a new parent ON ONLY under the build name, CONCURRENTLY per partition,
# attach, swap the names in one short transaction, drop the old parent in another.

CHANGED = {**INDEX, "columns": [{"name": "customer_id"}, {"name": "status"}, {"name": "created_at", "order": "desc"}]}


def oid_of(db: FreshDatabase, name: str) -> int | None:
    found = rows(db, "SELECT to_regclass(%s)::oid", f"public.{name}")[0][0]
    return None if found is None else int(found)


def is_attached(db: FreshDatabase, name: str) -> bool:
    return bool(rows(db, "SELECT count(*) FROM pg_inherits WHERE inhrelid = to_regclass(%s)", f"public.{name}")[0][0])


def definitions(db: FreshDatabase, parent_index: str) -> list[str]:
    return [r[0] for r in rows(db, "SELECT pg_get_indexdef(h.inhrelid) FROM pg_inherits h "
                                   "WHERE h.inhparent = to_regclass(%s)", f"public.{parent_index}")]


def with_writer(db: FreshDatabase, action: Any) -> tuple[Any, list[float], int]:
    """Run `action()` while a writer inserts into every partition in a loop; (result, waits, inserts)."""
    waits: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                n = 20_000_000
                while not stop.is_set():
                    n += 1
                    started = time.monotonic()
                    conn.execute("INSERT INTO orders VALUES (%s, %s, 'new', timestamptz '2026-01-15' "
                                 "+ (%s %% 70) * interval '1 day')", (n, n % 500, n))
                    waits.append(time.monotonic() - started)
        except BaseException as exc:  # reported by the test, never swallowed
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.2)
        result = action()
        time.sleep(0.2)
    finally:
        stop.set()
        writer.join(30)
    assert not errors, errors
    return result, waits, len(waits)


def test_a_changed_definition_is_rebuilt_without_blocking_writers(orders: FreshDatabase) -> None:
    assert all(o.ok for o in apply(orders, desired([INDEX])))
    old_children = {c for c, _ in partition_indexes(orders, "ix_orders_customer").values()}
    old_parent = oid_of(orders, "ix_orders_customer")
    # A DBA's index on one partition that looks exactly like the new definition: never attached, never dropped.
    with orders.connect() as conn:
        conn.execute("CREATE INDEX dba_lookalike ON orders_2026_02 (customer_id, status, created_at DESC)")
    lookalike = oid_of(orders, "dba_lookalike")
    d = desired([CHANGED])
    p = planned(orders, d)
    assert not p.conflicts, p.conflicts
    kinds = [s.kind for s in p.steps]
    assert kinds[0] == "create-index-parent" and "ix_orders_customer__new" in p.steps[0].sql_text
    assert kinds.count("create-index") == 3 and kinds.count("attach-index") == 3
    assert kinds[-2:] == ["swap-index", "drop-index"], kinds
    assert "definition changed in the resource" in p.steps[0].description
    outcomes, waits, inserted = with_writer(orders, lambda: apply(orders, d))
    assert all(o.ok for o in outcomes), outcomes
    print(f"\npartitioned rebuild: {inserted} inserts, longest wait {max(waits) * 1000:.1f} ms")
    assert inserted > 0 and max(waits) < WAIT_BOUND_SECONDS
    children = partition_indexes(orders, "ix_orders_customer")
    assert set(children) == {"orders_2026_01", "orders_2026_02", "orders_2026_03"}
    assert all(valid for _, valid in children.values()) and parent_valid(orders, "ix_orders_customer")
    assert all("(customer_id, status, created_at DESC)" in text for text in definitions(orders, "ix_orders_customer"))
    assert oid_of(orders, "ix_orders_customer") != old_parent
    assert not {c for c, _ in children.values()} & old_children  # every partition's index is new
    assert {c for c, _ in children.values()} | {"ix_orders_customer"} <= owned(orders)
    assert all(oid_of(orders, c) is None for c in old_children)
    assert oid_of(orders, "ix_orders_customer__new") is None and oid_of(orders, "ix_orders_customer__old") is None
    assert oid_of(orders, "dba_lookalike") == lookalike and not is_attached(orders, "dba_lookalike")
    assert not planned(orders, d).steps
    # And back: the partitions' indexes alternate between their two names, so a second rebuild works too.
    assert all(o.ok for o in apply(orders, desired([INDEX])))
    children = partition_indexes(orders, "ix_orders_customer")
    assert {c for c, _ in children.values()} == old_children and all(v for _, v in children.values())
    assert not planned(orders, desired([INDEX])).steps
    assert oid_of(orders, "dba_lookalike") == lookalike


def test_a_partition_index_changed_by_hand_is_rebuilt(orders: FreshDatabase) -> None:
    d = desired([INDEX])
    assert all(o.ok for o in apply(orders, d))
    with orders.connect() as conn:
        conn.execute("ALTER INDEX orders_2026_01_ix_orders_customer SET (fillfactor = 50)")
    p = planned(orders, d)
    assert "orders_2026_01_ix_orders_customer on partition public.orders_2026_01 was changed by hand" \
        in p.steps[0].description, p.descriptions()
    assert all(o.ok for o in apply(orders, d))
    assert all("fillfactor" not in text for text in definitions(orders, "ix_orders_customer"))
    assert parent_valid(orders, "ix_orders_customer") and not planned(orders, d).steps


def test_a_rebuild_never_drops_an_attached_index_that_is_not_ours_unless_replace(orders: FreshDatabase) -> None:
    assert all(o.ok for o in apply(orders, desired([INDEX])))
    # A DBA attaches a table that already has a matching index: PostgreSQL attaches that index to ours.
    with orders.connect() as conn:
        conn.execute("CREATE TABLE orders_2026_04 (LIKE orders)")
        conn.execute("CREATE INDEX dba_orders_04 ON orders_2026_04 (customer_id, created_at DESC)")
        conn.execute("ALTER TABLE orders ATTACH PARTITION orders_2026_04 FOR VALUES FROM ('2026-04-01') "
                     "TO ('2026-05-01')")
    assert is_attached(orders, "dba_orders_04")
    p = planned(orders, desired([CHANGED]))
    assert not p.steps, p.steps
    assert len(p.conflicts) == 1 and "public.dba_orders_04 on partition public.orders_2026_04" in p.conflicts[0]
    assert "adopt: Replace" in p.conflicts[0]
    assert all(o.ok for o in apply(orders, desired([CHANGED]))) and is_attached(orders, "dba_orders_04")
    replace = desired([{**CHANGED, "adopt": "Replace"}])
    p = planned(orders, replace)
    assert "dba_orders_04" in p.steps[-1].description and not p.conflicts
    assert all(o.ok for o in apply(orders, replace))
    children = partition_indexes(orders, "ix_orders_customer")
    assert len(children) == 4 and all(v for _, v in children.values()) and parent_valid(orders, "ix_orders_customer")


def test_an_invalid_partition_index_attached_by_hand_is_repaired(orders: FreshDatabase) -> None:
    d = desired([INDEX])
    full = planned(orders, d)
    cut = [s.kind for s in full.steps].index("attach-index") + 1  # only the first partition's index attached
    with orders.connect() as conn:
        assert all(o.ok for o in gateway.execute(conn, dataclasses.replace(full, steps=full.steps[:cut]), FAST))
    # A DBA's CREATE INDEX CONCURRENTLY fails in its wait phase (INVALID), and is attached by hand.
    with psycopg.connect(orders.dsn) as holder, orders.connect() as conn:
        holder.execute("INSERT INTO orders_2026_02 VALUES (1, 1, 'new', '2026-02-02')")  # open transaction
        conn.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            conn.execute("CREATE INDEX CONCURRENTLY dba_invalid ON orders_2026_02 (customer_id, created_at DESC)")
        holder.rollback()
        conn.execute("ALTER INDEX ix_orders_customer ATTACH PARTITION dba_invalid")
    assert partition_indexes(orders, "ix_orders_customer")["orders_2026_02"] == ("dba_invalid", False)
    p = planned(orders, d)
    assert not p.steps and "dba_invalid" in p.conflicts[0] and "is INVALID" in p.conflicts[0], p
    replace = desired([{**INDEX, "adopt": "Replace"}])
    assert all(o.ok for o in apply(orders, replace))
    children = partition_indexes(orders, "ix_orders_customer")
    assert len(children) == 3 and all(v for _, v in children.values()) and parent_valid(orders, "ix_orders_customer")
    assert not planned(orders, replace).steps


def test_an_interrupted_rebuild_resumes_and_a_taken_build_name_is_refused(orders: FreshDatabase) -> None:
    assert all(o.ok for o in apply(orders, desired([INDEX])))
    d = desired([CHANGED])
    full = planned(orders, d)
    cut = [s.kind for s in full.steps].index("attach-index") + 1
    with orders.connect() as conn:  # the operator stops after the first partition of the rebuild
        assert all(o.ok for o in gateway.execute(conn, dataclasses.replace(full, steps=full.steps[:cut]), FAST))
    rest = planned(orders, d)
    kinds = [s.kind for s in rest.steps]
    assert "create-index-parent" not in kinds and kinds.count("create-index") == 2, kinds
    assert all(o.ok for o in apply(orders, d))
    assert parent_valid(orders, "ix_orders_customer") and not planned(orders, d).steps
    # Someone's index at the name the next rebuild of one partition would take, and the current index at
    # the other: refused with the names, nothing touched.
    taken = partition_indexes(orders, "ix_orders_customer")["orders_2026_01"][0]
    other = "orders_2026_01_ix_orders_customer" if taken.endswith("_alt") else "orders_2026_01_ix_orders_customer_alt"
    with orders.connect() as conn:
        conn.execute(f"CREATE INDEX {other} ON orders_2026_01 (status)")
    p = planned(orders, desired([INDEX]))
    assert not p.steps and "partition public.orders_2026_01" in p.conflicts[0] and other in p.conflicts[0], p


def test_a_partitioned_index_made_by_hand_is_adopted_when_identical_else_replaced_on_request(
        orders: FreshDatabase) -> None:
    with orders.connect() as conn:  # as a migration would: a plain CREATE INDEX on the parent
        conn.execute("CREATE INDEX ix_orders_customer ON orders (customer_id, created_at DESC)")
        conn.execute("CREATE INDEX ix_orders_status ON orders (status)")
    made = oid_of(orders, "ix_orders_customer")
    other = {**INDEX, "name": "ix_orders_status", "columns": [{"name": "status"}, {"name": "id"}]}
    d = desired([INDEX, other])
    p = planned(orders, d)
    assert [s.kind for s in p.steps] == ["adopt"] and "ix_orders_customer" in p.steps[0].description
    assert len(p.conflicts) == 1 and "ix_orders_status" in p.conflicts[0] and "adopt: Replace" in p.conflicts[0]
    assert all(o.ok for o in apply(orders, d))
    assert oid_of(orders, "ix_orders_customer") == made and "ix_orders_customer" in owned_adopted(orders)
    replace = desired([INDEX, {**other, "adopt": "Replace"}])
    assert all(o.ok for o in apply(orders, replace))
    children = partition_indexes(orders, "ix_orders_status")
    assert len(children) == 3 and all(v for _, v in children.values()) and parent_valid(orders, "ix_orders_status")
    assert all("(status, id)" in text for text in definitions(orders, "ix_orders_status"))
    assert not planned(orders, replace).steps and oid_of(orders, "ix_orders_customer") == made


def owned_adopted(db: FreshDatabase) -> set[str]:
    return {r[0] for r in rows(db, "SELECT name FROM marketplacedb.owned_objects WHERE how = 'adopted'")}


def test_our_unattached_index_left_at_a_partitions_other_name_is_dropped(orders: FreshDatabase) -> None:
    """A build that outlived the operator (its backend went on after the client died) finishes at one
    name while the next reconcile built and attached the partition's index at the other: swept."""
    from marketplacedb_operator.sql import ddl, ownership

    d = desired([INDEX])
    assert all(o.ok for o in apply(orders, d))
    spec = d.indexes[0].spec
    orphan = "orders_2026_02_ix_orders_customer_alt"
    with orders.connect() as conn:  # what the operator's intent, build and record steps leave
        conn.execute(ownership.intent(OWNER, "public", orphan, "public", "orders_2026_02", d.indexes[0].hash))
        conn.execute(ddl.create_index_on(spec, orphan, table="orders_2026_02", schema="public"))
        with conn.transaction():
            for statement in ownership.record(OWNER, "index", "public", orphan, d.indexes[0].hash, "created"):
                conn.execute(statement)
        conn.execute("CREATE INDEX dba_orders_02 ON orders_2026_02 (customer_id, created_at DESC)")
    p = planned(orders, d)
    assert [(s.kind, orphan in s.sql_text) for s in p.steps] == [("drop-index", True)], p.descriptions()
    assert all(o.ok for o in apply(orders, d))
    assert oid_of(orders, orphan) is None and oid_of(orders, "dba_orders_02") is not None
    assert not planned(orders, d).steps and parent_valid(orders, "ix_orders_customer")


def test_a_leftover_old_parent_with_a_dbas_index_attached_is_left_alone(orders: FreshDatabase) -> None:
    """A rebuild's last step (drop the old parent) did not run; a DBA then attaches a partition whose
    matching index PostgreSQL attaches to that old parent. The next reconcile leaves it alone."""
    assert all(o.ok for o in apply(orders, desired([INDEX])))
    full = planned(orders, desired([CHANGED]))
    assert full.steps[-1].kind == "drop-index"
    with orders.connect() as conn:
        assert all(o.ok for o in gateway.execute(conn, dataclasses.replace(full, steps=full.steps[:-1]), FAST))
        conn.execute("CREATE TABLE orders_2026_04 (LIKE orders)")
        conn.execute("CREATE INDEX dba_orders_04 ON orders_2026_04 (customer_id, created_at DESC)")
        conn.execute("ALTER TABLE orders ATTACH PARTITION orders_2026_04 FOR VALUES FROM ('2026-04-01') "
                     "TO ('2026-05-01')")
    dba = oid_of(orders, "dba_orders_04")
    p = planned(orders, desired([CHANGED]))
    assert not [s for s in p.steps if s.kind == "drop-index" and "__old" in s.description], p.steps
    assert any("ix_orders_customer__old" in n and "dba_orders_04" in n for n in p.notes), p.notes
    apply(orders, desired([CHANGED]))
    assert oid_of(orders, "dba_orders_04") == dba
