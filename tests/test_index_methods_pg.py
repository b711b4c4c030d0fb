"""Index methods, operator classes, expression columns and storage parameters against real
PostgreSQL 15 (issue 18): each is built CONCURRENTLY, recorded, then found in sync (no drift), adopted
when identical, rebuilt and swapped when changed; an index whose extension is missing is blocked
with the exact CREATE EXTENSION, or the extension is created when the spec lists it."""

from __future__ import annotations

from typing import Any

import pytest

from harness.postgres import FreshDatabase
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.sql.plan import Desired, ExecutionPolicy, desired_state, plan

OWNER = "default/shop"
FAST = ExecutionPolicy(lock_timeout_seconds=2.0, statement_timeout_seconds=120.0, index_lock_timeout_seconds=20.0,
                       retries=2, retry_base_seconds=0.1)

TABLE = """
CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL, sku text NOT NULL,
                       attributes jsonb NOT NULL DEFAULT '{}', created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO products SELECT g, 'product ' || g, 'User' || g || '@Example.com', 'sku-' || g,
       jsonb_build_object('brand', 'b' || (g % 7), 'color', 'c' || (g % 3)), now() - g * interval '1 minute'
  FROM generate_series(1, 3000) g;
"""


def desired(indexes: list[dict[str, Any]], extensions: list[str] | None = None) -> Desired:
    spec = MarketplaceDBSpec.model_validate({
        "database": {"host": "db", "dbname": "shop", "credentialsSecretRef": {"name": "owner"},
                     "extensions": extensions or []},
        "indexes": indexes,
    })
    return desired_state(spec, OWNER)


def apply(db: FreshDatabase, d: Desired) -> list[Any]:
    with db.connect() as conn:
        return gateway.execute(conn, plan(d, gateway.observe(conn, d)), FAST)


def planned(db: FreshDatabase, d: Desired) -> Any:
    with db.connect() as conn:
        return plan(d, gateway.observe(conn, d))


def one(db: FreshDatabase, query: str, *params: Any) -> Any:
    with db.connect() as conn:
        row = conn.execute(query, params or None).fetchone()
        return row[0] if row else None


def indexdef(db: FreshDatabase, name: str) -> str:
    return str(one(db, "SELECT pg_get_indexdef(to_regclass(%s))", f"public.{name}"))


def valid(db: FreshDatabase, name: str) -> bool:
    return bool(one(db, "SELECT indisvalid AND indisready FROM pg_index WHERE indexrelid = to_regclass(%s)",
                    f"public.{name}"))


@pytest.fixture
def products(fresh_db: FreshDatabase) -> FreshDatabase:
    with fresh_db.connect() as conn:
        conn.execute(TABLE)
    return fresh_db


CASES: list[tuple[dict[str, Any], str, list[str]]] = [
    ({"name": "ix_email_lower", "table": "products", "columns": [{"expression": "lower(email)"}],
      "unique": True, "storage": {"fillfactor": 80}},
     "CREATE UNIQUE INDEX ix_email_lower ON public.products USING btree (lower(email)) WITH (fillfactor='80')", []),
    ({"name": "ix_sku_pattern", "table": "products", "columns": [{"name": "sku", "opclass": "text_pattern_ops"}]},
     "CREATE INDEX ix_sku_pattern ON public.products USING btree (sku text_pattern_ops)", []),
    ({"name": "ix_sku_hash", "table": "products", "method": "hash", "columns": [{"name": "sku"}],
      "storage": {"fillfactor": 70}},
     "CREATE INDEX ix_sku_hash ON public.products USING hash (sku) WITH (fillfactor='70')", []),
    ({"name": "ix_attributes", "table": "products", "method": "gin",
      "columns": [{"name": "attributes", "opclass": "jsonb_path_ops"}], "storage": {"fastupdate": False}},
     "CREATE INDEX ix_attributes ON public.products USING gin (attributes jsonb_path_ops) WITH (fastupdate=off)",
     []),
    ({"name": "ix_brand", "table": "products", "method": "btree",
      "columns": [{"expression": "attributes ->> 'brand'"}]},
     "CREATE INDEX ix_brand ON public.products USING btree (((attributes ->> 'brand'::text)))", []),
    ({"name": "ix_created_brin", "table": "products", "method": "brin", "columns": [{"name": "created_at"}],
      "storage": {"pages_per_range": 16}},
     "CREATE INDEX ix_created_brin ON public.products USING brin (created_at) WITH (pages_per_range='16')", []),
    ({"name": "ix_name_trgm", "table": "products", "method": "gin",
      "columns": [{"name": "name", "opclass": "gin_trgm_ops"}]},
     "CREATE INDEX ix_name_trgm ON public.products USING gin (name gin_trgm_ops)", ["pg_trgm"]),
    ({"name": "ix_name_trgm_gist", "table": "products", "method": "gist",
      "columns": [{"expression": "lower(name)", "opclass": "gist_trgm_ops"}]},
     "CREATE INDEX ix_name_trgm_gist ON public.products USING gist (lower(name) gist_trgm_ops)", ["pg_trgm"]),
    ({"name": "ix_id_gin", "table": "products", "method": "gin",
      "columns": [{"name": "id", "opclass": "int8_ops"}, {"name": "attributes"}]},
     "CREATE INDEX ix_id_gin ON public.products USING gin (id, attributes)", ["btree_gin"]),
]


@pytest.mark.parametrize(("index", "expected", "extensions"), CASES, ids=[c[0]["name"] for c in CASES])
def test_each_method_is_built_in_sync_and_rebuilt_when_changed(products: FreshDatabase, index: dict[str, Any],
                                                               expected: str, extensions: list[str]) -> None:
    d = desired([index], extensions)
    outcomes = apply(products, d)
    assert all(o.ok for o in outcomes), outcomes
    name = index["name"]
    assert valid(products, name)
    assert indexdef(products, name) == expected
    owned = one(products, "SELECT count(*) FROM marketplacedb.owned_objects WHERE name = %s AND how = 'created'", name)
    assert owned == 1
    again = planned(products, d)
    assert not again.steps and not again.conflicts, again  # no drift: the deparsed definition is stable
    # A change of method-specific details is drift: rebuilt CONCURRENTLY and swapped in.
    changed = dict(index, name=name)
    if "storage" in index:
        changed["storage"] = {}
    else:
        changed["where"] = "id > 10"
    swap = planned(products, desired([changed], extensions))
    assert [s.kind for s in swap.steps] == ["intent", "create-index", "swap-index", "drop-index"], swap
    before = one(products, "SELECT to_regclass(%s)::oid", f"public.{name}")
    assert all(o.ok for o in apply(products, desired([changed], extensions)))
    assert valid(products, name) and one(products, "SELECT to_regclass(%s)::oid", f"public.{name}") != before
    assert not planned(products, desired([changed], extensions)).steps


@pytest.mark.parametrize("index", [CASES[3][0], CASES[5][0], CASES[0][0], CASES[6][0], CASES[7][0]],
                         ids=["gin", "brin", "expression", "gin-trgm", "gist-trgm-expression"])
def test_an_identical_index_made_by_hand_is_adopted(products: FreshDatabase, index: dict[str, Any]) -> None:
    expected, extensions = next((c[1], c[2]) for c in CASES if c[0] is index)
    with products.connect() as conn:
        for extension in extensions:  # an opclass from an extension: deparsed public.gin_trgm_ops on both sides
            conn.execute(f"CREATE EXTENSION {extension}")
        conn.execute(expected)  # the DBA's own, identical index
    oid = one(products, "SELECT to_regclass(%s)::oid", f"public.{index['name']}")
    p = planned(products, desired([index]))
    assert [s.kind for s in p.steps] == ["adopt"], p
    assert all(o.ok for o in apply(products, desired([index])))
    assert one(products, "SELECT to_regclass(%s)::oid", f"public.{index['name']}") == oid
    assert not planned(products, desired([index])).steps


def test_a_different_index_by_hand_is_a_conflict_not_rebuilt(products: FreshDatabase) -> None:
    index = CASES[5][0]  # brin, pages_per_range 16
    with products.connect() as conn:
        conn.execute("CREATE INDEX ix_created_brin ON products USING brin (created_at) WITH (pages_per_range = 64)")
    p = planned(products, desired([index]))
    assert not p.steps and len(p.conflicts) == 1 and "definition differs" in p.conflicts[0]


def test_missing_extension_blocks_the_index_with_the_statement_to_run(products: FreshDatabase) -> None:
    trgm = CASES[6][0]
    plain = CASES[1][0]
    p = planned(products, desired([trgm, plain]))
    assert len(p.conflicts) == 1, p
    assert "blocked" in p.conflicts[0] and 'CREATE EXTENSION IF NOT EXISTS "pg_trgm"' in p.conflicts[0]
    assert "spec.indexes[0]" in p.conflicts[0]
    assert {s.object for s in p.steps} == {"index/public.ix_sku_pattern"}  # the other index goes on
    assert one(products, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'") == 0
    # The DBA runs the statement named in the conflict, as given: the index is then built.
    statement = p.conflicts[0].split("a DBA must run: ")[1].split(";")[0]
    with products.connect() as conn:
        conn.execute(statement)
    assert all(o.ok for o in apply(products, desired([trgm, plain])))
    assert valid(products, "ix_name_trgm")


def test_listed_extension_is_created_by_the_operator(products: FreshDatabase) -> None:
    d = desired([CASES[6][0]], ["pg_trgm"])
    p = planned(products, d)
    assert [s.kind for s in p.steps][:1] == ["create-extension"] and not p.conflicts
    assert all(o.ok for o in apply(products, d))
    assert one(products, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'") == 1
    assert valid(products, "ix_name_trgm")
    assert not planned(products, d).steps


def test_listed_extension_the_role_may_not_create_is_blocked(products: FreshDatabase) -> None:
    with psycopg_superuser(products) as conn:
        conn.execute(f'REVOKE CREATE ON DATABASE "{products.name}" FROM "{products.owner}", PUBLIC')
    p = planned(products, desired([CASES[6][0]], ["pg_trgm"]))
    assert not p.steps and len(p.conflicts) == 1
    assert "may not create it" in p.conflicts[0] and 'CREATE EXTENSION IF NOT EXISTS "pg_trgm"' in p.conflicts[0]
    assert products.owner not in p.conflicts[0]


def psycopg_superuser(db: FreshDatabase) -> Any:
    import psycopg

    return psycopg.connect(db.superuser_dsn, autocommit=True)


def test_a_volatile_expression_fails_cleanly_and_leaves_nothing(products: FreshDatabase) -> None:
    d = desired([{"name": "ix_random", "table": "products", "columns": [{"expression": "id + random()"}]}])
    outcomes = apply(products, d)
    assert len(outcomes) == 1 and not outcomes[0].ok
    assert "IMMUTABLE" in outcomes[0].message, outcomes
    assert one(products, "SELECT count(*) FROM pg_class WHERE relname LIKE 'ix_random%%'") == 0
    assert one(products, "SELECT count(*) FROM marketplacedb.owned_objects WHERE name LIKE 'ix_random%%'") == 0


# --- gin/gist on a scalar column without an opclass: the default class comes from btree_gin/btree_gist.

GIN_ID = {"name": "ix_id_gin", "table": "products", "method": "gin", "columns": [{"name": "id"}]}
GIST_CREATED = {"name": "ix_created_gist", "table": "products", "method": "gist", "columns": [{"name": "created_at"}]}
GIN_JSONB = {"name": "ix_attributes_gin", "table": "products", "method": "gin", "columns": [{"name": "attributes"}]}


def test_gin_on_a_scalar_column_without_opclass_is_blocked_until_btree_gin(products: FreshDatabase) -> None:
    p = planned(products, desired([GIN_ID, GIN_JSONB]))
    assert len(p.conflicts) == 1, p
    conflict = p.conflicts[0]
    assert conflict.startswith("spec.indexes[0]: blocked") and 'CREATE EXTENSION IF NOT EXISTS "btree_gin"' in conflict
    assert "default gin operator class of column id of type int8" in conflict
    assert {s.object for s in p.steps} == {"index/public.ix_attributes_gin"}  # jsonb has a default gin class
    statement = conflict.split("a DBA must run: ")[1].split(";")[0]
    with products.connect() as conn:
        conn.execute(statement)
    assert all(o.ok for o in apply(products, desired([GIN_ID, GIN_JSONB])))
    assert valid(products, "ix_id_gin") and "USING gin (id)" in indexdef(products, "ix_id_gin")
    assert not planned(products, desired([GIN_ID, GIN_JSONB])).steps


def test_gist_on_a_scalar_column_creates_listed_btree_gist(products: FreshDatabase) -> None:
    d = desired([GIST_CREATED], ["btree_gist"])
    p = planned(products, d)
    assert [s.kind for s in p.steps][:1] == ["create-extension"] and not p.conflicts, p
    assert "btree_gist" in p.steps[0].sql_text
    assert all(o.ok for o in apply(products, d))
    assert one(products, "SELECT count(*) FROM pg_extension WHERE extname = 'btree_gist'") == 1
    assert valid(products, "ix_created_gist") and not planned(products, d).steps


def test_a_type_no_extension_helps_is_blocked_with_the_servers_reason(products: FreshDatabase) -> None:
    with products.connect() as conn:
        conn.execute("ALTER TABLE products ADD COLUMN location point")
    index = {"name": "ix_location_gin", "table": "products", "method": "gin", "columns": [{"name": "location"}]}
    p = planned(products, desired([index], ["btree_gin"]))
    assert not p.steps and len(p.conflicts) == 1, p
    assert "data type point has no default operator class for access method gin" in p.conflicts[0]
    assert "declare an opclass" in p.conflicts[0]
