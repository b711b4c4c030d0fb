"""Unreported write statistics: which sessions may hold write counts the skip check cannot see yet.

Skip-if-unchanged compares the base tables' cumulative write counters (pg_stat_get_tuples_*) with
those recorded at the last success. PostgreSQL 15 counts a write in the writing backend and
flushes the counts to shared memory only when that backend reaches ReadyForQuery outside a
transaction block, at most once a second (pgstat_report_stat(false), PGSTAT_MIN_INTERVAL = 1 s;
src/backend/tcop/postgres.c, src/backend/utils/activity/pgstat.c): a flush that is too soon is
deferred to an idle timer (PGSTAT_IDLE_INTERVAL = 10 s) that flushes only while the session is
still idle outside a transaction; the next transaction end flushes otherwise. Nothing is flushed
inside a running statement (a procedure or DO block that COMMITs, a multi-statement message
with COMMIT), nor while a session is idle in a transaction. A backend that exits flushes in a
before_shmem_exit hook (pgstat_shutdown_hook), before its pg_stat_activity entry is cleared by
an on_shmem_exit hook (pgstat_beshutdown_hook): there is no moment when a gone session still
holds counts. https://www.postgresql.org/docs/15/monitoring-stats.html

Measured on PostgreSQL 15.18 (issue 16; each kind is tested in tests/test_refresh_unreported_pg.py):
two commits within a second, then idle: the counts appear 10.2 s after the session went idle; a
statement started 2 s after the deferral holds them until it ends (the timer does not flush during
a statement); a session idle in a transaction after a commit holds them until that transaction
ends (16 s and more); a procedure or DO block that committed shows xact_start > query_start
(xact.c StartTransaction takes GetCurrentTimestamp() in a nonatomic SPI context); a multi-statement
message with COMMIT does not (xact_start = query_start = the message's receipt); sessions of
other roles show no state, times or backend type without pg_read_all_stats (autovacuum workers
included).

So the check reads the counters first, then pg_stat_activity (not lagging), and may skip only
when no other session of this database could hold counts of a write committed after the last
success read its counters (`since`): every such session is listed here by kind, and decide()
refreshes and says why. This makes skips rarer on busy databases, on purpose: a refresh that was
not needed costs CPU, a wrong skip serves stale rows.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

from psycopg import sql

# 10 s idle timer + 2 s for the timer's latency and the flush on a loaded host (measured: 10.2 s).
FLUSHED_AFTER_IDLE_SECONDS: Final = 12
# Activity this long before `since` still counts (timestamps of one server clock; the margin
# covers a clock stepped back between the refresh and the check).
SINCE_MARGIN_SECONDS: Final = 1
# Every rule here is PostgreSQL 15's (shared-memory statistics). Before 15 a statistics collector
# process received the counts over UDP and could drop them under load: counters that miss writes
# for good. On such a server the counters prove nothing, so nothing is skipped.
MIN_SERVER_VERSION_NUM: Final = 150000

# One row: the kinds of the sessions that may hold unreported counts (one element per session), and
# of the settings that keep writes from being counted at all.
# Counted: sessions with a role (usesysid), i.e. client backends, background workers (pg_cron jobs,
# logical replication apply workers, parallel workers) and walsenders (PostgreSQL 15 pgstat_bestart
# sets st_userid for those only), minus this session (and its own parallel workers). Physical
# replication connections have no database (datid NULL): they are not this database's. A logical
# replication connection (replication=database, what CDC tools open) runs SQL through
# exec_simple_query with a client backend's flush rules, so it is read like one, except while it
# streams (START_REPLICATION: pg_stat_get_wal_senders() state other than 'startup'): it writes
# nothing then, and what it wrote before started before query_start. Autovacuum and auxiliary
# processes have no role and write no rows (measured: an autovacuum worker shows no usesysid).
# In order: hidden (another role's session, details hidden without pg_read_all_stats: nothing can
# be proved); worker (a background worker: no idle flush timer, its flushes are not bounded);
# committed-inside (a procedure or DO block that committed: counts held until it ends); running
# (any other statement in progress: it may have committed inside a multi-statement message, or
# committed a moment ago and not reached its flush; also 'disabled' when track_activities is off);
# recent (active since `since` and not provably flushed: idle for less than the idle timer plus a
# margin, or idle in a transaction since then). An idle session older than that has flushed.
# Then uncounted: track_counts off in this session (postgresql.conf, ALTER SYSTEM, this role or
# database), or turned off by ALTER ROLE/DATABASE ... SET for any role in this database (a bulk
# loader's role: its writes are never counted). pg_db_role_setting is readable by every role; a
# superuser's own `SET track_counts = off` in its session, or a function declared with that setting,
# cannot be seen from here.
ACTIVITY: Final = """\
SELECT ARRAY(
  SELECT k.kind FROM (
    SELECT CASE
      WHEN a.backend_type IS NULL THEN 'hidden'
      WHEN a.backend_type = 'walsender' AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_get_wal_senders() AS w
                                                    WHERE w.pid = a.pid AND w.state <> 'startup') THEN
        CASE WHEN coalesce(a.query_start, 'infinity') >= coalesce({since}, '-infinity') - {margin} THEN 'recent' END
      WHEN a.backend_type NOT IN ('client backend', 'walsender') THEN 'worker'
      WHEN a.state = 'active' AND a.xact_start > a.query_start THEN 'committed-inside'
      WHEN a.state IS NULL OR a.state NOT IN ('idle', 'idle in transaction', 'idle in transaction (aborted)')
        THEN 'running'
      WHEN a.state = 'idle' AND a.state_change < pg_catalog.statement_timestamp() - {flushed} THEN NULL
      WHEN coalesce(GREATEST(a.state_change, a.xact_start, a.query_start, a.backend_start), 'infinity')
           >= coalesce({since}, '-infinity') - {margin} THEN 'recent'
    END AS kind
    FROM pg_catalog.pg_stat_get_activity(NULL) AS a
    WHERE a.datid = (SELECT d.oid FROM pg_catalog.pg_database AS d WHERE d.datname = pg_catalog.current_database())
      AND a.pid <> pg_catalog.pg_backend_pid() AND a.leader_pid IS DISTINCT FROM pg_catalog.pg_backend_pid()
      AND a.usesysid IS NOT NULL
    UNION ALL
    SELECT 'old-server' WHERE pg_catalog.current_setting('server_version_num')::integer < {min_version}
    UNION ALL
    SELECT 'uncounted' WHERE NOT pg_catalog.current_setting('track_counts')::boolean OR EXISTS (
      SELECT 1 FROM pg_catalog.pg_db_role_setting AS rs
      CROSS JOIN LATERAL pg_catalog.unnest(rs.setconfig) AS c (setting)
      WHERE rs.setdatabase IN (0, (SELECT d.oid FROM pg_catalog.pg_database AS d
                                   WHERE d.datname = pg_catalog.current_database()))
        AND pg_catalog.lower(pg_catalog.split_part(c.setting, '=', 1)) = 'track_counts'
        AND pg_catalog.lower(pg_catalog.substr(c.setting, 13)) NOT IN ('=on', '=true', '=yes', '=1'))
  ) AS k WHERE k.kind IS NOT NULL ORDER BY 1) AS unreported"""


def activity_sql(since: sql.Composable, min_version: int = MIN_SERVER_VERSION_NUM) -> sql.Composed:
    """The sessions' kinds; `since` is a timestamptz expression (NULL: any activity counts)."""
    return sql.SQL(ACTIVITY).format(
        since=since, min_version=sql.Literal(min_version),
        flushed=sql.SQL("interval {}").format(sql.Literal(f"{FLUSHED_AFTER_IDLE_SECONDS} seconds")),
        margin=sql.SQL("interval {}").format(sql.Literal(f"{SINCE_MARGIN_SECONDS} seconds")),
    )


OWN: Final = "own"  # this session's own counts of the base tables, not flushed yet
UNCOUNTED: Final = "uncounted"  # a setting keeps writes from being counted (not a session)
OLD_SERVER: Final = "old-server"  # a server before PostgreSQL 15 (not a session)

_TEXT: Final = {
    OWN: "this session has writes to the tracked tables not reported yet",
    "hidden": "session(s) of other roles are hidden from this role: GRANT pg_read_all_stats (or pg_monitor) "
              "TO the operator's role",
    "worker": "background worker(s) (pg_cron job, logical replication, ...) connected: when they report "
              "their writes is not bounded",
    "committed-inside": "statement(s) committed inside themselves (a procedure or DO block with COMMIT): "
                        "reported only when they end",
    "running": "statement(s) running: what they commit is reported only when they end",
    "recent": "session(s) active since the last refresh, not reported yet (a session reports within ~10 s "
              "of going idle, inside a transaction only when it ends)",
    OLD_SERVER: "the server is older than PostgreSQL 15, whose statistics collector may drop write counts",
    UNCOUNTED: "track_counts is off in this session or set off for a role or this database (ALTER ROLE/DATABASE "
                 "... SET track_counts): such writes are never counted",
}
KINDS: Final = tuple(_TEXT)


def unreported_reason(kinds: tuple[str, ...]) -> str:
    """Why the counters prove nothing now, counted per kind, in KINDS order."""
    counts = Counter(kinds)
    settings = (OWN, UNCOUNTED, OLD_SERVER)  # not sessions: no count
    parts = [_TEXT[k] if k in settings else f"{counts[k]} {_TEXT[k]}" for k in KINDS if counts[k]]
    return "write statistics may be unreported: " + "; ".join(parts)
