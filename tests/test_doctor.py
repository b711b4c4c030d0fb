"""`marketplacedb doctor` against a real PostgreSQL 15, with the roles a platform team really has.

The README used to recommend "the owner of the tables": on PostgreSQL 15 such a role, when it does
not own the database, cannot `ALTER DATABASE ... SET` (spec.database.settings) nor create the
refresh state schema. doctor must say exactly that, print grants that are enough, and say nothing
is missing once they are applied: checked by running `apply` and `refresh` as that role.
"""

from __future__ import annotations

import json
import pathlib
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from harness.postgres import PostgresServer
from marketplacedb_operator import workload
from marketplacedb_operator.cli import main

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "marketplacedb.yaml"


class Weak:
    """A database owned by one role, its tables owned by another (the operator's), nothing else."""

    def __init__(self, pg: PostgresServer) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.pg, self.db, self.password = pg, f"doctor_{suffix}", secrets.token_urlsafe(12)
        self.dba, self.role = f"dba_{suffix}", f"tables_{suffix}"
        pg.create_role(self.dba, None, login=False)
        pg.create_role(self.role, self.password)
        pg.create_database(self.db, self.dba)
        self.admin("GRANT CREATE ON SCHEMA public TO {}", self.role)
        self.dsn = pg.dsn(self.db, self.role, self.password)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(workload.schema_sql())
            conn.execute(workload.data_sql(products=500))

    def admin(self, template: str, *names: str) -> None:
        self.pg.execute(sql.SQL(template).format(*map(sql.Identifier, names)), dbname=self.db)

    def drop(self) -> None:
        self.pg.drop_database(self.db)
        for role in (self.role, self.dba):
            self.pg.drop_role(role)


@pytest.fixture
def weak(pg: PostgresServer) -> Iterator[Weak]:
    db = Weak(pg)
    try:
        yield db
    finally:
        db.drop()


def _doctor(capsys: Any, dsn: str) -> tuple[int, dict[str, Any]]:
    code = main(["doctor", "-f", str(EXAMPLE), "--dsn", dsn, "-o", "json"])
    (resource,) = json.loads(capsys.readouterr().out)["resources"]
    return code, {c["need"]: c for c in resource["checks"]}


def test_table_owner_without_the_database_is_told_what_is_missing(weak: Weak, capsys: Any) -> None:
    code, found = _doctor(capsys, weak.dsn)
    assert code == 1
    missing = {need: c["grant"] for need, c in found.items() if c["level"] == "missing"}
    assert missing == {
        f"CREATE on database {weak.db} (the operator's schema marketplacedb: ownership records and refresh state)":
            f'GRANT CREATE ON DATABASE "{weak.db}" TO "{weak.role}"',
        f"own database {weak.db} (ALTER DATABASE ... SET needs its owner)":
            f'ALTER DATABASE "{weak.db}" OWNER TO "{weak.role}"',
    }
    assert found["own table public.seller_products (CREATE INDEX needs its owner)"]["level"] == "ok"
    # Skip-if-unchanged cannot see other roles' sessions without it (sql/refresh_stats.py): advised.
    stats = [c for need, c in found.items() if need.startswith("pg_read_all_stats (or pg_monitor): skip-if-unchanged")]
    assert [(c["level"], c["grant"]) for c in stats] == [("advice", f'GRANT pg_read_all_stats TO "{weak.role}"')]

    # What doctor calls missing really is: the same role fails exactly there.
    assert main(["apply", "-f", str(EXAMPLE), "--dsn", weak.dsn, "-o", "json"]) == 1
    outcomes = json.loads(capsys.readouterr().out)["resources"][0]["outcomes"]
    failed = [o for o in outcomes if not o["ok"]]
    assert failed and all("permission denied for database" in o["message"] or "must be owner of database"
                          in o["message"] for o in failed), failed
    assert main(["refresh", "-f", str(EXAMPLE), "--all", "--dsn", weak.dsn, "-o", "json"]) == 1
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["outcome"] for r in results} == {"failed"}
    assert all("permission denied for database" in r["error"] for r in results), results

    # The printed grants are enough: doctor is satisfied, and apply and refresh succeed.
    for grant in missing.values():
        weak.pg.execute(grant, dbname=weak.db)
    code, found = _doctor(capsys, weak.dsn)
    assert code == 0 and not [c for c in found.values() if c["level"] == "missing"]
    assert main(["apply", "-f", str(EXAMPLE), "--dsn", weak.dsn]) == 0
    capsys.readouterr()
    assert main(["refresh", "-f", str(EXAMPLE), "--all", "--dsn", weak.dsn]) == 0


def test_no_create_on_the_schema_and_tables_of_another_role(weak: Weak, capsys: Any) -> None:
    weak.admin("REVOKE CREATE ON SCHEMA public FROM {}", weak.role)
    app = f"app_{uuid.uuid4().hex[:8]}"
    weak.pg.create_role(app, None, login=False)
    try:
        weak.admin("ALTER TABLE public.search_history OWNER TO {}", app)
        code, found = _doctor(capsys, weak.dsn)
        assert code == 1
        schema = found["USAGE and CREATE on schema public"]
        assert schema["level"] == "missing"
        assert schema["grant"] == f'GRANT USAGE, CREATE ON SCHEMA "public" TO "{weak.role}"'
        table = found["own table public.search_history (CREATE INDEX needs its owner)"]
        assert table["level"] == "missing" and table["grant"] == f'GRANT "{app}" TO "{weak.role}"'
        # Text output: one line per need, the grant to run under it, and no password anywhere.
        assert main(["doctor", "-f", str(EXAMPLE), "--dsn", weak.dsn]) == 1
        text = capsys.readouterr().out
        assert f'grant: GRANT "{app}" TO "{weak.role}";' in text and weak.password not in text
        # Membership in the owning role is enough for the index build itself.
        weak.pg.execute(table["grant"], dbname=weak.db)
        weak.pg.execute(schema["grant"], dbname=weak.db)
        with psycopg.connect(weak.dsn, autocommit=True) as conn:
            conn.execute("CREATE INDEX CONCURRENTLY doctor_probe ON public.search_history (user_id)")
        _, found = _doctor(capsys, weak.dsn)
        assert found["own table public.search_history (CREATE INDEX needs its owner)"]["level"] == "ok"
    finally:
        weak.pg.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(app)), dbname=weak.db)
        weak.pg.drop_role(app)


def test_usage_errors_are_one_line(capsys: Any, tmp_path: pathlib.Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("MARKETPLACEDB_DSN", raising=False)
    assert main(["doctor", "-f", str(EXAMPLE)]) == 2
    assert capsys.readouterr().err.strip() == "no connection: pass --dsn or set MARKETPLACEDB_DSN"
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: marketplacedb.io/v1alpha1\nkind: MarketplaceDB\nmetadata: {name: x}\nspec: {}\n")
    assert main(["doctor", "-f", str(bad), "--dsn", "host=127.0.0.1"]) == 1
    assert "spec.database" in capsys.readouterr().err
