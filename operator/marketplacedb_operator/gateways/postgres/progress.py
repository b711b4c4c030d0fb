"""Progress of a background index build, and stopping one (a deleted resource's build).

pg_stat_progress_create_index (https://www.postgresql.org/docs/15/progress-reporting.html#CREATE-INDEX-PROGRESS-REPORTING)
has one row per backend running CREATE INDEX; a role sees its own backends' figures. During
"waiting for old snapshots" the build waits for every older transaction of the database, which
is what an open REPEATABLE READ session or an idle-in-transaction client makes it do.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ...ports import BuildProgress

PROGRESS = (
    "SELECT p.phase, p.blocks_done, p.blocks_total, c.relname "
    "FROM pg_catalog.pg_stat_progress_create_index p "
    "LEFT JOIN pg_catalog.pg_class c ON c.oid = p.index_relid "
    "WHERE p.pid = %(pid)s"
)
# Only the operator's own session: pg_terminate_backend of another role's backend is refused
# anyway without pg_signal_backend, and the application_name check keeps it to ours.
TERMINATE = (
    "SELECT pg_catalog.pg_terminate_backend(a.pid) FROM pg_catalog.pg_stat_activity a "
    "WHERE a.pid = %(pid)s AND a.usename = current_user AND a.application_name = %(app)s"
)


def read_build_progress(conn: psycopg.Connection[Any], pid: int) -> BuildProgress | None:
    row = conn.execute(PROGRESS, {"pid": pid}).fetchone()
    if row is None:
        return None
    return BuildProgress(str(row[0]), row[1], row[2], row[3])


def terminate(conn: psycopg.Connection[Any], pid: int, application_name: str) -> bool:
    row = conn.execute(TERMINATE, {"pid": pid, "app": application_name}).fetchone()
    return bool(row and row[0])
