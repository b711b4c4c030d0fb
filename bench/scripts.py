"""The pgbench scripts: the home page (before and after the operator), the round-trip floor, the
marketplace's query mix at peak, and a write load. One script run is one pgbench transaction.

The home page is exactly the two queries of marketplacedb_operator.workload (the BFF's), so the
"before" and "after" pages return the same rows in the same order.
"""

from __future__ import annotations

from pathlib import Path

from marketplacedb_operator import workload

from . import pgbench


def _one_statement(query: str) -> str:
    """pgbench reads one statement per line unless it ends with `;`: join, then terminate."""
    return " ".join(line.strip() for line in query.splitlines()) + ";\n"


def home_page(queries: dict[str, str]) -> str:
    """One home page = the BFF's two queries, in one pgbench transaction (two round trips)."""
    return "".join(_one_statement(queries[name]) for name in ("hot_products", "category_counts"))


def scripts(products: int) -> dict[str, str]:
    size = workload.workload_size(products)
    sp, users, cats = size.seller_products, size.users, size.categories
    return {
        "home_base": home_page(workload.HOME_QUERIES_BASE),
        "home_views": home_page(workload.HOME_QUERIES_VIEWS),
        # The floor: one primary-key lookup, the cheapest useful round trip.
        "pk": f"\\set id random(1, {sp})\nSELECT id, name, price FROM seller_products WHERE id = :id;\n",
        # The marketplace at peak, one query per transaction (weights in MIX): product pages,
        # category pages (partial index), the two home-page views, search suggestions (covering
        # index), a user's recent searches (index), a seller's open orders (index).
        "product": (f"\\set id random(1, {sp})\n"
                    "SELECT p.id, p.name, p.price, p.description, p.stock, s.store_name FROM seller_products AS p "
                    "JOIN seller_profiles AS s ON s.id = p.seller_id WHERE p.id = :id;\n"),
        "category": (f"\\set c random(1, {cats})\n"
                     "SELECT id, name, price, icon_url, sold_count FROM seller_products WHERE category_id = :c "
                     "AND is_available = true AND is_approved = true ORDER BY sold_count DESC LIMIT 24;\n"),
        "hot": _one_statement(workload.HOME_QUERIES_VIEWS["hot_products"]),
        "counts": _one_statement(workload.HOME_QUERIES_VIEWS["category_counts"]),
        "suggest": "SELECT query, is_trending FROM popular_searches ORDER BY search_count DESC LIMIT 10;\n",
        "recent": (f"\\set u random(1, {users})\n"
                   "SELECT query, created_at FROM search_history WHERE user_id = :u "
                   "ORDER BY created_at DESC LIMIT 10;\n"),
        "orders": (f"\\set s random(1, {size.sellers})\n"
                   "SELECT id, amount, created_at FROM seller_orders WHERE seller_id = :s AND status = 'paid' "
                   "ORDER BY created_at DESC LIMIT 20;\n"),
        # Writes: a sale (sold_count + 1) on a random product, in its own transaction.
        "sale": (f"\\set id random(1, {sp})\n"
                 "UPDATE seller_products SET sold_count = sold_count + 1, updated_at = now() WHERE id = :id;\n"),
    }


MIX: dict[str, int] = {"product": 40, "category": 15, "hot": 10, "counts": 10, "suggest": 10, "recent": 10,
                       "orders": 5}
"""Weights of the peak mix (percent of transactions)."""


class Scripts:
    """The scripts written to files once per bench run."""

    def __init__(self, directory: Path, products: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = pgbench.write_scripts(directory, scripts(products))

    def one(self, name: str) -> list[tuple[Path, int]]:
        return [(self.paths[name], 1)]

    def mix(self) -> list[tuple[Path, int]]:
        return [(self.paths[name], weight) for name, weight in MIX.items()]
