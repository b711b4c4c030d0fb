"""plan(desired, observed) on synthetic catalogs: pure, no server."""

from __future__ import annotations

import dataclasses
from typing import Any

from marketplacedb_operator import workload
from marketplacedb_operator.api.v1alpha1 import DDLPolicy, MarketplaceDBSpec
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.sql import ddl, report
from marketplacedb_operator.sql.catalog import OBSERVE, Catalog, Grant, IndexInfo, ViewInfo, observe_params
from marketplacedb_operator.sql.plan import Desired, ExecutionPolicy, StepOutcome, desired_state, plan, teardown_plan

OWNER = "prod/shop"

REFERENCE_INDEXES: list[dict[str, Any]] = [
    {"name": "idx_ai_accounts_available_category", "table": "ai_accounts",
     "columns": [{"name": "category_id"}, {"name": "sold_count", "order": "desc"}], "where": "is_available = true"},
    {"name": "idx_seller_products_available_approved", "table": "seller_products",
     "columns": [{"name": "category_id"}, {"name": "sold_count", "order": "desc"}],
     "where": "is_available = true AND is_approved = true"},
    {"name": "idx_seller_orders_seller_status", "table": "seller_orders",
     "columns": [{"name": "seller_id"}, {"name": "status"}, {"name": "created_at", "order": "desc"}]},
    {"name": "idx_search_history_user_recent", "table": "search_history",
     "columns": [{"name": "user_id"}, {"name": "created_at", "order": "desc"}]},
    {"name": "idx_popular_searches_ranking", "table": "popular_searches",
     "columns": [{"name": "search_count", "order": "desc"}], "include": ["query", "is_trending"]},
]


def spec(**overrides: Any) -> MarketplaceDBSpec:
    data: dict[str, Any] = {
        "database": {"host": "db", "dbname": "shop", "credentialsSecretRef": {"name": "owner"},
                     "settings": {"work_mem": "64MB", "random_page_cost": "1.1"}},
        "indexes": REFERENCE_INDEXES,
        "materializedViews": [{"name": n, "query": q, "uniqueKey": list(workload.VIEW_UNIQUE_KEYS[n])}
                              for n, q in workload.VIEW_QUERIES.items()],
    }
    data.update(overrides)
    return MarketplaceDBSpec.model_validate(data)


def desired(**overrides: Any) -> Desired:
    return desired_state(spec(**overrides), OWNER)


def index_info(name: str, table: str = "t", *, marker: str | None = None, valid: bool = True,
               def_hash: str = "d", **kw: Any) -> IndexInfo:
    values: dict[str, Any] = dict(schema="public", name=name, table_schema="public", table=table, table_kind="r",
                                  definition=f"CREATE INDEX {name} ...", def_hash=def_hash, valid=valid, ready=True,
                                  unique=False, primary=False, partial=False, expressions=False, comment=marker,
                                  key_columns=())
    values.update(kw)
    return IndexInfo(**values)


def view_info(name: str, *, marker: str | None, def_hash: str = "v", **kw: Any) -> ViewInfo:
    values: dict[str, Any] = dict(schema="public", name=name, definition="SELECT ...", def_hash=def_hash,
                                  populated=True, owner="o", comment=marker, grants=(), dependents=())
    values.update(kw)
    return ViewInfo(**values)


def in_sync(d: Desired) -> Catalog:
    """A catalog where everything `d` declares exists, is valid and carries our marker."""
    indexes = [index_info(i.spec.name, i.spec.table, marker=ddl.marker_prefix(OWNER, i.hash) + "d")
               for i in d.indexes]
    views = []
    for v in d.views:
        views.append(view_info(v.spec.name, marker=ddl.marker_prefix(OWNER, v.hash) + "v"))
        indexes.append(index_info(ddl.view_key_name(v.spec.name), v.spec.name, unique=True, table_kind="m",
                                  key_columns=tuple(v.spec.unique_key)))
    return Catalog(database="shop", user="owner", indexes=tuple(indexes), views=tuple(views),
                   relations=(("public", "ai_accounts", "r"),), database_settings=d.settings,
                   server_settings=(("max_connections", "100"), ("shared_buffers", "32MB")))


def replace_index(cat: Catalog, name: str, **changes: Any) -> Catalog:
    return dataclasses.replace(cat, indexes=tuple(dataclasses.replace(i, **changes) if i.name == name else i
                                                  for i in cat.indexes))


def kinds(p: Any) -> list[str]:
    return [s.kind for s in p.steps]


def test_empty_database_gets_everything_in_order() -> None:
    d = desired()
    p = plan(d, Catalog(database="shop", user="owner"))
    assert kinds(p) == ["create-index", "mark"] * 5 + ["create-view"] * 2 + ["set-setting"] * 2
    for step in p.steps:
        assert step.transactional == ("CONCURRENTLY" not in step.sql_text)
        assert step.lock_policy == ("index" if "CONCURRENTLY" in step.sql_text else "ddl")
    view = p.steps[10]
    assert view.check_view is not None and view.check_view.field == "spec.materializedViews[0]"
    text = view.sql_text
    assert text.index("CREATE MATERIALIZED VIEW") < text.index("CREATE UNIQUE INDEX") < text.index("COMMENT ON")
    assert p.steps[0].verify_index == ("public", "idx_ai_accounts_available_category__new")


def test_plan_is_stable_and_hashable() -> None:
    a = plan(desired(), Catalog(database="shop", user="owner"))
    b = plan(desired(), Catalog(database="shop", user="owner"))
    assert a.to_json() == b.to_json()
    assert a.hash == b.hash and len(a.hash) == 64
    assert plan(desired(indexes=REFERENCE_INDEXES[:4]), Catalog(database="shop", user="owner")).hash != a.hash


def test_in_sync_is_empty() -> None:
    d = desired()
    p = plan(d, in_sync(d))
    assert p.empty and not p.conflicts
    assert [s.state for s in report.index_statuses(d, in_sync(d))] == ["Valid"] * 5
    assert all(s.populated and s.message == "Ready" for s in report.view_statuses(d, in_sync(d)))


def test_spec_change_replaces_under_a_temporary_name() -> None:
    d = desired()
    cat = replace_index(in_sync(d), "idx_search_history_user_recent",
                        comment=ddl.marker_prefix(OWNER, "old-hash") + "d")
    p = plan(d, cat)
    assert kinds(p) == ["create-index", "swap-index", "drop-index"]
    build, swap, drop = p.steps
    assert '"idx_search_history_user_recent__new"' in build.sql_text and not build.transactional
    assert swap.transactional and swap.sql_text.count("RENAME TO") == 2 and "COMMENT ON INDEX" in swap.sql_text
    assert drop.sql_text == 'DROP INDEX CONCURRENTLY IF EXISTS "public"."idx_search_history_user_recent__old";'
    assert "resource" in build.description
    states = {s.name: s.state for s in report.index_statuses(d, cat)}
    assert states["idx_search_history_user_recent"] == "Drifted"


def test_hand_change_detected_by_live_definition_hash() -> None:
    d = desired()
    cat = replace_index(in_sync(d), "idx_popular_searches_ranking", def_hash="something-else")
    p = plan(d, cat)
    assert kinds(p) == ["create-index", "swap-index", "drop-index"]
    assert "changed by hand" in p.steps[0].description


def test_invalid_index_of_ours_is_dropped_and_rebuilt() -> None:
    d = desired()
    cat = replace_index(in_sync(d), "idx_seller_orders_seller_status", valid=False)
    p = plan(d, cat)
    assert kinds(p) == ["drop-index", "create-index", "mark"]
    assert p.steps[0].sql_text.startswith("DROP INDEX CONCURRENTLY")
    assert {s.name: s.state for s in report.index_statuses(d, cat)}["idx_seller_orders_seller_status"] == "Invalid"


def test_unmarked_invalid_is_rebuilt_but_unmarked_valid_is_a_conflict() -> None:
    d = desired()
    name = "idx_seller_orders_seller_status"
    invalid = replace_index(in_sync(d), name, comment=None, valid=False)
    assert kinds(plan(d, invalid)) == ["drop-index", "create-index", "mark"]
    foreign = replace_index(in_sync(d), name, comment="made by a DBA")
    p = plan(d, foreign)
    assert p.empty and len(p.conflicts) == 1
    assert "spec.indexes[2]" in p.conflicts[0] and "no owner marker" in p.conflicts[0]
    assert {s.name: s.state for s in report.index_statuses(d, foreign)}[name] == "Conflict"
    other_owner = replace_index(in_sync(d), name, comment=ddl.marker_prefix("other/res", "x") + "d")
    assert plan(d, other_owner).empty and "owned by other/res" in plan(d, other_owner).conflicts[0]


def test_name_taken_by_a_table_is_a_conflict() -> None:
    d = desired(indexes=[{**REFERENCE_INDEXES[0], "name": "ai_accounts"}], materializedViews=[])
    p = plan(d, in_sync(desired(indexes=[], materializedViews=[])))
    assert not any(s.kind == "create-index" for s in p.steps)
    assert "already exists as a table" in p.conflicts[0]


def test_leftover_temporaries_are_dropped_first() -> None:
    d = desired()
    cat = in_sync(d)
    cat = dataclasses.replace(cat, indexes=(*cat.indexes, index_info("idx_search_history_user_recent__old",
                                                                     marker=ddl.marker_prefix(OWNER, "x") + "d"),
                                            index_info("idx_search_history_user_recent__new", valid=False)))
    p = plan(d, cat)
    assert kinds(p) == ["drop-index", "drop-index"]
    assert all(s.object == "index/public.idx_search_history_user_recent" for s in p.steps)


def test_view_change_builds_swaps_and_copies_privileges() -> None:
    d = desired()
    cat = in_sync(d)
    grants = (Grant("reader", "SELECT", False), Grant(None, "SELECT", False))
    cat = dataclasses.replace(cat, views=tuple(
        dataclasses.replace(v, comment=ddl.marker_prefix(OWNER, "old") + "v", grants=grants)
        if v.name == "mv_hot_products" else v for v in cat.views))
    p = plan(d, cat)
    assert kinds(p) == ["create-view", "swap-view"]
    build, swap = p.steps
    assert '"mv_hot_products__new"' in build.sql_text
    assert 'GRANT SELECT ON "public"."mv_hot_products__new" TO "reader"' in build.sql_text
    assert 'GRANT SELECT ON "public"."mv_hot_products__new" TO PUBLIC' in build.sql_text
    assert build.cleanup and "DROP MATERIALIZED VIEW" in ddl.render(build.cleanup[0])
    assert swap.sql_text.splitlines() == [
        'DROP MATERIALIZED VIEW IF EXISTS "public"."mv_hot_products";',
        'ALTER MATERIALIZED VIEW "public"."mv_hot_products__new" RENAME TO "mv_hot_products";',
        'ALTER INDEX "public"."mv_hot_products__new__key" RENAME TO "mv_hot_products__key";',
    ]
    assert swap.transactional and swap.lock_policy == "ddl"


def test_view_with_dependents_is_not_swapped() -> None:
    d = desired()
    cat = in_sync(d)
    cat = dataclasses.replace(cat, views=tuple(
        dataclasses.replace(v, def_hash="hand-edited", dependents=("public.report",)) for v in cat.views))
    p = plan(d, cat)
    assert p.empty and len(p.conflicts) == 2 and "public.report depend on it" in p.conflicts[0]


def test_view_repairs_population_and_unique_index() -> None:
    d = desired()
    cat = in_sync(d)
    cat = dataclasses.replace(
        cat,
        views=tuple(dataclasses.replace(v, populated=v.name != "mv_category_counts") for v in cat.views),
        indexes=tuple(i for i in cat.indexes if i.name != "mv_hot_products__key"),
    )
    p = plan(d, cat)
    assert kinds(p) == ["create-index", "refresh-view"]
    assert 'CREATE UNIQUE INDEX CONCURRENTLY "mv_hot_products__key"' in p.steps[0].sql_text
    assert p.steps[1].sql_text == 'REFRESH MATERIALIZED VIEW "public"."mv_category_counts";'


def test_settings_set_and_reset_only_what_we_manage() -> None:
    d = desired_state(spec(), OWNER, previously_managed_settings=["jit", "work_mem"])
    cat = dataclasses.replace(in_sync(d), database_settings=(("jit", "0"), ("random_page_cost", "4"),
                                                            ("statement_timeout", "1min")))
    p = plan(d, cat)
    assert [s.sql_text for s in p.steps] == [
        """ALTER DATABASE "shop" SET "random_page_cost" = '1.1';""",
        """ALTER DATABASE "shop" SET "work_mem" = '64MB';""",
        'ALTER DATABASE "shop" RESET "jit";',
    ]  # statement_timeout was set by someone else: untouched


def _with_strays(d: Desired) -> Catalog:
    cat = in_sync(d)
    stray_ours = index_info("idx_removed_from_spec", marker=ddl.marker_prefix(OWNER, "x") + "d")
    stray_foreign = index_info("idx_dba", marker=None)
    stray_other = index_info("idx_other", marker=ddl.marker_prefix("other/res", "x") + "d")
    view_ours = view_info("mv_removed", marker=ddl.marker_prefix(OWNER, "x") + "v")
    key_of_view = index_info(ddl.view_key_name("mv_removed"), "mv_removed", table_kind="m")
    return dataclasses.replace(cat, indexes=(*cat.indexes, stray_ours, stray_foreign, stray_other, key_of_view),
                               views=(*cat.views, view_ours))


def test_undeclared_objects_dropped_only_with_drop_policy_and_only_ours() -> None:
    retain = desired()
    p = plan(retain, _with_strays(retain))
    assert p.empty and len(p.notes) == 2
    drop = desired(ddl={"deletionPolicy": "Drop"})
    p = plan(drop, _with_strays(drop))
    assert [(s.kind, s.object) for s in p.steps] == [("drop-index", "index/public.idx_removed_from_spec"),
                                                     ("drop-view", "view/public.mv_removed")]


def test_teardown_drops_only_marked_objects_and_resets_settings() -> None:
    drop = desired(ddl={"deletionPolicy": "Drop"})
    p = teardown_plan(drop, _with_strays(drop))
    dropped = [s.object for s in p.steps if s.kind.startswith("drop")]
    assert "index/public.idx_dba" not in dropped and "index/public.idx_other" not in dropped
    assert len([o for o in dropped if o.startswith("index/")]) == 6  # 5 declared + 1 stray of ours
    assert len([o for o in dropped if o.startswith("view/")]) == 3  # their unique indexes go with them
    assert [s.kind for s in p.steps if s.kind == "reset-setting"] == ["reset-setting"] * 2
    assert teardown_plan(desired(), _with_strays(desired())).empty


def test_the_state_schema_is_never_observed() -> None:
    assert "marketplacedb" in observe_params()["excluded"]
    assert "%(excluded)s" in OBSERVE.as_string(None)


def test_statuses_and_advice() -> None:
    d = desired()
    cat = Catalog(database="shop", user="o", server_settings=(("max_connections", "100"), ("shared_buffers", "32MB")))
    assert {s.state for s in report.index_statuses(d, cat)} == {"Missing"}
    failed = StepOutcome("index/public.idx_popular_searches_ranking", ok=False, message="boom")
    states = {s.name: (s.state, s.message) for s in report.index_statuses(d, cat, [failed])}
    assert states["idx_popular_searches_ranking"] == ("Failed", "boom")
    advice = report.advice(d, cat)
    assert any("max_connections is 100" in a and "not changed" in a for a in advice)
    assert any("shared_buffers is 32MB" in a for a in advice)
    assert [v.message for v in report.view_statuses(d, cat)] == ["Missing: will be created"] * 2


def test_execution_policy_from_spec() -> None:
    policy = ExecutionPolicy.from_spec(DDLPolicy(lock_timeout="2s", statement_timeout="10m"),
                                       Settings(index_lock_timeout_seconds=90, ddl_retries=5))
    assert policy == ExecutionPolicy(2.0, 600.0, 90.0, 5, 0.5)
