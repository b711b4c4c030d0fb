"""Hostile input: generated (hypothesis) and hand-written. Each spec is either rejected with a
message naming the field, or applied exactly: the database sees only what was declared."""

from __future__ import annotations

import copy
import json
from typing import Any

import psycopg
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from pydantic import ValidationError

from conftest import DEADLINE, ROOT, Rel
from harness.kube import eventually
from marketplacedb_operator import naming
from marketplacedb_operator.api.errors import format_errors
from marketplacedb_operator.api.v1alpha1 import MarketplaceDB
from marketplacedb_operator.sql import plan as planning
from marketplacedb_operator.sql.catalog import Catalog

EXAMPLE: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "marketplacedb.yaml").read_text())
SQLISH = st.sampled_from(['"', "'", ";", "--", "/*", "*/", "$$", "\\", "\n", "\x00", " DROP TABLE categories",
                          " OR 1=1", "pg_sleep(10)", "ü", "名", "\u202e", "A", "_", "1", " "])
HOSTILE_TEXT = st.one_of(st.text(max_size=80), st.lists(SQLISH, max_size=12).map("".join))


def _validate(mutate: Any) -> tuple[MarketplaceDB | None, list[str]]:
    body = copy.deepcopy(EXAMPLE)
    mutate(body["spec"])
    try:
        return MarketplaceDB.model_validate(body), []
    except ValidationError as exc:
        return None, format_errors(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=HOSTILE_TEXT, table=HOSTILE_TEXT, where=HOSTILE_TEXT)
def test_generated_identifiers_are_rejected_precisely_or_quoted(name: str, table: str, where: str) -> None:
    def mutate(spec: dict[str, Any]) -> None:
        spec["indexes"][0].update(name=name, table=table, where=where)

    resource, errors = _validate(mutate)
    if resource is None:
        assert errors and all(e.startswith("spec.") for e in errors), errors
        assert any(e.startswith("spec.indexes[0].") for e in errors), errors
        return
    # Accepted: every statement names exactly the declared identifiers, quoted.
    desired = planning.desired_state(resource.spec, "prod/shop")
    text = json.dumps([s.sql_text for s in planning.plan(desired, _empty_catalog()).steps])
    quoted = [sql.Identifier(x).as_string(None) for x in (name, table)]
    assert all(json.dumps(q)[1:-1] in text for q in quoted), (quoted, text[:300])


def _empty_catalog() -> Catalog:
    return Catalog(database="shop", user="owner", indexes=(), views=(), relations=(), database_settings={},
                   server_settings=())


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(tail=HOSTILE_TEXT)
def test_generated_view_queries_are_one_select_or_rejected(tail: str) -> None:
    def mutate(spec: dict[str, Any]) -> None:
        # Deliberately built by concatenation: the hostile tail is the point of the test.
        spec["materializedViews"][1]["query"] = "SELECT c.id FROM categories AS c WHERE c.name = 'x'" + tail  # noqa: S608

    resource, errors = _validate(mutate)
    if resource is None:
        assert any(e.startswith("spec.materializedViews[1].query") for e in errors), errors


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=HOSTILE_TEXT)
def test_generated_pooler_parameters_never_carry_a_line_break(value: str) -> None:
    resource, errors = _validate(lambda spec: spec["pooler"]["parameters"].update(server_idle_timeout=value))
    if resource is None:
        assert any(e.startswith("spec.pooler.parameters") for e in errors), errors
    else:
        assert "\n" not in value and "\r" not in value


# -- end to end: the subprocess operator against hand-written hostile resources -----------------------

HOSTILE: dict[str, tuple[Any, str]] = {
    "injection-name": (lambda s: s["indexes"][0].update(name='x"; DROP TABLE categories; --'),
                       "spec.indexes[0].name: "),
    "injection-where": (lambda s: s["indexes"][0].update(where="true) ; DROP TABLE categories; --"),
                        "spec.indexes[0].where: predicate does not parse"),
    "two-statements": (lambda s: s["materializedViews"][0].update(query="SELECT 1 AS id; DROP TABLE categories"),
                       "spec.materializedViews[0].query: query must be exactly one statement"),
    "unknown-field": (lambda s: s.update(dropEverything=True), "spec.dropEverything: Extra inputs are not permitted"),
    "pooler-newline": (lambda s: s["pooler"]["parameters"].update(server_idle_timeout="600\nadmin_users = evil"),
                       "spec.pooler.parameters: server_idle_timeout"),
    "oversized": (lambda s: s.update(indexes=[{"name": f"idx_x_{i}", "table": "categories",
                                               "columns": [{"name": "display_order"}], "where": "id > " + "9" * 50}
                                              for i in range(201)]),
                  "spec.indexes: List should have at most 200 items"),
}


async def test_hostile_resources_are_rejected_precisely_and_touch_nothing(rel: Rel) -> None:
    before = _fingerprint(rel.db.superuser_dsn)
    await rel.operator.start()
    for key, (mutate, _) in HOSTILE.items():
        spec = rel.spec()
        mutate(spec)
        await rel.create(spec, name=key)
    for key, (_, expected) in HOSTILE.items():
        cond = await rel.wait_condition("Ready", "False", "InvalidSpec", name=key)
        assert expected in cond["message"], (key, cond["message"])
    # A large valid resource (200 indexes, ~40 KB of spec), with unicode applied exactly.
    big = rel.spec()
    big["indexes"] = [{"name": f"idx_big_{i}", "table": "popular_searches", "columns": [{"name": "search_count"}],
                       "where": f"query <> 'ünïcode ✓ {i}' AND search_count > {i}"} for i in range(200)]
    big["materializedViews"] = []
    await rel.create(big, name="big")
    resource = await rel.wait_ready(name="big")
    assert len(json.dumps(resource["spec"])) > 30_000
    with psycopg.connect(rel.db.superuser_dsn, autocommit=True) as conn:
        definition = conn.execute("SELECT pg_get_indexdef('idx_big_7'::regclass)").fetchone()
    assert definition is not None and "'ünïcode ✓ 7'::text" in definition[0]
    # kopf's state on the object: the finalizer and one small marker (handlers.SeenMarkerStorage),
    # never a copy of the spec, so it does not grow with the spec (the 256 KiB annotation limit).
    sizes = {}
    for key in [*HOSTILE, "big"]:
        # kopf adds the finalizer after the event handler returns (the 200-index reconcile first).
        await eventually(lambda k=key: rel.resource(k)["metadata"].get("finalizers") == [naming.FINALIZER],
                         timeout=DEADLINE, message=f"{key}: finalizer")
        meta = rel.resource(key)["metadata"]
        annotations = meta.get("annotations") or {}
        extra = set(annotations) - {f"{naming.ANNOTATION_PREFIX}/seen"}
        assert extra == set(), extra
        sizes[key] = len(json.dumps(annotations))
        assert sizes[key] < 100, (key, sizes[key])
    rel.measurements["annotation bytes"] = sizes
    after = _fingerprint(rel.db.superuser_dsn)
    assert after["tables"] == before["tables"]  # no hostile statement dropped or created a table
    assert {n for n in after["indexes"] if n not in before["indexes"]} == {f"idx_big_{i}" for i in range(200)}


def _fingerprint(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = sorted(r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'"))
        indexes = sorted(r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'i'"))
    return {"tables": tables, "indexes": indexes}

