"""The scripts around the install: `make e2e`, `make help`, bootstrap and `demo --cluster`, on this machine.

Where a tool the script drives is missing here (docker, kind, a cluster), a stand-in records the
calls: these tests check what the scripts decide, never that a cluster did something.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
from typing import Any

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
