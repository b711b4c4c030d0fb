"""The scripts around the install: `make e2e`, `make help`, bootstrap and `demo --cluster`, on this machine.

Where a tool the script drives is missing here (docker, kind, a cluster), a stand-in records the
calls: these tests check what the scripts decide, never that a cluster did something.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest

from marketplacedb_operator.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _stub(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def test_make_e2e_says_not_run_before_any_bootstrap(tmp_path: pathlib.Path) -> None:
    """Without a container engine: one NOT RUN line, exit 0, and no virtualenv or apt step first."""
    venv = tmp_path / "venv-that-must-not-appear"
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    if pathlib.Path("/usr/bin/docker").exists():  # a docker whose engine does not answer, as here
        _stub(tmp_path, "docker", "exit 1")
        env["PATH"] = f"{tmp_path}:{env['PATH']}"
    result = subprocess.run(["make", "-s", "e2e", f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [result.stdout.strip()]
    assert result.stdout.startswith("e2e: NOT RUN: "), result.stdout
    assert not venv.exists() and "bootstrap" not in result.stdout + result.stderr


def test_make_help_lists_every_documented_target() -> None:
    listed = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    targets = {line.split("\t", 1)[0] for line in listed.splitlines()}
    assert {"demo", "test", "lint", "generate", "bench", "bench-quick", "e2e", "image", "image-push",
            "install", "soak"} <= targets


def test_bootstrap_installs_python3_venv_when_the_venv_module_is_missing(tmp_path: pathlib.Path) -> None:
    """A fresh Debian has python3 without ensurepip: bootstrap must ask apt for python3-venv."""
    _stub(tmp_path, "python3", "exit 1")  # `import ensurepip, venv` fails, as on a fresh Debian
    _stub(tmp_path, "id", "echo 1000")  # not root: bootstrap lists what it needs and stops
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    result = subprocess.run(["bash", "scripts/bootstrap.sh", str(tmp_path / "venv")], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "python3-venv" in result.stderr.split("missing", 1)[1], result.stderr


def test_demo_cluster_never_applies_the_placeholder_secret(tmp_path: pathlib.Path, monkeypatch: Any,
                                                           capsys: Any) -> None:
    calls = tmp_path / "calls"
    # A kubectl whose cluster has no Secret (and no namespace) yet: every call is recorded.
    _stub(tmp_path, "kubectl", f'echo "$*" >> {calls}\ncase "$*" in *"get secret"*) exit 1;; esac\nexit 0')
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert main(["demo", "--cluster"]) == 2
    out = capsys.readouterr().out
    assert "kubectl create namespace prod" in out and "create secret generic shop-db-owner" in out
    recorded = calls.read_text()
    assert "apply" not in recorded and "secret.yaml" not in recorded
    # With the Secret in place: the CRD and the example are applied, the placeholder never.
    _stub(tmp_path, "kubectl", f'echo "$*" >> {calls}\nexit 0')
    calls.write_text("")
    assert main(["demo", "--cluster"]) == 0
    applied = [line for line in calls.read_text().splitlines() if line.startswith("apply")]
    assert len(applied) == 2 and not any("secret.yaml" in line for line in applied)


def test_license_file_is_the_apache_2_text_the_metadata_declares() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) == 202
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in (ROOT / "Dockerfile").read_text()


# ---------------------------------------------------------------- scripts/e2e.sh's decisions, on a stand-in cluster


class FakeCluster:
    """docker/kind/helm/kubectl replaced by tests/e2e/fake_cluster.sh, PostgreSQL real (see there)."""

    def __init__(self, tmp_path: pathlib.Path, dsn: str) -> None:
        self.bin, self.state, self.log = tmp_path / "bin", tmp_path / "state", tmp_path / "calls.log"
        self.bin.mkdir()
        self.state.mkdir()
        for tool in ("docker", "kind", "helm", "kubectl"):
            (self.bin / tool).symlink_to(ROOT / "tests" / "e2e" / "fake_cluster.sh")
        self.env = {**os.environ, "PATH": f"{self.bin}:/usr/bin:/bin", "FAKE_LOG": str(self.log),
                    "FAKE_STATE": str(self.state), "FAKE_DSN": dsn,
                    "FAKE_MARKETPLACEDB": str(pathlib.Path(sys.executable).parent / "marketplacedb")}

    def run(self, **env: str) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        return subprocess.run(["bash", "scripts/e2e.sh"], cwd=ROOT, env={**self.env, **env}, capture_output=True,
                              text=True, check=False, timeout=240)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def fake_cluster(tmp_path: pathlib.Path, fresh_db: Any) -> FakeCluster:
    return FakeCluster(tmp_path, fresh_db.superuser_dsn)


def test_e2e_passes_on_a_real_refresh_and_removes_the_cluster_it_created(fake_cluster: FakeCluster) -> None:
    result = fake_cluster.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "e2e: PASSED (Ready; refresh refreshed" in result.stdout
    calls = fake_cluster.calls()
    assert any(c.startswith("kind create cluster") for c in calls)
    assert any(c.startswith("kind delete cluster") for c in calls)


def test_e2e_reruns_on_a_reused_cluster_and_leaves_what_it_did_not_create(fake_cluster: FakeCluster) -> None:
    assert fake_cluster.run(KEEP_CLUSTER="1").returncode == 0
    assert not any(c.startswith("kind delete") for c in fake_cluster.calls()), "KEEP_CLUSTER=1 keeps it"
    again = fake_cluster.run(FAKE_CLUSTERS="marketplacedb-e2e", FAKE_NS_EXISTS="1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reference schema already loaded (rerun): kept" in again.stdout
    calls = fake_cluster.calls()
    assert not any(c.startswith(("kind create", "kind delete")) for c in calls)
    assert not any("delete namespace" in c for c in calls)
    assert any(re.search(r"delete job e2e-refresh-\d+", c) for c in calls), "its own Job is removed"


@pytest.mark.parametrize(("job", "says"), [
    ("busy", "outcome skipped-busy, not a refresh"),
    ("lying", "products after the refresh, expected"),
])
def test_e2e_fails_when_the_refresh_did_not_refresh(fake_cluster: FakeCluster, job: str, says: str) -> None:
    result = fake_cluster.run(FAKE_JOB=job)
    assert result.returncode == 1, result.stdout + result.stderr
    assert says in result.stderr and "PASSED" not in result.stdout
