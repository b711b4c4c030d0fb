"""Small statistics: percentiles (nearest-rank), medians of runs, gaps between completions."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of `values`; NaN when empty.

    Nearest rank, not interpolation: the p99 of 100 samples is the 99th sample, a latency that
    was really observed.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Iterable[float]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def longest_gap(times: Sequence[float], start: float, end: float) -> float:
    """The longest interval in [start, end] during which none of `times` fell."""
    inside = sorted(t for t in times if start <= t <= end)
    edges = [start, *inside, end]
    return max((b - a for a, b in zip(edges, edges[1:], strict=False)), default=end - start)


def empty_seconds(times: Sequence[float], start: float, end: float) -> int:
    """Whole seconds [start + k, start + k + 1) inside [start, end) in which nothing completed."""
    counts = [0] * max(0, int(end - start))
    for t in times:
        k = int(t - start)
        if 0 <= k < len(counts):
            counts[k] += 1
    return sum(1 for c in counts if c == 0)
