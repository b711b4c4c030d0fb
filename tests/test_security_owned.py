"""Issue 13, findings 2 and 3: Kubernetes objects the operator did not create are never taken over
by name, and application Deployments get probes only when they invite a MarketplaceDB, from one
field manager per resource, without a PATCH per resync and without two resources fighting.

The reconciler runs on KMock with the real Kubernetes gateway and the session's PostgreSQL 15."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kubernetes_validate
import psycopg
import pytest

from marketplacedb_operator import naming
from marketplacedb_operator.settings import Settings
from security_env import API, NS, Sec, resource, sec_env, secret

SETTINGS = Settings(connect_timeout_seconds=3, resync_seconds=1)
VIEW = "mv_items"


@pytest.fixture
async def sec(kube_api: Any, kube_objects: Any, kube_client: Any, fresh_db: Any) -> AsyncIterator[Sec]:
    with psycopg.connect(fresh_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
    async with sec_env(kube_api, kube_objects, kube_client, SETTINGS) as env:
        await env.objects.create(secret("own", {"username": fresh_db.owner, "password": fresh_db.owner_password},
                                        opted_in=True, bound="shop,rival"))
        env.db = fresh_db  # type: ignore[attr-defined]
        yield env


def _database(db: Any) -> dict[str, Any]:
    return {"host": db.server.host, "port": db.server.port, "dbname": db.name, "sslMode": "disable",
            "credentialsSecretRef": {"name": "own"}}


def _view() -> dict[str, Any]:
    return {"name": VIEW, "query": "SELECT id, name FROM items", "uniqueKey": ["id"],
            "refresh": {"schedule": "*/5 * * * *"}}


def _history(sec: Sec, api_version: str, kind: str, name: str) -> int:
    return len(sec.objects.history(api_version, kind, name, NS))


def _deployment(name: str, probed_by: str | None, containers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    annotations = {naming.ANN_PROBED_BY: probed_by} if probed_by else {}
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS, "annotations": annotations},
            "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
                "containers": containers or [{"name": "app", "image": "example.com/app:1"}]}}}}


# --- finding 2: owned objects -------------------------------------------------------------------


async def test_objects_named_like_ours_are_not_taken_over(sec: Sec) -> None:
    pooler, cronjob = naming.pooler_name("shop"), naming.refresh_cronjob_name("shop", VIEW)
    # Someone else's ConfigMap with our name *and* our labels, and a CronJob with our name.
    await sec.objects.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": pooler, "namespace": NS, "labels": naming.labels("shop", "pooler")}, "data": {"owner": "team-b"}})
    await sec.objects.create({"apiVersion": "batch/v1", "kind": "CronJob",
                              "metadata": {"name": cronjob, "namespace": NS},
                              "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": {"spec": {
                                  "containers": [{"name": "x", "image": "team-b/job:1"}]}}}}}})
    await sec.objects.create(resource(_database(sec.db), pooler={"enabled": True},  # type: ignore[attr-defined]
                                      materializedViews=[_view()]))
    mark = len(sec.writes())
    await sec.reconcile()

    pooler_cond, refresh_cond = sec.condition("PoolerAvailable"), sec.condition("RefreshScheduled")
    assert (pooler_cond["status"], pooler_cond["reason"]) == ("False", "Conflict")
    assert f"ConfigMap {NS}/{pooler} exists and was not created by this MarketplaceDB" in pooler_cond["message"]
    assert (refresh_cond["status"], refresh_cond["reason"]) == ("False", "Conflict")
    assert f"CronJob {NS}/{cronjob}" in refresh_cond["message"]
    # Nothing was written: the foreign objects are untouched and no other pooler part exists.
    assert _history(sec, "v1", "ConfigMap", pooler) == 1 and _history(sec, "batch/v1", "CronJob", cronjob) == 1
    assert sec.objects.get("v1", "ConfigMap", pooler, NS)["data"] == {"owner": "team-b"}
    for kind, api_version in (("Deployment", "apps/v1"), ("Service", "v1"), ("PodDisruptionBudget", "policy/v1")):
        assert sec.objects.get(api_version, kind, pooler, NS) is None, kind
    assert sec.objects.get("v1", "Secret", naming.pooler_auth_secret_name("shop"), NS) is None
    assert [w for w in sec.writes()[mark:] if "/marketplacedbs/" not in w] == []

    # Once the names are free, the objects are created, ours, valid; an idle pass writes nothing.
    await sec.objects.delete(sec.objects.get("v1", "ConfigMap", pooler, NS))
    await sec.objects.delete(sec.objects.get("batch/v1", "CronJob", cronjob, NS))
    await sec.reconcile()
    assert sec.condition("RefreshScheduled")["status"] == "True"
    uid = sec.objects.get(API, "MarketplaceDB", "shop", NS)["metadata"]["uid"]
    for api_version, kind, name in (("v1", "ConfigMap", pooler), ("batch/v1", "CronJob", cronjob),
                                    ("apps/v1", "Deployment", pooler)):
        obj = sec.objects.get(api_version, kind, name, NS)
        assert [r["uid"] for r in obj["metadata"]["ownerReferences"] if r["controller"]] == [uid]
    cronjob_body = sec.objects.get("batch/v1", "CronJob", cronjob, NS)
    clean = {k: v for k, v in cronjob_body.items() if k != "status"}
    clean["metadata"] = {k: cronjob_body["metadata"][k] for k in ("name", "namespace", "labels", "ownerReferences")}
    kubernetes_validate.validate(clean, "1.30.0", strict=True)
    before = len(sec.writes())
    await sec.reconcile()
    assert [w for w in sec.writes()[before:] if "/marketplacedbs/" not in w] == []


async def test_objects_with_our_labels_but_not_ours_are_not_deleted(sec: Sec) -> None:
    extra, auth = "shop-pooler-extra", naming.pooler_auth_secret_name("shop")
    labels = naming.labels("shop", "pooler")
    await sec.objects.create({"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": extra, "namespace": NS, "labels": labels}, "data": {"k": "v"}})
    await sec.objects.create({"apiVersion": "v1", "kind": "Secret",
                              "metadata": {"name": auth, "namespace": NS, "labels": labels}, "data": {}})
    await sec.objects.create(resource(_database(sec.db)))  # type: ignore[attr-defined]
    mark = len(sec.writes())
    await sec.reconcile()  # pooler disabled: the operator prunes the pooler component
    assert sec.objects.get("v1", "ConfigMap", extra, NS) is not None
    assert sec.objects.get("v1", "Secret", auth, NS) is not None
    assert [w for w in sec.writes()[mark:] if "DELETE" in w] == []


# --- finding 3: probes --------------------------------------------------------------------------


def _operator_writes(sec: Sec, deployment: str) -> list[str]:
    """The operator's writes to a Deployment (its requests name a field manager; the test's do not)."""
    return [w for w in sec.writes(f"/deployments/{deployment}") if "fieldManager=" in w]


PROBE = {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 5}


def _defaulted(probe: dict[str, Any]) -> dict[str, Any]:
    """The probe as a real API server stores and returns it."""
    out = {"initialDelaySeconds": 0, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1,
           "failureThreshold": 3, **copy.deepcopy(probe)}
    out["httpGet"] = {"scheme": "HTTP", **out["httpGet"]}
    return out


async def test_a_deployment_that_does_not_opt_in_is_not_patched(sec: Sec) -> None:
    await sec.objects.create(_deployment("payments", probed_by=None))
    await sec.objects.create(_deployment("search", probed_by="another-mdb"))
    await sec.objects.create(resource(_database(sec.db),  # type: ignore[attr-defined]
                                      healthProbes=[{"deployment": "payments", "readiness": PROBE},
                                                    {"deployment": "search", "readiness": PROBE}]))
    await sec.reconcile()
    cond = sec.condition("ProbesApplied")
    assert (cond["status"], cond["reason"]) == ("False", "ProbeTargetNotOptedIn")
    assert naming.ANN_PROBED_BY in cond["message"] and "payments" in cond["message"] and "search" in cond["message"]
    assert sec.writes("/deployments/") == []
    assert _history(sec, "apps/v1", "Deployment", "payments") == 1


async def test_probes_use_the_resources_own_field_manager_and_tolerate_api_defaults(sec: Sec) -> None:
    await sec.objects.create(_deployment("web", probed_by="other, shop"))
    await sec.objects.create(resource(_database(sec.db),  # type: ignore[attr-defined]
                                      healthProbes=[{"deployment": "web", "readiness": PROBE, "liveness": PROBE}]))
    await sec.reconcile()
    assert sec.condition("ProbesApplied")["status"] == "True"
    writes = _operator_writes(sec, "web")
    assert len(writes) == 1 and "fieldManager=marketplacedb-operator/probes/shop" in writes[0]
    assert "force" not in writes[0]
    live = sec.objects.get("apps/v1", "Deployment", "web", NS)
    assert live["metadata"]["annotations"][naming.PROBE_CLAIM_PREFIX + "app"] == "shop/readiness,liveness"

    # What a real API server returns: every probe default filled in. No write may follow.
    container = live["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"] = _defaulted(PROBE)
    container["livenessProbe"] = _defaulted(PROBE)
    await sec.objects.patch(live, {"spec": {"template": {"spec": {"containers": [container]}}}})
    await sec.reconcile()
    await sec.reconcile()
    assert len(_operator_writes(sec, "web")) == 1

    # A real change (the period) is written once.
    body = sec.objects.get(API, "MarketplaceDB", "shop", NS)
    changed = {"deployment": "web", "readiness": {**PROBE, "periodSeconds": 7}, "liveness": PROBE}
    await sec.objects.patch_spec(body, {"healthProbes": [changed]})
    await sec.reconcile()
    assert len(_operator_writes(sec, "web")) == 2


async def test_two_resources_naming_one_container_conflict_instead_of_fighting(sec: Sec) -> None:
    await sec.objects.create(_deployment("web", probed_by="shop,rival"))
    database = _database(sec.db)  # type: ignore[attr-defined]
    await sec.objects.create(resource(database, healthProbes=[{"deployment": "web", "readiness": PROBE}]))
    other = {**PROBE, "periodSeconds": 30}
    await sec.objects.create(resource(database, name="rival", healthProbes=[{"deployment": "web", "readiness": other}]))
    await sec.reconcile("shop")
    applied = _operator_writes(sec, "web")
    for _ in range(2):
        await sec.reconcile("rival")
        await sec.reconcile("shop")
    cond = sec.condition("ProbesApplied", "rival")
    assert (cond["status"], cond["reason"]) == ("False", "Conflict")
    assert "container app: probes are set by MarketplaceDB shop" in cond["message"]
    assert _operator_writes(sec, "web") == applied  # one write, by shop; rival never wrote
    probe = sec.objects.get("apps/v1", "Deployment", "web", NS)["spec"]["template"]["spec"]["containers"][0]
    assert probe["readinessProbe"]["periodSeconds"] == 5
    assert sec.condition("ProbesApplied", "shop")["status"] == "True"


@pytest.mark.parametrize("holder", ["marketplacedb-operator", "kubectl-client-side-apply"])
async def test_a_field_conflict_is_reported_unless_it_is_the_former_shared_manager(sec: Sec, holder: str) -> None:
    """The API server answers 409 when another manager owns a probe field (KMock has no field
    ownership: the answer is the API server's, played by a reaction). The operator's own former
    shared manager is migrated (a forced apply); anyone else's field is a Conflict."""
    message = (f'Apply failed with 1 conflict: conflict with "{holder}" using apps/v1: '
               '.spec.template.spec.containers[name="app"].readinessProbe.periodSeconds')

    answered: list[bool] = []

    def first_apply(request: Any) -> bool:
        return (request.method == "PATCH" and request.resource is not None and request.name == "web"
                and "force" not in request.params and not answered)

    def conflict(_: Any) -> None:
        answered.append(True)
        raise kmock.KubernetesError(status=409, reason="Conflict", message=message)

    sec.api[first_apply] << conflict
    await sec.objects.create(_deployment("web", probed_by="shop"))
    await sec.objects.create(resource(_database(sec.db),  # type: ignore[attr-defined]
                                      healthProbes=[{"deployment": "web", "readiness": PROBE}]))
    await sec.reconcile()
    writes = _operator_writes(sec, "web")
    cond = sec.condition("ProbesApplied")
    if holder == "marketplacedb-operator":
        assert len(writes) == 2 and "force" not in writes[0] and "force=true" in writes[1]
        assert cond["status"] == "True"
    else:
        assert len(writes) == 1 and "force" not in writes[0]
        assert (cond["status"], cond["reason"]) == ("False", "Conflict")
        assert f'conflict with "{holder}"' in cond["message"]
