"""`marketplacedb render`: every object for a resource, offline, with no real secret."""

from __future__ import annotations

import argparse
import base64
import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from marketplacedb_operator.cli import render as render_cli
from marketplacedb_operator.specs import pgbouncer as pgb

MANIFEST = """\
apiVersion: marketplacedb.io/v1alpha1
kind: MarketplaceDB
metadata: {name: shop, namespace: prod}
spec:
  database:
    host: postgres.prod.svc
    dbname: marketplace
    credentialsSecretRef: {name: shop-db-owner}
  materializedViews:
    - name: mv_hot
      query: "SELECT 1 AS id"
      uniqueKey: [id]
      refresh: {schedule: "*/5 * * * *"}
  pooler:
    enabled: true
    replicas: 2
    parameters: {server_idle_timeout: "600"}
    metrics: {enabled: true, serviceMonitor: true}
"""


def main(argv: list[str]) -> int:
    """The `render` subcommand alone (the full CLI imports every other command's module too)."""
    parser = argparse.ArgumentParser(prog="marketplacedb")
    render_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def render(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str,
           text: str = MANIFEST) -> tuple[int, str, str]:
    path = tmp_path / "shop.yaml"
    path.write_text(text)
    code = main(["render", "-f", str(path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_render_prints_every_object_as_valid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = render(tmp_path, capsys)
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "CronJob", "Deployment", "PodDisruptionBudget", "Secret", "Service", "ServiceMonitor"]
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(copy.deepcopy(doc), "1.30.0", strict=True)
    ini = next(d for d in docs if d["kind"] == "ConfigMap")["data"][pgb.INI_KEY]
    section = pgb.parse_ini(ini)["pgbouncer"]
    # max_connections assumed 100: (100 - 3 reserved - 10 headroom) // (2 replicas + 1) = 29.
    assert section["max_db_connections"] == "29"
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert "filled in by the operator" in base64.b64decode(secret["data"][pgb.AUTH_KEY]).decode()
    assert "&id" not in out  # no YAML anchors: readable by every tool


def test_render_sizes_from_max_connections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = render(tmp_path, capsys, "--max-connections", "400")
    ini = next(d for d in yaml.safe_load_all(out) if d["kind"] == "ConfigMap")["data"][pgb.INI_KEY]
    assert pgb.parse_ini(ini)["pgbouncer"]["max_db_connections"] == str((400 - 3 - 40) // 3)


def test_render_credentials_only_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = pgb.scram_verifier("pw", b"0123456789abcdef")
    monkeypatch.setenv("SHOP_VERIFIER", verifier)
    code, out, _ = render(tmp_path, capsys, "--username", "owner", "--secret-env", "SHOP_VERIFIER")
    assert code == 0
    secret = next(d for d in yaml.safe_load_all(out) if d["kind"] == "Secret")
    assert base64.b64decode(secret["data"][pgb.AUTH_KEY]).decode() == f'"owner" "{verifier}"\n'
    code, _, err = render(tmp_path, capsys, "--secret-env", "UNSET_VARIABLE_FOR_TEST")
    assert code == 1 and "--username" in err


def test_render_names_the_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = render(tmp_path, capsys, text=MANIFEST.replace('server_idle_timeout: "600"', "pool_mode: session"))
    assert code == 1 and out == ""
    assert "spec.pooler.parameters" in err and "pool_mode" in err
