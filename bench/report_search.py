"""Section 7 of bench/REPORT.md: product search before and after the trigram index (bench/scenarios/search.py).

Every sentence is computed from the run's figures: the per-run ratios of p50 and p99 (same run,
back to back), their median, and flags when the index did not help or the rows differed.
"""

from __future__ import annotations

import math
from typing import Any

from .report_kit import against_expectation, load_line, med, num, ratio, ratio_row, run_rows, runs_header, table
from .stats import median


def search_section(results: dict[str, Any]) -> list[str]:
    runs = results["workbench"].get("search")
    if not runs:
        return []
    first = runs[0]
    lines = ["## 7. Product search: `name ILIKE '%term%'` before and after the trigram index", "",
             f"The shop's search box (`workload.SEARCH_QUERIES[\"product_search\"]`, a random term `pack #<n>` per "
             f"query) on seller_products ({num(first['rows'])} rows), one client, directly on PostgreSQL, in each "
             "run: first as the operator finds the database (no index serves a leading-wildcard ILIKE), then with "
             "the example's `idx_seller_products_name_trgm` (`gin_trgm_ops`), built `CONCURRENTLY` in between. "
             "The index is dropped again after each run.", ""]
    lines += table(runs_header("product search", runs), [
        *run_rows(runs, [("without the index: searches", "before_searches", ""),
                         ("without the index: p50", "before_p50_ms", "ms"),
                         ("without the index: p99", "before_p99_ms", "ms"),
                         ("with the trigram index: searches", "after_searches", ""),
                         ("with the trigram index: p50", "after_p50_ms", "ms"),
                         ("with the trigram index: p99", "after_p99_ms", "ms"),
                         ("index build (CONCURRENTLY)", "build_s", "s")]),
        ratio_row("p50 ratio (without / with)", [float(r["p50_ratio"]) for r in runs]),
        ratio_row("p99 ratio (without / with)", [float(r["p99_ratio"]) for r in runs])])
    p50 = median(float(r["p50_ratio"]) for r in runs)
    p99 = median(float(r["p99_ratio"]) for r in runs)
    if not math.isnan(p50) and not math.isnan(p99):
        lines += [f"With the trigram index, a search's median latency is {ratio(p50)} lower at p50 "
                  f"({num(med(runs, 'before_p50_ms'), 'ms')} -> {num(med(runs, 'after_p50_ms'), 'ms')}) and "
                  f"{ratio(p99)} at p99 ({num(med(runs, 'before_p99_ms'), 'ms')} -> "
                  f"{num(med(runs, 'after_p99_ms'), 'ms')}), medians of the per-run ratios.", ""]
    fewest = min(int(r["before_searches"]) for r in runs)
    if fewest < 100:
        lines += [f"Without the index a run made as few as {fewest} searches: its p99 is then the slowest of them "
                  "(nearest rank), not a tail of a hundred.", ""]
    if not all(r.get("index_used") for r in runs):
        lines += ["**The planner did not choose the trigram index** for a typical term in every run: the ratio "
                  "then measures the planner's choice, not the index.", ""]
    if not all(r.get("same_rows") for r in runs):
        lines += ["**The search returned different rows with and without the index** in at least one run.", ""]
    lines += load_line(results, "7.")
    lines += against_expectation("the trigram index should make the search faster", med(runs, "before_p50_ms"),
                                 med(runs, "after_p50_ms"), "p50 without the index", "p50 with it")
    return lines
