"""Wiring: the real gateways assembled into the Deps that reconcile() takes.

This sits at the top layer because it is the one place that knows both the ports and every
gateway (the PostgreSQL gateway modules and refresh.py are independent of each other).
"""

from __future__ import annotations

import datetime
from typing import Any

import psycopg
from kubernetes import client as k8s

from ..api.v1alpha1 import MaterializedViewSpec
from ..gateways.kube import KubeGateway
from ..gateways.postgres import connect, pooler, progress, schema, server
from ..gateways.postgres.refresh import PostgresRefresh, read_refresh_states
from ..ports import BuildProgress, ConnInfo, Deps
from ..refresh import RefreshOutcome, run_refresh
from ..settings import Settings
from ..sql.catalog import Catalog
from ..sql.plan import Desired, ExecutionPolicy, Plan, StepOutcome
from ..sql.refresh import RefreshState


class PostgresDatabase:
    """ports.Database over direct autocommit sessions: one for DDL, one per refresh.

    A refresh gets its own session because its advisory lock belongs to the session; the index
    builds get a second "watch" session to report which sessions they wait for.
    """

    def __init__(self, info: ConnInfo) -> None:
        self._info = info
        self._conn: psycopg.Connection[Any] = connect(info)

    def observe(self, desired: Desired) -> Catalog:
        return schema.observe(self._conn, desired)

    def execute(self, plan: Plan, policy: ExecutionPolicy) -> list[StepOutcome]:
        watch: psycopg.Connection[Any] | None = None

        def open_watch() -> psycopg.Connection[Any]:
            nonlocal watch
            if watch is None or watch.closed:
                watch = connect(self._info)
            return watch

        try:
            return schema.execute(self._conn, plan, policy, watch=open_watch)
        finally:
            if watch is not None:
                watch.close()

    def server_limits(self) -> tuple[int, int]:
        limits = server.read_server_limits(self._conn)
        return limits.max_connections, limits.superuser_reserved_connections

    def scram_verifier(self, role: str) -> str | None:
        return server.read_scram_verifier(self._conn, role)

    def lookup_function_exists(self, function: str) -> bool:
        return pooler.lookup_function_exists(self._conn, function)

    def refresh_states(self) -> list[RefreshState]:
        return read_refresh_states(self._conn)

    def refresh(self, view: MaterializedViewSpec, now: datetime.datetime, force: bool) -> RefreshOutcome:
        with connect(self._info) as conn:
            return run_refresh(PostgresRefresh(conn), view, now, force)

    def close(self) -> None:
        self._conn.close()

    def backend_pid(self) -> int:
        return int(self._conn.info.backend_pid)

    def build_progress(self, pid: int) -> BuildProgress | None:
        return progress.read_build_progress(self._conn, pid)

    def cancel(self) -> None:
        """Terminate this session's backend from a new session (thread-safe: never touches
        self._conn, which the executing thread owns); the executor then fails fast."""
        with connect(self._info) as other:
            progress.terminate(other, self.backend_pid(), self._info.application_name)


def make_deps(settings: Settings, api_client: k8s.ApiClient) -> Deps:
    timeout = (settings.kube_connect_timeout_seconds, settings.kube_request_timeout_seconds)
    return Deps(kube=KubeGateway(api_client, timeout=timeout), open_database=PostgresDatabase, settings=settings)
