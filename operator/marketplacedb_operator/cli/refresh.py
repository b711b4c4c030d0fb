"""`marketplacedb refresh`: the CronJob entrypoint, also handy for humans.

In a CronJob: `marketplacedb refresh --view NAME --schema SCHEMA --max-staleness 1h --timeout 5m
--skip-if-unchanged -o json`, connecting with libpq's variables (PGHOST, PGPORT, PGDATABASE,
PGUSER, PGPASSWORD, PGSSLMODE) set from the Secret: no DSN on the command line, no manifest file.
For humans: `-f FILE` takes the views and their policies from a MarketplaceDB manifest, `--dsn`
gives a connection (beware: a password in a DSN is visible in `ps`; prefer PGPASSWORD).

`marketplacedb history -f FILE [--view NAME] [-o json]` prints the recorded runs (the last N per
view, newest first) from the operator's schema in the database.

Exit status: 0 when every view was refreshed or skipped, 1 when any failed, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from psycopg import sql

from .. import naming
from ..api.v1alpha1 import DatabaseSpec, MarketplaceDB
from ..durations import parse_duration
from ..gateways.postgres import ConnInfo, DatabaseUnreachable, connect
from ..gateways.postgres.refresh import PostgresRefresh, read_history
from ..refresh import RefreshOutcome, explain_view, refresh_view
from ..sql.refresh import (
    DEFAULT_HISTORY,
    DEFAULT_LOCK_TIMEOUT,
    HistoryEntry,
    RefreshDatabaseError,
    RefreshOptions,
    ViewTarget,
    options_for,
)
from ..sql.refresh_sql import regclass
from .manifest import ManifestError, load_resources

REFRESH_APPLICATION_NAME = "marketplacedb-refresh"
STATE_EXISTS = sql.SQL("SELECT pg_catalog.to_regclass({}) IS NOT NULL").format(
    regclass(naming.STATE_SCHEMA, naming.STATE_TABLE)
)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "refresh",
        help="refresh materialized views: never overlapping, skipped when nothing changed",
        description="Refresh materialized views once (the CronJob entrypoint). Exit 0 when every view was "
        "refreshed or skipped, 1 when any failed.",
    )
    parser.add_argument("-f", "--filename", help="MarketplaceDB manifest: views and policies from its spec")
    parser.add_argument("--resource", help="MarketplaceDB name in the file (when it holds several)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--view", action="append", metavar="NAME", help="view to refresh (repeatable)")
    which.add_argument("--all", action="store_true", help="every view of the manifest (needs -f)")
    parser.add_argument("--schema", default=None, help="schema of --view without -f (default public)")
    parser.add_argument("--dsn", help="libpq connection string (default: PG* environment variables)")
    parser.add_argument("--max-staleness", type=_duration, help="refresh anyway after this long (e.g. 1h)")
    parser.add_argument("--timeout", type=_duration, help="statement_timeout of the refresh (e.g. 5m)")
    parser.add_argument("--lock-timeout", type=_duration, help=f"lock_timeout (default {DEFAULT_LOCK_TIMEOUT:g}s)")
    parser.add_argument("--skip-if-unchanged", action=argparse.BooleanOptionalAction, default=None,
                        help="skip when the base tables saw no writes (default true)")
    parser.add_argument("--force", action="store_true", help="refresh even when nothing changed")
    parser.add_argument("--explain", action="store_true",
                        help="print which skip rule applies and what a run would do; no lock, no refresh, no record")
    parser.add_argument("--depends-on", action="append", metavar="TABLE", default=None,
                        help="table whose writes count for --skip-if-unchanged (refresh.dependsOn; repeatable)")
    parser.add_argument("--allow-volatile-functions", action="store_true", default=None,
                        help="accept volatile functions in the view (allowVolatileFunctions; dangerous)")
    parser.add_argument("--history-limit", type=int, default=None,
                        help=f"runs kept in the view's history (default {DEFAULT_HISTORY})")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    parser.set_defaults(handler=_run)

    history = commands.add_parser(
        "history", help="print the recorded refresh runs of a manifest's views (last N per view)",
        description="The last refresh runs per view, newest first, read from the operator's schema.",
    )
    history.add_argument("-f", "--filename", required=True, help="MarketplaceDB manifest (its database and views)")
    history.add_argument("--resource", help="MarketplaceDB name in the file (when it holds several)")
    history.add_argument("--view", help="only this view")
    history.add_argument("--dsn", help="libpq connection string (default: the manifest's database, PGUSER/PGPASSWORD)")
    history.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    history.set_defaults(handler=_history)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class UsageError(ValueError):
    pass


def _overrides(args: argparse.Namespace, options: RefreshOptions) -> RefreshOptions:
    changes: dict[str, Any] = {}
    for field in ("max_staleness", "timeout", "lock_timeout", "skip_if_unchanged", "history_limit"):
        value = getattr(args, field, None)
        if value is not None:
            changes[field] = value
    if getattr(args, "depends_on", None):
        changes["depends_on"] = tuple(args.depends_on)
    if getattr(args, "allow_volatile_functions", None):
        changes["allow_volatile"] = True
    if changes.get("history_limit", 1) < 1:
        raise UsageError("--history-limit must be at least 1")
    return RefreshOptions(**{**options.__dict__, **changes})


def _pick_resource(args: argparse.Namespace) -> MarketplaceDB:
    resources = load_resources(args.filename)
    if args.resource:
        matches = [r for r in resources if r.metadata.get("name") == args.resource]
        if not matches:
            raise UsageError(f"{args.filename}: no MarketplaceDB named {args.resource!r}")
        return matches[0]
    if len(resources) > 1:
        raise UsageError(f"{args.filename} holds {len(resources)} MarketplaceDBs: choose one with --resource")
    return resources[0]


def targets(args: argparse.Namespace) -> tuple[list[tuple[ViewTarget, RefreshOptions]], DatabaseSpec | None]:
    """The views to refresh with their options, and the manifest's database (if any)."""
    if not args.filename:
        if args.all:
            raise UsageError("--all needs -f FILE (the views are listed in the manifest)")
        schema = args.schema or "public"
        return [(ViewTarget(schema, name), _overrides(args, RefreshOptions())) for name in args.view], None
    resource = _pick_resource(args)
    views = resource.spec.materialized_views
    if not args.all:
        by_name = {v.name: v for v in views}
        missing = [n for n in args.view if n not in by_name]
        if missing:
            raise UsageError(f"{args.filename}: no materialized view named {', '.join(missing)}")
        views = [by_name[n] for n in args.view]
    chosen = [(ViewTarget(v.schema_name, v.name), _overrides(args, options_for(v))) for v in views]
    return chosen, resource.spec.database


def conninfo(dsn: str | None, environ: Mapping[str, str], database: DatabaseSpec | None) -> ConnInfo:
    """From --dsn, else the manifest's database, else libpq's PG* variables; user and password
    always fall back to PGUSER/PGPASSWORD, so a secret never needs to be on the command line."""
    env_user, env_password = environ.get("PGUSER", "postgres"), environ.get("PGPASSWORD", "")
    if dsn:
        try:
            info = ConnInfo.from_dsn(dsn, application_name=REFRESH_APPLICATION_NAME)
        except Exception:  # libpq's message quotes the DSN, password included: say nothing of it
            raise UsageError("--dsn is not a valid libpq connection string (not shown: it may hold a password)") \
                from None
        if not info.password and env_password:
            info = ConnInfo(**{**info.kwargs(), "password": env_password})
        return info
    sslmode: str
    if database is not None:
        host, port, dbname, sslmode = database.host, database.port, database.dbname, database.ssl_mode
    else:
        host = environ.get("PGHOST", "localhost")
        port = int(environ.get("PGPORT", "5432"))
        dbname = environ.get("PGDATABASE", env_user)
        sslmode = environ.get("PGSSLMODE", "prefer")
    return ConnInfo(host=host, port=port, dbname=dbname, user=env_user, password=env_password, sslmode=sslmode,
                    application_name=environ.get("PGAPPNAME", REFRESH_APPLICATION_NAME),
                    connect_timeout=int(environ.get("PGCONNECT_TIMEOUT", "10")))


def _print(outcome: RefreshOutcome, output: str) -> None:
    if output == "json":
        print(json.dumps(outcome.to_json(), sort_keys=True), flush=True)
        return
    line = f"{outcome.schema}.{outcome.view}: {outcome.outcome} in {outcome.seconds:.3f}s: {outcome.reason}"
    if outcome.rows is not None:
        line += f" ({outcome.rows} rows)"
    if outcome.error:
        line += f": {outcome.error}"
    print(line, flush=True)


def _run(args: argparse.Namespace) -> int:
    try:
        chosen, database = targets(args)
        info = conninfo(args.dsn, os.environ, database)
    except (ManifestError, UsageError, ValueError) as exc:
        print(f"marketplacedb refresh: {exc}", file=sys.stderr)
        return 2
    try:
        conn = connect(info)
    except DatabaseUnreachable as exc:
        for target, _ in chosen:
            _print(RefreshOutcome(target.schema, target.name, "failed", "database unreachable", 0.0,
                                  error=str(exc)), args.output)
        return 1
    failed = False
    with conn:
        db = PostgresRefresh(conn)
        if args.explain:
            return _explain(db, chosen, args)
        for target, options in chosen:
            outcome = refresh_view(db, target, options, datetime.datetime.now(datetime.UTC), args.force)
            _print(outcome, args.output)
            failed = failed or not outcome.ok
    return 1 if failed else 0


def _explain(db: PostgresRefresh, chosen: list[tuple[ViewTarget, RefreshOptions]], args: argparse.Namespace) -> int:
    """Rolled back: the operator's schema may be created to read it, and nothing stays."""
    failed = False
    now = datetime.datetime.now(datetime.UTC)
    for target, options in chosen:
        try:
            with db.conn.transaction(force_rollback=True):
                if not db.conn.execute(STATE_EXISTS).fetchone()[0]:  # type: ignore[index]
                    db.ensure_state_table()
                rule, decision = explain_view(db, target, options, now, args.force)
        except RefreshDatabaseError as exc:
            rule, action, reason = "", "fail", str(exc)
        else:
            action, reason = decision.action, decision.reason
        failed = failed or action == "fail"
        if args.output == "json":
            print(json.dumps({"schema": target.schema, "view": target.name, "action": action, "reason": reason,
                              "rule": rule}, sort_keys=True), flush=True)
        else:
            print(f"{target.schema}.{target.name}: would {action}: {reason}; rule: {rule}", flush=True)
    return 1 if failed else 0


def _history(args: argparse.Namespace) -> int:
    try:
        resource = _pick_resource(args)
        names = {v.name for v in resource.spec.materialized_views}
        if args.view and args.view not in names:
            raise UsageError(f"{args.filename}: no materialized view named {args.view}")
        info = conninfo(args.dsn, os.environ, resource.spec.database)
    except (ManifestError, UsageError, ValueError) as exc:
        print(f"marketplacedb history: {exc}", file=sys.stderr)
        return 2
    try:
        with connect(info) as conn:
            entries = read_history(conn, args.view)
    except (DatabaseUnreachable, RefreshDatabaseError) as exc:
        print(f"marketplacedb history: {exc}", file=sys.stderr)
        return 1
    declared = {(v.schema_name, v.name) for v in resource.spec.materialized_views}
    for entry in entries:
        if (entry.schema, entry.name) in declared:
            _print_history(entry, args.output)
    return 0


def _print_history(entry: HistoryEntry, output: str) -> None:
    if output == "json":
        data = {"schema": entry.schema, "view": entry.name, "attemptAt": entry.attempt_at.isoformat(),
                "outcome": entry.outcome, "reason": entry.reason, "seconds": entry.seconds, "rows": entry.rows,
                "error": entry.error}
        print(json.dumps({k: v for k, v in data.items() if v is not None}, sort_keys=True), flush=True)
        return
    seconds = f" in {entry.seconds:.3f}s" if entry.seconds is not None else ""
    rows = f" ({entry.rows} rows)" if entry.rows is not None else ""
    error = f": {entry.error}" if entry.error else ""
    print(f"{entry.attempt_at.isoformat()} {entry.schema}.{entry.name}: {entry.outcome}{seconds}{rows}: "
          f"{entry.reason or ''}{error}", flush=True)
