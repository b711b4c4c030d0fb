"""The operator SIGKILLed at each step of a reconcile, then restarted: it must converge, leave no
INVALID index, no `__new`/`__old` object, no session or lock behind, and lose no canary row.

Each step is made to last (a session of the test holds what the step needs, or the emulator holds
the step's HTTP request), so that the kill lands *in* the step, not near it.
"""

from __future__ import annotations

import asyncio
import random
import signal
from typing import Any

import psycopg
import pytest
import rel_db

from conftest import DEADLINE, SOAK, Rel
from harness.kube import eventually


async def _operator_waiting(rel: Rel, like: str, timeout: float = DEADLINE) -> list[int]:
    async def check() -> list[int]:
        return await asyncio.to_thread(rel_db.statements_running, rel.db.superuser_dsn, rel.db.name, like,
                                       waiting=True)

    pids: list[int] = await eventually(check, timeout=timeout, interval=0.02, message=f"operator waiting in {like}")
    return pids


async def _no_operator_session(rel: Rel, timeout: float = DEADLINE) -> None:
    """Once the process is dead, PostgreSQL must end its sessions, even one stuck in a lock wait
    (the server notices a vanished client only when it checks: client_connection_check_interval)."""

    async def check() -> bool:
        return not await asyncio.to_thread(rel_db.operator_sessions, rel.db.superuser_dsn, rel.db.name)

    ok = await eventually(check, timeout=timeout, interval=0.1, message="operator sessions gone after SIGKILL")
    assert ok, await asyncio.to_thread(rel_db.operator_sessions, rel.db.superuser_dsn, rel.db.name)


async def _kill_in_db_step(rel: Rel, blocker_sql: tuple[str, ...], like: str, spec: dict[str, Any] | None) -> None:
    blocker = rel_db.Blocker(rel.db.superuser_dsn, *blocker_sql)
    try:
        if spec is None:
            await rel.create()
        else:
            await rel.objects.patch_spec(rel.resource(), spec)
        await _operator_waiting(rel, like)
        await rel.operator.kill()
        await _no_operator_session(rel)
    finally:
        blocker.release()


STEPS = ["index-build", "view-create", "view-swap", "cronjob-apply", "status-write"]


@pytest.mark.parametrize("step", STEPS)
async def test_sigkill_at_each_step_then_restart(rel: Rel, step: str) -> None:
    spec: dict[str, Any] | None = None
    with rel_db.CanaryWriter(rel.app_dsn) as writer:
        await rel.operator.start()
        if step == "index-build":
            # An idle snapshot: the CONCURRENTLY build waits in its second phase, INVALID index present.
            await _kill_in_db_step(rel, ("BEGIN ISOLATION LEVEL REPEATABLE READ", "SELECT 1"),
                                   "CREATE INDEX CONCURRENTLY%", None)
        elif step == "view-create":
            # categories locked: the catalog read, the view's check or CREATE MATERIALIZED VIEW
            # waits for it (whichever comes first: all are steps of the same reconcile).
            await _kill_in_db_step(rel, ("BEGIN", "LOCK TABLE categories IN ACCESS EXCLUSIVE MODE"), "%", None)
        elif step == "view-swap":
            await rel.create()
            await rel.wait_ready()
            spec = _changed_view(rel)
            # A reader of the old view: the swap's rename waits for it (the new view is built by then).
            await _kill_in_db_step(rel, ("BEGIN", "SELECT count(*) FROM mv_category_counts"), "%", spec)
        else:
            await _kill_in_request(rel, step)
        rel.measurements[f"killed in {step}"] = {"starts": rel.operator.starts}
        await rel.operator.start()
        await rel.assert_invariants(writer, spec=spec)
    if step == "view-swap":
        with psycopg.connect(rel.db.superuser_dsn) as conn:
            definition = conn.execute("SELECT pg_get_viewdef('mv_category_counts'::regclass)").fetchone()
        assert definition is not None and "reliability_version" in definition[0]


def _changed_view(rel: Rel) -> dict[str, Any]:
    spec = rel.resource()["spec"]
    view = spec["materializedViews"][1]
    assert view["name"] == "mv_category_counts"
    view["query"] = view["query"].replace("c.display_order,", "c.display_order, 2 AS reliability_version,", 1)
    assert "reliability_version" in view["query"]
    return dict(spec)


async def _kill_in_request(rel: Rel, step: str) -> None:
    """Hold the operator's first CronJob apply (or status write) in the emulator, and kill it there."""
    arrived, killed = asyncio.Event(), asyncio.Event()
    holding = True

    def matches(request: Any) -> bool:
        if not holding or request.method not in ("PATCH", "POST") or request.resource is None:
            return False
        if step == "cronjob-apply":  # a new CronJob is a create (POST): names are never taken over by apply
            return bool(request.resource.plural == "cronjobs")
        return bool(request.method == "PATCH" and request.resource.plural == "marketplacedbs"
                    and request.subresource == "status")

    async def hold(_: Any) -> int:
        arrived.set()
        await killed.wait()  # the client is gone by then: nobody reads this answer
        return 503

    rel.api[matches] << hold
    await rel.create()
    await asyncio.wait_for(arrived.wait(), DEADLINE)
    await rel.operator.kill()
    holding = False
    killed.set()


async def test_random_sigkills_converge(rel: Rel) -> None:
    """Kill at random moments of the first reconciles (more in SOAK), restart each time."""
    rng = random.Random(20240601)
    rounds = 25 if SOAK else 3
    with rel_db.CanaryWriter(rel.app_dsn) as writer:
        await rel.operator.start()
        await rel.create()
        for _ in range(rounds):
            await asyncio.sleep(rng.uniform(0.05, 1.5))
            await rel.operator.signal(signal.SIGKILL)
            await rel.operator.start()
        rel.measurements["random kills"] = rounds
        await rel.assert_invariants(writer)



