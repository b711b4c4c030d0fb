"""`render`: every Kubernetes object the operator would create for a resource, as YAML, offline.

What needs the database is assumed (max_connections 100 unless --max-connections); the pooler's
auth Secret holds a placeholder unless credentials are given through environment variables (never
on the command line, where any process could read them).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

from ..api.v1alpha1 import MarketplaceDB
from ..settings import Settings
from ..specs.cronjobs import build_cronjobs
from ..specs.pgbouncer import PoolerConfigError, PoolerCredentials
from ..specs.pooler_manifests import build_pooler
from ..specs.pooler_sizing import compute_budget
from .manifest import ManifestError, load_resources

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


class _Dumper(yaml.SafeDumper):
    """No anchors/aliases (shared label dicts), multi-line strings as literal blocks (the ini)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def register(commands: Any) -> None:
    render = commands.add_parser(
        "render", help="print every object the operator would create (pooler, refresh CronJobs) as YAML"
    )
    render.add_argument("-f", "--filename", required=True, help="MarketplaceDB manifest file")
    render.add_argument("--max-connections", type=int, default=100,
                        help="the server's max_connections to size the pooler from (default 100)")
    render.add_argument("--superuser-reserved-connections", type=int, default=3,
                        help="the server's superuser_reserved_connections (default 3)")
    render.add_argument("--username", help="database user for the pooler's auth file")
    render.add_argument("--secret-env", metavar="VAR",
                        help="environment variable holding that user's SCRAM verifier (or password)")
    render.set_defaults(handler=_render)


def resource_dict(resource: MarketplaceDB) -> dict[str, Any]:
    """The object the builders take: metadata with a namespace and a (placeholder) uid."""
    meta = dict(resource.metadata)
    meta.setdefault("namespace", "default")
    meta.setdefault("uid", PLACEHOLDER_UID)
    return {"apiVersion": resource.api_version, "kind": resource.kind, "metadata": meta}


def _credentials(args: argparse.Namespace) -> PoolerCredentials | None:
    if args.secret_env is None:
        return None
    secret = os.environ.get(args.secret_env)
    if not secret or not args.username:
        raise ManifestError(f"--secret-env {args.secret_env} needs --username and a non-empty variable")
    return PoolerCredentials(args.username, secret)


def render_objects(resource: MarketplaceDB, settings: Settings, max_connections: int,
                   superuser_reserved: int, credentials: PoolerCredentials | None) -> list[dict[str, Any]]:
    obj = resource_dict(resource)
    budget = compute_budget(resource.spec.pooler, settings, max_connections, superuser_reserved)
    objects = build_pooler(obj, resource.spec, settings, budget, credentials)
    return objects + build_cronjobs(obj, resource.spec, settings)


def _render(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(os.environ)
        credentials = _credentials(args)
        objects: list[dict[str, Any]] = []
        for resource in load_resources(args.filename):
            objects += render_objects(resource, settings, args.max_connections,
                                      args.superuser_reserved_connections, credentials)
    except (ManifestError, PoolerConfigError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    sys.stdout.write(dump_yaml(objects))
    return 0
