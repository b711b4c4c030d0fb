"""`marketplacedb run`: the operator process (kopf, liveness endpoint, Prometheus metrics)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from .. import handlers, metrics, metrics_exposition
from ..settings import Settings
from .wiring import make_deps


def register(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="run the operator (watches MarketplaceDB resources)",
        description="Run the operator: reconcile MarketplaceDB resources until stopped. Settings come from "
        "MARKETPLACEDB_* environment variables (see the README).",
    )
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    run.add_argument("--peering", metavar="NAME", help="kopf peering name, for more than one operator replica")
    run.add_argument("--liveness-port", type=int, default=8080, help="port of the /healthz endpoint (default 8080)")
    run.add_argument("--metrics-port", type=int, default=9090, help="port of the /metrics endpoint (default 9090)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(handler=_run)


def _api_client() -> k8s.ApiClient:
    """In-cluster credentials when running in a pod, else the current kubeconfig context."""
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


class JsonFormatter(logging.Formatter):
    """One JSON object per line (structured logs for Loki/Elasticsearch)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("namespace", "name"):  # kopf's object context, when present
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as exc:  # names the variable: a bad chart value, not a crash loop of tracebacks
        print(f"marketplacedb run: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    namespaces = args.namespace or list(settings.namespaces)
    deps = make_deps(settings, _api_client())
    metrics_exposition.serve(args.metrics_port, metrics.REGISTRY)  # not start_http_server: memory (its docstring)
    handlers.run_operator(
        deps,
        namespaces=namespaces,
        peering=args.peering,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz",
    )
    return 0
