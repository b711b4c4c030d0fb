"""The reference resource's schema part, shared by the pure plan tests (test_plan.py) and the schema
engine tests on a real PostgreSQL (test_schema_engine_pg.py and the modules that import from it)."""

from __future__ import annotations

from typing import Any

from marketplacedb_operator import workload

# The reference workload's indexes (docs/architecture.md#reference-workload).
REFERENCE_INDEXES: list[dict[str, Any]] = [
    {"name": "idx_ai_accounts_available_category", "table": "ai_accounts",
     "columns": [{"name": "category_id"}, {"name": "sold_count", "order": "desc"}], "where": "is_available = true"},
    {"name": "idx_seller_products_available_approved", "table": "seller_products",
     "columns": [{"name": "category_id"}, {"name": "sold_count", "order": "desc"}],
     "where": "is_available = true AND is_approved = true"},
    {"name": "idx_seller_orders_seller_status", "table": "seller_orders",
     "columns": [{"name": "seller_id"}, {"name": "status"}, {"name": "created_at", "order": "desc"}]},
    {"name": "idx_search_history_user_recent", "table": "search_history",
     "columns": [{"name": "user_id"}, {"name": "created_at", "order": "desc"}]},
    {"name": "idx_popular_searches_ranking", "table": "popular_searches",
     "columns": [{"name": "search_count", "order": "desc"}], "include": ["query", "is_trending"]},
]


def reference_views(refresh: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The reference workload's materialized views, with `refresh` as each one's policy when given."""
    return [{"name": name, "query": query, "uniqueKey": list(workload.VIEW_UNIQUE_KEYS[name]),
             **({"refresh": refresh} if refresh is not None else {})}
            for name, query in workload.VIEW_QUERIES.items()]


def reference_spec(database: dict[str, Any], /, *, refresh: dict[str, Any] | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """A MarketplaceDB spec (as the API server stores it) with the reference indexes and views;
    `overrides` replace whole top-level fields (`database` included)."""
    spec: dict[str, Any] = {"database": database, "indexes": REFERENCE_INDEXES,
                            "materializedViews": reference_views(refresh)}
    spec.update(overrides)
    return spec
