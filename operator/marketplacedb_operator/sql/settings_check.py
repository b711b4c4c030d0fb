"""Database settings confirmed against the connected server's pg_settings before ALTER DATABASE (pure).

    refused(desired, catalog) -> list[str]    one message per declared value the server would refuse

api/parameters.py types each allow-listed GUC with PostgreSQL 15's bounds, for admission (no server
at hand there). The server the operator connects to is the authority: another major version, a build
without prefetch (effective_io_concurrency's maximum is 0 there) or a managed service may differ. The
gateway reads `pg_settings` (vartype, unit, min_val, max_val, enumvals) for the declared names
(GUC_FACTS, in the observation's transaction), and the plan refuses the whole settings block when
one value falls outside them: a condition naming the parameter and what this server allows, instead
of a failed statement, and no setting changed while another is refused.

The conversion follows PostgreSQL's own (guc.c, parse_int/parse_real and convert_to_base_unit): a
value with a unit is converted to the parameter's unit and rounded half to even (rint), a value
without one is in the parameter's unit; then min_val..max_val. tests/test_settings_check_pg.py
checks this agrees with the server itself (set_config in a rolled-back transaction) value for value.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Read in the observation's transaction, for the declared names only.
GUC_FACTS = """
SELECT name, vartype, coalesce(unit, ''), coalesce(min_val, ''), coalesce(max_val, ''),
       coalesce(enumvals, '{}'::text[])
  FROM pg_catalog.pg_settings WHERE name = ANY (%(names)s::text[])
"""

# Bytes per memory unit and milliseconds per time unit (guc.c's unit tables).
_MEMORY_BYTES: dict[str, float] = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME_MS: dict[str, float] = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_NUMBER = re.compile(r"^\s*([-+]?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


@dataclasses.dataclass(frozen=True)
class GucFacts:
    """One row of pg_settings: what the server accepts for a parameter."""

    name: str
    vartype: str  # bool, integer, real, enum, string
    unit: str = ""  # kB, 8kB, MB, B, ms, s, min, or ''
    min_val: str = ""
    max_val: str = ""
    enumvals: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> GucFacts:
        name, vartype, unit, low, high, choices = row
        return cls(str(name), str(vartype), str(unit), str(low), str(high), tuple(str(c) for c in choices or ()))

    def allowed(self) -> str:
        """What the server allows, in words, for messages."""
        if self.vartype == "enum":
            return "one of " + ", ".join(self.enumvals)
        if self.vartype == "bool":
            return "a boolean"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.min_val}..{self.max_val}{unit}"


def _unit_scale(unit: str) -> tuple[dict[str, float], float] | None:
    """(unit table, size of the parameter's unit in it) for a parameter with a unit (`8kB`: 8 x 1024 B)."""
    match = re.fullmatch(r"([0-9]*)([A-Za-z]+)", unit)
    if match is None:
        return None
    count, base = int(match[1] or 1), match[2]
    for table in (_MEMORY_BYTES, _TIME_MS):
        if base in table:
            return dict(table), table[base] * count
    return None


def _amount(facts: GucFacts, value: str) -> float | None:
    """The value in the parameter's own unit, as the server computes it; None when it cannot parse it."""
    match = _NUMBER.fullmatch(value)
    if not match:
        return None
    amount, unit = float(match[1]), match[2]
    if unit:
        scale = _unit_scale(facts.unit)
        if scale is None or unit not in scale[0]:
            return None
        amount = amount * scale[0][unit] / scale[1]
    return float(round(amount)) if facts.vartype == "integer" else amount


def problem(facts: GucFacts | None, name: str, value: str) -> str:
    """Why the server would refuse `value` for `name`, or '' when it accepts it."""
    if facts is None:
        return f"{name} is not a parameter of the connected server"
    if facts.vartype == "enum":
        return "" if value.lower() in facts.enumvals else f"{value!r} is not {facts.allowed()} on this server"
    if facts.vartype in ("integer", "real"):
        amount = _amount(facts, value)
        if amount is None or not math.isfinite(amount):
            return f"{value!r} is not a {facts.vartype} in {facts.unit or 'no unit'} this server can read"
        if not float(facts.min_val) <= amount <= float(facts.max_val):
            return f"{value!r} is outside what this server allows: {facts.allowed()}"
    return ""


def refused(settings: Iterable[tuple[str, str]], facts: Mapping[str, GucFacts] | None) -> list[str]:
    """One message per declared setting the connected server would refuse (empty: apply them all).
    Without facts (pg_settings not read: a catalog built by hand) there is nothing to confirm against."""
    if facts is None:
        return []
    problems = [(name, problem(facts.get(name), name, value)) for name, value in settings]
    found = [f"spec.database.settings.{name}: {why} (pg_settings)" for name, why in problems if why]
    if found:
        found[-1] += "; no database setting was changed"
    return found
