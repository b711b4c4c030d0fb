"""The test harness's server starters (tests/harness/), reused rather than copied.

tests/ is not a package on the import path of `python -m bench.run`, so it is added here, once,
before the harness modules are imported. Nothing is moved: the tests and the bench start the
very same PostgreSQL and pgbouncer processes.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from harness.pgbouncer import PgBouncerProcess, pgbouncer_binary  # noqa: E402
from harness.postgres import (  # noqa: E402
    PostgresServer,
    as_service_user,
    free_port,
    pg_bindir,
    running_as_root,
)


def harness_module(name: str) -> Any:
    """tests/harness/<name>.py, imported on demand (harness.kube pulls in kopf and kmock)."""
    return importlib.import_module(f"harness.{name}")


__all__ = [
    "ROOT", "TESTS", "PgBouncerProcess", "PostgresServer", "as_service_user", "free_port", "harness_module",
    "pg_bindir", "pgbouncer_binary", "running_as_root",
]
