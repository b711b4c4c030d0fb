"""The reference workload's search and filter queries (issue 18) on real PostgreSQL 15: the example
resource builds a trigram GIN index (creating pg_trgm, listed in spec.database.extensions) and a
jsonb_path_ops GIN index, and the planner can answer both queries from them with the same rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from psycopg.types.json import Jsonb

from harness.postgres import FreshDatabase
from marketplacedb_operator import workload
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.sql.plan import ExecutionPolicy, desired_state, plan

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "marketplacedb.yaml"
FAST = ExecutionPolicy(lock_timeout_seconds=2.0, statement_timeout_seconds=120.0, index_lock_timeout_seconds=20.0,
                       retries=2, retry_base_seconds=0.1)
PARAMS: dict[str, dict[str, Any]] = {"product_search": {"term": "pack #1"},
                                     "attribute_filter": {"filter": Jsonb({"delivery": "instant", "language": "de"})}}
INDEX_OF = {"product_search": "idx_seller_products_name_trgm", "attribute_filter": "idx_seller_products_attributes"}


def example_spec() -> MarketplaceDBSpec:
    doc = next(d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d and d.get("kind") == "MarketplaceDB")
    return MarketplaceDBSpec.model_validate(doc["spec"])


def test_search_and_filter_use_their_indexes(workload_db: FreshDatabase) -> None:
    spec = example_spec()
    assert "pg_trgm" in spec.database.extensions
    search = [i for i in spec.indexes if i.name in INDEX_OF.values()]
    d = desired_state(spec.model_copy(update={"indexes": search, "materialized_views": []}), "default/shop")
    with workload_db.connect() as conn:
        before = {name: conn.execute(query, PARAMS[name]).fetchall() for name, query in workload.SEARCH_QUERIES.items()}
        assert all(before.values()), before  # the data has rows for both
        outcomes = gateway.execute(conn, plan(d, gateway.observe(conn, d)), FAST)
        assert all(o.ok for o in outcomes), outcomes
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'").fetchone() == (1,)
        conn.execute("SET enable_seqscan = off")  # small data: prove the index can serve the query
        for name, query in workload.SEARCH_QUERIES.items():
            explained = json.dumps(conn.execute("EXPLAIN (FORMAT JSON) " + query, PARAMS[name]).fetchone())
            assert INDEX_OF[name] in explained, (name, explained)
            assert conn.execute(query, PARAMS[name]).fetchall() == before[name]


def test_the_partitioned_order_history_gets_its_index_on_every_partition(workload_db: FreshDatabase) -> None:
    spec = example_spec()
    index = next(i for i in spec.indexes if i.table == "seller_order_events")
    d = desired_state(spec.model_copy(update={"indexes": [index], "materialized_views": []}), "default/shop")
    params = {"seller": 1, "since": "2024-12-01 00:00:00+00"}
    query = workload.ORDER_QUERIES["seller_activity"]
    with workload_db.connect() as conn:
        partitions = {r[0] for r in conn.execute("SELECT inhrelid::regclass::text FROM pg_inherits "
                                                 "WHERE inhparent = 'seller_order_events'::regclass")}
        assert len(partitions) == 5
        assert conn.execute("SELECT count(*) FROM seller_order_events").fetchone() == \
            conn.execute("SELECT count(*) FROM seller_orders").fetchone()
        before = conn.execute(query, params).fetchall()
        assert before  # seller 1 has recent events
        p = plan(d, gateway.observe(conn, d))
        assert "ON ONLY" in p.steps[0].sql_text and [s.kind for s in p.steps].count("create-index") == 5
        assert all(o.ok for o in gateway.execute(conn, p, FAST))
        attached = conn.execute(
            "SELECT t.relname, x.indisvalid FROM pg_inherits h JOIN pg_index x ON x.indexrelid = h.inhrelid "
            "JOIN pg_class t ON t.oid = x.indrelid WHERE h.inhparent = to_regclass(%s)",
            [f"public.{index.name}"]).fetchall()
        assert {t for t, _ in attached} == partitions and all(v for _, v in attached)
        conn.execute("SET enable_seqscan = off")
        explained = json.dumps(conn.execute("EXPLAIN (FORMAT JSON) " + query, params).fetchone())
        assert index.name in explained and "2024q1" not in explained, explained  # pruned, then the index
        assert conn.execute(query, params).fetchall() == before
        assert not plan(d, gateway.observe(conn, d)).steps
