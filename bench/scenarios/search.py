"""Scenario 7: product search, `name ILIKE '%term%'`, before and after the trigram GIN index.

The shop's search box (marketplacedb_operator.workload.SEARCH_QUERIES["product_search"], with a
random term `pack #<n>` per query) on the full-scale seller_products, one client, directly on
PostgreSQL: first as the operator finds the database (no index can serve a leading-wildcard
ILIKE: a sequential scan), then with the example's `idx_seller_products_name_trgm` (gin_trgm_ops),
built CONCURRENTLY by the operator's own DDL builder. Both sides run in the same run, back to back,
so their ratio is taken per run. The index and pg_trgm (when this scenario created it) are dropped
again at the end of each run: the database is left as the operator finds it, and `marketplacedb
apply` later builds the index as usual. It therefore runs before the example is applied.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from psycopg import sql

from marketplacedb_operator import workload
from marketplacedb_operator.api.v1alpha1 import IndexSpec
from marketplacedb_operator.sql import ddl

from .. import pgbench
from ..env import Workbench

INDEX_NAME = "idx_seller_products_name_trgm"
# Per run: a window of searches without the index, the build, a window with it. Windows, not counts:
# a search without the index scans the whole table (a few hundred ms at 1 M products), and the
# full bench gives this scenario 25 s (bench/run.py FULL_BUDGET). The report gives the counts.
BEFORE_SECONDS = 2.0
AFTER_SECONDS = 1.0
CHECK_TERM = "pack #1"  # the rows of this search must be the same with and without the index


def script(products: int) -> str:
    """The workload's search query as a pgbench script: the term built from a random number."""
    size = workload.workload_size(products)
    query = workload.SEARCH_QUERIES["product_search"].replace("%%", "%").replace("%(term)s", "('pack #' || :n)")
    return f"\\set n random(1, {size.seller_products})\n" + " ".join(line.strip() for line in query.splitlines()) \
        + ";\n"


def _index(bench: Workbench) -> IndexSpec:
    return next(i for i in bench.spec.indexes if i.name == INDEX_NAME)


def _typical(products: int) -> str:
    """A term like those of the script (most match a few rows): what the planner is asked to explain."""
    return f"pack #{workload.workload_size(products).seller_products // 3}"


def _rows(bench: Workbench) -> list[Any]:
    with bench.connect() as conn:
        return [conn.execute(workload.SEARCH_QUERIES["product_search"], {"term": term}).fetchall()
                for term in (CHECK_TERM, _typical(bench.products))]


def product_search(bench: Workbench, directory: Path, *, before_seconds: float = BEFORE_SECONDS,
                   after_seconds: float = AFTER_SECONDS) -> dict[str, Any]:
    """One run: searches for `before_seconds` without the trigram index, build it, searches for
    `after_seconds` with it, drop it."""
    index = _index(bench)
    directory.mkdir(parents=True, exist_ok=True)
    paths = pgbench.write_scripts(directory, {"search": script(bench.products)})
    target, scripts = bench.direct(), [(paths["search"], 1)]
    with bench.connect() as conn:
        if conn.execute("SELECT to_regclass(%s)", [f"public.{INDEX_NAME}"]).fetchone() != (None,):
            raise RuntimeError(f"{INDEX_NAME} exists already: run this scenario before the example is applied")
        had_trgm = conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'").fetchone() == (1,)
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    try:
        rows_before = _rows(bench)
        before = pgbench.run("search-before", target, scripts, clients=1, seconds=before_seconds, timeout=3600)
        started = time.perf_counter()
        with bench.connect() as conn:
            conn.execute(ddl.create_index(index))  # CONCURRENTLY, as the operator builds it
        build_s = time.perf_counter() - started
        after = pgbench.run("search-after", target, scripts, clients=1, seconds=after_seconds, timeout=3600)
        with bench.connect() as conn:
            plan = conn.execute("EXPLAIN (FORMAT JSON) " + workload.SEARCH_QUERIES["product_search"],
                                {"term": _typical(bench.products)}).fetchone()
        rows_after = _rows(bench)
    finally:
        with bench.connect() as conn:
            conn.execute(ddl.drop_index("public", INDEX_NAME))
            if not had_trgm:
                conn.execute(sql.SQL("DROP EXTENSION IF EXISTS pg_trgm"))
    return {
        "before_searches": before.processed, "after_searches": after.processed,
        "rows": workload.workload_size(bench.products).seller_products,
        "before_p50_ms": before.p(50), "before_p99_ms": before.p(99), "before_ok": before.ok,
        "after_p50_ms": after.p(50), "after_p99_ms": after.p(99), "after_ok": after.ok,
        "p50_ratio": before.p(50) / after.p(50) if after.p(50) else float("nan"),
        "p99_ratio": before.p(99) / after.p(99) if after.p(99) else float("nan"),
        "build_s": build_s,
        "index_used": INDEX_NAME in str(plan),
        "same_rows": rows_before == rows_after and bool(rows_before[0]),
    }
