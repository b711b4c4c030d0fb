"""One retry-delay policy for the whole operator: exponential, bounded, with jitter.

Two loops used it with two formulas (the reconcile backoff in handlers.py: half-to-full of a capped
exponential; DDL lock-timeout retries in gateways/postgres/schema.py: 0.5x to 1.5x of an uncapped
one). Both now call `delay()`.

Why a function and not `tenacity`: neither caller is a retry loop tenacity could wrap. The reconcile
backoff is a number handed to kopf's timer (the "loop" is the next timer tick, across handler calls,
with the failure count in per-resource memory), and the DDL runner retries only some errors, runs
cleanup between attempts (drop an INVALID index, record the blockers) and takes an injected sleep and
random source so that tests can read the delays. tenacity's `wait_exponential_jitter` would give the
same number through a RetryCallState built by hand; the policy itself is the three lines below.
"""

from __future__ import annotations

import math
import random

# 2**16 x base is past any ceiling worth having; capping the exponent keeps huge counts finite.
_MAX_DOUBLINGS = 16


def delay(base: float, attempt: int, ceiling: float = math.inf, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt + 1` (attempt 0: the first retry).

    The exponential step `base * 2**attempt`, capped at `ceiling`, then "equal jitter": a uniform
    draw between half of it and all of it. Never more than the ceiling (a dead database costs at most
    one attempt per ceiling), never less than half the step (no hot loop), and replicas or several
    resources that failed together drift apart instead of retrying in lockstep.
    """
    step = min(ceiling, base * 2.0 ** min(max(attempt, 0), _MAX_DOUBLINGS))
    draw = (rng or random).uniform(0, step / 2)  # the module's generator when none is injected
    return step / 2 + draw
