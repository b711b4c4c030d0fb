"""`marketplacedb doctor`: does the database role have what this MarketplaceDB needs?

    marketplacedb doctor -f FILE --dsn DSN [--resource NAME] [-o json]

Connects as the role the operator will use (the DSN stands in for the resource's Secret; prefer
MARKETPLACEDB_DSN, a password on a command line is visible in `ps`), reads the catalog and the
server's own privilege functions, and prints per feature what is granted, what is missing and the
SQL an administrator runs to grant it. Changes nothing (view queries run with LIMIT 0 in a READ ONLY
transaction). docs/install.md#3-the-database-role lists the same needs.

Exit status: 0 nothing required is missing, 1 something is (or the manifest or connection failed),
2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..api.v1alpha1 import MarketplaceDB
from ..gateways.postgres import ConnInfo, DatabaseUnreachable, connect
from ..gateways.postgres.privileges import read_facts
from ..sql.ddl import render
from ..sql.privileges import Check, checks
from .manifest import ManifestError, load_resources
from .schema import DSN_ENV

_MARK = {"ok": "ok     ", "missing": "MISSING", "advice": "advice "}


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "doctor",
        help="check the database role's privileges against what a MarketplaceDB needs; print the GRANTs",
        description="Check, against the live server, that the role in --dsn may do everything the "
        "MarketplaceDB in FILE declares (indexes, views, refresh state, settings), and print the SQL that grants "
        "what is missing. Changes nothing. Exit 1 when something required is missing.",
    )
    parser.add_argument("-f", "--filename", required=True, help="MarketplaceDB manifest (YAML)")
    parser.add_argument("--dsn", help=f"libpq connection string as the operator's role (default: ${DSN_ENV})")
    parser.add_argument("--resource", help="MarketplaceDB name in the file (default: every one)")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    parser.set_defaults(handler=_doctor)


def _as_dict(check: Check) -> dict[str, Any]:
    return {"feature": check.feature, "need": check.need, "level": check.level,
            "grant": None if check.grant is None else render(check.grant)}


def _print(name: str, found: list[Check]) -> None:
    missing = sum(c.level == "missing" for c in found)
    print(f"MarketplaceDB {name}: " + (f"{missing} missing privilege(s)" if missing else "the role has what it needs"))
    for check in found:
        print(f"  {_MARK[check.level]} {check.feature}: {check.need}")
        if check.grant is not None and check.level != "ok":
            print(f"          grant: {render(check.grant)};")


def _selected(args: argparse.Namespace) -> list[MarketplaceDB]:
    resources = load_resources(args.filename)
    if args.resource:
        resources = [r for r in resources if r.metadata.get("name") == args.resource]
        if not resources:
            raise ManifestError(f"{args.filename}: no MarketplaceDB named {args.resource!r}")
    return resources


def _conninfo(dsn: str | None) -> ConnInfo | int:
    dsn = dsn or os.environ.get(DSN_ENV)
    if not dsn:
        print(f"no connection: pass --dsn or set {DSN_ENV}", file=sys.stderr)
        return 2
    try:
        return ConnInfo.from_dsn(dsn, application_name="marketplacedb-doctor")
    except Exception:  # libpq's message may quote the DSN: say nothing of it
        print("the DSN is not a valid libpq connection string", file=sys.stderr)
        return 2


def _doctor(args: argparse.Namespace) -> int:
    try:
        resources = _selected(args)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    info = _conninfo(args.dsn)
    if isinstance(info, int):
        return info
    report: dict[str, list[Check]] = {}
    try:
        with connect(info) as conn:
            for resource in resources:
                name = f"{resource.metadata.get('namespace') or 'default'}/{resource.metadata.get('name')}"
                report[name] = checks(resource.spec, read_facts(conn, resource.spec))
    except DatabaseUnreachable as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.output == "json":
        doc = {"resources": [{"resource": n, "checks": [_as_dict(c) for c in found]} for n, found in report.items()]}
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        for name, found in report.items():
            _print(name, found)
    return 1 if any(c.level == "missing" for found in report.values() for c in found) else 0
