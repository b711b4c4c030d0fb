"""Issue 12, finding 8 through the operator (kopf on KMock, real PostgreSQL 15): the reference
workload created by a migration before the operator existed is adopted, not rebuilt, and the
resource becomes Ready with every index reported `Adopted`."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from marketplacedb_operator import workload
from test_operator import CANARY, Env, _ready, env, example_resource  # noqa: F401  (env is a fixture)
from test_schema_engine_pg import INDEXES, run
from test_schema_ownership_pg import _migration_sql


def oids(db: Any, *names: str) -> dict[str, int]:
    with psycopg.connect(db.superuser_dsn) as conn:
        return {n: conn.execute("SELECT to_regclass(%s)::oid", [n]).fetchone()[0] for n in names}  # type: ignore[index]


async def test_operator_adopts_a_migrated_workload_and_becomes_ready(env: Env) -> None:  # noqa: F811
    owner_dsn = env.db.server.dsn(env.db.name, env.db.owner, CANARY)  # the fixture set this password
    for statement in _migration_sql():
        run(owner_dsn, statement)
    body: dict[str, Any] = example_resource(env.db)
    for name, value in body["spec"]["database"]["settings"].items():
        run(env.db.superuser_dsn, sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(env.db.name), sql.Identifier(name), sql.Literal(value)))
    names = [i["name"] for i in INDEXES] + list(workload.VIEW_QUERIES) + [f"{v}_uniq" for v in workload.VIEW_QUERIES]
    before = oids(env.db, *names)
    async with env.operator():
        await env.objects.create(body)
        await env.pooler_controller()
        resource = await _ready(env)
    status = resource["status"]
    assert [i["state"] for i in status["indexes"]] == ["Adopted"] * 5
    assert {v["message"] for v in status["materializedViews"]} == {"Ready (adopted)"}
    assert status["summary"]["indexes"] == "5/5"
    assert oids(env.db, *names) == before  # nothing rebuilt
