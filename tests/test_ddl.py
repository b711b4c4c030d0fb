"""DDL builders rendered without a server: exact SQL, quoting, markers, hashes."""

from __future__ import annotations

import pytest
from psycopg import sql

from marketplacedb_operator.api.v1alpha1 import IndexSpec, MaterializedViewSpec
from marketplacedb_operator.sql import ddl


def _index(**overrides: object) -> IndexSpec:
    data: dict[str, object] = {
        "name": "idx_seller_products_available_approved",
        "table": "seller_products",
        "columns": [{"name": "category_id"}, {"name": "sold_count", "order": "desc"}],
        "where": "is_available = true AND is_approved = true",
    }
    data.update(overrides)
    return IndexSpec.model_validate(data)


def test_create_index_is_concurrent_and_exact() -> None:
    text = ddl.render(ddl.create_index(_index()))
    assert text == (
        'CREATE INDEX CONCURRENTLY "idx_seller_products_available_approved" ON "public"."seller_products" '
        'USING btree ("category_id", "sold_count" DESC) WHERE is_available = true AND is_approved = true'
    )


def test_covering_unique_and_nulls() -> None:
    spec = _index(name="idx_popular_searches_ranking", table="popular_searches", where=None, unique=True,
                  columns=[{"name": "search_count", "order": "desc", "nulls": "last"}],
                  include=["query", "is_trending"])
    assert ddl.render(ddl.create_index(spec, "tmp")) == (
        'CREATE UNIQUE INDEX CONCURRENTLY "tmp" ON "public"."popular_searches" USING btree '
        '("search_count" DESC NULLS LAST) INCLUDE ("query", "is_trending")'
    )


def test_drop_and_rename_index() -> None:
    assert ddl.render(ddl.drop_index("public", "i")) == 'DROP INDEX CONCURRENTLY IF EXISTS "public"."i"'
    assert ddl.render(ddl.rename_index("s", "a", "b")) == 'ALTER INDEX "s"."a" RENAME TO "b"'


@pytest.mark.parametrize("hostile", ['a"b', "x; DROP TABLE canary; --", "é\u202eunicode", "x$mdb$y", "o'k"])
def test_identifiers_are_quoted_whatever_they_hold(hostile: str) -> None:
    spec = IndexSpec.model_construct(name=hostile, table=hostile, schema_name="public",
                                     columns=_index().columns, where=None, include=[], unique=False)
    text = ddl.render(ddl.create_index(spec))
    quoted = '"' + hostile.replace('"', '""') + '"'
    assert f"CONCURRENTLY {quoted} ON \"public\".{quoted} USING" in text
    # The marker DO block carries the name as a quoted literal, never in a dollar-quoted body.
    mark = ddl.render(ddl.mark("INDEX", "public", hostile, ddl.marker_prefix("ns/n", "h")))
    assert mark.startswith(("DO '", "DO  E'"))
    assert "$" not in mark or "$" in hostile  # no dollar quoting anywhere: nothing for a name to close


def test_mark_body_is_one_literal() -> None:
    text = ddl.render(ddl.mark("MATERIALIZED VIEW", "public", "mv", ddl.marker_prefix("prod/shop", "abc")))
    assert text.startswith("DO '") and text.endswith("'")
    inner = text[4:-1]
    assert "''" in inner and "'" not in inner.replace("''", "")  # every quote inside is doubled
    assert "COMMENT ON MATERIALIZED VIEW %s IS %L" in inner
    assert "pg_get_viewdef" in inner and "marketplacedb.io/owner=prod/shop;hash=abc;def=" in inner


def test_marker_round_trip_and_foreign_comments() -> None:
    marker = ddl.parse_marker(ddl.marker_prefix("prod/shop", "aa") + "bb")
    assert marker == ddl.Marker(owner="prod/shop", spec_hash="aa", def_hash="bb")
    assert ddl.parse_marker(None) is None
    assert ddl.parse_marker("hand-made index for reports") is None
    assert ddl.parse_marker("marketplacedb.io/owner=;hash=x") is None


def test_index_hash_ignores_formatting_not_meaning() -> None:
    a = ddl.index_hash(_index(where="is_available = true AND is_approved = true"))
    b = ddl.index_hash(_index(where="(is_available=true)   and (is_approved = TRUE) -- comment"))
    assert a == b
    assert a != ddl.index_hash(_index(columns=[{"name": "sold_count", "order": "desc"}, {"name": "category_id"}]))
    assert a != ddl.index_hash(_index(where="is_available = true"))
    assert a == ddl.index_hash(_index(name="another_name"))  # the name is the identity, not the definition
    assert len(a) == 64


def test_view_hash_ignores_refresh_policy_and_comments() -> None:
    base = {"name": "mv", "query": "SELECT id FROM t", "uniqueKey": ["id"]}
    a = ddl.view_hash(MaterializedViewSpec.model_validate(base))
    b = ddl.view_hash(MaterializedViewSpec.model_validate(
        {**base, "query": "select id /* hello */ from t", "refresh": {"schedule": "*/5 * * * *"}}))
    c = ddl.view_hash(MaterializedViewSpec.model_validate({**base, "query": "SELECT id FROM t LIMIT 5"}))
    assert a == b != c


def test_view_ddl() -> None:
    assert ddl.render(ddl.create_view("public", "mv", "select id from t")) == \
        'CREATE MATERIALIZED VIEW "public"."mv" AS SELECT id FROM t WITH DATA'
    assert ddl.render(ddl.create_view_index("public", "mv", "mv__key", ["product_type", "id"], concurrently=False)) == \
        'CREATE UNIQUE INDEX "mv__key" ON "public"."mv" USING btree ("product_type", "id")'
    assert "CONCURRENTLY" in ddl.render(ddl.create_view_index("s", "v", "k", ["id"], concurrently=True))
    assert ddl.render(ddl.drop_view("public", "mv")) == 'DROP MATERIALIZED VIEW IF EXISTS "public"."mv"'
    assert ddl.render(ddl.rename_view("public", "a", "b")) == 'ALTER MATERIALIZED VIEW "public"."a" RENAME TO "b"'


def test_create_view_rejects_a_second_statement_even_unvalidated() -> None:
    with pytest.raises(ValueError, match="exactly one statement"):
        ddl.create_view("public", "mv", "SELECT 1 AS id; DROP TABLE canary")


def test_grants_only_known_privileges() -> None:
    assert ddl.render(ddl.grant("SELECT", "public", "mv", "reader", False)) == \
        'GRANT SELECT ON "public"."mv" TO "reader"'
    assert ddl.render(ddl.grant("SELECT", "public", "mv", None, True)) == \
        'GRANT SELECT ON "public"."mv" TO PUBLIC WITH GRANT OPTION'
    with pytest.raises(KeyError):
        ddl.grant("SELECT; DROP TABLE x", "public", "mv", None, False)


def test_database_settings() -> None:
    assert ddl.render(ddl.set_database("shop", "work_mem", "64MB")) == \
        """ALTER DATABASE "shop" SET "work_mem" = '64MB'"""
    assert ddl.render(ddl.set_database("shop", "x", "a'b")) == """ALTER DATABASE "shop" SET "x" = 'a''b'"""
    assert ddl.render(ddl.reset_database("shop", "work_mem")) == 'ALTER DATABASE "shop" RESET "work_mem"'


def test_temp_names_fit_63_bytes() -> None:
    long = "i" * 63
    for name in (ddl.temp_name(long), ddl.old_name(long), ddl.view_key_name(long), ddl.temp_name("short")):
        assert len(name.encode()) <= 63
    assert ddl.temp_name("idx") == "idx__new" and ddl.old_name("idx") == "idx__old"
    assert ddl.temp_name(long) != ddl.old_name(long)


def test_render_needs_no_connection() -> None:
    # psycopg pads E'' with a space
    assert ddl.render(sql.SQL("SELECT {}").format(sql.Literal("back\\slash"))) == "SELECT  E'back\\\\slash'"
