"""`marketplacedb demo`: the operator's main job on a local sandbox, or on a real cluster.

The sandbox is real where it can be: a throwaway PostgreSQL 15 loaded with the reference
workload, the real pgbouncer started on the config the operator rendered, and the operator
itself. Kubernetes is the KMock API *emulator*: it stores objects and serves watches, but runs no
controllers, so the demo plays the Deployment controller for the pooler (it starts pgbouncer on
the rendered ConfigMap/Secret and reports the pod ready). The sandbox servers come from the test
harness (tests/harness), so the demo runs from a source checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import psycopg
import yaml

from .. import naming, workload

ROOT = pathlib.Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "marketplacedb.yaml"
NS, NAME = "prod", "shop"


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the operator on a local sandbox (or --cluster) and show what it did",
        description="Start a throwaway PostgreSQL (reference workload), the KMock Kubernetes API emulator and "
        "the operator; apply examples/marketplacedb.yaml; show conditions, indexes, views, the pooler, a refresh "
        "and the home-page query before and after. --cluster applies the CRD and example to the current "
        "kube context instead.",
    )
    demo.add_argument("--products", type=int, default=200_000, help="workload size (default 200000)")
    demo.add_argument("--cluster", action="store_true", help="use the current kube context instead of a sandbox")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.cluster:
        return _cluster()
    harness = ROOT / "tests"
    if not (harness / "harness" / "kube.py").exists():
        print("the sandbox demo runs from a source checkout (it uses tests/harness): clone the repo, `make demo`")
        return 2
    sys.path.insert(0, str(harness))
    return asyncio.run(_sandbox(args.products))


def _cluster() -> int:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("--cluster needs kubectl on PATH and a current kube context")
        return 2
    # The credentials are never a committed placeholder (examples/secret.yaml says `change-me`):
    # the real Secret must exist first, and the demo says how to create it.
    secret = "shop-db-owner"
    if subprocess.run([kubectl, "-n", NS, "get", "secret", secret], capture_output=True, check=False).returncode:
        print(f"--cluster needs the database owner's Secret first (see docs/install.md#3-the-database-role):\n"
              f"  kubectl create namespace {NS}\n"
              f"  kubectl -n {NS} create secret generic {secret} --from-literal=username=ROLE "
              "--from-literal=password='...'\n"
              f"  kubectl -n {NS} label secret {secret} {naming.LABEL_CREDENTIALS}=true\n"
              f"and spec.database.host in {EXAMPLE.relative_to(ROOT)} pointing at your server.")
        return 2
    for path in (ROOT / "crds" / "marketplacedbs.marketplacedb.io.yaml", EXAMPLE):
        subprocess.run([kubectl, "apply", "--server-side", "-f", str(path)], check=True)
    subprocess.run([kubectl, "-n", NS, "get", "mdb", NAME, "-o", "wide"], check=False)
    print("Install the operator to reconcile it: see docs/install.md (build and push the image, then helm install)")
    return 0


def _say(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _timed(dsn: str, queries: dict[str, str], rounds: int) -> dict[str, float]:
    """Median milliseconds per query over `rounds` runs on one connection."""
    result = {}
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        for name, query in queries.items():
            samples = []
            for _ in range(rounds):
                started = time.perf_counter()
                conn.execute(query).fetchall()
                samples.append((time.perf_counter() - started) * 1000)
            result[name] = statistics.median(samples)
    return result


async def _sandbox(products: int) -> int:
    from harness.kube import KubeObjects, eventually, kopf_runner, kube_emulator
    from harness.pgbouncer import PgBouncerProcess
    from harness.postgres import PostgresServer

    from .. import handlers
    from ..settings import Settings
    from .wiring import make_deps

    print("SANDBOX: throwaway PostgreSQL 15 + real pgbouncer + KMock, a Kubernetes API *emulator*")
    print("(not a cluster: no scheduler, no controllers, no pods; the demo plays the Deployment controller)")
    server = PostgresServer(max_connections=100)
    server.start()
    bouncer: PgBouncerProcess | None = None
    try:
        _say(f"loading the reference workload ({products:,} products)")
        server.create_role("shop_owner", "demo-owner-password")
        server.execute("GRANT pg_read_all_stats TO shop_owner")  # docs/install.md: skip-if-unchanged sees all sessions
        server.create_database("marketplace", "shop_owner")
        owner_dsn = server.dsn("marketplace", "shop_owner", "demo-owner-password")
        started = time.perf_counter()
        with psycopg.connect(owner_dsn, autocommit=True) as conn:
            conn.execute(workload.schema_sql())
            conn.execute(workload.data_sql(products=products))
            conn.execute("VACUUM (ANALYZE)")
        print(f"loaded in {time.perf_counter() - started:.1f} s")
        before = await asyncio.to_thread(_timed, owner_dsn, workload.HOME_QUERIES_BASE, 5)
        for name, ms in before.items():
            print(f"home page from base tables: {name:16} {ms:9.2f} ms (median of 5)")

        async with kube_emulator() as api:
            objects = KubeObjects(api)
            await _seed_cluster(objects, server)
            deps = make_deps(Settings(resync_seconds=5.0), _client(str(api.url)))
            import kopf

            registry = kopf.OperatorRegistry()
            handlers.register(registry, deps)
            async with kopf_runner(api, registry, namespaces=[NS]):
                _say("kubectl apply -f examples/marketplacedb.yaml  (database pointed at the sandbox)")
                await objects.create(_resource(server))
                bouncer = await _play_pooler_controller(objects, eventually)
                resource = await eventually(lambda: _ready(objects), timeout=600, message="Ready")
                _show(resource, objects)
                await _refresh(objects, eventually)
                after = await asyncio.to_thread(
                    _timed,
                    bouncer.dsn("marketplace", "shop_owner", "demo-owner-password"),
                    workload.HOME_QUERIES_VIEWS,
                    50,
                )
                _say("home page, before (base tables, direct) vs after (views, through pgbouncer)")
                for name, ms in after.items():
                    print(f"{name:16} {before[name]:9.2f} ms -> {ms:7.3f} ms  ({before[name] / ms:,.0f}x)")
                ready = [c for c in resource["status"]["conditions"] if c["type"] == "Ready"][0]
                print(f"\nMarketplaceDB {NS}/{NAME}: Ready={ready['status']} ({ready['reason']})")
                return 0 if ready["status"] == "True" else 1
    finally:
        if bouncer is not None:
            bouncer.stop()
        server.stop()
        server.cleanup()


def _client(url: str) -> Any:
    import kubernetes

    config = kubernetes.client.Configuration()
    config.host = url.rstrip("/")
    return kubernetes.client.ApiClient(config)


def _resource(server: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["spec"]["database"].update(host=server.host, port=server.port, dbname="marketplace", sslMode="disable")
    return body


async def _seed_cluster(objects: Any, server: Any) -> None:
    await objects.ensure_namespace(NS)
    await objects.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "shop-db-owner", "namespace": NS, "labels": {naming.LABEL_CREDENTIALS: "true"},
                         "annotations": {naming.ANN_CREDENTIALS_FOR: "shop"}},
            "stringData": {"username": "shop_owner", "password": "demo-owner-password"},
        }
    )
    for name in ("bff-marketplace-home", "bff-marketplace-search", "bff-store-public"):
        labels = {"app": name}
        await objects.create(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                # The Deployment's owner lets this MarketplaceDB set its probes (README "Security model").
                "metadata": {"name": name, "namespace": NS, "annotations": {naming.ANN_PROBED_BY: NAME}},
                "spec": {
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "app", "image": "example.com/bff:1.0"}]},
                    },
                },
            }
        )


async def _play_pooler_controller(objects: Any, eventually: Any) -> Any:
    """What kubelet would do: start pgbouncer on the rendered ConfigMap and Secret, report it ready."""
    from harness.pgbouncer import PgBouncerProcess

    name = naming.pooler_name(NAME)
    config = await eventually(lambda: objects.get("v1", "ConfigMap", name, NS), timeout=300, message="ConfigMap")
    secret = await eventually(
        lambda: objects.get("v1", "Secret", naming.pooler_auth_secret_name(NAME), NS), message="auth Secret"
    )
    ini = next(iter(config["data"].values()))
    userlist = base64.b64decode(next(iter(secret["data"].values()))).decode()
    bouncer = PgBouncerProcess(ini, userlist)
    await asyncio.to_thread(bouncer.start)
    _say("pgbouncer started on the rendered config (transaction mode)")
    for line in ini.splitlines():
        if line.split("=")[0].strip() in ("pool_mode", "default_pool_size", "max_db_connections", "max_client_conn"):
            print("  " + line)
    deployment = await eventually(lambda: objects.get("apps/v1", "Deployment", name, NS), message="Deployment")
    replicas = deployment["spec"]["replicas"]
    await objects.patch(deployment, {"status": {"readyReplicas": replicas}}, subresource="status")
    return bouncer


def _ready(objects: Any) -> dict[str, Any] | None:
    resource = objects.get(naming.API_VERSION, naming.KIND, NAME, NS) or {}
    for condition in resource.get("status", {}).get("conditions", []):
        if condition["type"] == "Ready" and condition["status"] == "True":
            return dict(resource)
    return None


def _show(resource: dict[str, Any], objects: Any) -> None:
    status = resource["status"]
    _say("kubectl get mdb shop")
    print(
        f"  READY=True  INDEXES={status['summary']['indexes']}  VIEWS={status['summary']['views']}  "
        f"POOLER={status['summary']['pooler']}"
    )
    _say("conditions")
    for c in status["conditions"]:
        print(f"  {c['type']:18} {c['status']:6} {c['reason']:16} {c['message']}")
    _say("indexes")
    for i in status["indexes"]:
        print(f"  {i['name']:42} {i['state']}")
    _say("materialized views")
    for v in status["materializedViews"]:
        print(f"  {v['name']:20} populated={v['populated']}  {v.get('message', '')}")
    budget = status["pooler"]["budget"]
    _say("pooler budget (from the server's max_connections)")
    print(f"  {budget['message']}")
    _say("objects the operator wrote")
    for api_version, kind in (
        ("v1", "ConfigMap"),
        ("v1", "Secret"),
        ("v1", "Service"),
        ("apps/v1", "Deployment"),
        ("policy/v1", "PodDisruptionBudget"),
        ("batch/v1", "CronJob"),
    ):
        names = [
            o["metadata"]["name"]
            for o in objects.list_objects(api_version, kind, NS)
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") == naming.APP_NAME
        ]
        if names:
            print(f"  {kind:20} {', '.join(names)}")
    print("  probes applied to: bff-marketplace-home, bff-marketplace-search, bff-store-public")


async def _refresh(objects: Any, eventually: Any) -> None:
    _say("kubectl annotate mdb shop marketplacedb.io/refresh-now=1  (an on-demand refresh)")
    resource = objects.get(naming.API_VERSION, naming.KIND, NAME, NS)
    await objects.patch(resource, {"metadata": {"annotations": {naming.ANN_REFRESH_NOW: "1"}}})

    def refreshed() -> list[dict[str, Any]] | None:
        current = objects.get(naming.API_VERSION, naming.KIND, NAME, NS) or {}
        views = current.get("status", {}).get("materializedViews", [])
        return views if views and all(v.get("lastResult") for v in views) else None

    for view in await eventually(refreshed, timeout=120, message="refresh outcome in status"):
        print(f"  {view['name']:20} {view['lastResult']:18} {view.get('lastRefreshSeconds') or 0:.3f} s")
