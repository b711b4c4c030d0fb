"""The refresh decision and the lock key, without a server: every rule of decide() says why."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from decimal import Decimal
from typing import Any

from marketplacedb_operator.refresh import RefreshOptions, ViewTarget
from marketplacedb_operator.sql import refresh_check
from marketplacedb_operator.sql.refresh import Observation, RefreshState, decide, lock_key, rule_for

HOT = ViewTarget("public", "mv_hot_products")
COUNTS = ViewTarget("public", "mv_category_counts")
OPTIONS = RefreshOptions(skip_if_unchanged=True, max_staleness=3600, timeout=60, lock_timeout=5)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def observed(**fields: Any) -> Any:
    last = utcnow() - datetime.timedelta(minutes=1)
    state = RefreshState("public", "mv", last_attempt=last, last_success=last, counters=Decimal(10),
                         signature="sig", result="refreshed")
    values: dict[str, Any] = {"exists": True, "populated": True, "owned": True, "unique_index": "mv_key",
                              "base_tables": 2, "counters": Decimal(10), "signature": "sig", "state": state}
    values.update(fields)
    return Observation(**values)


def test_decide_covers_every_rule() -> None:
    now = utcnow()
    assert decide(observed(), OPTIONS, now).action == "skip"
    assert decide(observed(exists=False), OPTIONS, now).action == "fail"
    assert "owner" in decide(observed(owned=False), OPTIONS, now).reason
    foreign = decide(observed(untracked=1), OPTIONS, now)
    assert foreign.action == "refresh" and "cannot be tracked" in foreign.reason
    assert decide(observed(base_tables=0), OPTIONS, now).action == "refresh"
    failed_state = dataclasses_replace(observed().state, result="failed")
    assert "failed" in decide(observed(state=failed_state), OPTIONS, now).reason
    # Counters can reset (pg_stat_reset, crash): any difference refreshes, not only an increase.
    assert decide(observed(counters=Decimal(3)), OPTIONS, now).action == "refresh"
    assert "rewritten" in decide(observed(signature="other"), OPTIONS, now).reason
    plain = decide(observed(unique_index=None), OPTIONS, now, force=True)
    assert (plain.action, plain.concurrently) == ("refresh", False) and "no usable unique index" in plain.plain_reason
    assert decide(observed(), OPTIONS, now, force=True).concurrently


def dataclasses_replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)


def test_lock_key_is_stable_and_two_int4() -> None:
    key = lock_key(HOT)
    assert key == lock_key(ViewTarget("public", "mv_hot_products"))
    assert key != lock_key(COUNTS) and key != lock_key(ViewTarget("other", "mv_hot_products"))
    assert all(-(2**31) <= part < 2**31 for part in key)
    # Pinned: a CronJob pod of one release and the operator of the next must take the same lock.
    assert key == (1296319025, -1997257334)


def test_functions_time_and_depends_on_rules() -> None:
    now = utcnow()
    declared = RefreshOptions(max_staleness=3600, depends_on=("prices",))
    function = observed(untracked_functions=("public.price_of",))
    assert "declare refresh.dependsOn" in decide(function, OPTIONS, now).reason
    assert decide(function, declared, now).action == "skip"
    assert "trusted through dependsOn" in rule_for(function, declared)
    clock = observed(time_functions=("now()",))
    assert "time-dependent (now())" in decide(clock, declared, now).reason
    volatile = observed(volatile_functions=("setval",))
    refused = decide(volatile, OPTIONS, now)
    assert refused.action == "fail" and "setval" in refused.reason and "allowVolatileFunctions" in refused.reason
    allowed = decide(volatile, RefreshOptions(allow_volatile=True), now)
    assert allowed.action == "refresh" and "volatile" in allowed.reason
    assert "not found: public.nope" in decide(observed(missing_depends=("public.nope",)), declared, now).reason
    assert rule_for(observed(), OPTIONS) == "skipped when unchanged: write counters of 2 table(s) tracked"


def test_the_plan_skip_rule_covers_every_case_in_decide_order() -> None:
    from marketplacedb_operator.api.v1alpha1 import MaterializedViewSpec
    from marketplacedb_operator.sql.view_calls import ViewCalls, refusal, skip_rule

    def spec(**extra: Any) -> MaterializedViewSpec:
        return MaterializedViewSpec.model_validate({"name": "mv", "query": "SELECT 1 AS id", "uniqueKey": ["id"],
                                                    **extra})

    plain = spec()
    assert skip_rule(plain, None, "42501 insufficient_privilege") == \
        "skip-if-unchanged: decided at each refresh (the query could not be analyzed: 42501 insufficient_privilege)"
    assert skip_rule(plain, ViewCalls(foreign=("public.remote",), tables=("public.t",))) == \
        "skip-if-unchanged: off: reads foreign table(s) public.remote (no write counters)"
    assert skip_rule(plain, ViewCalls()) == "skip-if-unchanged: off: reads no table (nothing to track)"
    # volatile before time before untracked functions, as in decide()
    both = ViewCalls(volatile=("public.f()",), time=("now()",), untracked=("public.g() (stable)",))
    assert skip_rule(plain, both) == "skip-if-unchanged: off: calls volatile function(s) public.f() (refused)"
    assert refusal(plain, "spec.materializedViews[0]", both) is not None
    allowed = spec(allowVolatileFunctions=True)
    assert refusal(allowed, "spec.materializedViews[0]", both) is None
    assert "(allowed by allowVolatileFunctions)" in skip_rule(allowed, both)
    declared = spec(refresh={"schedule": "*/5 * * * *", "dependsOn": ["prices"]})
    assert skip_rule(declared, ViewCalls(untracked=("public.g() (stable)",))) == \
        "skip-if-unchanged: on (no table read directly; dependsOn declared: prices, trusted for public.g() (stable))"


def test_unreported_write_statistics_refuse_the_skip_and_say_why() -> None:
    """Checked last, after every rule that refreshes anyway: the counters proved nothing."""
    now = utcnow()
    kinds = ("own", "hidden", "hidden", "committed-inside", "running", "recent", "worker")
    decision = decide(observed(unreported=kinds), OPTIONS, now)
    assert decision.action == "refresh" and decision.concurrently
    assert decision.reason.startswith("write statistics may be unreported: this session has writes")
    assert "2 session(s) of other roles are hidden from this role: GRANT pg_read_all_stats (or pg_monitor)" \
        in decision.reason
    for text in ("1 background worker(s)", "1 statement(s) committed inside themselves", "1 statement(s) running",
                 "1 session(s) active since the last refresh"):
        assert text in decision.reason
    # A reason that refreshes anyway comes first (the write is seen: no need to blame sessions).
    assert "counters" in decide(observed(unreported=("recent",), counters=Decimal(11)), OPTIONS, now).reason


def test_a_changed_check_function_body_gets_a_new_name() -> None:
    """The check function is created only when missing: an old body under the same name would stay
    in every database that has it (and keep the holes a new body closes). Change the body, raise the
    version in CHECK_FUNCTION and record the new fingerprint together."""
    ddl = refresh_check.check_function_ddl().as_string(None)
    fingerprint = hashlib.sha256(ddl.encode()).hexdigest()[:16]
    assert fingerprint == refresh_check.CHECK_FUNCTION_FINGERPRINT, (
        f"{refresh_check.CHECK_FUNCTION}'s body changed: raise its version and set "
        f"CHECK_FUNCTION_FINGERPRINT = {fingerprint!r}")
