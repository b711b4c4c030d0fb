"""The operator under benchmark: the real `marketplacedb run`, with a stopwatch around reconcile().

    KUBECONFIG=... MARKETPLACEDB_RESYNC_SECONDS=... python -m bench.operator_proc LOG -- run -n bench ...

Everything after `--` goes to the `marketplacedb` CLI unchanged; the only addition is a wrapper
around `handlers.reconcile` that appends one JSON line per reconcile (resource, start time,
seconds) to LOG. The wrapper is instrumentation, not a stand-in: the original runs every time.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from marketplacedb_operator import cli, handlers


def instrument(log_path: str) -> None:
    original: Callable[..., Any] = getattr(handlers, "reconcile")  # noqa: B009  (handlers' own import)
    lock = threading.Lock()
    sink = open(log_path, "a", buffering=1)

    def timed(body: dict[str, Any], deps: Any) -> Any:
        started_wall, started = time.time(), time.perf_counter()
        try:
            return original(body, deps)
        finally:
            meta = body.get("metadata", {})
            line = json.dumps({"name": f"{meta.get('namespace')}/{meta.get('name')}", "start": started_wall,
                               "seconds": time.perf_counter() - started, "generation": meta.get("generation")})
            with lock:
                sink.write(line + "\n")

    setattr(handlers, "reconcile", timed)  # noqa: B010  handlers._run calls it through the module global


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m bench.operator_proc LOG -- <marketplacedb args>", file=sys.stderr)
        return 2
    instrument(argv[0])
    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
