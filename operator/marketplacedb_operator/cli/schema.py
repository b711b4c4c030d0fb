"""`marketplacedb plan` and `marketplacedb apply`: the schema engine without Kubernetes.

    marketplacedb plan  -f FILE --dsn DSN [-o json]            # prints steps and exact SQL; runs no DDL
    marketplacedb apply -f FILE --dsn DSN [-o json] [--approve HASH]

The DSN (credentials included) replaces the resource's Secret; prefer the MARKETPLACEDB_DSN
environment variable, a password on a command line is visible in `ps`. It must reach the
database directly, never through the pooler. `plan` only reads the catalog (and asks the server
for the columns of each new view query with LIMIT 0 in a READ ONLY transaction).

With `approval: Manual`, `apply` executes only when `--approve` carries the hash `plan` printed;
an `--approve` that does not match the current plan is refused (the database changed since).

Exit status: 0 success (or nothing to do), 1 a manifest error, a failed object, a conflict (an
object under a declared name that is not this resource's, left alone) or a lost session (the
outcomes so far are printed, then one line), 2 usage, 3 approval required.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import psycopg

from ..api.v1alpha1 import MarketplaceDB
from ..gateways.postgres import ConnInfo, DatabaseUnreachable, connect
from ..gateways.postgres import schema as gateway
from ..settings import Settings
from ..sql import report
from ..sql.catalog import Catalog
from ..sql.plan import Desired, ExecutionPolicy, Plan, StepOutcome, desired_state, owner_of, plan
from .manifest import ManifestError, load_resources

DSN_ENV = "MARKETPLACEDB_DSN"
EXIT_APPROVAL = 3


def register(commands: Any) -> None:
    for name, text in (("plan", "print the DDL a MarketplaceDB needs (steps and exact SQL); execute nothing"),
                       ("apply", "apply a MarketplaceDB's indexes, views and settings; print per-object outcomes")):
        parser = commands.add_parser(name, help=text, description=text)
        parser.add_argument("-f", "--filename", required=True, help="MarketplaceDB manifest (YAML)")
        parser.add_argument("--dsn", help=f"libpq connection string, direct to the database (default: ${DSN_ENV})")
        parser.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
        if name == "apply":
            parser.add_argument("--approve", metavar="HASH", help="execute only the plan with this hash")
        parser.set_defaults(handler=_plan if name == "plan" else _apply)


def _load(args: argparse.Namespace) -> tuple[list[MarketplaceDB], ConnInfo] | int:
    try:
        resources = load_resources(args.filename)  # every field checked before any connection
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    dsn = args.dsn or os.environ.get(DSN_ENV)
    if not dsn:
        print(f"no connection: pass --dsn or set {DSN_ENV}", file=sys.stderr)
        return 2
    try:
        return resources, ConnInfo.from_dsn(dsn)
    except Exception:  # libpq's message may quote the DSN: say nothing of it
        print("the DSN is not a valid libpq connection string", file=sys.stderr)
        return 2


def _resource_name(resource: MarketplaceDB) -> tuple[str, str]:
    meta = resource.metadata
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "unnamed")


def _view_problems(conn: Any, desired: Desired, the_plan: Plan) -> list[str]:
    """The new queries' columns, asked of the server before anything runs (READ ONLY, LIMIT 0)."""
    problems = []
    for step in the_plan.steps:
        check = step.check_view
        if check is None:
            continue
        try:
            columns = gateway.check_view_columns(conn, check.query)
        except Exception as exc:  # reported per view, never fatal
            problems.append(f"{check.field}.query: {gateway.describe_error(exc)}")
            continue
        missing = [k for k in check.unique_key if k not in columns]
        if missing:
            problems.append(f"{check.field}.uniqueKey: {missing} not returned by the query (it returns {columns})")
    return problems


def _plan_one(conn: Any, resource: MarketplaceDB) -> tuple[Desired, Catalog, Plan]:
    namespace, name = _resource_name(resource)
    desired = desired_state(resource.spec, owner_of(namespace, name))
    observed = gateway.observe(conn, desired)
    return desired, observed, plan(desired, observed)


def _document(resource: MarketplaceDB, desired: Desired, observed: Catalog, the_plan: Plan,
              problems: list[str]) -> dict[str, Any]:
    namespace, name = _resource_name(resource)
    return {
        "resource": f"{namespace}/{name}",
        "database": observed.database,
        "plan": the_plan.to_dict(),
        "problems": problems,
        "advice": report.advice(desired, observed),
        "indexes": [s.model_dump(by_alias=True) for s in report.index_statuses(desired, observed)],
        "materializedViews": [s.model_dump(by_alias=True, exclude_none=True)
                              for s in report.view_statuses(desired, observed)],
    }


def _print_plan(doc: dict[str, Any]) -> None:
    the_plan = doc["plan"]
    steps = the_plan["steps"]
    print(f"MarketplaceDB {doc['resource']} on database {doc['database']}: "
          f"{len(steps) or 'no'} step(s), plan hash {the_plan['hash']}")
    for number, step in enumerate(steps, start=1):
        mode = "in a transaction" if step["transaction"] else "outside a transaction"
        print(f"  {number}. [{step['kind']}] {step['description']} ({mode}, {step['lockPolicy']} lock policy)")
        for line in step["sql"].splitlines():
            print(f"       {line}")
    for view in doc["materializedViews"]:
        rule = view.get("refreshRule") or "skip-if-unchanged: decided at each refresh (the query was not analyzed)"
        print(f"  view {view['name']}: {rule}")
    for label in ("conflicts", "notes"):
        for line in the_plan[label]:
            print(f"  {label[:-1]}: {line}")
    for line in doc["problems"]:
        print(f"  problem: {line}")
    for line in doc["advice"]:
        print(f"  advice: {line}")


def _emit(documents: list[dict[str, Any]], output: str, printer: Any) -> None:
    if output == "json":
        sys.stdout.write(json.dumps({"resources": documents}, sort_keys=True, indent=2, ensure_ascii=False) + "\n")
    else:
        for doc in documents:
            printer(doc)


def _plan(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    resources, info = loaded
    documents = []
    try:
        with connect(info) as conn:
            for resource in resources:
                desired, observed, the_plan = _plan_one(conn, resource)
                problems = _view_problems(conn, desired, the_plan)
                documents.append(_document(resource, desired, observed, the_plan, problems))
    except DatabaseUnreachable as exc:
        print(exc, file=sys.stderr)
        return 1
    except (psycopg.Error, gateway.StepFailed, gateway.ObservationFailed) as exc:
        _emit(documents, args.output, _print_plan)
        print(_lost(exc), file=sys.stderr)
        return 1
    _emit(documents, args.output, _print_plan)
    # A conflict leaves the declared state unreachable, as for apply: a pipeline gating on
    # `plan` must not read it as success.
    return 1 if any(d["problems"] or d["plan"]["conflicts"] for d in documents) else 0


def _outcome_dict(outcome: StepOutcome) -> dict[str, Any]:
    return {
        "object": outcome.object,
        "ok": outcome.ok,
        "executed": list(outcome.executed),
        "message": outcome.message,
        "attempts": outcome.attempts,
        "blockingSessions": [s.model_dump(by_alias=True) for s in report.blocking_status(outcome.blocking)],
    }


def _print_apply(doc: dict[str, Any]) -> None:
    outcomes = doc["outcomes"]
    status = "approval required" if doc.get("approvalRequired") else f"{len(outcomes)} object(s) changed"
    print(f"MarketplaceDB {doc['resource']} on database {doc['database']}: {status} "
          f"(plan hash {doc['plan']['hash']})")
    if doc.get("approvalRequired"):
        print(f"  rerun with --approve {doc['plan']['hash']} after reviewing `marketplacedb plan`")
    for outcome in outcomes:
        print(f"  {'ok    ' if outcome['ok'] else 'FAILED'} {outcome['object']}"
              + (f": {outcome['message']}" if outcome["message"] else ""))
        for session in outcome["blockingSessions"]:
            print(f"         blocked by pid {session['pid']} ({session['state']}, {session['ageSeconds']}s)")
    for line in doc["plan"]["conflicts"]:
        print(f"  conflict: {line}")
    for line in doc["plan"]["notes"]:
        print(f"  note: {line}")
    for line in doc["advice"]:
        print(f"  advice: {line}")


def _approval_needed(resource: MarketplaceDB, the_plan: Plan, approve: str | None) -> bool:
    if the_plan.empty:
        return False
    if approve is not None:
        return approve != the_plan.hash  # a stale approval never runs a different plan
    return resource.spec.ddl.approval == "Manual"


def _apply(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    resources, info = loaded
    settings = Settings.from_env(os.environ)
    documents: list[dict[str, Any]] = []
    code = 0
    try:
        with connect(info) as conn:
            for resource in resources:
                desired, observed, the_plan = _plan_one(conn, resource)
                doc = _document(resource, desired, observed, the_plan, [])
                documents.append(doc)
                if _approval_needed(resource, the_plan, args.approve):
                    doc.update(outcomes=[], approvalRequired=True)
                    code = max(code, EXIT_APPROVAL)
                    continue
                policy = ExecutionPolicy.from_spec(resource.spec.ddl, settings)
                outcomes = gateway.execute(conn, the_plan, policy, watch=lambda: connect(info))
                doc.update(outcomes=[_outcome_dict(o) for o in outcomes], approvalRequired=False)
                if not all(o.ok for o in outcomes) or the_plan.conflicts:
                    code = max(code, 1)  # a conflict leaves the declared state unreached
                if conn.closed:
                    raise psycopg.OperationalError("the connection was lost during apply")
                after = gateway.observe(conn, desired)
                doc["indexes"] = [s.model_dump(by_alias=True)
                                  for s in report.index_statuses(desired, after, outcomes)]
                doc["materializedViews"] = [s.model_dump(by_alias=True, exclude_none=True)
                                            for s in report.view_statuses(desired, after, outcomes)]
    except DatabaseUnreachable as exc:
        print(exc, file=sys.stderr)
        return 1
    except (psycopg.Error, gateway.StepFailed, gateway.ObservationFailed) as exc:
        # Session lost, server stopped, catalog unreadable: what ran so far, then one line.
        for doc in documents:
            doc.setdefault("outcomes", [])
            doc.setdefault("approvalRequired", False)
        _emit(documents, args.output, _print_apply)
        print(_lost(exc), file=sys.stderr)
        return 1
    _emit(documents, args.output, _print_apply)
    return code


def _lost(exc: BaseException) -> str:
    """One line for a database error outside any object (never DETAIL, never the DSN)."""
    if isinstance(exc, psycopg.OperationalError) and not exc.sqlstate:
        return "database connection lost: the outcomes above are what ran; run apply again to converge"
    return f"database error: {gateway.describe_error(exc)}; the outcomes above are what ran"
