"""One corpus of good and bad MarketplaceDBs, each with the layer expected to refuse it.

- "ok": everyone accepts;
- "crd": the CRD (schema + CEL) refuses it at `kubectl apply`, and so do the models and webhook;
- "webhook": only PostgreSQL's grammar or typed values can tell (CEL cannot): the CRD accepts it,
  the models and the webhook refuse it.

Cases are mutations of examples/marketplacedb.yaml (valid as is).
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any, Literal

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "marketplacedb.yaml").read_text())
Layer = Literal["ok", "crd", "webhook"]
DEEP_OR = " || ".join(["'a'"] * 60)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    layer: Layer
    document: dict[str, Any]


def _set(document: dict[str, Any], path: str, value: Any) -> None:
    """path like "spec.indexes.0.where"; a value of DELETE removes the key."""
    parts: list[Any] = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = document
    for part in parts[:-1]:
        node = node[part]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


DELETE = object()


def case(id: str, layer: Layer, *edits: tuple[str, Any] | Callable[[dict[str, Any]], None]) -> Case:
    document = copy.deepcopy(EXAMPLE)
    for edit in edits:
        if callable(edit):
            edit(document)
        else:
            _set(document, *edit)
    return Case(id, layer, document)


def _dup_index(d: dict[str, Any]) -> None:
    d["spec"]["indexes"].append(copy.deepcopy(d["spec"]["indexes"][0]))


def _view_named_like_index(d: dict[str, Any]) -> None:
    d["spec"]["materializedViews"][0]["name"] = d["spec"]["indexes"][0]["name"]


def _dup_view(d: dict[str, Any]) -> None:
    d["spec"]["materializedViews"].append(copy.deepcopy(d["spec"]["materializedViews"][0]))


def _dup_probe(d: dict[str, Any]) -> None:
    d["spec"]["healthProbes"].append(copy.deepcopy(d["spec"]["healthProbes"][0]))


def _many_indexes(d: dict[str, Any]) -> None:
    base = d["spec"]["indexes"][2]
    d["spec"]["indexes"] = [dict(copy.deepcopy(base), name=f"idx_{i}") for i in range(201)]


PROBE = "spec.healthProbes.0.readiness"
INDEX = "spec.indexes.0"
VIEW = "spec.materializedViews.0"

CORPUS: list[Case] = [
    # --- accepted -------------------------------------------------------------------------------
    case("example", "ok"),
    case("minimal", "ok", lambda d: d.update(spec={"database": {
        "host": "db", "dbname": "shop", "credentialsSecretRef": {"name": "owner"}}})),
    case("index in another schema may share a view's name", "ok", _view_named_like_index,
         (f"{VIEW}.schema", "reporting")),
    case("tcpSocket probe with a port name", "ok", (PROBE, {"tcpSocket": {"port": "http-api"}})),
    case("grpc probe", "ok", (PROBE, {"grpc": {"port": 9090}})),
    case("cron macro", "ok", (f"{VIEW}.refresh.schedule", "@hourly")),
    case("cron names and lists", "ok", (f"{VIEW}.refresh.schedule", "0 3,15 * JAN-MAR mon-fri")),
    case("predicate IS TRUE", "ok", (f"{INDEX}.where", "is_available IS TRUE")),
    case("predicate with IN", "ok", (f"{INDEX}.where", "status IN ('paid', 'shipped')")),
    case("work_mem at PostgreSQL's minimum", "ok", ("spec.database.settings", {"work_mem": "64kB"})),
    case("defaultPoolSize number", "ok", ("spec.pooler.defaultPoolSize", 40)),
    case("pooler resources", "ok", ("spec.pooler.resources", {"requests": {"cpu": "100m"}})),
    case("duration 1h30m", "ok", ("spec.ddl.lockTimeout", "1h30m")),
    case("name of 63 characters", "ok", ("metadata.name", "a" * 63)),
    case("TLS with a CA and a client certificate", "ok", ("spec.database.tls", {
        "caConfigMapRef": {"name": "db-ca"}, "clientCertSecretRef": {"name": "db-client"}})),
    # --- refused by the CRD ---------------------------------------------------------------------
    case("injection in index name", "crd", (f"{INDEX}.name", 'x"; DROP TABLE users; --')),
    case("identifier of 64 bytes", "crd", (f"{INDEX}.name", "a" * 64)),
    case("non-ASCII identifier", "crd", (f"{INDEX}.name", "ïndex")),
    case("upper-case identifier", "crd", (f"{INDEX}.table", "Users")),
    case("identifier starting with a digit", "crd", (f"{VIEW}.name", "1view")),
    case("empty identifier", "crd", (f"{INDEX}.columns.0.name", "")),
    case("bad dbname", "crd", ("spec.database.dbname", "market place")),
    case("bad host", "crd", ("spec.database.host", "db;rm -rf")),
    case("database port 0", "crd", ("spec.database.port", 0)),
    case("database port 70000", "crd", ("spec.database.port", 70000)),
    case("httpGet port 70000", "crd", (f"{PROBE}.httpGet.port", 70000)),
    case("httpGet port 0", "crd", (f"{PROBE}.httpGet.port", 0)),
    case("httpGet port name with upper case", "crd", (f"{PROBE}.httpGet.port", "HTTP")),
    case("httpGet port name of digits", "crd", (f"{PROBE}.httpGet.port", "8080")),
    case("tcpSocket port name too long", "crd", (PROBE, {"tcpSocket": {"port": "a-very-long-port-name"}})),
    case("grpc port 65536", "crd", (PROBE, {"grpc": {"port": 65536}})),
    case("exec probe", "crd", (PROBE, {"exec": {"command": ["true"]}})),
    case("exec beside httpGet", "crd", (f"{PROBE}.exec", {"command": ["sh", "-c", "id"]})),
    case("probe without handler", "crd", (PROBE, {"periodSeconds": 10})),
    case("probe with two handlers", "crd", (PROBE, {"httpGet": {"port": 8080}, "tcpSocket": {"port": 8080}})),
    case("probe path without slash", "crd", (f"{PROBE}.httpGet.path", "health")),
    case("probe scheme", "crd", (f"{PROBE}.httpGet.scheme", "FTP")),
    case("negative initialDelaySeconds", "crd", (f"{PROBE}.initialDelaySeconds", -1)),
    case("container name", "crd", ("spec.healthProbes.0.container", "Web_App")),
    case("duplicate index names", "crd", _dup_index),
    case("index and view share a name", "crd", _view_named_like_index),
    case("duplicate view names", "crd", _dup_view),
    case("duplicate probed deployments", "crd", _dup_probe),
    case("duplicate index columns", "crd",
         lambda d: d["spec"]["indexes"][0]["columns"].append({"name": "category_id"})),
    case("include repeats a key column", "crd", ("spec.indexes.4.include", ["query", "search_count"])),
    case("include duplicates", "crd", ("spec.indexes.4.include", ["query", "query"])),
    case("no index columns", "crd", (f"{INDEX}.columns", [])),
    case("index order", "crd", (f"{INDEX}.columns.1.order", "descending")),
    case("too many indexes", "crd", _many_indexes),
    case("empty uniqueKey", "crd", (f"{VIEW}.uniqueKey", [])),
    case("duplicate uniqueKey", "crd", (f"{VIEW}.uniqueKey", ["id", "id"])),
    case("empty query", "crd", (f"{VIEW}.query", "")),
    case("empty predicate", "crd", (f"{INDEX}.where", "")),
    case("cron in words", "crd", (f"{VIEW}.refresh.schedule", "every 5 minutes")),
    case("cron minute 61", "crd", (f"{VIEW}.refresh.schedule", "61 * * * *")),
    case("cron with six fields", "crd", (f"{VIEW}.refresh.schedule", "0 */5 * * * *")),
    case("cron unknown macro", "crd", (f"{VIEW}.refresh.schedule", "@fortnightly")),
    case("cron hour 24", "crd", (f"{VIEW}.refresh.schedule", "0 24 * * *")),
    case("duration in words", "crd", ("spec.ddl.lockTimeout", "5 seconds")),
    case("duration without unit", "crd", (f"{VIEW}.refresh.maxStaleness", "60")),
    case("deletion policy", "crd", ("spec.ddl.deletionPolicy", "Delete")),
    case("refresh mode", "crd", (f"{VIEW}.refresh.mode", "Cron")),
    case("unknown pooler parameter", "crd", ("spec.pooler.parameters", {"unknown_knob": 1})),
    case("pooler parameter that is a field", "crd", ("spec.pooler.parameters", {"pool_mode": "session"})),
    case("pooler auth parameter", "crd", ("spec.pooler.parameters", {"auth_type": "trust"})),
    case("unknown database setting", "crd", ("spec.database.settings", {"shared_preload_libraries": "x"})),
    case("server-wide setting", "crd", ("spec.database.settings", {"max_connections": "1000"})),
    case("replicas 0", "crd", ("spec.pooler.replicas", 0)),
    case("defaultPoolSize 0", "crd", ("spec.pooler.defaultPoolSize", 0)),
    case("defaultPoolSize word", "crd", ("spec.pooler.defaultPoolSize", "max")),
    case("pooler resources key", "crd", ("spec.pooler.resources", {"requets": {"cpu": "1"}})),
    case("unknown spec field", "crd", ("spec.indexess", [])),
    case("missing database", "crd", ("spec.database", DELETE)),
    case("resource name with upper case", "crd", ("metadata.name", "Shop")),
    case("resource name of 64 characters", "crd", ("metadata.name", "a" * 64)),
    case("resource name with newline and punctuation", "crd", ("metadata.name", "Bad Name!\n;x")),
    case("resource name missing", "crd", ("metadata.name", DELETE)),
    case("resource name an integer", "crd", ("metadata.name", 7)),
    case("namespace with upper case", "crd", ("metadata.namespace", "Prod")),
    case("secret name", "crd", ("spec.database.credentialsSecretRef.name", "Owner_Secret")),
    case("two CAs", "crd", ("spec.database.tls", {"caSecretRef": {"name": "ca"}, "caConfigMapRef": {"name": "ca"}})),
    case("TLS key name", "crd", ("spec.database.tls", {"caConfigMapRef": {"name": "ca", "key": "ca crt"}})),
    case("image too long", "crd", ("spec.pooler.image", "x" * 600)),
    case("predicate too long", "crd", (f"{INDEX}.where", "a = 1 AND " * 500 + "true")),
    # --- refused by the webhook only (PostgreSQL's grammar, typed values) --------------------------
    case("predicate OFFSET", "webhook", (f"{INDEX}.where", "true OFFSET 5")),
    case("predicate FOR UPDATE", "webhook", (f"{INDEX}.where", "true FOR UPDATE")),
    case("predicate not boolean", "webhook", (f"{INDEX}.where", "id")),
    case("predicate parameter", "webhook", (f"{INDEX}.where", "id > $1")),
    case("predicate injection", "webhook", (f"{INDEX}.where", "true); DROP TABLE users; --")),
    case("predicate subquery", "webhook", (f"{INDEX}.where", "(SELECT count(*) FROM users) > 0")),
    case("predicate NOT x1000", "webhook", (f"{INDEX}.where", "NOT " * 1000 + "true")),
    case("predicate || x60", "webhook", (f"{INDEX}.where", DEEP_OR + " = 'b'")),
    case("query NUL byte hides the WHERE", "webhook",
         (f"{VIEW}.query", "SELECT id FROM categories\u0000 WHERE is_active")),
    case("query || x60", "webhook", (f"{VIEW}.query", "SELECT " + DEEP_OR + " AS id")),
    case("query two statements", "webhook", (f"{VIEW}.query", "SELECT 1 AS id; DELETE FROM categories")),
    case("query writes", "webhook",
         (f"{VIEW}.query", "WITH d AS (DELETE FROM categories RETURNING id) SELECT id FROM d")),
    case("query FOR UPDATE", "webhook", (f"{VIEW}.query", "SELECT id FROM categories FOR UPDATE")),
    case("query INTO", "webhook", (f"{VIEW}.query", "SELECT id INTO copy FROM categories")),
    case("query not a SELECT", "webhook", (f"{VIEW}.query", "DROP TABLE categories")),
    case("work_mem 0", "webhook", ("spec.database.settings", {"work_mem": "0"})),
    case("work_mem unit", "webhook", ("spec.database.settings", {"work_mem": "64 parsecs"})),
    case("statement_timeout too long", "webhook", ("spec.database.settings", {"statement_timeout": "30d"})),
    case("isolation level", "webhook", ("spec.database.settings", {"default_transaction_isolation": "chaos"})),
    case("pooler parameter not a number", "webhook",
         ("spec.pooler.parameters", {"server_idle_timeout": "60\nadmin_users = evil"})),
    case("pooler parameter out of range", "webhook", ("spec.pooler.parameters", {"verbose": 9})),
    case("pooler bool parameter", "webhook", ("spec.pooler.parameters", {"log_stats": "maybe"})),
    case("cron unknown month name", "webhook", (f"{VIEW}.refresh.schedule", "0 0 1 xyz *")),
]
