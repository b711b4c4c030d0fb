"""One corpus, three judges, one verdict (issue 17).

Every case in tests/admission_corpus.py goes through the models, through the generated CRD
as the API server applies it (schema, defaults, list-map keys, and the x-kubernetes-validations
rules evaluated by cel-python), and through the operator's validating webhook: kopf serving the
real handlers over HTTPS (a self-signed certificate made here), sent real AdmissionReview JSON.
The CRD refuses what CEL can express; the webhook and models refuse the rest; both together
give the models' verdict on every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import pathlib
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
import kubernetes.client
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from admission_corpus import CORPUS, Case
from celcost import STATIC_ESTIMATED_COST_LIMIT, STATIC_ESTIMATED_CRD_COST_LIMIT, crd_rule_costs
from crd_admission import crd_problems, crd_schema
from harness.kube import KubeEmulator, eventually, kopf_runner
from marketplacedb_operator import handlers, webhook
from marketplacedb_operator.api.errors import format_errors
from marketplacedb_operator.api.v1alpha1 import MarketplaceDB
from marketplacedb_operator.cli.wiring import make_deps
from marketplacedb_operator.settings import Settings as OperatorSettings

IDS = [c.id for c in CORPUS]


def _model_problems(document: dict[str, Any]) -> list[str]:
    try:
        MarketplaceDB.model_validate(document)
    except ValidationError as exc:
        return format_errors(exc)
    return []


def test_corpus_covers_every_layer() -> None:
    layers = [c.layer for c in CORPUS]
    assert len(CORPUS) >= 60 and len(set(IDS)) == len(IDS)
    assert min(layers.count("ok"), layers.count("webhook")) >= 10 and layers.count("crd") >= 40


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_models_verdict(case: Case) -> None:
    problems = _model_problems(case.document)
    assert bool(problems) == (case.layer != "ok"), problems
    assert all(": " in p for p in problems)  # each names its field


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_crd_verdict(case: Case) -> None:
    """The CRD refuses exactly the cases CEL and the schema can express, and accepts the rest."""
    problems = crd_problems(case.document)
    assert not any("error evaluating" in p for p in problems), problems
    assert bool(problems) == (case.layer == "crd"), problems


def _leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, (*prefix, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


LEAVES = _leaf_paths(CORPUS[0].document)
HOSTILE_TEXT = st.lists(st.sampled_from(["\x00", "'", '"', ";", "$1", "(", ")", "NOT ", " || ", "\n", "é",
                                         "*", "/", "-", "@", "0", "9", "a", "Z", " ", ",", "?", "::", "%"]),
                        max_size=30).map("".join)
ANY_VALUE = st.one_of(HOSTILE_TEXT, st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                      st.just([]), st.just({}), st.just({"a": 1}), st.just("x" * 70000))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(LEAVES), ANY_VALUE), min_size=1, max_size=3))
def test_random_edits_never_crash_and_the_crd_is_never_stricter(edits: list[tuple[tuple[Any, ...], Any]]) -> None:
    """Whatever a leaf holds: the models give a verdict (no other exception), every CEL rule
    evaluates, and the CRD never refuses what the operator would accept."""
    document = copy.deepcopy(CORPUS[0].document)
    for path, value in edits:
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    model = _model_problems(document)
    crd = crd_problems(document)
    assert not any("error evaluating" in p for p in crd), crd
    assert not crd or model, crd


# --- CEL cost ---------------------------------------------------------------------------------------


def test_cel_cost_is_under_the_kubernetes_limits() -> None:
    costs = crd_rule_costs(crd_schema())
    assert len(costs) >= 10
    too_expensive = [(c.path, c.total) for c in costs if c.total > STATIC_ESTIMATED_COST_LIMIT]
    assert too_expensive == []
    total = sum(c.total for c in costs)
    assert total < STATIC_ESTIMATED_CRD_COST_LIMIT, total


def test_cost_estimate_grows_with_bounds() -> None:
    """The estimator is not blind: an unbounded list makes the uniqueness rule explode."""
    schema = crd_schema()
    unique_key = schema["properties"]["spec"]["properties"]["materializedViews"]["items"]["properties"]["uniqueKey"]
    bounded = crd_rule_costs(unique_key)[0].cost
    del unique_key["maxItems"]
    assert crd_rule_costs(unique_key)[0].cost > STATIC_ESTIMATED_COST_LIMIT > 100 * bounded


# --- the webhook, over HTTPS -------------------------------------------------------------------------


def _certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def _review(document: dict[str, Any], operation: str = "CREATE", old: dict[str, Any] | None = None) -> dict[str, Any]:
    metadata = document.get("metadata", {})
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "marketplacedb.io", "version": "v1alpha1", "kind": "MarketplaceDB"},
            "resource": {"group": "marketplacedb.io", "version": "v1alpha1", "resource": "marketplacedbs"},
            "requestKind": {"group": "marketplacedb.io", "version": "v1alpha1", "kind": "MarketplaceDB"},
            "requestResource": {"group": "marketplacedb.io", "version": "v1alpha1", "resource": "marketplacedbs"},
            "name": metadata.get("name"),
            "namespace": metadata.get("namespace", "prod"),
            "operation": operation,
            "userInfo": {"username": "kubernetes-admin", "groups": ["system:masters"]},
            "object": document,
            "oldObject": old,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


class WebhookClient:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def review(self, document: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        review = _review(document, **kwargs)
        async with self.session.post(self.url, data=json.dumps(review),
                                     headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
        assert body["kind"] == "AdmissionReview" and body["response"]["uid"] == review["request"]["uid"]
        result: dict[str, Any] = body["response"]
        return result


@contextlib.asynccontextmanager
async def serving_webhook(kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient,
                          directory: pathlib.Path) -> AsyncIterator[WebhookClient]:
    """kopf with the operator's handlers and the webhook on; run inside the test's own task
    (kopf cancels tasks started after it when it stops, so it must not straddle a fixture)."""
    cert, key = _certificate(directory)
    port = kopf.WebhookServer._allocate_free_port()
    operator_settings = OperatorSettings(webhook_port=port, webhook_addr="127.0.0.1", webhook_certfile=str(cert),
                        webhook_keyfile=str(key))
    registry = kopf.OperatorRegistry()
    handlers.register(registry, make_deps(operator_settings, kube_client))
    context = ssl.create_default_context(cafile=str(cert))  # the client verifies the server's certificate
    async with kopf_runner(kube_api, registry, namespaces=["prod"]), aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        client = WebhookClient(session, f"https://127.0.0.1:{port}/{webhook.HANDLER_ID}")

        async def serving() -> bool:
            try:
                await client.review(CORPUS[0].document)
                return True
            except aiohttp.ClientConnectionError:
                return False

        await eventually(serving, timeout=30, message="webhook serving")
        yield client


async def test_webhook_gives_the_models_verdict_on_every_case(
    kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient, tmp_path: pathlib.Path
) -> None:
    wrong = []
    async with serving_webhook(kube_api, kube_client, tmp_path) as client:
        for case in CORPUS:
            response = await client.review(case.document)
            expected = _model_problems(case.document)
            if response["allowed"] != (not expected):
                wrong.append((case.id, response))
            elif expected:
                status = response["status"]
                if status["code"] != 422 or expected[0] not in status["message"]:
                    wrong.append((case.id, status))
    assert wrong == []


async def test_webhook_lets_unchanged_specs_and_deletions_through(
    kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient, tmp_path: pathlib.Path
) -> None:
    """A resource stored before the webhook (or the CRD rules) existed must still lose its finalizer;
    only the spec is judged."""
    bad = next(c for c in CORPUS if c.id == "predicate OFFSET").document
    good = CORPUS[0].document
    async with serving_webhook(kube_api, kube_client, tmp_path) as client:
        created = await client.review(bad)
        finalizer_removed = dict(bad, metadata=dict(bad["metadata"], finalizers=[]))
        unchanged = await client.review(finalizer_removed, operation="UPDATE", old=bad)
        deleting = dict(bad, metadata=dict(bad["metadata"], deletionTimestamp="2026-01-01T00:00:00Z"))
        while_deleting = await client.review(deleting, operation="UPDATE", old=good)
        changed = await client.review(bad, operation="UPDATE", old=good)
        # A status from another operator version does not block a good spec.
        stale_status = await client.review(dict(good, status={"indexes": "not a list"}), operation="UPDATE", old=bad)
    assert not created["allowed"] and unchanged["allowed"] and while_deleting["allowed"]
    assert stale_status["allowed"]
    assert not changed["allowed"] and "spec.indexes[0].where" in changed["status"]["message"]


async def test_webhook_off_by_default(kube_api: KubeEmulator, kube_client: kubernetes.client.ApiClient) -> None:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, make_deps(OperatorSettings(), kube_client))
    assert registry._webhooks.get_all_handlers() == []
    async with kopf_runner(kube_api, registry, namespaces=["prod"]):
        await asyncio.sleep(0.5)  # kopf refuses to run validate handlers without a server: it runs
