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
