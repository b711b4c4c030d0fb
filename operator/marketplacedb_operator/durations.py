"""Durations as Kubernetes users write them (`500ms`, `5s`, `30m`, `1h30m`, `2d`).

The arithmetic is `durationpy`'s (Go's duration strings; installed with the `kubernetes` client, which
requires durationpy>=0.11, the version that reads the `d` unit too). The *form* is ours:
DURATION_PATTERN is what the CRD enforces, and it is stricter than durationpy on purpose. durationpy
0.11 also takes fractions (`1.5h`), signs (`-5s`), a bare `0`, units ns/us/w/mm/y, and even spaces
between parts (`1h 30m`: its regular expression checks only the string's start and end). The API
server would refuse all of those through the CRD's pattern, so the operator refuses them too: one
form, whether the spec came through the API server, the webhook or `marketplacedb validate`.
"""

from __future__ import annotations

import re

import durationpy

DURATION_PATTERN = r"^([0-9]+(ms|s|m|h|d))+$"


def parse_duration(text: str) -> float:
    """Seconds in `text`; ValueError with the accepted form when it is not a duration."""
    if not isinstance(text, str) or not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration: use digits and units ms, s, m, h, d (e.g. 5s, 1h30m)")
    try:
        return float(durationpy.from_str(text).total_seconds())
    except durationpy.DurationError:
        # Past timedelta's range (about 2.7 million years): not a duration anyone means.
        raise ValueError(f"{text[:40]!r} is out of range: at most 999999999d") from None


def to_pg_ms(seconds: float) -> str:
    """A PostgreSQL duration setting value (`lock_timeout`, `statement_timeout`) in milliseconds."""
    return f"{round(seconds * 1000)}ms"
