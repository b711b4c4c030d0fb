"""Formatting and bookkeeping shared by the report's sections (bench/report.py, report_rest.py):
numbers, tables of runs, medians, the issue's targets, and the machine load beside each scenario."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .load import OUTSIDE_THRESHOLD
from .stats import median

LARGE_KEYS = ("latencies", "base_latencies", "indexed_latencies", "views_latencies", "peak_latencies", "timelines",
              "ready_times", "rss_timeline", "timelines")


def compact(value: Any) -> Any:
    """The results without per-transaction arrays (for results.json)."""
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items() if k not in LARGE_KEYS}
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


# --- formatting -------------------------------------------------------------------------------------


def num(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        text = f"{int(value):,}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".rstrip()


def ratio(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.1f}x"


def col(runs: Sequence[dict[str, Any]], key: str) -> list[Any]:
    return [run.get(key) for run in runs]


def med(runs: Sequence[dict[str, Any]], key: str) -> float:
    return median(float(v) for v in col(runs, key) if isinstance(v, int | float) and not isinstance(v, bool))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def spread(values: Sequence[Any]) -> str:
    """(max - min) / median of the runs: how stable a figure is (empty for one run or non-numbers)."""
    clean = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)
             and not math.isnan(float(v))]
    middle = median(clean)
    if len(clean) < 2 or not middle:
        return ""
    return f"{(max(clean) - min(clean)) / abs(middle):.0%}"


def run_rows(runs: Sequence[dict[str, Any]], metrics: Sequence[tuple[str, str, str]]) -> list[list[str]]:
    """One row per metric: label, each run, the median (unit appended), the spread of the runs."""
    rows = []
    for label, key, unit in metrics:
        values = col(runs, key)
        cells = [num(v, unit) for v in values]
        rows.append([label, *cells, f"**{num(med(runs, key), unit)}**", spread(values)])
    return rows


def ratio_row(label: str, values: Sequence[float]) -> list[str]:
    """A row of per-run ratios, their median and spread."""
    return [label, *[ratio(v) for v in values], f"**{ratio(median(values))}**", spread(values)]


def runs_header(first: str, runs: Sequence[Any]) -> list[str]:
    return [first, *[f"run {i}" for i in range(1, len(runs) + 1)], "median", "spread"]


# --- derived figures -----------------------------------------------------------------------------------


def per_run_ratio(numerators: Sequence[dict[str, Any]], num_key: str, denominators: Sequence[dict[str, Any]],
                  den_key: str) -> list[float]:
    out = []
    for a, b in zip(numerators, denominators, strict=False):
        x, y = a.get(num_key), b.get(den_key)
        out.append(float(x) / float(y) if x and y else math.nan)
    return out


class Targets:
    """The open issues' targets: (issue, what, measured, reached, explanation). `reached` None is a
    figure the issue asks to show without a threshold; its explanation is always given."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bool | None, str, str]] = []

    def add(self, what: str, measured: str, reached: bool | None, why_not: Callable[[], str],
            issue: str = "", values: Sequence[Any] = ()) -> None:
        """`values`: the figure of each run, for its spread (how stable the measured figure is)."""
        self.rows.append((issue, what, measured, reached, "" if reached else why_not(), spread(values)))


UNKNOWN = "The cause is not established by this run's figures."


def against_expectation(what: str, expected: float, got: float, label_expected: str, label_got: str,
                        unit: str = "ms") -> list[str]:
    """A flag when `got` (which should be the smaller) is larger than `expected` (medians)."""
    if math.isnan(expected) or math.isnan(got) or got <= expected:
        return []
    return [f"**Contradicts the expected direction** ({what}): {label_got} {num(got, unit)} is worse than "
            f"{label_expected} {num(expected, unit)}. " + UNKNOWN, ""]


# --- machine load beside each scenario ---------------------------------------------------------------


def scenario_load(results: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """The load sampler's segments whose label starts with `prefix`, merged (sample-weighted)."""
    segs = [v for k, v in results.get("load", {}).items() if k.startswith(prefix) and v.get("samples")]
    if not segs:
        return None
    n = sum(v["samples"] for v in segs)
    merged = {key: sum(v[key] * v["samples"] for v in segs) / n for key in ("busy", "bench", "outside")}
    merged["outside_max"] = max(v["outside_max"] for v in segs)
    merged["loaded"] = merged["outside"] > OUTSIDE_THRESHOLD
    return merged


def load_line(results: dict[str, Any], prefix: str) -> list[str]:
    """One sentence on how busy the machine was during a scenario, and from where."""
    seg = scenario_load(results, prefix)
    if seg is None:
        return ["Machine load during this scenario: not sampled.", ""]
    text = (f"Machine during this scenario: all CPUs {seg['busy']:.0%} busy on average, the bench's own processes "
            f"{seg['bench']:.0%}, other work {seg['outside']:.0%} "
            f"(at most {seg['outside_max']:.0%} in a 0.5 s sample).")
    if seg["loaded"]:
        return [f"**Loaded from outside**: {text} More than {OUTSIDE_THRESHOLD:.0%} of the CPUs went to other work: "
                "these figures are not what this machine gives when it is quiet.", ""]
    return [text, ""]


def loaded_note(results: dict[str, Any], prefix: str) -> str:
    """A clause for a "why" sentence when the scenario was loaded from outside (else empty)."""
    seg = scenario_load(results, prefix)
    if seg is None or not seg["loaded"]:
        return ""
    return (f" Other work used {seg['outside']:.0%} of the CPUs during this scenario (marked loaded), which "
            "alone can account for a miss on a latency target.")


