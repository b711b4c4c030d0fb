"""What each API write after an operator restart changed, and whether it was owed.

A restart with nothing changed owes no write. Time still passes, though: a write is *owed* when
the status it writes differs from the status stored before the restart only in what time alone
changes by design (a view that crossed its maxStaleness: `stale` and the Stale condition; a
refresh that ran meanwhile: its lastRefreshTime, lastResult, recentOutcomes), and an Event is owed
when its resource's status write was. Every other write is *spurious*: a rewrite of the same
status, a field a restart recomputes differently, kopf's bookkeeping, a re-applied object.
"""

from __future__ import annotations

import collections
from typing import Any

# Per-view status fields that change when time passes or a refresh runs, with nothing else changed.
_VIEW_TIME_FIELDS = {"stale", "lastRefreshTime", "lastRefreshSeconds", "lastResult", "recentOutcomes"}
# Conditions whose status follows those fields (Stale turns True; Ready does not depend on Stale).
_TIME_CONDITIONS = {"Stale"}


def _conditions(status: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    return {c.get("type"): (c.get("status"), c.get("reason"), c.get("message")) for c in status.get("conditions") or []}


def changed_paths(before: dict[str, Any] | None, patch: dict[str, Any]) -> list[str]:
    """The status fields a merge patch changes, as paths ('conditions[Stale]', 'materializedViews[v].stale');
    a lastTransitionTime alone is reported as such, not as a change of the condition."""
    old = before or {}
    paths: list[str] = []
    for key, new in sorted(patch.items()):
        if key == "conditions":
            was, now = _conditions(old), _conditions({"conditions": new})
            differ = [t for t in sorted(set(was) | set(now), key=str) if was.get(t) != now.get(t)]
            paths += [f"conditions[{t}]" for t in differ]
            if not differ and new != old.get("conditions"):
                paths.append("conditions.lastTransitionTime")
        elif key == "materializedViews" and isinstance(new, list):
            was_views = {v.get("name"): v for v in old.get(key) or []}
            for view in new:
                prior = was_views.pop(view.get("name"), {})
                paths += [f"{key}[{view.get('name')}].{f}" for f in sorted(set(view) | set(prior))
                          if view.get(f) != prior.get(f)]
            paths += [f"{key}[{name}] removed" for name in was_views]
        elif new != old.get(key):
            paths.append(key)
    return paths


def _owed(paths: list[str]) -> bool:
    def time_only(path: str) -> bool:
        if path.startswith("conditions["):
            return path[len("conditions["):-1] in _TIME_CONDITIONS
        if path.startswith("materializedViews["):
            return path.rsplit(".", 1)[-1] in _VIEW_TIME_FIELDS
        return False

    return bool(paths) and all(time_only(p) for p in paths)


def classify(before: dict[str, dict[str, Any] | None], writes: list[list[Any]]) -> dict[str, Any]:
    """Sort the writes made after a restart into owed and spurious ones.

    `before`: each MarketplaceDB's stored status (namespace/name -> status) just before the restart;
    `writes`: [time, method, resource[/subresource], namespace/name, body] as the emulator recorded them.
    """
    owed: collections.Counter[str] = collections.Counter()
    spurious: collections.Counter[str] = collections.Counter()
    why: collections.Counter[str] = collections.Counter()  # spurious status writes: which fields changed
    examples: list[dict[str, Any]] = []
    owed_keys: set[str] = set()
    latest = {k: dict(v or {}) for k, v in before.items()}
    events: list[tuple[str, str]] = []  # (kind, the resource it is about)
    for _, method, resource, key, body in sorted(writes, key=lambda w: w[0]):
        kind = f"{method} {resource}"
        if resource == "events" and isinstance(body, dict):
            about = body.get("involvedObject") or {}
            events.append((kind, f"{about.get('namespace')}/{about.get('name')}"))
            continue
        if resource == "marketplacedbs/status" and isinstance(body, dict):
            status = body.get("status")
            patch: dict[str, Any] = status if isinstance(status, dict) else body
            paths = changed_paths(latest.get(key), patch)
            stored = latest.setdefault(key, {})
            for field, value in patch.items():  # a merge patch: null deletes the field
                stored.pop(field, None) if value is None else stored.__setitem__(field, value)
            if _owed(paths):
                owed[kind] += 1
                owed_keys.add(key)
                continue
            spurious[kind] += 1
            for path in paths or ["nothing (the same status again)"]:
                why[path if path.startswith("conditions") else path.split("[", 1)[0] +
                    ("." + path.rsplit(".", 1)[-1] if "]." in path else "")] += 1
            if len(examples) < 5:
                examples.append({"write": f"{kind} {key}", "changed": paths or "nothing"})
            continue
        spurious[kind] += 1
        if len(examples) < 5:
            examples.append({"write": f"{kind} {key}", "body": str(body)[:300]})
    for kind, about in events:  # an Event for an owed transition (Stale=True) is owed too
        (owed if about in owed_keys else spurious)[kind] += 1
    return {"owed": sum(owed.values()), "spurious": sum(spurious.values()), "owed_by_kind": dict(owed),
            "spurious_by_kind": dict(spurious), "spurious_status_fields": dict(why.most_common(12)),
            "spurious_examples": examples}
