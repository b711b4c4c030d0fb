"""Refresh overlap: a CronJob fired twice at once (two real `marketplacedb refresh` processes with the
CronJob's own args and env), and a manual refresh (refresh-now annotation) during a scheduled one.
A sampler watches pg_stat_activity throughout: never two REFRESHes of one view at a time."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from typing import Any

import rel_db
from rel_operator import all_cmdlines

from conftest import DEADLINE, NS, Rel
from harness.kube import eventually
from marketplacedb_operator import naming

VIEW = "mv_hot_products"


def _cronjob_command(rel: Rel, view: str) -> tuple[list[str], dict[str, str]]:
    """The CronJob's container command, args and env, resolved as the kubelet would (secretKeyRef)."""
    name = naming.refresh_cronjob_name("shop", view)
    cronjob = rel.objects.get("batch/v1", "CronJob", name, NS)
    assert cronjob is not None, f"CronJob {name} not applied"
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = rel.objects.get("v1", "Secret", ref["name"], NS) or {}
            data = secret.get("stringData") or {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            env[item["name"]] = data[ref["key"]]
    assert container["command"] == ["marketplacedb"]
    # `python -m marketplacedb_operator.cli` is the console script `marketplacedb` of this venv.
    return [sys.executable, "-m", "marketplacedb_operator.cli", *container["args"]], env


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.Popen(command, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def _finish(proc: subprocess.Popen[str], timeout: float = DEADLINE) -> tuple[int, dict[str, Any], str]:
    out, err = await asyncio.to_thread(proc.communicate, timeout=timeout)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, (lines[0] if lines else {}), err


async def _until_refresh_waits(rel: Rel) -> None:
    def waiting() -> bool:
        import psycopg

        with psycopg.connect(rel.db.superuser_dsn, autocommit=True) as conn:
            return bool(conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND application_name = 'marketplacedb-refresh' "
                "AND wait_event_type = 'Lock'", [rel.db.name]).fetchall())

    async def check() -> bool:
        return await asyncio.to_thread(waiting)

    await eventually(check, timeout=DEADLINE, interval=0.02, message="a refresh waiting on the held lock")


UPDATED = "SELECT pg_stat_get_tuples_updated('ai_accounts'::regclass)"


async def _changed_base_tables(rel: Rel) -> None:
    """Write to a base table, then wait until the write counters show it: they are flushed
    asynchronously (README: Limits), about 1 s idle and longer under load, and skip-if-unchanged
    reads them, so the refresh below would otherwise see "unchanged" on a busy machine."""
    import psycopg

    def updated() -> int:
        with psycopg.connect(rel.db.superuser_dsn, autocommit=True) as conn:
            row = conn.execute(UPDATED).fetchone()
        return int(row[0]) if row else 0

    def change() -> int:
        before = updated()
        with psycopg.connect(rel.db.superuser_dsn, autocommit=True) as conn:
            conn.execute("UPDATE ai_accounts SET sold_count = sold_count + 1 WHERE id IN (SELECT id FROM ai_accounts "
                         "ORDER BY id LIMIT 5)")
        return before

    before = await asyncio.to_thread(change)

    async def flushed() -> bool:
        return await asyncio.to_thread(updated) > before

    await eventually(flushed, timeout=DEADLINE, interval=0.1, message="the update in the statistics counters")


async def _operator_waits_on_a_lock(rel: Rel) -> None:
    async def check() -> list[int]:
        return await asyncio.to_thread(rel_db.statements_running, rel.db.superuser_dsn, rel.db.name, "%",
                                       waiting=True)

    await eventually(check, timeout=DEADLINE, interval=0.05, message="the operator waiting on the held table")


async def test_cronjob_fired_twice_at_once(rel: Rel) -> None:
    await rel.operator.start()
    await rel.create()
    await rel.wait_ready()
    command, env = _cronjob_command(rel, VIEW)
    assert rel.canary not in " ".join(command)  # the password travels in env only
    await _changed_base_tables(rel)
    with rel_db.ActivitySampler(rel.db.superuser_dsn, rel.db.name) as sampler:
        # Hold a base table so the first refresh waits *inside* its advisory lock: the two runs overlap.
        blocker = rel_db.Blocker(rel.db.superuser_dsn, "BEGIN", "LOCK TABLE seller_profiles IN ACCESS EXCLUSIVE MODE")
        try:
            # The first run waits for the held table; a longer lock_timeout than the default 5 s, so a
            # slow start of the second process on a busy machine cannot time it out.
            first = _start([*command, "--lock-timeout", "60s"], env)
            await _until_refresh_waits(rel)
            second = _start(command, env)
            leaked = [pid for pid, line in all_cmdlines().items() if rel.canary in line]
            code2, out2, err2 = await _finish(second)
        finally:
            blocker.release()
        code1, out1, err1 = await _finish(first)
    assert leaked == []
    assert (code1, code2) == (0, 0), (err1, err2)
    assert out1["outcome"] in ("refreshed", "refreshed-plain"), out1
    assert out2["outcome"] == "skipped-busy", out2
    assert sampler.max_concurrent_refresh <= 1
    rel.measurements["cronjob twice"] = {"first": out1, "second": out2, "samples": sampler.samples}
    await rel.assert_invariants()


async def test_manual_refresh_during_a_scheduled_one(rel: Rel) -> None:
    await rel.operator.start()
    await rel.create()
    await rel.wait_ready()
    command, env = _cronjob_command(rel, VIEW)
    await _changed_base_tables(rel)
    with rel_db.ActivitySampler(rel.db.superuser_dsn, rel.db.name) as sampler:
        blocker = rel_db.Blocker(rel.db.superuser_dsn, "BEGIN", "LOCK TABLE seller_profiles IN ACCESS EXCLUSIVE MODE")
        try:
            scheduled = _start([*command, "--lock-timeout", "60s"], env)
            await _until_refresh_waits(rel)
            request = str(time.time())
            await rel.objects.patch(rel.resource(), {"metadata": {"annotations": {naming.ANN_REFRESH_NOW: request}}})
            await _operator_waits_on_a_lock(rel)  # its reconcile now waits on the same table (catalog read)
        finally:
            blocker.release()

        def handled() -> bool:
            return rel.resource().get("status", {}).get("handledRefreshRequest") == request

        await eventually(handled, timeout=DEADLINE, message="the manual refresh handled")
        code, out, err = await _finish(scheduled)
    assert code == 0 and out["outcome"] in ("refreshed", "refreshed-plain"), (out, err)
    assert sampler.max_concurrent_refresh <= 1
    # The manual request met the running refresh: it skipped (busy) or ran after it, never beside it.
    assert rel.condition("RefreshScheduled")["status"] == "True"
    rel.measurements["manual during scheduled"] = {"scheduled": out, "samples": sampler.samples}
    await rel.assert_invariants()
