"""The operator end to end: kopf in-process against the KMock API emulator, real PostgreSQL 15.

KMock runs no controllers: the tests play the Deployment controller where a real cluster would
(setting the pooler's readyReplicas), and nothing garbage-collects owned objects.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import kopf
import kubernetes
import kubernetes_validate
import psycopg
import pytest
import yaml

from harness.kube import KubeEmulator, KubeObjects, eventually, iter_requests, kopf_runner
from marketplacedb_operator import handlers, metrics, naming
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
NS = "prod"
API = "marketplacedb.io/v1alpha1"
CANARY = "canary-Pa55-w0rd-7f3c9e"
PROBED = ["bff-marketplace-home", "bff-marketplace-search", "bff-store-public"]
# The example's declared indexes (5 b-tree, plus the trigram and JSONB GIN indexes of issue 18).
INDEXES = len(yaml.safe_load((ROOT / "examples" / "marketplacedb.yaml").read_text())["spec"]["indexes"])
# How long a test waits for a state the operator must reach: a deadline, not an expectation (seconds
# on an idle machine; several times that on a loaded 2-core one, a CPU hog on each core).
DEADLINE = 180.0


def example_resource(db: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "marketplacedb.yaml").read_text())
    database = body["spec"]["database"]
    database.update(host=db.server.host, port=db.server.port, dbname=db.name, sslMode="disable")
    database.pop("settings", None)
    body["spec"]["database"]["settings"] = {"work_mem": "32MB", "random_page_cost": "1.1"}
    return body


def app_deployment(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "annotations": {naming.ANN_PROBED_BY: "shop"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{"name": "app", "image": "example.com/bff:1.0", "ports": [{"containerPort": 8080}]}]
                },
            },
        },
    }


@dataclasses.dataclass
class Env:
    api: KubeEmulator
    objects: KubeObjects
    db: Any
    deps: Any
    logs: list[str]

    def operator(self) -> Any:
        """kopf with the operator's handlers, in this test's task (kopf cancels tasks started after
        it when it stops, so it must not straddle a fixture's setup and teardown)."""
        registry = kopf.OperatorRegistry()
        handlers.register(registry, self.deps)
        return kopf_runner(self.api, registry, namespaces=[NS])

    def resource(self) -> dict[str, Any]:
        return self.objects.get(API, "MarketplaceDB", "shop", NS) or {}

    def condition(self, type_: str) -> dict[str, Any]:
        for item in self.resource().get("status", {}).get("conditions", []):
            if item["type"] == type_:
                return dict(item)
        return {}

    async def pooler_controller(self) -> None:
        """Play the Deployment controller: mark the pooler's pods ready."""
        name = naming.pooler_name("shop")
        deployment = await eventually(lambda: self.objects.get("apps/v1", "Deployment", name, NS), message="pooler")
        replicas = deployment["spec"]["replicas"]
        await self.objects.patch(deployment, {"status": {"readyReplicas": replicas}}, subresource="status")


class _Capture(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@pytest.fixture
async def env(
    kube_api: KubeEmulator, kube_objects: KubeObjects, kube_client: kubernetes.client.ApiClient, workload_db: Any
) -> AsyncIterator[Env]:
    with psycopg.connect(workload_db.superuser_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {workload_db.owner} PASSWORD '{CANARY}'")  # the canary is the real password
    await kube_objects.ensure_namespace(NS)
    await kube_objects.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "shop-db-owner", "namespace": NS, "labels": {naming.LABEL_CREDENTIALS: "true"},
                         "annotations": {naming.ANN_CREDENTIALS_FOR: "shop"}},
            "stringData": {"username": workload_db.owner, "password": CANARY},
        }
    )
    for name in PROBED:
        await kube_objects.create(app_deployment(name))
    logs: list[str] = []
    handler = _Capture(logs)
    logging.getLogger().addHandler(handler)
    settings = Settings(resync_seconds=1.0, tick_seconds=0.5, retry_base_seconds=1.0, ddl_retry_base_seconds=0.05)
    deps = make_deps(settings, kube_client)
    try:
        yield Env(kube_api, kube_objects, workload_db, deps, logs)
    finally:
        logging.getLogger().removeHandler(handler)


async def _ready(env: Env, timeout: float = DEADLINE) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        resource = env.resource()
        status = resource.get("status", {})
        ready = env.condition("Ready")
        if ready.get("status") == "True" and status.get("observedGeneration") == resource["metadata"]["generation"]:
            return resource
        return None

    result: dict[str, Any] = await eventually(check, timeout=timeout, message=f"Ready; now {env.condition('Ready')}")
    return result


def _catalog(db: Any) -> dict[str, Any]:
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        indexes = dict(
            conn.execute(
                "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relname LIKE 'idx_%'"
            ).fetchall()
        )
        views = dict(conn.execute("SELECT matviewname, ispopulated FROM pg_matviews").fetchall())
        settings = conn.execute(
            "SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE d.datname = current_database() AND s.setrole = 0"
        ).fetchone()
    return {"indexes": indexes, "views": views, "settings": sorted(settings[0]) if settings else []}


def _writes(api: KubeEmulator) -> list[str]:
    return [f"{r.method} {r.url.path}" for r in iter_requests(api) if r.method in ("POST", "PUT", "PATCH", "DELETE")]


async def test_create_converges_to_ready_with_everything_applied(env: Env) -> None:
    async with env.operator():
        await env.objects.create(example_resource(env.db))
        await env.pooler_controller()
        resource = await _ready(env)
        status = resource["status"]

        catalog = _catalog(env.db)
        assert catalog["indexes"] == {name: True for name in catalog["indexes"]} and len(catalog["indexes"]) == INDEXES
        assert catalog["views"] == {"mv_hot_products": True, "mv_category_counts": True}
        assert catalog["settings"] == ["random_page_cost=1.1", "work_mem=32MB"]
        assert [i["state"] for i in status["indexes"]] == ["Valid"] * INDEXES
        assert status["summary"] == {"indexes": f"{INDEXES}/{INDEXES}", "views": "2/2", "pooler": "2/2"}
        assert status["pooler"]["budget"]["maxConnections"] == 100

        written = {
            kind: env.objects.list_objects(api, kind, NS)
            for api, kind in [
                ("v1", "ConfigMap"),
                ("v1", "Secret"),
                ("v1", "Service"),
                ("apps/v1", "Deployment"),
                ("batch/v1", "CronJob"),
                ("policy/v1", "PodDisruptionBudget"),
            ]
        }
        assert len(written["batch/v1" and "CronJob"]) == 2
        assert {d["metadata"]["name"] for d in written["Deployment"]} == {*PROBED, naming.pooler_name("shop")}
        for items in written.values():
            for item in items:
                clean = {k: v for k, v in item.items() if k != "status"}
                clean["metadata"] = {
                    k: v
                    for k, v in item["metadata"].items()
                    if k in ("name", "namespace", "labels", "annotations", "ownerReferences")
                }
                kubernetes_validate.validate(clean, "1.30.0", strict=True)
        for name in PROBED:
            container = env.objects.get("apps/v1", "Deployment", name, NS)["spec"]["template"]["spec"]["containers"][0]
            assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8080, "scheme": "HTTP"}
            assert container["image"] == "example.com/bff:1.0"  # only probe fields were applied
            assert "ownerReferences" not in env.objects.get("apps/v1", "Deployment", name, NS)["metadata"]

        # Idle resyncs: the timer runs (resync 1 s) but writes nothing and runs no DDL. First let
        # the last transition's writes land (kopf posts Events from a queue; on a loaded machine
        # a late status write can follow Ready by seconds): wait for 3 quiet seconds, at most 60.
        await _quiet(env, seconds=3.0, timeout=DEADLINE)
        before_writes, before_catalog = _writes(env.api), _catalog(env.db)
        ddl_before = _ddl_count(env.db)
        await asyncio.sleep(3.5)
        assert _writes(env.api)[len(before_writes) :] == []
        assert _catalog(env.db) == before_catalog
        assert _ddl_count(env.db) == ddl_before

        _assert_no_canary(env)


async def _quiet(env: Env, *, seconds: float, timeout: float) -> None:
    """Wait until the API has seen no write for `seconds` (a resync that writes never gets there)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    count, since = len(_writes(env.api)), loop.time()
    while loop.time() - since < seconds:
        assert loop.time() < deadline, f"writes never stopped: {_writes(env.api)[count - 5:]}"
        await asyncio.sleep(0.2)
        now = len(_writes(env.api))
        if now != count:
            count, since = now, loop.time()


def _ddl_count(db: Any) -> str:
    """A fingerprint of the catalog rows DDL rewrites: any DDL on a relation of the schema
    (create, drop, rename, comment, reindex) writes a new version of its pg_class row."""
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT relname, xmin::text, relfilenode FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace ORDER BY relname"
        ).fetchall()
    return repr(rows)


def _assert_no_canary(env: Env) -> None:
    everything = json.dumps([obj.raw for obj in env.api.objects.values() if not obj.deleted], default=str)
    secrets = [o for o in env.objects.list_objects("v1", "Secret", NS) if o["metadata"]["name"] != "shop-db-owner"]
    # The pooler's auth Secret legitimately holds the credential (PgBouncer needs it): exclude it.
    for secret in secrets:
        everything = everything.replace(json.dumps(secret, default=str)[1:-1], "")
    leaks = [where for where, text in [("logs", "\n".join(env.logs))] if CANARY in text]
    resource = env.resource()
    for where, part in [
        ("status", resource.get("status")),
        ("annotations", resource["metadata"].get("annotations")),
        ("events", env.objects.events(NS)),
        ("configmaps", env.objects.list_objects("v1", "ConfigMap", NS)),
        ("cronjobs", env.objects.list_objects("batch/v1", "CronJob", NS)),
    ]:
        if CANARY in json.dumps(part, default=str):
            leaks.append(where)
    assert leaks == []


async def test_edits_converge_with_one_reconcile(env: Env) -> None:
    async with env.operator():
        created = await env.objects.create(example_resource(env.db))
        await env.pooler_controller()
        await _ready(env)
        spec = copy.deepcopy(created["spec"])
        spec["indexes"].append(
            {"name": "idx_categories_order", "table": "categories", "columns": [{"name": "display_order"}]}
        )
        view = spec["materializedViews"][1]
        assert view["query"].lstrip().upper().startswith("SELECT ")
        view["query"] = "SELECT 1 AS version, " + view["query"].lstrip()[len("SELECT ") :]
        spec["pooler"]["parameters"]["server_idle_timeout"] = 300
        # Let the create's last writes land before counting (a fixed sleep was too short under
        # load): 3 s without a write (resync is 1 s here, and a steady state writes nothing).
        await _quiet(env, seconds=3.0, timeout=DEADLINE)
        before = len(_writes(env.api))
        await env.objects.patch_spec(created, spec)
        resource = await _ready(env)
        assert resource["metadata"]["generation"] == 2
        assert _catalog(env.db)["indexes"]["idx_categories_order"] is True
        with psycopg.connect(env.db.superuser_dsn, autocommit=True) as conn:
            columns = conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0", [view["name"]]
            ).fetchall()
        assert ("version",) in columns  # the view was swapped to the new definition
        ini = env.objects.get("v1", "ConfigMap", naming.pooler_name("shop"), NS)["data"]["pgbouncer.ini"]
        assert "server_idle_timeout = 300" in ini
        # No unrelated writes: a reload-safe pooler change touches the ConfigMap only (the pods are
        # not rolled), the CronJobs and probes are not re-applied.
        writes = [w for w in _writes(env.api)[before:] if "/events" not in w]
        touched = sorted({w.split()[1].rsplit("/", 2)[-2] for w in writes if not w.endswith("/status")})
        assert touched == ["configmaps", "marketplacedbs"], writes
        _assert_no_canary(env)


async def test_invalid_spec_is_a_permanent_condition_and_touches_nothing(env: Env) -> None:
    async with env.operator():
        body = example_resource(env.db)
        body["spec"]["indexes"][0]["name"] = 'x"; DROP TABLE seller_products; --'
        await env.objects.create(body)
        ready = await eventually(
            lambda: env.condition("Ready").get("reason") == "InvalidSpec" and env.condition("Ready"),
            message="InvalidSpec",
        )
        assert "spec.indexes[0].name: " in ready["message"]
        assert _catalog(env.db)["indexes"] == {}
        await eventually(
            lambda: any(
                e.get("reason") == "InvalidSpec" and e.get("type") == "Warning"
                for e in env.objects.events(NS, involved_name="shop")
            ),
            message="a Warning Event for the invalid spec",
        )


async def test_missing_secret_then_created(env: Env) -> None:
    async with env.operator():
        body = example_resource(env.db)
        body["spec"]["database"]["credentialsSecretRef"]["name"] = "late-secret"
        await env.objects.create(body)
        await eventually(
            lambda: env.condition("DatabaseReachable").get("reason") == "SecretNotFound", message="missing"
        )
        await env.objects.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "late-secret", "namespace": NS, "labels": {naming.LABEL_CREDENTIALS: "true"},
                         "annotations": {naming.ANN_CREDENTIALS_FOR: "shop"}},
                "stringData": {"username": env.db.owner, "password": CANARY},
            }
        )
        await env.pooler_controller()
        await _ready(env)
        _assert_no_canary(env)


def _reconciles() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "marketplacedb_reconcile_duration_seconds_count", {"namespace": NS, "resource": "shop"}
    )
    return value or 0.0


async def test_database_down_backs_off_and_recovers(env: Env) -> None:
    async with env.operator():
        await env.objects.create(example_resource(env.db))
        await env.pooler_controller()
        await _ready(env)
        env.db.server.stop()
        try:
            down = await eventually(
                lambda: (
                    env.condition("DatabaseReachable").get("status") == "False" and env.condition("DatabaseReachable")
                ),
                timeout=DEADLINE,
                message="DatabaseReachable=False",
            )
            assert down["reason"] == "DatabaseUnreachable"
            assert "cannot connect" in down["message"] and CANARY not in down["message"]
            assert env.condition("Ready")["status"] == "False"
            # Backoff, not a hot loop: the timer ticks every 0.5 s, retries come at ~1, 2, 4 s...
            before = _reconciles()
            await asyncio.sleep(6)
            assert _reconciles() - before <= 5
        finally:
            env.db.server.start()
        await _ready(env)
        assert all(_catalog(env.db)["indexes"].values())
        _assert_no_canary(env)


@pytest.mark.parametrize("policy", ["Retain", "Drop"])
async def test_delete_honours_the_deletion_policy(env: Env, policy: str) -> None:
    async with env.operator():
        body = example_resource(env.db)
        body["spec"]["ddl"]["deletionPolicy"] = policy
        await env.objects.create(body)
        await env.pooler_controller()
        await _ready(env)
        created = await eventually(
            lambda: naming.FINALIZER in (env.resource()["metadata"].get("finalizers") or []) and env.resource(),
            message="the finalizer",
        )
        # kopf's state on the object: the finalizer and one small marker, never a copy of the spec.
        assert set(created["metadata"].get("annotations") or {}) <= {f"{naming.ANNOTATION_PREFIX}/seen"}
        # Someone else's index on the same database: never touched by either policy.
        with psycopg.connect(env.db.superuser_dsn, autocommit=True) as conn:
            conn.execute("CREATE INDEX hand_made_idx ON categories (name)")
        await env.objects.delete(created)
        await eventually(lambda: env.resource() == {}, timeout=DEADLINE, message="finalizer released")
        catalog = _catalog(env.db)
        if policy == "Retain":
            assert len(catalog["indexes"]) == INDEXES and len(catalog["views"]) == 2
            assert catalog["settings"] == ["random_page_cost=1.1", "work_mem=32MB"]
        else:
            assert catalog["indexes"] == {} and catalog["views"] == {}
            assert catalog["settings"] == []
        with psycopg.connect(env.db.superuser_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('hand_made_idx') IS NOT NULL").fetchone() == (True,)
        # Probe fields are released with an empty server-side apply for each probed Deployment
        # (KMock cannot drop fields by ownership, so assert the request itself).
        releases = [
            r
            for r in iter_requests(env.api, "PATCH")
            if r.url.path.endswith(tuple(PROBED))
            and r.data
            == {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": r.url.path.rsplit("/", 1)[-1], "namespace": NS},
            }
        ]
        assert sorted(r.url.path.rsplit("/", 1)[-1] for r in releases) == sorted(PROBED)


async def test_manual_approval_waits_for_the_plan_hash(env: Env) -> None:
    async with env.operator():
        body = example_resource(env.db)
        body["spec"]["ddl"]["approval"] = "Manual"
        body["spec"]["pooler"]["enabled"] = False
        created = await env.objects.create(body)
        waiting = await eventually(
            lambda: env.condition("SchemaApplied").get("reason") == "AwaitingApproval" and env.resource(),
            timeout=DEADLINE,
            message="AwaitingApproval",
        )
        plan = waiting["status"]["plan"]
        assert plan["approved"] is False and plan["steps"]
        assert _catalog(env.db)["indexes"] == {}  # nothing executed
        await env.objects.patch(created, {"metadata": {"annotations": {naming.ANN_APPROVE_PLAN: plan["hash"]}}})
        await _ready(env)
        assert len(_catalog(env.db)["indexes"]) == INDEXES
