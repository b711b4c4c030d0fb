"""Index spec of issue 18 without a database: what the models refuse (naming the field), what the
CRD refuses alike, the DDL composed, and that a plain b-tree index keeps its definition hash (an
upgrade must not rebuild every existing index)."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import pydantic
import pytest

from admission_corpus import CORPUS
from crd_admission import crd_problems
from marketplacedb_operator.api.v1alpha1 import IndexSpec, MarketplaceDBSpec
from marketplacedb_operator.sql import ddl


def index(**fields: Any) -> IndexSpec:
    return IndexSpec.model_validate({"name": "ix", "table": "t", **fields})


@pytest.mark.parametrize(("fields", "message"), [
    ({"columns": [{"expression": "lower(email)); DROP TABLE t; --"}]}, "expression"),
    ({"columns": [{"expression": "lower(email) FROM pg_authid"}]}, "trailing clause"),
    ({"columns": [{"expression": "(SELECT max(id) FROM t)"}]}, "subqueries"),
    ({"columns": [{"expression": "a, b"}]}, "exactly one expression"),
    ({"columns": [{"expression": "$1"}]}, "parameter"),
    ({"columns": [{"name": "a", "expression": "lower(a)"}]}, "exactly one of name and expression"),
    ({"columns": [{}]}, "exactly one of name and expression"),
    ({"columns": [{"name": "a", "opclass": "gin_trgm_ops) WITH (x"}]}, "opclass"),
    ({"method": "gin", "columns": [{"name": "a", "opclass": "text_pattern_ops"}]}, "not a gin operator class"),
    ({"method": "hash", "columns": [{"name": "a"}, {"name": "b"}]}, "exactly one column"),
    ({"method": "gin", "unique": True, "columns": [{"name": "a"}]}, "only btree"),
    ({"method": "brin", "include": ["b"], "columns": [{"name": "a"}]}, "INCLUDE"),
    ({"method": "gist", "columns": [{"name": "a", "order": "desc"}]}, "btree only"),
    ({"method": "brin", "storage": {"fillfactor": 50}, "columns": [{"name": "a"}]}, "storage.fillfactor"),
    ({"method": "btree", "storage": {"fastupdate": True}, "columns": [{"name": "a"}]}, "storage.fastupdate"),
    ({"storage": {"fillfactor": 5}, "columns": [{"name": "a"}]}, "fillfactor"),
    ({"method": "rtree", "columns": [{"name": "a"}]}, "method"),
])
def test_bad_index_specs_are_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        index(**fields)
    assert message in str(caught.value)


def test_unknown_extension_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="extensions"):
        MarketplaceDBSpec.model_validate({"database": {"host": "db", "dbname": "d", "credentialsSecretRef":
                                                       {"name": "o"}, "extensions": ["plpython3u"]}})


def test_the_crd_refuses_what_the_models_refuse() -> None:
    document = copy.deepcopy(CORPUS[0].document)
    document["spec"]["database"]["extensions"] = ["plpython3u"]
    document["spec"]["indexes"] = [
        {"name": "a", "table": "t", "columns": [{"name": "x", "expression": "lower(x)"}]},
        {"name": "b", "table": "t", "columns": [{"name": "x", "opclass": "evil_ops"}]},
        {"name": "c", "table": "t", "method": "gin", "columns": [{"expression": "lower(x)"}, {"name": "y"},
                                                                   {"name": "y"}]},
    ]
    problems = crd_problems(document)
    assert any("extensions" in p for p in problems), problems
    assert any("exactly one of name and expression" in p for p in problems), problems
    assert any("opclass" in p for p in problems), problems
    assert any("must not repeat a column" in p for p in problems), problems
    good = copy.deepcopy(CORPUS[0].document)
    good["spec"]["database"]["extensions"] = ["pg_trgm"]
    good["spec"]["indexes"] = [{"name": "c", "table": "t", "method": "gin", "storage": {"fastupdate": False},
                                "columns": [{"expression": "lower(x)", "opclass": "gin_trgm_ops"}]}]
    assert crd_problems(good) == []


def test_ddl_is_composed_from_the_deparsed_expression_and_allow_listed_names() -> None:
    spec = index(method="gin", columns=[{"expression": "lower( name )  -- comment", "opclass": "gin_trgm_ops"}],
                 storage={"fastupdate": False}, where="deleted_at IS NULL")
    assert ddl.render(ddl.create_index(spec)) == (
        'CREATE INDEX CONCURRENTLY "ix" ON "public"."t" USING gin ((lower(name)) "gin_trgm_ops") '
        "WITH (fastupdate = 'off') WHERE deleted_at IS NULL")
    assert spec.extensions == ("pg_trgm",)


def test_a_plain_btree_index_keeps_its_definition_hash() -> None:
    spec = index(columns=[{"name": "a"}, {"name": "b", "order": "desc", "nulls": "last"}], include=["c"],
                 where="a > 1", unique=True)
    # The canonical form written before issue 18 (same keys, same order): existing records stay in sync.
    before = json.dumps({"schema": "public", "table": "t", "columns": [["a", "asc", None], ["b", "desc", "last"]],
                         "include": ["c"], "where": "a > 1", "unique": True},
                        sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert ddl.index_hash(spec) == hashlib.sha256(before.encode()).hexdigest()
    plain = ddl.index_hash(index(columns=[{"name": "a"}]))
    assert ddl.index_hash(index(columns=[{"name": "a"}], method="hash")) != plain
    assert ddl.index_hash(index(columns=[{"name": "a"}], storage={"fillfactor": 90})) != \
        ddl.index_hash(index(columns=[{"name": "a"}]))
