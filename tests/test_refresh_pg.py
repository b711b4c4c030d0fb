"""The refresh engine against a real PostgreSQL 15 with the reference workload.

Views and their unique indexes are created here with plain SQL from `workload.VIEW_QUERIES`
(the schema engine is tested elsewhere). Write counters in pg_stat_user_tables are flushed by
the writing backend asynchronously: writers here call `pg_stat_force_next_flush()` (PostgreSQL
15), which flushes before the statement's ReadyForQuery, so the next check sees the writes.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from marketplacedb_operator import workload
from marketplacedb_operator.cli import main
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh, read_refresh_states
from marketplacedb_operator.refresh import RefreshOptions, ViewTarget, refresh_view
from marketplacedb_operator.sql.refresh import lock_key

HOT = ViewTarget("public", "mv_hot_products")
COUNTS = ViewTarget("public", "mv_category_counts")
SLOW = ViewTarget("public", "mv_slow")
SLOW_SECONDS = 1.5
OPTIONS = RefreshOptions(skip_if_unchanged=True, max_staleness=3600, timeout=60, lock_timeout=5)
# mv_slow sleeps through pg_sleep(), a volatile function: it has to opt in, as in a spec.
SLOW_OPTIONS = RefreshOptions(skip_if_unchanged=True, max_staleness=3600, timeout=60, lock_timeout=5,
                              allow_volatile=True)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_views(conn: psycopg.Connection[Any]) -> None:
    for name, query in workload.VIEW_QUERIES.items():
        conn.execute(sql.SQL("CREATE MATERIALIZED VIEW {} AS {}").format(sql.Identifier(name), sql.SQL(query)))
        key = sql.SQL(", ").join(sql.Identifier(c) for c in workload.VIEW_UNIQUE_KEYS[name])
        conn.execute(sql.SQL("CREATE UNIQUE INDEX {} ON {} ({})").format(
            sql.Identifier(f"{name}_key"), sql.Identifier(name), key))


def settle_stats(conn: psycopg.Connection[Any], timeout: float = 15.0) -> None:
    """Wait until the loader's backend has gone and its last statistics are flushed (it flushes on exit)."""
    deadline = time.monotonic() + timeout
    conn.execute("SELECT pg_stat_force_next_flush()")
    while conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchone()[0]:
        assert time.monotonic() < deadline, "another backend is still connected"
        time.sleep(0.05)
    last, stable_since = None, time.monotonic()
    while time.monotonic() - stable_since < 0.5:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        now = conn.execute("SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_user_tables").fetchone()[0]
        if now != last:
            last, stable_since = now, time.monotonic()
        assert time.monotonic() < deadline, "statistics keep changing"
        time.sleep(0.05)


@pytest.fixture
def views_db(workload_db: Any) -> Iterator[Any]:
    yield prepare_views(workload_db)


def prepare_views(workload_db: Any) -> Any:
    """The workload database with its two views and mv_slow, statistics settled."""
    with workload_db.connect() as conn:
        create_views(conn)
        # A view whose refresh takes SLOW_SECONDS, for overlap and reader tests.
        conn.execute(sql.SQL(
            "CREATE MATERIALIZED VIEW mv_slow AS "
            "WITH s AS MATERIALIZED (SELECT pg_sleep({}) AS z) "
            "SELECT c.id, c.name FROM categories AS c, s WHERE s.z IS NOT NULL"
        ).format(sql.Literal(SLOW_SECONDS)))
        conn.execute("CREATE UNIQUE INDEX mv_slow_key ON mv_slow (id)")
        settle_stats(conn)
    return workload_db


def connect(db: Any, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(db.dsn, autocommit=True, **kwargs)


def counting_connect(db: Any) -> tuple[psycopg.Connection[Any], list[str]]:
    """A connection whose cursors log every statement they send (one execute = one round trip)."""
    log: list[str] = []

    class Counting(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            log.append(query.as_string(self.connection) if isinstance(query, sql.Composable) else str(query))
            return super().execute(query, params, **kwargs)

    return psycopg.connect(db.dsn, autocommit=True, cursor_factory=Counting), log


def refresh(db: Any, target: ViewTarget, options: RefreshOptions = OPTIONS, now: datetime.datetime | None = None,
            force: bool = False) -> Any:
    with connect(db) as conn:
        return refresh_view(PostgresRefresh(conn), target, options, now or utcnow(), force)


def write(db: Any, statement: str) -> None:
    with connect(db) as conn:
        conn.execute(statement)
        conn.execute("SELECT pg_stat_force_next_flush()")


def state_of(db: Any, target: ViewTarget) -> Any:
    with connect(db) as conn:
        return {(s.schema, s.name): s for s in read_refresh_states(conn)}[(target.schema, target.name)]


def rows_of(db: Any, view: str) -> list[tuple[Any, ...]]:
    with connect(db) as conn:
        return conn.execute(sql.SQL("SELECT * FROM {} ORDER BY 1, 2").format(sql.Identifier(view))).fetchall()


# --- skip-if-unchanged ------------------------------------------------------------------------


def test_first_refresh_is_concurrent_and_recorded(views_db: Any) -> None:
    with connect(views_db) as conn:
        assert read_refresh_states(conn) == []  # no state table yet: an empty list, no error
    outcome = refresh(views_db, HOT)
    assert outcome.outcome == "refreshed", outcome
    assert outcome.rows == 100 and outcome.error is None
    assert "no successful refresh" in outcome.reason
    state = state_of(views_db, HOT)
    assert state.result == "refreshed" and state.rows == 100 and state.error is None
    assert state.last_success is not None and state.last_attempt == state.last_success
    assert state.counters is not None and state.counters > 0
    assert state.outcomes == {"refreshed": 1} and state.max_staleness == 3600


def test_unchanged_base_tables_skip_with_one_catalog_round_trip(views_db: Any) -> None:
    start = utcnow()
    assert refresh(views_db, HOT, now=start).outcome == "refreshed"
    conn, log = counting_connect(views_db)
    with conn:
        outcome = refresh_view(PostgresRefresh(conn), HOT, OPTIONS, start + datetime.timedelta(minutes=5))
    assert outcome.outcome == "skipped-unchanged", outcome
    assert "no writes" in outcome.reason
    # Lock, catalog check, skip record and unlock: one round trip (the server-side check function).
    assert len(log) == 1, log
    assert "refresh_check_v3" in log[0]
    state = state_of(views_db, HOT)
    assert state.result == "skipped-unchanged" and state.outcomes == {"refreshed": 1, "skipped-unchanged": 1}
    assert state.last_success == start  # a skip does not pretend the data is newer


@pytest.mark.parametrize("statement", [
    "UPDATE ai_accounts SET sold_count = sold_count + 1 WHERE id = 1",
    "UPDATE seller_profiles SET store_name = store_name || '!' WHERE id = 1",
    "DELETE FROM seller_orders WHERE id = 1; UPDATE seller_products SET sold_count = 0 WHERE id = 1",
    "INSERT INTO ai_accounts (name, price) VALUES ('new', 1)",
])
def test_writes_to_any_base_table_refresh(views_db: Any, statement: str) -> None:
    assert refresh(views_db, HOT).outcome == "refreshed"
    assert refresh(views_db, HOT).outcome == "skipped-unchanged"
    write(views_db, statement)
    outcome = refresh(views_db, HOT)
    assert outcome.outcome == "refreshed", outcome
    assert "written since the last refresh" in outcome.reason
    assert refresh(views_db, HOT).outcome == "skipped-unchanged"


def test_writes_to_unrelated_tables_do_not_refresh(views_db: Any) -> None:
    assert refresh(views_db, HOT).outcome == "refreshed"
    write(views_db, "UPDATE popular_searches SET search_count = search_count + 1 WHERE id = 1")
    write(views_db, "DELETE FROM search_history WHERE id = 1")
    assert refresh(views_db, HOT).outcome == "skipped-unchanged"


def test_max_staleness_refreshes_without_writes(views_db: Any) -> None:
    start = utcnow()
    assert refresh(views_db, COUNTS, now=start).outcome == "refreshed"
    assert refresh(views_db, COUNTS, now=start + datetime.timedelta(minutes=59)).outcome == "skipped-unchanged"
    outcome = refresh(views_db, COUNTS, now=start + datetime.timedelta(minutes=61))
    assert outcome.outcome == "refreshed" and "maxStaleness passed" in outcome.reason
    assert state_of(views_db, COUNTS).last_success == start + datetime.timedelta(minutes=61)


def test_skip_if_unchanged_false_and_force_always_refresh(views_db: Any) -> None:
    assert refresh(views_db, COUNTS).outcome == "refreshed"
    always = RefreshOptions(skip_if_unchanged=False)
    outcome = refresh(views_db, COUNTS, always)
    assert outcome.outcome == "refreshed" and "skipIfUnchanged is false" in outcome.reason
    forced = refresh(views_db, COUNTS, force=True)
    assert forced.outcome == "refreshed" and "requested" in forced.reason


def test_base_tables_found_through_plain_views_and_truncate_detected(views_db: Any) -> None:
    with connect(views_db) as conn:
        conn.execute("CREATE VIEW v_trending AS SELECT id, query FROM popular_searches WHERE is_trending")
        conn.execute("CREATE MATERIALIZED VIEW mv_trending AS SELECT id, query FROM v_trending")
        conn.execute("CREATE UNIQUE INDEX ON mv_trending (id)")
    target = ViewTarget("public", "mv_trending")
    assert refresh(views_db, target).outcome == "refreshed"
    assert refresh(views_db, target).outcome == "skipped-unchanged"
    write(views_db, "UPDATE popular_searches SET is_trending = NOT is_trending WHERE id = 2")
    assert refresh(views_db, target).outcome == "refreshed"
    # TRUNCATE does not move n_tup_del, but it gives the table a new file: the signature changes.
    write(views_db, "TRUNCATE popular_searches")
    outcome = refresh(views_db, target)
    assert outcome.outcome == "refreshed" and outcome.rows == 0, outcome
    assert "rewritten" in outcome.reason


# --- never overlapping ------------------------------------------------------------------------


def test_lock_held_elsewhere_means_skipped_busy(views_db: Any) -> None:
    key = lock_key(HOT)
    with connect(views_db) as holder:
        assert holder.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()[0]
        first, second = refresh(views_db, HOT, force=True), refresh(views_db, HOT, force=True)
        assert (first.outcome, second.outcome) == ("skipped-busy", "skipped-busy")
        assert first.error is None and "advisory lock" in first.reason
    # The holder's session ended: its lock went with it.
    assert refresh(views_db, HOT).outcome == "refreshed"
    assert state_of(views_db, HOT).outcomes == {"skipped-busy": 2, "refreshed": 1}


def test_crashed_session_loses_its_lock(views_db: Any) -> None:
    key = lock_key(HOT)
    holder = connect(views_db)
    pid = holder.execute("SELECT pg_backend_pid(), pg_advisory_lock(%s, %s)", key).fetchone()[0]
    assert refresh(views_db, HOT).outcome == "skipped-busy"
    with psycopg.connect(views_db.superuser_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
    assert refresh(views_db, HOT).outcome == "refreshed"
    holder.close()


def test_two_refreshes_at_the_same_moment_one_runs(views_db: Any) -> None:
    barrier = threading.Barrier(2)
    outcomes: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with connect(views_db) as conn:
                db = PostgresRefresh(conn)
                barrier.wait()
                outcomes.append(refresh_view(db, SLOW, SLOW_OPTIONS, utcnow(), force=True))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(o.outcome for o in outcomes) == ["refreshed", "skipped-busy"], outcomes
    assert all(o.error is None for o in outcomes)
    busy = next(o for o in outcomes if o.outcome == "skipped-busy")
    assert busy.seconds < SLOW_SECONDS  # it did not wait for the other refresh
    print(f"\n[measured] overlap: refresh {max(o.seconds for o in outcomes):.3f}s, busy skip {busy.seconds:.4f}s")


# --- readers during a refresh -----------------------------------------------------------------


def read_during_refresh(db: Any, target: ViewTarget, options: RefreshOptions) -> tuple[Any, list[float]]:
    """Refresh while a reader queries the view in a loop; the latencies of reads during the refresh."""
    stop = threading.Event()
    reads: list[tuple[float, float]] = []

    def reader() -> None:
        with connect(db) as conn:
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(target.schema, target.name))
            while not stop.is_set():
                started = time.monotonic()
                conn.execute(query).fetchone()
                reads.append((started, time.monotonic()))

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.2)
    began = time.monotonic()
    outcome = refresh(db, target, options, force=True)
    ended = time.monotonic()
    stop.set()
    thread.join(30)
    during = [end - start for start, end in reads if end > began and start < ended]
    return outcome, during


def test_reader_is_never_blocked_by_a_concurrent_refresh(views_db: Any) -> None:
    outcome, during = read_during_refresh(views_db, SLOW, SLOW_OPTIONS)
    assert outcome.outcome == "refreshed", outcome
    assert outcome.refresh_seconds >= SLOW_SECONDS
    assert len(during) > 10  # reads kept completing throughout the refresh
    assert max(during) < SLOW_SECONDS / 2  # none waited for the refresh
    # The contrast: a plain refresh (no usable unique index) locks readers out for its duration.
    with connect(views_db) as conn:
        conn.execute("DROP INDEX mv_slow_key")
    plain, blocked = read_during_refresh(views_db, SLOW, SLOW_OPTIONS)
    assert plain.outcome == "refreshed-plain"
    assert max(blocked) >= SLOW_SECONDS / 2
    print(f"\n[measured] longest read during CONCURRENTLY refresh ({outcome.refresh_seconds:.2f}s): "
          f"{max(during) * 1000:.2f} ms over {len(during)} reads; during a plain refresh: {max(blocked) * 1000:.0f} ms")


# --- plain refreshes say why ------------------------------------------------------------------


def test_unpopulated_view_first_refresh_is_plain(views_db: Any) -> None:
    with connect(views_db) as conn:
        conn.execute(sql.SQL("CREATE MATERIALIZED VIEW mv_cold AS {} WITH NO DATA").format(
            sql.SQL(workload.VIEW_QUERIES["mv_category_counts"])))
        conn.execute("CREATE UNIQUE INDEX ON mv_cold (id)")
    target = ViewTarget("public", "mv_cold")
    first = refresh(views_db, target)
    assert first.outcome == "refreshed-plain", first
    assert "not populated" in first.reason and "cannot be CONCURRENTLY" in first.reason
    assert first.rows == 45
    second = refresh(views_db, target, force=True)
    assert second.outcome == "refreshed"


@pytest.mark.parametrize("index", [None, "CREATE UNIQUE INDEX ON mv_noidx (id) WHERE id > 0",
                                   "CREATE UNIQUE INDEX ON mv_noidx ((id + 0))", "CREATE INDEX ON mv_noidx (id)"])
def test_view_without_usable_unique_index_is_refreshed_plainly(views_db: Any, index: str | None) -> None:
    with connect(views_db) as conn:
        conn.execute("CREATE MATERIALIZED VIEW mv_noidx AS SELECT id, name FROM categories")
        if index:
            conn.execute(index)
    outcome = refresh(views_db, ViewTarget("public", "mv_noidx"))
    assert outcome.outcome == "refreshed-plain", outcome
    assert "no usable unique index" in outcome.reason


# --- failures ---------------------------------------------------------------------------------


def test_failed_refresh_keeps_rows_records_error_and_recovers(views_db: Any, monkeypatch: Any) -> None:
    with connect(views_db) as conn:
        conn.execute("CREATE MATERIALIZED VIEW mv_by_order AS SELECT display_order AS id, name FROM categories")
        conn.execute("CREATE UNIQUE INDEX ON mv_by_order (id)")
    target = ViewTarget("public", "mv_by_order")
    assert refresh(views_db, target).outcome == "refreshed"
    before = rows_of(views_db, "mv_by_order")
    write(views_db, "UPDATE categories SET display_order = 1 WHERE id = 2")  # a duplicate key in the new rows

    outcome = refresh(views_db, target)
    assert outcome.outcome == "failed", outcome
    assert outcome.error is not None and outcome.error.startswith("23505")
    assert rows_of(views_db, "mv_by_order") == before
    state = state_of(views_db, target)
    assert state.result == "failed" and state.error == outcome.error and state.consecutive_failures == 1
    assert state.rows == len(before)  # the last success's figures are kept

    # The CronJob entrypoint: the same failure exits non-zero, with one JSON line.
    monkeypatch.setenv("PGPASSWORD", views_db.owner_password)
    dsn_without_password = views_db.server.dsn(views_db.name, views_db.owner, "")
    code, lines = run_cli(["refresh", "--view", "mv_by_order", "--dsn", dsn_without_password, "-o", "json"])
    assert code == 1 and lines[0]["outcome"] == "failed" and lines[0]["view"] == "mv_by_order"
    assert state_of(views_db, target).consecutive_failures == 2

    write(views_db, "UPDATE categories SET display_order = 2 WHERE id = 2")
    fixed = refresh(views_db, target)
    assert fixed.outcome == "refreshed", fixed
    state = state_of(views_db, target)
    assert state.error is None and state.consecutive_failures == 0 and state.result == "refreshed"


def test_timeout_fails_and_keeps_rows(views_db: Any) -> None:
    before = rows_of(views_db, "mv_slow")
    outcome = refresh(views_db, SLOW, RefreshOptions(timeout=0.3, lock_timeout=0.3, allow_volatile=True), force=True)
    assert outcome.outcome == "failed" and outcome.error.startswith("57014"), outcome  # query_canceled
    assert rows_of(views_db, "mv_slow") == before


def test_missing_view_fails_cleanly(views_db: Any) -> None:
    outcome = refresh(views_db, ViewTarget("public", "mv_nope"))
    assert outcome.outcome == "failed" and "does not exist" in outcome.reason


def run_cli(argv: list[str]) -> tuple[int, list[dict[str, Any]]]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
