"""The reference workload: deterministic SQL text, and the example resource agrees with it.

Running the SQL on a real PostgreSQL is the job of the `workload_db` fixture's tests.
"""

from __future__ import annotations

import fnmatch
import pathlib
import subprocess
import sys
import tomllib
from typing import Any

import pytest
import yaml

from marketplacedb_operator import workload

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TABLES = (
    "categories",
    "ai_accounts",
    "seller_profiles",
    "seller_products",
    "seller_orders",
    "seller_order_events",
    "search_history",
    "popular_searches",
)
DESIGN_INDEXES = (
    "idx_ai_accounts_available_category",
    "idx_seller_products_available_approved",
    "idx_seller_orders_seller_status",
    "idx_search_history_user_recent",
    "idx_popular_searches_ranking",
)


def code(sql: str) -> str:
    """The SQL without its `--` comments (none of the texts has `--` inside a string)."""
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def example() -> dict[str, Any]:
    with (EXAMPLES / "marketplacedb.yaml").open(encoding="utf-8") as f:
        doc: dict[str, Any] = yaml.safe_load(f)
    return doc


def test_data_sql_is_deterministic() -> None:
    assert workload.data_sql(2000) == workload.data_sql(2000)
    assert workload.data_sql(2000, seed=7) == workload.data_sql(2000, seed=7)
    assert workload.data_sql(2000, seed=7) != workload.data_sql(2000, seed=8)
    assert workload.data_sql(2000) != workload.data_sql(3000)
    assert workload.data_sql(2000) == workload.data_sql(2000, seed=1)


def test_data_sql_fills_every_table_without_random() -> None:
    text = code(workload.data_sql(2000))
    for table in TABLES:
        assert f"INSERT INTO {table} " in text
        assert f"setval(pg_get_serial_sequence('{table}', 'id')" in text
    assert "random()" not in text
    assert "now()" not in text  # a fixed time origin: the same rows on any day
    assert text.rstrip().endswith(";")
    assert text.rstrip().splitlines()[-1].startswith("ANALYZE ")


def test_sizes_follow_the_product_count() -> None:
    size = workload.workload_size(2_000_000)
    assert (size.ai_accounts, size.seller_products) == (600_000, 1_400_000)
    assert (size.sellers, size.orders, size.searches) == (20_000, 2_000_000, 2_000_000)
    assert (size.categories, size.popular_searches) == (50, 10_000)
    small = workload.workload_size(10)
    assert small.ai_accounts + small.seller_products == 10
    assert small.sellers == 5 and small.popular_searches == 10


@pytest.mark.parametrize(("products", "seed"), [(9, 1), (-1, 1), (True, 1), (2000, -1), (2000, True), (2000, 10**7)])
def test_bad_arguments_are_rejected(products: Any, seed: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        workload.data_sql(products, seed)


def test_schema_has_the_tables_but_not_the_operator_indexes() -> None:
    text = code(workload.schema_sql())
    for table in TABLES:
        assert f"CREATE TABLE {table} (" in text
    assert "CREATE INDEX" not in text.upper()
    assert "MATERIALIZED VIEW" not in text.upper()


def test_data_sql_restores_the_foreign_keys_it_drops() -> None:
    # The loader drops the named foreign keys for speed and must add back exactly those.
    text = workload.data_sql(2000)
    schema = workload.schema_sql()
    dropped = [line.split()[-1].rstrip(",;") for line in text.splitlines() if "DROP CONSTRAINT" in line]
    assert len(dropped) == 5
    for name in dropped:
        assert f"CONSTRAINT {name} FOREIGN KEY" in schema
        assert f"ADD CONSTRAINT {name}" in text


def test_schema_file_is_package_data() -> None:
    # schema_sql() reads data/schema.sql through importlib.resources: an editable install finds
    # it in the source tree, a wheel (the container image) only if setuptools ships it.
    with (ROOT / "pyproject.toml").open("rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["marketplacedb_operator"]
    assert any(fnmatch.fnmatch("data/schema.sql", pattern) for pattern in patterns), patterns


def test_examples_schema_is_the_packaged_schema() -> None:
    assert (EXAMPLES / "schema.sql").read_text(encoding="utf-8") == workload.schema_sql()


def test_example_view_queries_are_the_workload_queries() -> None:
    views = {v["name"]: v for v in example()["spec"]["materializedViews"]}
    assert set(views) == set(workload.VIEW_QUERIES)
    for name, query in workload.VIEW_QUERIES.items():
        assert views[name]["query"] == query
        assert tuple(views[name]["uniqueKey"]) == workload.VIEW_UNIQUE_KEYS[name]


def test_example_has_the_design_indexes() -> None:
    spec = example()["spec"]
    assert tuple(i["name"] for i in spec["indexes"])[: len(DESIGN_INDEXES)] == DESIGN_INDEXES
    assert spec["materializedViews"][1]["refresh"]["schedule"] == "*/10 * * * *"


def test_example_is_a_valid_resource() -> None:
    pytest.importorskip("pg_query")
    pytest.importorskip("croniter")
    from marketplacedb_operator.api.v1alpha1 import MarketplaceDB

    resource = MarketplaceDB.model_validate(example())
    assert resource.metadata == {"name": "shop", "namespace": "prod"}
    assert [v.unique_key for v in resource.spec.materialized_views] == [["product_type", "id"], ["id"]]


def test_home_queries_pair_base_tables_with_views() -> None:
    assert set(workload.HOME_QUERIES_BASE) == set(workload.HOME_QUERIES_VIEWS) == {"hot_products", "category_counts"}
    assert workload.HOME_QUERIES_BASE["hot_products"] == workload.VIEW_QUERIES["mv_hot_products"]
    assert "FROM mv_hot_products" in workload.HOME_QUERIES_VIEWS["hot_products"]
    assert "FROM mv_category_counts" in workload.HOME_QUERIES_VIEWS["category_counts"]
    for query in workload.HOME_QUERIES_VIEWS.values():
        assert "ai_accounts" not in query and "seller_products" not in query


def test_generate_cli_prints_schema_then_data() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "generate.py"), "--products", "100", "--seed", "3", "--schema"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == workload.schema_sql() + "\n" + workload.data_sql(100, 3)


def test_generate_cli_rejects_too_few_products() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "generate.py"), "--products", "5"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "products must be" in result.stderr
