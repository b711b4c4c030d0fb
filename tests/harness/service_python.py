"""Run the project's Python code as the service OS user, from a copy that user can read.

Why: as root, servers run as `postgres` (harness.postgres), and so must any process that talks to
them as their OS user (the pooler agent uses pgbouncer's admin socket, which admits only the same
uid without a password). The checkout and its virtualenv may sit where that user cannot read: CI
clones into `mktemp -d` (mode 0700, root only), and the venv's interpreter may live under /root.
A PYTHONPATH into the checkout then silently imports nothing ("No module named ...").

So, when running as root, the package and the installed distributions it requires are copied once
per test session into a world-readable temp dir (hard links when the filesystem allows, else
copies) and run by the system python3 (the venv's interpreter is unreadable for that user). The
copy holds code only, no secret. When not root, nothing is copied: the current interpreter and
paths are used as they are.
"""

from __future__ import annotations

import atexit
import importlib.metadata as metadata
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

from .postgres import running_as_root

__all__ = ["SYSTEM_PYTHON", "readable_site", "service_python_command"]

PROJECT = "marketplacedb-operator"
PACKAGE = "marketplacedb_operator"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's 3.11: same ABI as the venv's compiled wheels
_REPO = Path(__file__).resolve().parents[2]
_site: Path | None = None


def _link_or_copy(src: str, dst: str) -> str:
    # A hard link needs no read access to the source's directories, only to the new path's.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _required_distributions(root: str) -> list[metadata.Distribution]:
    """`root` and every distribution it requires (with the extras asked for), as installed here."""
    seen: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency not installed here: the code cannot need it
        key = f"{dist.metadata['Name'].lower().replace('_', '-')}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return list({id(d): d for d in seen.values()}.values())


def _copy_distribution(dist: metadata.Distribution, site: Path) -> None:
    base = Path(str(dist.locate_file("")))
    for rel in dist.files or []:
        src = base / rel
        if rel.parts[0] == ".." or not src.is_file() or rel.suffix == ".pyc":
            continue  # scripts outside site-packages, and caches the copy regenerates if it can
        dst = site / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            _link_or_copy(str(src), str(dst))


def readable_site() -> Path:
    """A world-readable dir holding the package and its installed dependencies (built once)."""
    global _site
    if _site is None:
        site = Path(tempfile.mkdtemp(prefix="mdb-site-"))
        atexit.register(shutil.rmtree, site, ignore_errors=True)
        for dist in _required_distributions(PROJECT):
            if dist.metadata["Name"].lower().replace("_", "-") != PROJECT:
                _copy_distribution(dist, site)
        # The project itself from the checkout's sources (an editable install lists no files).
        shutil.copytree(_REPO / "operator" / PACKAGE, site / PACKAGE, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in [site, *site.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
            elif not path.stat().st_mode & 0o004:
                # Unreadable for others: copy (a chmod would change the linked original too).
                data = path.read_bytes()
                path.unlink()
                path.write_bytes(data)
                path.chmod(0o644)
        _site = site
    return _site


def service_python_command(module: str) -> tuple[list[str], dict[str, str]]:
    """argv and env to run `python -m module` as the service user (see the module docstring)."""
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if running_as_root():
        env["PYTHONPATH"] = str(readable_site())
        return [SYSTEM_PYTHON, "-m", module], env
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO / "operator"), sysconfig.get_paths()["purelib"]])
    return [sys.executable, "-m", module], env
