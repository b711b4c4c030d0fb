"""Database faults: stopped mid-reconcile, connections reset, a lock held on an indexed table, an
idle-in-transaction snapshot during an index build. Each ends with the invariants (conftest.Rel)."""

from __future__ import annotations

import asyncio
from typing import Any

import rel_db

from conftest import DEADLINE, MAX_API_CALLS_PER_MINUTE, SOAK, Rel
from harness.kube import eventually

HISTORY_INDEX = "idx_search_history_user_recent"  # built on search_history, where the canary writes
OTHER_INDEX = "idx_popular_searches_ranking"


async def _wait_build_waiting(rel: Rel, timeout: float = DEADLINE) -> list[int]:
    def waiting() -> list[int]:
        return rel_db.statements_running(rel.db.superuser_dsn, rel.db.name, "CREATE INDEX CONCURRENTLY%", waiting=True)

    async def check() -> list[int]:
        return await asyncio.to_thread(waiting)

    pids: list[int] = await eventually(check, timeout=timeout, interval=0.05, message="an index build waiting")
    return pids


async def test_idle_in_transaction_snapshot_during_an_index_build(rel: Rel) -> None:
    # A REPEATABLE READ snapshot, idle: every CREATE INDEX CONCURRENTLY waits for it (phase 2/3).
    blocker = rel_db.Blocker(rel.db.superuser_dsn, "BEGIN ISOLATION LEVEL REPEATABLE READ",
                             "SELECT count(*) FROM categories")
    with rel_db.CanaryWriter(rel.app_dsn) as writer:
        try:
            await rel.operator.start()
            window = await rel.window()
            spec = rel.spec()
            # Two indexes (every build waits for the snapshot; two are enough and keep it short).
            spec["indexes"] = [i for i in spec["indexes"] if i["name"] in (HISTORY_INDEX, OTHER_INDEX)]
            await rel.create(spec)
            await _wait_build_waiting(rel)
            # The build times out on the index lock policy: a precise condition, the blocker named.
            cond = await rel.wait_condition("SchemaApplied", "False", "DDLFailed")
            assert "55P03" in cond["message"]  # lock_not_available
            status = rel.resource()["status"]
            blocking = status.get("blockingSessions", [])
            assert blocker.pid in [s["pid"] for s in blocking], status
            assert rel.condition("Ready")["status"] == "False"
            rel.assert_no_spin(await rel.close_window(window), "idle-in-transaction snapshot")
        finally:
            blocker.release()
        await rel.assert_invariants(writer)


async def test_long_transaction_holding_a_lock_on_the_indexed_table(rel: Rel) -> None:
    # SHARE UPDATE EXCLUSIVE conflicts with CREATE INDEX CONCURRENTLY but not with INSERT: the
    # writes go on while the build cannot start.
    blocker = rel_db.Blocker(rel.db.superuser_dsn, "BEGIN", "LOCK TABLE search_history IN SHARE UPDATE EXCLUSIVE MODE")
    with rel_db.CanaryWriter(rel.app_dsn) as writer:
        try:
            await rel.operator.start()
            window = await rel.window()
            await rel.create()
            cond = await rel.wait_condition("SchemaApplied", "False", "DDLFailed")
            assert HISTORY_INDEX in cond["message"] and "55P03" in cond["message"], cond
            # One failed index does not hold the others back.
            states = {i["name"]: i["state"] for i in rel.resource()["status"]["indexes"]}
            assert states[HISTORY_INDEX] != "Valid"
            assert [s for n, s in states.items() if n != HISTORY_INDEX] == ["Valid"] * 4, states
            assert blocker.pid in [s["pid"] for s in rel.resource()["status"].get("blockingSessions", [])]
            await asyncio.sleep(3)  # keep failing for a while: the spin bound is what matters here
            rel.assert_no_spin(await rel.close_window(window), "lock held on indexed table")
        finally:
            blocker.release()
        await rel.assert_invariants(writer)


async def test_connections_reset_repeatedly(rel: Rel) -> None:
    """pg_terminate_backend on every operator session, over and over, while it builds and later."""
    rounds = 40 if SOAK else 12
    terminated = 0
    # An idle snapshot keeps the builds waiting for the first half, so the resets hit them mid-build.
    blocker = rel_db.Blocker(rel.db.superuser_dsn, "BEGIN ISOLATION LEVEL REPEATABLE READ", "SELECT 1")
    with rel_db.CanaryWriter(rel.app_dsn) as writer:
        await rel.operator.start()
        window = await rel.window()
        await rel.create()
        # The resets start once the operator has a session (on a busy machine its first connection
        # can take seconds): otherwise the first rounds hit nothing and prove nothing.
        await _wait_operator_session(rel)
        for round_ in range(rounds):
            if round_ == rounds // 2:
                blocker.release()
            terminated += await asyncio.to_thread(rel_db.terminate_operator_sessions, rel.db.superuser_dsn,
                                                  rel.db.name)
            await asyncio.sleep(0.25)
        rel.assert_no_spin(await rel.close_window(window), "connections reset")
        rel.measurements["sessions_terminated"] = terminated
        await rel.assert_invariants(writer)
    assert terminated > 0, "no operator session was ever caught: the fault did not happen"


async def _wait_operator_session(rel: Rel) -> None:
    async def check() -> list[Any]:
        return await asyncio.to_thread(rel_db.operator_sessions, rel.db.superuser_dsn, rel.db.name)

    await eventually(check, timeout=DEADLINE, interval=0.05, message="an operator session")


async def test_database_stopped_mid_reconcile_and_restarted(rel: Rel) -> None:
    # Hold the builds (idle snapshot) so the stop lands in the middle of a reconcile.
    blocker = rel_db.Blocker(rel.db.superuser_dsn, "BEGIN ISOLATION LEVEL REPEATABLE READ", "SELECT 1")
    server: Any = rel.db.server
    with rel_db.CanaryWriter(rel.app_dsn) as writer:
        await rel.operator.start()
        await rel.create()
        await _wait_build_waiting(rel)
        window = await rel.window()
        await asyncio.to_thread(server.stop)  # pg_ctl stop -m fast: every session is cut
        blocker.conn.close()
        try:
            cond = await rel.wait_condition("DatabaseReachable", "False", "DatabaseUnreachable")
            assert rel.db.name in cond["message"] and rel.canary not in cond["message"]
            await asyncio.sleep(4 if not SOAK else 20)  # down for a while: no spinning meanwhile
            api_window = await _api_only(rel, window)
        finally:
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(server.wait_ready)
        rel.measurements["database down"] = api_window
        assert api_window["api_per_min"] <= MAX_API_CALLS_PER_MINUTE, api_window
        await rel.assert_invariants(writer)


async def _api_only(rel: Rel, window: Any) -> dict[str, Any]:
    """The spin window while the database is down (DDL attempts cannot be counted then)."""
    import time

    from rel_operator import api_requests

    seconds = time.monotonic() - window.started
    calls = api_requests(rel.api) - window.api0
    assert rel.operator.running
    return {"seconds": round(seconds, 1), "api_per_min": round(calls * 60 / max(seconds, 1.0))}
