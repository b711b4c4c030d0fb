"""`marketplacedb refresh` as the CronJob and humans run it, against a real PostgreSQL 15."""

from __future__ import annotations

import json
from typing import Any

import pytest

from marketplacedb_operator import workload
from marketplacedb_operator.api.v1alpha1 import MaterializedViewSpec
from marketplacedb_operator.gateways.postgres.refresh import PostgresRefresh
from marketplacedb_operator.refresh import run_refresh
from test_refresh_pg import COUNTS, connect, prepare_views, run_cli, state_of, utcnow


@pytest.fixture
def views_db(workload_db: Any) -> Any:
    return prepare_views(workload_db)


def test_cli_cronjob_style_uses_the_environment(views_db: Any, monkeypatch: Any) -> None:
    server = views_db.server
    for key, value in {"PGHOST": server.host, "PGPORT": str(server.port), "PGDATABASE": views_db.name,
                       "PGUSER": views_db.owner, "PGPASSWORD": views_db.owner_password,
                       "PGSSLMODE": "disable"}.items():
        monkeypatch.setenv(key, value)
    args = ["refresh", "--view", "mv_hot_products", "--schema", "public", "--max-staleness", "1h",
            "--timeout", "5m", "--skip-if-unchanged", "-o", "json"]
    code, lines = run_cli(args)
    assert code == 0
    assert [line["outcome"] for line in lines] == ["refreshed"]
    assert set(lines[0]) >= {"view", "outcome", "reason", "seconds"}
    code, lines = run_cli(args)
    assert code == 0 and lines[0]["outcome"] == "skipped-unchanged"


def test_cli_all_views_of_a_manifest(views_db: Any, monkeypatch: Any, tmp_path: Any) -> None:
    import yaml

    server = views_db.server
    views = [{"name": n, "query": q, "uniqueKey": list(workload.VIEW_UNIQUE_KEYS[n]),
              "refresh": {"schedule": "*/5 * * * *"}} for n, q in workload.VIEW_QUERIES.items()]
    manifest = {
        "apiVersion": "marketplacedb.io/v1alpha1", "kind": "MarketplaceDB",
        "metadata": {"name": "shop", "namespace": "prod"},
        "spec": {"database": {"host": server.host, "port": server.port, "dbname": views_db.name,
                              "sslMode": "disable", "credentialsSecretRef": {"name": "shop-db"}},
                 "materializedViews": views},
    }
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(manifest))
    monkeypatch.setenv("PGUSER", views_db.owner)
    monkeypatch.setenv("PGPASSWORD", views_db.owner_password)
    code, lines = run_cli(["refresh", "-f", str(path), "--all", "-o", "json"])
    assert code == 0
    assert {(line["view"], line["outcome"]) for line in lines} == {
        ("mv_hot_products", "refreshed"), ("mv_category_counts", "refreshed")}
    monkeypatch.setenv("PGPASSWORD", "wrong")
    code, lines = run_cli(["refresh", "-f", str(path), "--view", "mv_hot_products", "-o", "json"])
    assert code == 1 and lines[0]["outcome"] == "failed" and "wrong" not in json.dumps(lines)


def test_run_refresh_from_a_spec(views_db: Any) -> None:
    spec = MaterializedViewSpec.model_validate({
        "name": "mv_category_counts", "query": workload.VIEW_QUERIES["mv_category_counts"], "uniqueKey": ["id"],
        "refresh": {"schedule": "*/5 * * * *", "maxStaleness": "10m", "timeout": "1m"},
    })
    with connect(views_db) as conn:
        outcome = run_refresh(PostgresRefresh(conn), spec, utcnow(), force=False)
    assert outcome.outcome == "refreshed" and outcome.rows == 45
    assert state_of(views_db, COUNTS).max_staleness == 600
