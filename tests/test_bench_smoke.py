"""The benchmark code runs: its real servers at a toy scale, one scenario end to end, no mocks.

bench/ starts its own PostgreSQL (the harness's), loads the reference workload, applies the example
resource with `marketplacedb apply` and measures with pgbench; here with 2,000 products, so that
the whole test takes a few seconds. Speed is never asserted, only that the figures exist and the
behaviour they measure holds (skip-if-unchanged skips; the views return what the base tables do).
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from marketplacedb_operator import workload

# bench/ is a top-level package of the repository, not of the installed project: import it from
# the checkout (pytest puts only tests/ on the path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import env, pgbench, report
from bench.scenarios import home, refresh
from bench.scripts import Scripts

PRODUCTS = 2000


@pytest.fixture(scope="module")
def bench_env() -> Iterator[tuple[env.Workbench, Scripts]]:
    workdir = Path(tempfile.mkdtemp(prefix="mdb-bench-test-"))
    bench = env.start(PRODUCTS, workdir, max_connections=50)
    try:
        output = bench.apply_example()
        assert all(o["ok"] for doc in output["resources"] for o in doc["outcomes"])
        yield bench, Scripts(workdir / "scripts", PRODUCTS)
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_home_page_before_and_after_through_pgbench(bench_env: tuple[env.Workbench, Scripts]) -> None:
    bench, scripts = bench_env
    before = home.before_operator(bench, scripts, pages=2)
    assert before["base_pages"] == 2 and before["base_p50_ms"] > 0
    views = pgbench.run("views", bench.direct(), scripts.one("home_views"), clients=1, transactions=20)
    assert views.ok and views.processed == 20 and len(views.latencies_ms) == 20
    with bench.connect() as conn:  # the two pages the bench compares are the same rows
        for name in ("hot_products", "category_counts"):
            base = conn.execute(workload.HOME_QUERIES_BASE[name]).fetchall()
            assert base == conn.execute(workload.HOME_QUERIES_VIEWS[name]).fetchall()


def test_skip_if_unchanged_scenario_runs_and_skips(bench_env: tuple[env.Workbench, Scripts]) -> None:
    bench, _ = bench_env
    result = refresh.skip_if_unchanged(bench, checks=5, forced=1)
    assert result["period_runs"] == 18  # an hour of */5 and */10
    assert result["period_refreshes"] == 0 and result["period_skipped"] == 18
    assert result["always_refreshes"] == 18 and result["always_seconds"] > 0
    assert not math.isnan(result["check_p50_ms"])
    assert report.num(result["check_p50_ms"], "ms").endswith(" ms")
