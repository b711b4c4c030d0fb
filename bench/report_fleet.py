"""Scenario 6's explanations (bench/report_rest.py's operator section): what the writes after a
restart changed, and where the operator's memory goes, both computed from the run's own records."""

from __future__ import annotations

import math
from typing import Any

from .report_kit import num
from .scenarios.fleet_procs import SCRAPE_EVERY

# Owners (bench/operator_proc.py's owner()) grouped for the report, in order.
_GROUPS = (
    ("kopf (the watch: object bodies, per-object memory)", ("kopf", "aiohttp", "multidict", "yarl", "aiosignal")),
    ("Prometheus metrics (per-resource series)", ("prometheus_client", "operator:metrics.py")),
    ("the operator's own objects", ("operator:",)),
    ("Kubernetes client, psycopg, pydantic", ("kubernetes", "urllib3", "psycopg", "pydantic", "pydantic_core")),
)


def restart_rows() -> list[tuple[str, str, str]]:
    return [("idle resync: writes owed (time passed: a view crossed maxStaleness, a refresh ran)",
             "idle_writes_owed", ""),
            ("idle resync: spurious writes (nothing changed)", "idle_writes_spurious", "")]


def restart_lines(runs: list[dict[str, Any]]) -> list[str]:
    traced: list[dict[str, Any]] = [r["idle_writes_traced"] for r in runs if r.get("idle_writes_traced")]
    if not traced:
        return []
    first = traced[0]
    lines = ["Every write after the restart was traced (the emulator records each write's body) and compared "
             "with the status stored before the restart (`bench/scenarios/restart_writes.py`): *owed* when it "
             "changes only what time alone changes by design (a view's `stale` and the Stale condition, a refresh "
             "that ran), *spurious* otherwise. Run 1: "
             f"{first['owed']} owed, {first['spurious']} spurious."]
    if first["spurious"]:
        lines[-1] += (" Spurious, by request: " + ", ".join(f"{k} {v}" for k, v in first["spurious_by_kind"].items())
                      + "; status fields they changed: "
                      + (", ".join(f"{k} ({v})" for k, v in first["spurious_status_fields"].items()) or "none")
                      + ". First ones: " + "; ".join(str(e) for e in first["spurious_examples"][:3]) + ".")
    return lines + [""]


def _group(owner: str) -> str:
    for label, prefixes in _GROUPS:
        if any(owner == p or (p.endswith(":") and owner.startswith(p)) for p in prefixes):
            return label
    return "other (standard library, asyncio tasks, threads)"


def _burst_lines(run: dict[str, Any], base: float, peak: float, count: int) -> list[str]:
    """When the growth happened: a bulk create's burst (kopf's per-object workers each hold the
    object's parsed body while they work) or the reconciles that followed (live series, state)."""
    timeline = [(t, v) for t, v in run.get("rss_timeline", []) if t >= 0 and not math.isnan(v)]
    if not timeline or math.isnan(peak) or peak <= base:
        return []
    mark = base + 0.9 * (peak - base)
    at = next((t for t, v in timeline if v >= mark), None)
    if at is None:
        return []
    ready = sum(1 for r in run.get("ready_times", []) if r <= at)
    return [f"- 90% of the growth ({num(mark, 'MiB')}) was reached {num(at, 's')} after the resources were created, "
            f"when {ready:,} of {count:,} were Ready: the bulk create's burst (every object's event at once), "
            "not the reconciles after it."
            if ready < count / 10 else
            f"- 90% of the growth ({num(mark, 'MiB')}) was reached {num(at, 's')} after the resources were created, "
            f"when {ready:,} of {count:,} were Ready: growth with the reconciles, not a burst at the create."]


def memory_lines(runs: list[dict[str, Any]], count: int) -> list[str]:
    """Where the memory goes: the first (untraced) process's RSS figures, and the restarted
    (tracemalloc) process's live Python objects after its resync, by owner."""
    run = runs[0]
    base, peak, ready = (float(run.get(k) or math.nan) for k in ("rss_start_mib", "rss_peak_mib", "rss_ready_mib"))
    lines = ["**Where the memory goes** (run 1; `bench/operator_proc.py` traces the restarted process with "
             "tracemalloc, so that process's RSS is inflated by the tracing; the peak and Ready figures are the "
             "untraced first process's):", "",
             f"- before any resource: {num(base, 'MiB')} (Python, kopf, pydantic, psycopg, the Kubernetes client, "
             "the metrics server: imports and threads);",
             f"- at the peak: {num(peak, 'MiB')}, {num((peak - base) * 1024 / count, 'KiB')} per resource above that; "
             f"when all were Ready: {num(ready, 'MiB')}; /metrics was scraped every "
             f"{SCRAPE_EVERY:g} s meanwhile, as the chart's ServiceMonitor does ({run.get('metrics_scrapes', 0):,} "
             f"scrapes, the last {num(run.get('metrics_scrape_bytes', 0) / 2**20, 'MiB')} of text)."]
    lines += _burst_lines(run, base, peak, count)
    profile = run.get("idle_memory_profile")
    if not profile:
        return [*lines, "- live objects per resource: not traced in this run.", ""]
    grouped: dict[str, float] = {}
    for owner, mib in profile.get("by_owner_mib", {}).items():
        grouped[_group(owner)] = grouped.get(_group(owner), 0.0) + mib
    live = sum(grouped.values())
    lines.append(f"- live Python objects grown since start-up in the restarted process, every resource reconciled "
                 f"once: {num(live, 'MiB')}, {num(live * 1024 / count, 'KiB')} per resource: "
                 + "; ".join(f"{label} {num(mib * 1024 / count, 'KiB')}" for label, mib in
                             sorted(grouped.items(), key=lambda kv: -kv[1]) if abs(mib) * 1024 / count >= 0.05) + ".")
    transient = (peak - base) - live
    lines.append(f"- the rest of the peak, {num(transient, 'MiB')}, is not live at rest: while a bulk create's events "
                 "are handled, kopf's per-object workers each hold their object's parsed body (~21 KiB for this "
                 "resource; ~1,000 were live 10 s into a create of 1,000, BENCH_ALLOCATOR_STATS in "
                 "bench/operator_proc.py) and Python's allocator keeps the arenas they filled; plus the reconciles' "
                 "working memory (at most 8 reconciles and 8 background jobs at once) and freed memory the "
                 "allocator had not yet handed back.")
    return [*lines, ""]
