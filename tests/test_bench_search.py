"""Scenario 7 of the benchmark (product search before and after the trigram index) runs end to end
on its real servers at a toy scale: the figures exist, the rows are the same with and without the
index, the planner uses it, and the database is left as the operator finds it. Speed is never
asserted. The report's section is computed from those figures."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is a top-level package of the checkout
from bench import env
from bench.report_search import search_section
from bench.scenarios import search


def test_search_scenario_runs_and_leaves_the_database_as_found() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mdb-bench-search-"))
    bench = env.start(2000, workdir, max_connections=50)
    try:
        runs = [search.product_search(bench, workdir / "search", before_seconds=0.5, after_seconds=0.5)
                for _ in range(2)]
        with bench.connect() as conn:
            assert conn.execute("SELECT to_regclass('public.idx_seller_products_name_trgm')").fetchone() == (None,)
            assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'").fetchone() == (0,)
        for run in runs:
            assert run["before_ok"] and run["after_ok"] and run["rows"] == 1400
            assert run["before_searches"] > 0 and run["after_searches"] > 0
            assert run["same_rows"] and run["index_used"], run
            assert run["before_p50_ms"] > 0 and run["after_p99_ms"] > 0
            assert run["p50_ratio"] == run["before_p50_ms"] / run["after_p50_ms"]
        # marketplacedb apply still builds the index afterwards (created by the operator, not adopted)
        output = bench.apply_example()
        assert all(o["ok"] for doc in output["resources"] for o in doc["outcomes"])
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(search_section({"workbench": {"search": runs}, "load": {}}))
    assert "## 7. Product search" in text and "1,400 rows" in text
    assert "p50 ratio (without / with)" in text and "medians of the per-run ratios" in text
