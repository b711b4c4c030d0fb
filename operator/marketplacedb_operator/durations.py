"""Durations as Kubernetes users write them (`500ms`, `5s`, `30m`, `1h30m`, `2d`)."""

from __future__ import annotations

import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h|d))+$"


def parse_duration(text: str) -> float:
    """Seconds in `text`; ValueError with the accepted form when it is not a duration."""
    if not isinstance(text, str) or not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration: use digits and units ms, s, m, h, d (e.g. 5s, 1h30m)")
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(text))


def to_pg_ms(seconds: float) -> str:
    """A PostgreSQL duration setting value (`lock_timeout`, `statement_timeout`) in milliseconds."""
    return f"{round(seconds * 1000)}ms"
