"""The one retry-delay policy (backoff.py) used by the reconcile backoff and by DDL lock-timeout retries."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from marketplacedb_operator import backoff


@given(base=st.floats(0.01, 60), attempt=st.integers(-3, 10_000), ceiling=st.floats(0.01, 3600),
       seed=st.integers(0, 2**32))
def test_delay_is_between_half_and_all_of_the_capped_step(base: float, attempt: int, ceiling: float,
                                                           seed: int) -> None:
    step = min(ceiling, base * 2.0 ** min(max(attempt, 0), 16))
    pause = backoff.delay(base, attempt, ceiling, random.Random(seed))
    assert step / 2 <= pause <= step <= ceiling


def test_delays_of_resources_that_failed_together_drift_apart() -> None:
    rng = random.Random(7)
    pauses = {backoff.delay(5.0, 3, 300.0, rng) for _ in range(20)}
    assert len(pauses) == 20 and all(20.0 <= p <= 40.0 for p in pauses)
