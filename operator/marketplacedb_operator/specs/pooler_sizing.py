"""The pooler's connection budget: how many server connections each PgBouncer pod may open.

Every pod opens its own pool, so the anchors' habit of copying one `default_pool_size` to every
pod multiplies it by the replica count, and a rollout briefly adds one more pod. Here the budget
is computed once from the server's real `max_connections`:

    available = max_connections - superuser_reserved_connections - headroom
    headroom  = max(settings.headroom_min_connections, ceil(headroom_fraction * max_connections))
    pods      = replicas + 1
    per pod   = available // pods   (= max_db_connections, the hard cap PgBouncer enforces)

Why `replicas + 1`: during a rolling update (and during a voluntary eviction) one extra pod holds
server connections at once: either the surge pod (replicas == 1: maxSurge 1, so there is no gap
in service) or the old pod still draining its transactions while its replacement starts (the
Deployment controller creates the replacement as soon as the old pod is *terminating*, not when it
is gone; replicas > 1 uses maxSurge 0 / maxUnavailable 1, so only one pod is replaced at a time).
`max_db_connections` makes each pod's share a hard limit, so the sum can never exceed `available`.

Several users (the owner and `spec.pooler.users`, or whoever auth_query admits) each get a pool of
`default_pool_size` per pod; `max_db_connections` is per database, so it caps the sum of those
pools. Only an explicit `max_db_connections: 0` (no limit) makes the count of users matter.
"""

from __future__ import annotations

import math
from typing import Any

from ..api.v1alpha1 import PoolerBudget, PoolerSpec
from ..settings import Settings

# Part of a pod's share kept as the reserve pool (used only when clients wait longer than
# reserve_pool_timeout): absorbs bursts without raising the steady-state connection count.
RESERVE_FRACTION = 0.2


def headroom(settings: Settings, max_connections: int) -> int:
    """Connections kept free for the operator, refresh jobs and ad-hoc sessions."""
    return max(settings.headroom_min_connections, math.ceil(settings.headroom_fraction * max_connections))


def budgeted_pods(replicas: int) -> int:
    """Pods that may hold server connections at the same time (see the module docstring)."""
    return replicas + 1


def rollout_strategy(replicas: int) -> dict[str, Any]:
    """The Deployment strategy the budget assumes: one extra pod at most, never a gap for one replica."""
    if replicas > 1:
        rolling = {"maxSurge": 0, "maxUnavailable": 1}
    else:
        rolling = {"maxSurge": 1, "maxUnavailable": 0}
    return {"type": "RollingUpdate", "rollingUpdate": rolling}


def _int_param(pooler: PoolerSpec, name: str) -> int | None:
    value = pooler.parameters.get(name)
    return None if value is None else int(value)


def login_users(pooler: PoolerSpec) -> int:
    """Pools a pod may open: one per user that logs in (the owner only when allowed)."""
    owner = pooler.owner_login if pooler.owner_login is not None else not pooler.users
    return len(pooler.users) + (1 if owner else 0)


def compute_budget(
    pooler: PoolerSpec, settings: Settings, max_connections: int, superuser_reserved_connections: int = 3
) -> PoolerBudget:
    """The per-pod pool sizes for `pooler` on a server with `max_connections` (pure)."""
    keep = headroom(settings, max_connections)
    available = max(0, max_connections - superuser_reserved_connections - keep)
    pods = budgeted_pods(pooler.replicas)
    share = available // pods
    explicit_reserve = _int_param(pooler, "reserve_pool_size")
    explicit_max_db = _int_param(pooler, "max_db_connections")
    if pooler.default_pool_size == "auto":
        reserve = explicit_reserve if explicit_reserve is not None else int(share * RESERVE_FRACTION)
        pool = max(1, share - reserve)
        max_db = explicit_max_db if explicit_max_db is not None else max(1, share)
    else:
        pool = pooler.default_pool_size
        reserve = explicit_reserve or 0
        max_db = explicit_max_db if explicit_max_db is not None else pool + reserve
    # max_db_connections = 0 means "no limit" in PgBouncer: a pod may then open pool + reserve per
    # user (auth_query users are not known in advance: counted as one more, and said so).
    users = max(1, login_users(pooler)) + (1 if pooler.auth_query is not None else 0)
    per_pod = users * (pool + reserve) if max_db == 0 else min(users * (pool + reserve), max_db)
    oversubscribed = pods * per_pod > available
    message = (
        f"{pods} pods x {per_pod} server connections = {pods * per_pod} of {available} available "
        f"(max_connections {max_connections} - superuser_reserved {superuser_reserved_connections} "
        f"- headroom {keep})"
    )
    if max_db == 0 and pooler.auth_query is not None:
        message += "; max_db_connections 0 with authQuery: each looked-up user adds a pool, unbounded"
        oversubscribed = True
    if oversubscribed:
        message = "oversubscribed: " + message
    return PoolerBudget(
        max_connections=max_connections,
        headroom=keep,
        replicas=pooler.replicas,
        pool_size=pool,
        reserve_pool_size=reserve,
        max_db_connections=max_db,
        oversubscribed=oversubscribed,
        superuser_reserved_connections=superuser_reserved_connections,
        budgeted_pods=pods,
        available=available,
        message=message,
    )
