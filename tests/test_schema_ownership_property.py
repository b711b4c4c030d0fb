"""Property (issue 12): whatever sequence of look-alike objects, spec changes, applies and teardowns
with deletionPolicy Drop happens, no object the operator did not create or adopt is ever dropped
or altered (same OID, same definition, same comment). Real PostgreSQL 15; each example works in a
schema of its own, as a resource of its own."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from harness.postgres import FreshDatabase
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.sql import ddl
from marketplacedb_operator.sql.plan import desired_state, plan, teardown_plan
from test_schema_engine_pg import FAST

_EXAMPLES = itertools.count()

LOOK_ALIKES = ["index__new", "index__old", "view__new", "view__key_elsewhere", "like_copy", "forged_comment",
               "invalid_declared", "identical_declared", "different_declared"]
ACTIONS = st.one_of(
    st.tuples(st.just("user"), st.sampled_from(LOOK_ALIKES)),
    st.tuples(st.just("spec"), st.sampled_from(["index_columns", "view_query", "drop_index", "drop_view", "policy"])),
    st.tuples(st.just("apply"), st.just("")),
    st.tuples(st.just("teardown"), st.just("")),
)


def _spec(schema: str, state: dict[str, Any]) -> MarketplaceDBSpec:
    indexes = [{"name": "idx_a", "table": "t", "schema": schema,
                "columns": [{"name": c} for c in state["columns"]]}] if state["index"] else []
    views = [{"name": "mv_t", "schema": schema, "uniqueKey": ["id"],
              "query": ddl.render(sql.SQL("SELECT id, {} FROM {}.t").format(
                  sql.Identifier(state["view_column"]), sql.Identifier(schema)))}] if state["view"] else []
    return MarketplaceDBSpec.model_validate({
        "database": {"host": "db", "dbname": "x", "credentialsSecretRef": {"name": "s"}},
        "ddl": {"deletionPolicy": state["policy"], "lockTimeout": "2s"},
        "indexes": indexes, "materializedViews": views})


def _snapshot(conn: psycopg.Connection[Any], oids: set[int]) -> dict[int, tuple[Any, ...]]:
    """(name, definition, comment, reloptions) of each OID that still exists."""
    rows = conn.execute(
        "SELECT c.oid::bigint, c.relname, CASE c.relkind WHEN 'i' THEN pg_get_indexdef(c.oid) "
        "WHEN 'm' THEN pg_get_viewdef(c.oid) ELSE c.relkind::text END, obj_description(c.oid, 'pg_class'), "
        "c.reloptions FROM pg_class c WHERE c.oid = ANY(%s::oid[])", [sorted(oids)]).fetchall()
    return {int(r[0]): tuple(r[1:]) for r in rows}


def _user_action(conn: psycopg.Connection[Any], dsn: str, schema: str, what: str, n: int) -> None:
    s = sql.Identifier(schema)
    marker = sql.Literal(ddl.marker_prefix(f"default/prop-{schema}", "x") + "y")
    statements = {
        "index__new": [sql.SQL("CREATE INDEX IF NOT EXISTS idx_a__new ON {}.t (b)").format(s)],
        "index__old": [sql.SQL("CREATE INDEX IF NOT EXISTS idx_a__old ON {}.t (a)").format(s),
                       sql.SQL("COMMENT ON INDEX {}.idx_a__old IS 'do not drop'").format(s)],
        "view__new": [sql.SQL("CREATE MATERIALIZED VIEW IF NOT EXISTS {}.mv_t__new AS SELECT 1 AS id").format(s)],
        "view__key_elsewhere": [sql.SQL("CREATE TABLE IF NOT EXISTS {}.other (id int)").format(s),
                                sql.SQL("CREATE INDEX IF NOT EXISTS mv_t__key ON {}.other (id)").format(s)],
        "like_copy": [sql.SQL("CREATE TABLE {}.{} (LIKE {}.t INCLUDING ALL)").format(
            s, sql.Identifier(f"t_copy_{n}"), s)],
        "forged_comment": [sql.SQL("CREATE INDEX {} ON {}.t (b)").format(sql.Identifier(f"dba_{n}"), s),
                           sql.SQL("COMMENT ON INDEX {}.{} IS {}").format(s, sql.Identifier(f"dba_{n}"), marker)],
        "identical_declared": [sql.SQL("CREATE INDEX IF NOT EXISTS idx_a ON {}.t (a)").format(s)],
        "different_declared": [sql.SQL("CREATE INDEX IF NOT EXISTS idx_a ON {}.t (b, a)").format(s)],
    }.get(what)
    if what == "invalid_declared":  # someone's cancelled build under the declared name
        if conn.execute("SELECT to_regclass(%s)", [f"{schema}.idx_a"]).fetchone() != (None,):
            return
        with psycopg.connect(dsn, autocommit=True) as blocker:
            blocker.execute("BEGIN")
            blocker.execute(sql.SQL("LOCK TABLE {}.t IN ROW EXCLUSIVE MODE").format(s))
            conn.execute("SET lock_timeout = '100ms'")
            try:
                conn.execute(sql.SQL("CREATE INDEX CONCURRENTLY idx_a ON {}.t (a)").format(s))
            except psycopg.errors.LockNotAvailable:
                pass
            finally:
                conn.execute("RESET lock_timeout")
                blocker.execute("ROLLBACK")
        return
    for statement in statements or []:
        conn.execute(statement)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(ACTIONS, min_size=3, max_size=9))
def test_no_foreign_object_is_ever_dropped_or_altered(fresh_db: FreshDatabase, actions: list[tuple[str, str]]) -> None:
    schema = f"p{next(_EXAMPLES)}"
    owner = f"default/prop-{schema}"
    state: dict[str, Any] = {"columns": ["a"], "view_column": "a", "index": True, "view": True, "policy": "Drop"}
    with psycopg.connect(fresh_db.superuser_dsn, autocommit=True) as su, fresh_db.connect() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.t (id int PRIMARY KEY, a int, b int)").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("INSERT INTO {}.t SELECT g, g % 7, g % 3 FROM generate_series(1, 200) g").format(
            sql.Identifier(schema)))
        before = {r[0] for r in su.execute("SELECT oid::bigint FROM pg_class").fetchall()}
        foreign: dict[int, tuple[Any, ...]] = {}
        for number, (kind, what) in enumerate(actions):
            if kind == "user":
                _user_action(su if what == "invalid_declared" else conn, fresh_db.superuser_dsn, schema, what, number)
                created = {r[0] for r in su.execute("SELECT oid::bigint FROM pg_class").fetchall()} - before
                before |= created
                foreign.update(_snapshot(su, created))
            elif kind == "spec":
                if what == "index_columns":
                    state["columns"] = ["a", "b"] if state["columns"] == ["a"] else ["a"]
                elif what == "view_query":
                    state["view_column"] = "b" if state["view_column"] == "a" else "a"
                elif what == "policy":
                    state["policy"] = "Retain" if state["policy"] == "Drop" else "Drop"
                else:
                    key = "index" if what == "drop_index" else "view"
                    state[key] = not state[key]
            else:
                d = desired_state(_spec(schema, state), owner)
                observed = gateway.observe(conn, d)
                the_plan = plan(d, observed) if kind == "apply" else \
                    teardown_plan(desired_state(_spec(schema, {**state, "policy": "Drop"}), owner), observed)
                gateway.execute(conn, the_plan, FAST)
                before |= {r[0] for r in su.execute("SELECT oid::bigint FROM pg_class").fetchall()}
            adopted = {int(r[0]) for r in su.execute(
                "SELECT oid::bigint FROM marketplacedb.owned_objects WHERE owner = %s AND oid IS NOT NULL", [owner])
                } if su.execute("SELECT to_regclass('marketplacedb.owned_objects')").fetchone() != (None,) else set()
            for oid in adopted:
                foreign.pop(oid, None)  # adopted (identical definition under a declared name): now ours
            now = _snapshot(su, set(foreign))
            assert now == foreign, (actions[: number + 1], {o: (foreign[o], now.get(o)) for o in foreign
                                                            if now.get(o) != foreign[o]})
