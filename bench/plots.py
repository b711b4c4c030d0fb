"""PNG plots of one run: latency distributions, the refresh stall timeline, the operator's fleet.

matplotlib (the `bench` extra) with the non-interactive Agg backend; a missing matplotlib
skips the plots and says so in the log rather than losing the report.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def draw(results: dict[str, Any], directory: Path) -> dict[str, str]:
    """Draw every plot; returns {name: path relative to REPORT.md}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install '.[bench]'): no plots", file=sys.stderr)
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    wb, fleet = results.get("workbench"), results["fleet"]
    painters = (("home", _home), ("pooling", _pooling), ("refresh", _refresh)) if wb is not None else ()
    # `make bench-fleet` writes its own operator plot beside the main run's.
    operator = "operator-fleet" if wb is None else "operator"
    for name, painter in (*painters, (operator, _operator)):
        fig = painter(plt, wb or {}, fleet)
        if fig is None:
            continue
        path = directory / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files[name] = f"plots/{path.name}"
    return files


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    ordered = sorted(values)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n:,})")


def _middle(runs: list[dict[str, Any]], key: str) -> list[float]:
    """The samples of all runs together (each run is short; together they fill the tails)."""
    return [v for run in runs for v in run.get(key, [])]


def _home(plt: Any, wb: dict[str, Any], fleet: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _cdf(ax, _middle(wb["home_before"], "base_latencies"), "base tables, no indexes")
    _cdf(ax, _middle(wb["home_after"], "indexed_latencies"), "base tables + operator's indexes")
    _cdf(ax, _middle(wb["home_after"], "views_latencies"), "materialized views (1 client)")
    _cdf(ax, _middle(wb["home_after"], "peak_latencies"), "views at 1,160 pages/s via pgbouncer")
    ax.set_xscale("log")
    ax.set_xlabel("home page latency (ms, log scale)")
    ax.set_ylabel("fraction of pages")
    ax.set_title("Home page (two BFF queries): latency distribution, all runs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _pooling(plt: Any, wb: dict[str, Any], fleet: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for where in ("direct", "pooled"):
        _cdf(ax, [v for run in wb["peak"] for v in run.get("latencies", {}).get(where, [])], where)
    ax.set_xscale("log")
    ax.set_xlabel("transaction latency from its scheduled start (ms, log scale)")
    ax.set_ylabel("fraction of transactions")
    peak = wb["peak"][0] if wb["peak"] else {}
    ax.set_title(f"{peak.get('clients', 500):,} clients at {peak.get('rate', 0):,} tx/s (60% of direct flat-out): "
                 "direct vs pgbouncer, all runs", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _refresh(plt: Any, wb: dict[str, Any], fleet: dict[str, Any]) -> Any:
    runs = wb["refresh"]
    if not runs:
        return None
    run = runs[0]  # one run drawn as it happened
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    width = 0.05
    titles = {"plain": "REFRESH MATERIALIZED VIEW (plain, what a pg_cron job runs)",
              "concurrent": "the project's refresh (REFRESH ... CONCURRENTLY)"}
    for ax, mode in zip(axes, ("plain", "concurrent"), strict=True):
        line = run["timelines"][mode]
        origin = line["origin"]
        times = [t - origin for t in line["completions"]]
        if times:
            bins = int(max(times) / width) + 1
            ax.hist(times, bins=bins, range=(0, bins * width), color="tab:blue", label="reads completed")
        ax.axvspan(line["start"] - origin, line["end"] - origin, color="tab:red", alpha=0.2, label="refresh running")
        ax.set_ylabel(f"reads per {int(width * 1000)} ms")
        ax.set_title(titles[mode], fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds since the read load started (home pages at 1,160/s)")
    fig.suptitle("Home-page reads completed while both views are refreshed (run 1)")
    return fig


def _operator(plt: Any, wb: dict[str, Any], fleet: dict[str, Any]) -> Any:
    sizes = sorted((k for k in fleet if k.isdigit()), key=int)
    if not sizes:
        return None
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for size in sizes:
        run = fleet[size][0]
        times = run.get("ready_times", [])
        ax.step(times, range(1, len(times) + 1), where="post", label=f"N = {int(size):,}")
        timeline = run.get("rss_timeline", [])
        mem.plot([t for t, _ in timeline], [v for _, v in timeline], label=f"N = {int(size):,}")
    ax.set_xlabel("seconds after the resources were created")
    ax.set_ylabel("resources Ready")
    ax.set_title("Resources Ready over time (run 1)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    mem.set_xlabel("seconds after the resources were created")
    mem.set_ylabel("operator resident memory (MiB)")
    mem.set_title("Operator memory (VmRSS), run 1")
    mem.grid(True, alpha=0.3)
    mem.legend(fontsize=8)
    return fig
