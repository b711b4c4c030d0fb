"""plan(desired, observed) on synthetic catalogs: pure, no server."""

from __future__ import annotations

import dataclasses
from typing import Any

from marketplacedb_operator.api.v1alpha1 import DDLPolicy, MarketplaceDBSpec
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.sql import ddl, ownership, report
from marketplacedb_operator.sql.catalog import (
    Catalog,
    Grant,
    IndexInfo,
    Record,
    ViewInfo,
    observe_params,
    observe_query,
)
from marketplacedb_operator.sql.plan import Desired, ExecutionPolicy, StepOutcome, desired_state, plan, teardown_plan
from schema_fixtures import REFERENCE_INDEXES, reference_spec

OWNER = "prod/shop"

def spec(**overrides: Any) -> MarketplaceDBSpec:
    database = {"host": "db", "dbname": "shop", "credentialsSecretRef": {"name": "owner"},
                "settings": {"work_mem": "64MB", "random_page_cost": "1.1"}}
    return MarketplaceDBSpec.model_validate(reference_spec(database, **overrides))


def desired(**overrides: Any) -> Desired:
    return desired_state(spec(**overrides), OWNER)


_OIDS = iter(range(20000, 10**6))


def ours(spec_hash: str = "x", def_hash: str = "d", owner: str = OWNER, how: str = "created") -> Record:
    """The ownership record that binds an object's OID to `owner`."""
    return Record(owner, how, spec_hash, def_hash)


def index_info(name: str, table: str = "t", *, marker: str | None = None, valid: bool = True,
               def_hash: str = "d", record: Record | None = None, **kw: Any) -> IndexInfo:
    values: dict[str, Any] = dict(schema="public", name=name, table_schema="public", table=table, table_kind="r",
                                  definition=f"CREATE INDEX {name} ...", def_hash=def_hash, valid=valid, ready=True,
                                  unique=False, primary=False, partial=False, expressions=False, comment=marker,
                                  key_columns=(), oid=next(_OIDS), record=record)
    values.update(kw)
    return IndexInfo(**values)


def view_info(name: str, *, marker: str | None, def_hash: str = "v", record: Record | None = None,
              **kw: Any) -> ViewInfo:
    values: dict[str, Any] = dict(schema="public", name=name, definition="SELECT ...", def_hash=def_hash,
                                  populated=True, owner="owner", comment=marker, grants=(), dependents=(),
                                  oid=next(_OIDS), record=record)
    values.update(kw)
    return ViewInfo(**values)


def in_sync(d: Desired) -> Catalog:
    """A catalog where everything `d` declares exists, is valid and is recorded as ours."""
    indexes = [index_info(i.spec.name, i.spec.table, marker=ddl.marker_prefix(OWNER, i.hash) + "d",
                          record=ours(i.hash)) for i in d.indexes]
    views = []
    for v in d.views:
        views.append(view_info(v.spec.name, marker=ddl.marker_prefix(OWNER, v.hash) + "v",
                               record=ours(v.hash, "v")))
        indexes.append(index_info(ddl.view_key_name(v.spec.name), v.spec.name, unique=True, table_kind="m",
                                  key_columns=tuple(v.spec.unique_key), record=ours("")))
    return Catalog(database="shop", user="owner", indexes=tuple(indexes), views=tuple(views), records=True,
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
    assert kinds(p) == ["intent", "create-index", "mark"] * 5 + ["create-view"] * 2 + ["set-setting"] * 2
    for step in p.steps:
        assert step.transactional == ("CONCURRENTLY" not in step.sql_text)
        assert step.lock_policy == ("index" if "CONCURRENTLY" in step.sql_text else "ddl")
    view = p.steps[15]
    assert view.check_view is not None and view.check_view.field == "spec.materializedViews[0]"
    text = view.sql_text
    assert text.index("CREATE MATERIALIZED VIEW") < text.index("CREATE UNIQUE INDEX") < text.index("COMMENT ON")
    assert p.steps[1].verify_index == ("public", "idx_ai_accounts_available_category__new")
    assert p.steps[1].build_table == ("public", "ai_accounts")
    assert "owned_objects" in p.steps[0].sql_text and "'building'" in p.steps[0].sql_text  # the intent
    assert "owned_objects" in p.steps[2].sql_text and "'created'" in p.steps[2].sql_text  # the record
    assert "owned_objects" in text and "COMMENT ON" in text


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
    cat = replace_index(in_sync(d), "idx_search_history_user_recent", record=ours("old-hash"))
    p = plan(d, cat)
    assert kinds(p) == ["intent", "create-index", "swap-index", "drop-index"]
    _, build, swap, drop = p.steps
    assert '"idx_search_history_user_recent__new"' in build.sql_text and not build.transactional
    assert swap.transactional and swap.sql_text.count("RENAME TO") == 2 and "COMMENT ON INDEX" in swap.sql_text
    assert drop.statements[0] == ownership.assert_oid("public", "idx_search_history_user_recent__old",
                                                      cat.index("public", "idx_search_history_user_recent").oid)
    assert ddl.render(drop.statements[1]) == \
        'DROP INDEX CONCURRENTLY IF EXISTS "public"."idx_search_history_user_recent__old"'
    assert "resource" in build.description
    states = {s.name: s.state for s in report.index_statuses(d, cat)}
    assert states["idx_search_history_user_recent"] == "Drifted"


def test_hand_change_detected_by_live_definition_hash() -> None:
    d = desired()
    cat = replace_index(in_sync(d), "idx_popular_searches_ranking", def_hash="something-else")
    p = plan(d, cat)
    assert kinds(p) == ["intent", "create-index", "swap-index", "drop-index"]
    assert "changed by hand" in p.steps[1].description


def test_invalid_index_of_ours_is_dropped_and_rebuilt() -> None:
    d = desired()
    cat = replace_index(in_sync(d), "idx_seller_orders_seller_status", valid=False)
    p = plan(d, cat)
    assert kinds(p) == ["drop-index", "intent", "create-index", "mark"]
    assert "DROP INDEX CONCURRENTLY" in p.steps[0].sql_text
    assert {s.name: s.state for s in report.index_statuses(d, cat)}["idx_seller_orders_seller_status"] == "Invalid"


def test_unrecorded_objects_are_never_ours_whatever_their_comment_or_state() -> None:
    d = desired()
    name = "idx_seller_orders_seller_status"
    # Someone's INVALID index (their cancelled build) under a declared name: left alone.
    invalid = replace_index(in_sync(d), name, record=None, comment=None, valid=False)
    p = plan(d, invalid)
    assert p.empty and "INVALID" in p.conflicts[0] and "spec.indexes[2].adopt: Replace" in p.conflicts[0]
    # Someone's CREATE INDEX CONCURRENTLY still running (not ready yet): left alone.
    building = replace_index(in_sync(d), name, record=None, valid=False, ready=False, building_pid=4242)
    assert plan(d, building).empty and "being built by another session (pid 4242)" in plan(d, building).conflicts[0]
    # A forged or copied marker comment: proves nothing.
    forged = replace_index(in_sync(d), name, record=None, comment=ddl.marker_prefix(OWNER, "x") + "d")
    p = plan(d, forged)
    assert p.empty and "copied or forged" in p.conflicts[0]
    assert {s.name: s.state for s in report.index_statuses(d, forged)}[name] == "Conflict"
    other_owner = replace_index(in_sync(d), name, record=ours(owner="other/res"))
    assert plan(d, other_owner).empty and "owned by other/res" in plan(d, other_owner).conflicts[0]
    # Even with adopt: Replace, another resource's index or a running build is never replaced.
    indexes = [{**i, "adopt": "Replace"} for i in REFERENCE_INDEXES]
    replace = desired(indexes=indexes)
    assert plan(replace, other_owner).empty and plan(replace, building).empty


def test_identical_unrecorded_object_is_adopted_without_ddl() -> None:
    d = desired()
    name = "idx_seller_orders_seller_status"
    cat = replace_index(in_sync(d), name, record=None, comment="made by the migration", signature="USING btree (x)")
    cat = dataclasses.replace(cat, expected=((("public", name), "USING btree (x)"),))
    p = plan(d, cat)
    assert kinds(p) == ["adopt"] and not p.conflicts
    assert "COMMENT" not in p.steps[0].sql_text and "'adopted'" in p.steps[0].sql_text
    assert {s.name: s.state for s in report.index_statuses(d, cat)}[name] == "Pending"
    adopted = replace_index(in_sync(d), name, record=ours(d.indexes[2].hash, how="adopted"))
    assert plan(d, adopted).empty
    assert {s.name: s.state for s in report.index_statuses(d, adopted)}[name] == "Adopted"
    # The index of a unique constraint, even identical: never adopted (nor replaced).
    constraint = dataclasses.replace(cat, indexes=tuple(dataclasses.replace(i, constraint="t_x_key")
                                                        if i.name == name else i for i in cat.indexes))
    assert plan(d, constraint).empty and "implements constraint t_x_key" in plan(d, constraint).conflicts[0]
    # Same definition on another table, or a different definition: not adopted.
    elsewhere = dataclasses.replace(cat, indexes=tuple(dataclasses.replace(i, table="other") if i.name == name else i
                                                       for i in cat.indexes))
    assert plan(d, elsewhere).empty and "definition differs" in plan(d, elsewhere).conflicts[0]


def test_foreign_key_dependent_unique_index_is_never_replaced_nor_dropped() -> None:
    d = desired()
    name = "idx_popular_searches_ranking"
    fk = ("orders_search_fkey on public.orders",)
    cat = replace_index(in_sync(d), name, record=ours("old-hash"), unique=True, foreign_keys=fk)
    p = plan(d, cat)
    assert p.empty and "orders_search_fkey" in p.conflicts[0] and "drop and re-create" in p.conflicts[0]
    drop = desired(ddl={"deletionPolicy": "Drop"})
    cat = replace_index(in_sync(drop), name, foreign_keys=fk)
    teardown = teardown_plan(drop, cat)
    assert f"index/public.{name}" not in [s.object for s in teardown.steps]
    assert any("left in place" in n and "orders_search_fkey" in n for n in teardown.notes)


def test_name_taken_by_a_table_is_a_conflict() -> None:
    d = desired(indexes=[{**REFERENCE_INDEXES[0], "name": "ai_accounts"}], materializedViews=[])
    p = plan(d, in_sync(desired(indexes=[], materializedViews=[])))
    assert not any(s.kind == "create-index" for s in p.steps)
    assert "already exists as a table" in p.conflicts[0]


def test_leftover_temporaries_are_dropped_only_when_recorded_as_ours() -> None:
    d = desired()
    cat = in_sync(d)
    ours_old = index_info("idx_search_history_user_recent__old", record=ours())
    ours_new = index_info("idx_search_history_user_recent__new", valid=False, record=ours(how="building"))
    p = plan(d, dataclasses.replace(cat, indexes=(*cat.indexes, ours_old, ours_new)))
    assert kinds(p) == ["drop-index", "drop-index"]
    assert all(s.object == "index/public.idx_search_history_user_recent" for s in p.steps)
    # Look-alike names that are not recorded (a DBA's `__old` with a "do not drop" comment, an
    # unmarked `__new`, an INVALID `__new`, a copied marker): left alone and reported.
    strays = (index_info("idx_search_history_user_recent__old", comment="do not drop"),
              index_info("idx_search_history_user_recent__new", valid=False),
              index_info("idx_popular_searches_ranking__old", marker=ddl.marker_prefix(OWNER, "x") + "d"))
    p = plan(d, dataclasses.replace(cat, indexes=(*cat.indexes, *strays)))
    assert p.empty
    assert sorted(n.split(" (")[0] for n in p.notes) == [
        "left alone: index public.idx_popular_searches_ranking__old",
        "left alone: index public.idx_search_history_user_recent__new",
        "left alone: index public.idx_search_history_user_recent__old"]
    drop = desired(ddl={"deletionPolicy": "Drop"})
    cat = in_sync(drop)
    assert not [s for s in teardown_plan(drop, dataclasses.replace(cat, indexes=(*cat.indexes, *strays))).steps
                if "__" in s.object and "__key" not in s.object]


def test_view_change_builds_swaps_and_copies_privileges() -> None:
    d = desired()
    cat = in_sync(d)
    grants = (Grant("reader", "SELECT", False), Grant(None, "SELECT", False))
    cat = dataclasses.replace(cat, views=tuple(
        dataclasses.replace(v, record=ours("old", "v"), grants=grants,
                            column_grants=(Grant("auditor", "SELECT", False, "price"),),
                            reloptions=("autovacuum_enabled=false",), comment="hot products, owned by the web team",
                            column_comments=(("price", "in cents"),), owner="web_owner")
        if v.name == "mv_hot_products" else v for v in cat.views),
        indexes=(*cat.indexes, index_info("mv_hot_products_by_price", "mv_hot_products", table_kind="m",
                                          signature="USING btree (price)")))
    p = plan(d, cat)
    assert kinds(p) == ["create-view", "swap-view"]
    build, swap = p.steps
    assert '"mv_hot_products__new"' in build.sql_text
    assert 'GRANT SELECT ON "public"."mv_hot_products__new" TO "reader"' in build.sql_text
    assert 'GRANT SELECT ON "public"."mv_hot_products__new" TO PUBLIC' in build.sql_text
    assert build.cleanup and "DROP MATERIALIZED VIEW" in ddl.render(build.cleanup[0])
    assert 'GRANT SELECT ("price") ON "public"."mv_hot_products__new" TO "auditor"' in build.sql_text
    assert 'SET (autovacuum_enabled = \'false\')' in build.sql_text
    assert "IS 'hot products, owned by the web team'" in build.sql_text and "IS 'in cents'" in build.sql_text
    assert 'OWNER TO "web_owner"' in build.sql_text
    assert 'CREATE INDEX "mv_hot_products_by_price__new" ON "public"."mv_hot_products__new" USING btree (price)' \
        in build.sql_text
    lines = swap.sql_text.splitlines()
    assert lines[0].startswith("DO ") and "not the one planned" in lines[0]  # the OID is checked first
    assert lines[1:5] == [
        'DROP MATERIALIZED VIEW IF EXISTS "public"."mv_hot_products";',
        'ALTER MATERIALIZED VIEW "public"."mv_hot_products__new" RENAME TO "mv_hot_products";',
        'ALTER INDEX "public"."mv_hot_products__new__key" RENAME TO "mv_hot_products__key";',
        'ALTER INDEX "public"."mv_hot_products_by_price__new" RENAME TO "mv_hot_products_by_price";',
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
    assert kinds(p) == ["intent", "create-index", "mark", "refresh-view"]
    assert 'CREATE UNIQUE INDEX CONCURRENTLY "mv_hot_products__key"' in p.steps[1].sql_text
    assert p.steps[3].sql_text == 'REFRESH MATERIALIZED VIEW "public"."mv_category_counts";'


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
    stray_ours = index_info("idx_removed_from_spec", record=ours())
    stray_foreign = index_info("idx_dba", marker=None)
    stray_copied = index_info("orders_archive_status_idx", marker=ddl.marker_prefix(OWNER, "x") + "d")
    stray_other = index_info("idx_other", record=ours(owner="other/res"))
    view_ours = view_info("mv_removed", marker=None, record=ours())
    key_of_view = index_info(ddl.view_key_name("mv_removed"), "mv_removed", table_kind="m", record=ours())
    return dataclasses.replace(cat, indexes=(*cat.indexes, stray_ours, stray_foreign, stray_copied, stray_other,
                                             key_of_view),
                               views=(*cat.views, view_ours),
                               marked=(("public", "orders_archive_status_idx", "i"),))


def test_undeclared_objects_dropped_only_with_drop_policy_and_only_ours() -> None:
    retain = desired()
    p = plan(retain, _with_strays(retain))
    assert p.empty and len(p.notes) == 3
    assert "left alone: index public.orders_archive_status_idx carries this resource's marker" in p.notes[2]
    drop = desired(ddl={"deletionPolicy": "Drop"})
    p = plan(drop, _with_strays(drop))
    assert [(s.kind, s.object) for s in p.steps] == [("drop-index", "index/public.idx_removed_from_spec"),
                                                     ("drop-view", "view/public.mv_removed")]


def test_teardown_drops_only_marked_objects_and_resets_settings() -> None:
    drop = desired(ddl={"deletionPolicy": "Drop"})
    p = teardown_plan(drop, _with_strays(drop))
    dropped = [s.object for s in p.steps if s.kind.startswith("drop")]
    assert "index/public.idx_dba" not in dropped and "index/public.idx_other" not in dropped
    assert "index/public.orders_archive_status_idx" not in dropped
    assert p.steps[-1].kind == "forget" and "owned_objects" in p.steps[-1].sql_text
    assert len([o for o in dropped if o.startswith("index/")]) == 6  # 5 declared + 1 stray of ours
    assert len([o for o in dropped if o.startswith("view/")]) == 3  # their unique indexes go with them
    assert [s.kind for s in p.steps if s.kind == "reset-setting"] == ["reset-setting"] * 2
    assert teardown_plan(desired(), _with_strays(desired())).empty


def test_the_state_schema_is_never_observed() -> None:
    params = observe_params(OWNER, [("public", "idx_a")])
    assert "marketplacedb" in params["excluded"] and (params["schemas"], params["names"]) == (["public"], ["idx_a"])
    assert "%(excluded)s" in observe_query(True).as_string(None)
    assert "owned_objects" in observe_query(True).as_string(None)
    assert "owned_objects" not in observe_query(False).as_string(None)


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


def test_views_carrying_someone_elses_index_are_not_dropped_and_stale_intents_adopt_nothing() -> None:
    drop = desired(ddl={"deletionPolicy": "Drop"})
    cat = in_sync(drop)
    dba = index_info("dba_hot_by_name", "mv_hot_products", table_kind="m")
    late = index_info("idx_gone__new", "t", record=ours(how="building"))  # valid, bound by a stale intent
    cat = dataclasses.replace(cat, indexes=(*cat.indexes, dba, late))
    p = teardown_plan(drop, cat)
    dropped = [s.object for s in p.steps if s.kind.startswith("drop")]
    assert "view/public.mv_hot_products" not in dropped and "view/public.mv_category_counts" in dropped
    assert any("mv_hot_products" in n and "index dba_hot_by_name (not this resource's)" in n for n in p.notes)
    assert "index/public.idx_gone__new" not in dropped
    invalid = dataclasses.replace(cat, indexes=tuple(dataclasses.replace(i, valid=False) if i.name == "idx_gone__new"
                                                     else i for i in cat.indexes))
    assert "index/public.idx_gone__new" in [s.object for s in teardown_plan(drop, invalid).steps]
