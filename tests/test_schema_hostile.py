"""Hostile input: rejected before anything reaches the database, naming the field; and the DDL
builders quote whatever gets past validation. A canary table proves nothing was touched."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from harness.postgres import FreshDatabase
from marketplacedb_operator.api.v1alpha1 import IndexColumn, IndexSpec, MarketplaceDBSpec, MaterializedViewSpec
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.sql.plan import ExecutionPolicy, desired_state, plan

BASE: dict[str, Any] = {
    "apiVersion": "marketplacedb.io/v1alpha1",
    "kind": "MarketplaceDB",
    "metadata": {"name": "shop", "namespace": "default"},
    "spec": {
        "database": {"host": "db", "dbname": "shop", "credentialsSecretRef": {"name": "owner"}},
        "indexes": [{"name": "idx_canary_v", "table": "canary", "columns": [{"name": "v"}]}],
        "materializedViews": [{"name": "mv_canary", "query": "SELECT id, v FROM canary", "uniqueKey": ["id"]}],
    },
}

# (case, path into the spec, value, the field the message must name)
HOSTILE: list[tuple[str, tuple[Any, ...], Any, str]] = [
    ("quote in index name", ("indexes", 0, "name"), 'idx"; DROP TABLE canary; --', "spec.indexes[0].name"),
    ("semicolon in table", ("indexes", 0, "table"), "canary; DROP TABLE canary", "spec.indexes[0].table"),
    ("unicode column", ("indexes", 0, "columns", 0, "name"), "naïve\u202e", "spec.indexes[0].columns[0].name"),
    ("quote in include", ("indexes", 0, "include"), ['v") WHERE false; DROP TABLE canary; --'],
     "spec.indexes[0].include[0]"),
    ("second statement in predicate", ("indexes", 0, "where"), "true; DROP TABLE canary",
     "spec.indexes[0].where"),
    ("subquery in predicate", ("indexes", 0, "where"), "(SELECT count(*) FROM canary) > 0", "spec.indexes[0].where"),
    ("quote in view name", ("materializedViews", 0, "name"), "mv'; DROP TABLE canary; --",
     "spec.materializedViews[0].name"),
    ("quote in unique key", ("materializedViews", 0, "uniqueKey"), ['id"'], "spec.materializedViews[0].uniqueKey[0]"),
    ("second statement", ("materializedViews", 0, "query"), "SELECT id, v FROM canary; DROP TABLE canary",
     "spec.materializedViews[0].query"),
    ("INSERT in a CTE", ("materializedViews", 0, "query"),
     "WITH x AS (INSERT INTO canary (id, v) VALUES (99, 'x') RETURNING id, v) SELECT id, v FROM x",
     "spec.materializedViews[0].query"),
    ("UPDATE in a CTE", ("materializedViews", 0, "query"),
     "WITH x AS (UPDATE canary SET v = 'gone' RETURNING id, v) SELECT id, v FROM x", "spec.materializedViews[0].query"),
    ("DELETE in a nested CTE", ("materializedViews", 0, "query"),
     "SELECT id, v FROM (WITH d AS (DELETE FROM canary RETURNING id, v) SELECT * FROM d) s",
     "spec.materializedViews[0].query"),
    ("SELECT INTO", ("materializedViews", 0, "query"), "SELECT id, v INTO stolen FROM canary",
     "spec.materializedViews[0].query"),
    ("FOR UPDATE", ("materializedViews", 0, "query"), "SELECT id, v FROM canary FOR UPDATE",
     "spec.materializedViews[0].query"),
    ("comment hiding a statement", ("materializedViews", 0, "query"),
     "SELECT id, v FROM canary /* harmless */; DELETE FROM canary -- ; SELECT 1",
     "spec.materializedViews[0].query"),
    ("line comment then statement", ("materializedViews", 0, "query"),
     "SELECT id, v FROM canary --\n;DROP TABLE canary",
     "spec.materializedViews[0].query"),
    ("not a SELECT", ("materializedViews", 0, "query"), "TRUNCATE canary", "spec.materializedViews[0].query"),
]


def _manifest(tmp_path: Path, where: tuple[Any, ...], value: Any) -> str:
    document = copy.deepcopy(BASE)
    target: Any = document["spec"]
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    return str(path)


def _canary(db: FreshDatabase) -> list[Any]:
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT id, v FROM canary ORDER BY id").fetchall()
        relations = conn.execute("SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                                 "ORDER BY relname").fetchall()
        comments = conn.execute("SELECT count(*) FROM pg_description").fetchone()
        return [rows, relations, comments]


@pytest.fixture
def canary_db(fresh_db: FreshDatabase) -> FreshDatabase:
    with fresh_db.connect() as conn:
        conn.execute("CREATE TABLE canary (id int PRIMARY KEY, v text NOT NULL)")
        conn.execute("INSERT INTO canary SELECT g, 'row ' || g FROM generate_series(1, 20) g")
    return fresh_db


@pytest.mark.parametrize(("case", "where", "value", "field"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_rejected_before_the_database_naming_the_field(case: str, where: tuple[Any, ...], value: Any, field: str,
                                                      canary_db: FreshDatabase, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from marketplacedb_operator.cli import main

    manifest = _manifest(tmp_path, where, value)
    before = _canary(canary_db)
    # Unreachable DSN: the field error, not a connection error, proves nothing tried to connect.
    for dsn in ("host=127.0.0.1 port=1 dbname=nowhere user=nobody connect_timeout=1", canary_db.dsn):
        for command in ("plan", "apply"):
            capsys.readouterr()
            code = main([command, "-f", manifest, "--dsn", dsn])
            out, err = capsys.readouterr()
            assert code == 1, (case, out)
            assert field in err, (case, err)
            assert "cannot connect" not in err and out == ""
    assert _canary(canary_db) == before


def test_hostile_identifiers_are_quoted_by_the_builders(canary_db: FreshDatabase) -> None:
    """Defence in depth: identifiers that validation would refuse, forced through model_construct,
    still reach PostgreSQL as one quoted name each (including `$mdb$` and quotes in the marker)."""
    table, index, view = 'tbl"; DROP TABLE canary; --', "idx$mdb$'; DROP TABLE canary; --", "mv é'\"$$"
    with canary_db.connect() as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {} text)").format(
            sql.Identifier(table), sql.Identifier("we'ird;col")))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'a'), (2, 'b')").format(sql.Identifier(table)))
    before = _canary(canary_db)
    spec = MarketplaceDBSpec.model_validate(BASE["spec"])
    spec.indexes = [IndexSpec.model_construct(name=index, table=table, schema_name="public", unique=False,
                                              columns=[IndexColumn.model_construct(name="we'ird;col", order="desc",
                                                                                   nulls=None)],
                                              where=None, include=[])]
    spec.materialized_views = [MaterializedViewSpec.model_construct(
        name=view, schema_name="public", query="SELECT id, v FROM canary", unique_key=["id"], refresh=None)]
    d = desired_state(spec, "default/shop")
    with canary_db.connect() as conn:
        outcomes = gateway.execute(conn, plan(d, gateway.observe(conn, d)), ExecutionPolicy(retries=0))
        assert all(o.ok for o in outcomes), outcomes
        cat = gateway.observe(conn, d)
        assert plan(d, cat).empty  # the markers were written and read back through the quoting
    info = cat.index("public", index)
    assert info is not None and info.valid and info.marker is not None and info.marker.owner == "default/shop"
    mv = cat.view("public", view)
    assert mv is not None and mv.populated and mv.marker is not None
    rows, relations, _ = _canary(canary_db)
    assert rows == before[0]
    assert ("canary",) in relations and (table,) in relations


def test_view_check_evaluates_nothing_and_runs_read_only(canary_db: FreshDatabase) -> None:
    """The column check plans the query without running it (LIMIT 0), in a READ ONLY transaction:
    a function the parser cannot see into neither runs nor could write."""
    with canary_db.connect() as conn:
        conn.execute("CREATE SEQUENCE s")
        conn.execute("CREATE FUNCTION wipe() RETURNS int LANGUAGE sql AS 'DELETE FROM canary RETURNING 1'")
        columns = gateway.check_view_columns(conn, "SELECT wipe() AS id, nextval('s') AS n FROM canary")
        assert columns == ["id", "n"]
        assert conn.execute("SELECT count(*) FROM canary").fetchone() == (20,)
        assert conn.execute("SELECT is_called FROM s").fetchone() == (False,)
        with conn.transaction():  # what READ ONLY does to such a function, should it ever run
            conn.execute("SET TRANSACTION READ ONLY")
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                with conn.transaction():
                    conn.execute("SELECT wipe()")
