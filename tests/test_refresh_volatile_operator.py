"""Issue 16 through the operator (kopf on KMock, real PostgreSQL 15): a declared view whose query
calls a user-defined VOLATILE function is refused before any DDL, shown as the SchemaApplied
condition (Conflict, the function named) and in the view's status, while the other views are made."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from harness.kube import eventually
from test_operator import Env, env  # noqa: F401  (env is a fixture)
from test_operator import example_resource as example


async def test_the_operator_refuses_a_view_calling_a_user_defined_volatile_function(env: Env) -> None:  # noqa: F811
    with psycopg.connect(env.db.superuser_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.audit (n int); "
                     "CREATE FUNCTION ops.touch(p bigint) RETURNS bigint LANGUAGE plpgsql AS "
                     "$$ BEGIN INSERT INTO ops.audit VALUES (1); RETURN p; END $$")
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA ops TO {0}; GRANT INSERT ON ops.audit TO {0}").format(
            sql.Identifier(env.db.owner)))
    body: dict[str, Any] = example(env.db)
    body["spec"]["materializedViews"].append(
        {"name": "mv_touched", "query": "SELECT id, ops.touch(id) AS t FROM seller_products", "uniqueKey": ["id"]})
    number = len(body["spec"]["materializedViews"]) - 1
    async with env.operator():
        await env.objects.create(body)
        await env.pooler_controller()

        async def refused() -> dict[str, Any] | None:
            views = {v["name"]: v for v in env.resource().get("status", {}).get("materializedViews", [])}
            applied = env.condition("SchemaApplied")
            others = [v for name, v in views.items() if name != "mv_touched"]
            if applied.get("reason") == "Conflict" and others and all(v.get("populated") for v in others):
                return {"applied": applied, "views": views}
            return None

        seen = await eventually(refused, timeout=90, message=f"refused; now {env.condition('SchemaApplied')}")
    message = seen["applied"]["message"]
    assert f"spec.materializedViews[{number}].query: refused: calls volatile function(s) ops.touch(bigint)" in message
    assert "allowVolatileFunctions: true" in message
    touched = seen["views"]["mv_touched"]
    assert touched["message"].startswith("Refused: ") and not touched["populated"]
    assert touched["refreshRule"] == "skip-if-unchanged: off: calls volatile function(s) ops.touch(bigint) (refused)"
    with psycopg.connect(env.db.superuser_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.mv_touched'), (SELECT count(*) FROM ops.audit)").fetchone() \
            == (None, 0)
