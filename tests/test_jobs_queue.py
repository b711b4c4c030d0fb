"""A queued schema job keeps the desired state, not its plan, and plans when it starts (issue 14,
finding 8: at N = 1,000 the waiting jobs' plans were most of the operator's peak memory).

Real PostgreSQL 15 through the operator's own Database (cli.wiring.PostgresDatabase); the pool is
the real Background with one slot, held by a job that waits for the test.
"""

from __future__ import annotations

import gc
import threading
import types
import weakref
from typing import Any

import psycopg

from harness.postgres import FreshDatabase
from marketplacedb_operator import jobs
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.background import Background, Job
from marketplacedb_operator.cli.wiring import PostgresDatabase
from marketplacedb_operator.ports import ConnInfo
from marketplacedb_operator.sql import plan as planning

INDEX = {"name": "ix_items_sku", "table": "items", "columns": [{"name": "sku"}]}


def _setup(db: FreshDatabase) -> tuple[Any, ConnInfo, planning.Desired, planning.ExecutionPolicy]:
    with db.connect() as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, sku text NOT NULL)")
    spec = MarketplaceDBSpec.model_validate({
        "database": {"host": "127.0.0.1", "port": db.server.port, "dbname": db.name,
                     "credentialsSecretRef": {"name": "creds"}},
        "indexes": [INDEX]})
    info = ConnInfo(host="127.0.0.1", port=db.server.port, dbname=db.name, user=db.owner,
                    password=db.owner_password)
    desired = planning.desired_state(spec, db.owner)
    policy = planning.ExecutionPolicy(lock_timeout_seconds=5, statement_timeout_seconds=60)
    deps = types.SimpleNamespace(background=Background(total=1, per_database=1), open_database=PostgresDatabase)
    return deps, info, desired, policy


def _hold_the_only_slot(deps: Any) -> threading.Event:
    release = threading.Event()
    deps.background.submit(Job(("other/one", "schema"), "elsewhere", lambda job: release.wait(60)))
    return release


def _index_exists(db: FreshDatabase) -> bool:
    with psycopg.connect(db.dsn) as conn:
        return conn.execute("SELECT to_regclass('public.ix_items_sku') IS NOT NULL").fetchone()[0]  # type: ignore[index]


def _plan(info: ConnInfo, desired: planning.Desired) -> planning.Plan:
    database = PostgresDatabase(info)
    try:
        return planning.plan(desired, database.observe(desired))
    finally:
        database.close()


def test_a_waiting_job_does_not_keep_its_plan(fresh_db: FreshDatabase) -> None:
    deps, info, desired, policy = _setup(fresh_db)
    release = _hold_the_only_slot(deps)
    plan = _plan(info, desired)
    assert not plan.empty
    kept = weakref.ref(plan)
    job = jobs.submit_schema(deps, ("prod/shop", "schema"), info, desired, plan.hash, policy, manual=False)
    del plan
    gc.collect()
    assert job.started is None and kept() is None, "the queued job holds the plan"
    release.set()
    assert job.done.wait(60) and job.error is None, job.error
    assert [o.ok for o in job.result] == [True] and _index_exists(fresh_db)


def test_a_job_plans_when_it_starts_and_runs_only_the_approved_plan(fresh_db: FreshDatabase) -> None:
    deps, info, desired, policy = _setup(fresh_db)
    approved = _plan(info, desired).hash
    release = _hold_the_only_slot(deps)
    job = jobs.submit_schema(deps, ("prod/shop", "schema"), info, desired, approved, policy, manual=True)
    # While the job waits, a DBA creates an index under the declared name: the approved plan
    # (create it) is no longer what the database needs.
    with fresh_db.connect() as conn:
        conn.execute("CREATE INDEX ix_items_sku ON items (id)")
        dba = conn.execute("SELECT 'public.ix_items_sku'::regclass::oid").fetchone()
    assert _plan(info, desired).hash != approved
    release.set()
    assert job.done.wait(60) and job.error is None, job.error
    assert job.result == [], "a plan nobody approved ran"
    with fresh_db.connect() as conn:
        assert conn.execute("SELECT to_regclass('public.ix_items_sku')::oid").fetchone() == dba


def test_a_waiting_job_starts_from_the_latest_spec_and_approval(fresh_db: FreshDatabase) -> None:
    """While the job waits, the user takes the index out of the spec, or switches to approval:
    Manual without approving: the job starts from what reconcile saw last, not what it was queued with."""
    deps, info, desired, policy = _setup(fresh_db)
    emptied = planning.desired_state(MarketplaceDBSpec.model_validate({
        "database": {"host": "127.0.0.1", "port": fresh_db.server.port, "dbname": fresh_db.name,
                     "credentialsSecretRef": {"name": "creds"}}}), fresh_db.owner)
    for later in ((emptied, "", policy, False), (desired, "", policy, True)):
        release = _hold_the_only_slot(deps)
        job = jobs.submit_schema(deps, ("prod/shop", "schema"), info, desired, _plan(info, desired).hash, policy,
                                 manual=False)
        assert deps.background.refresh_inputs(("prod/shop", "schema"), later)
        release.set()
        assert job.done.wait(60) and job.error is None, job.error
        assert job.result == [] and not _index_exists(fresh_db), job.result
        assert not deps.background.refresh_inputs(("prod/shop", "schema"), later)  # started: too late
