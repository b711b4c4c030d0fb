"""The chart's opt-in webhook: off by default; with cert-manager or a given certificate it wires
a ValidatingWebhookConfiguration to the operator's kopf endpoint, scoped so that a down
operator never blocks anything but (with failurePolicy Fail) MarketplaceDB writes."""

from __future__ import annotations

import base64
import os
import pathlib
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from chart_render import Rendered, render_chart
from marketplacedb_operator import webhook
from marketplacedb_operator.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "marketplacedb-operator"
K8S_VERSION = "1.30.0"
CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()
CERT_MANAGER = {"webhook": {"enabled": True}}
OWN_CERT = {"webhook": {"enabled": True, "certManager": {"enabled": False}, "secretName": "mdb-tls", "caBundle": CA}}


def _container(rendered: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = rendered.find("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_off_by_default() -> None:
    rendered = render_chart(CHART)
    assert rendered.find("ValidatingWebhookConfiguration") == [] and rendered.find("Certificate") == []
    pod, container = _container(rendered)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert not webhook.enabled(Settings.from_env(env))
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]


@pytest.mark.parametrize("values", [CERT_MANAGER, OWN_CERT], ids=["cert-manager", "own-certificate"])
def test_enabled_wires_the_operator_endpoint(values: dict[str, Any]) -> None:
    rendered = render_chart(CHART, values)
    for obj in rendered.objects:
        if obj["kind"] not in ("Certificate", "Issuer"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    (config,) = rendered.find("ValidatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 5 and hook["sideEffects"] == "None"
    assert hook["rules"] == [{"apiGroups": ["marketplacedb.io"], "apiVersions": ["v1alpha1"],
                              "operations": ["CREATE", "UPDATE"], "resources": ["marketplacedbs"],
                              "scope": "Namespaced"}]
    service_ref = hook["clientConfig"]["service"]
    assert service_ref["path"] == f"/{webhook.HANDLER_ID}"
    (service,) = rendered.find("Service", service_ref["name"])
    pod, container = _container(rendered)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] == "webhook" and ports["webhook"] == 9443
    # The operator, started with this env and these mounts, serves the certificate the hook trusts.
    settings = Settings.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    assert webhook.enabled(settings) and settings.webhook_port == 9443
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "webhook-cert"]
    assert os.path.dirname(settings.webhook_certfile) == mount["mountPath"] == os.path.dirname(settings.webhook_keyfile)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-cert"]
    if values is OWN_CERT:
        assert volume["secret"]["secretName"] == "mdb-tls" and hook["clientConfig"]["caBundle"] == CA
        assert rendered.find("Certificate") == []
    else:
        (certificate,) = rendered.find("Certificate")
        assert certificate["spec"]["secretName"] == volume["secret"]["secretName"]
        assert f"{service['metadata']['name']}.marketplacedb-system.svc" in certificate["spec"]["dnsNames"]
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
            f"marketplacedb-system/{certificate['metadata']['name']}")
        assert [i["metadata"]["name"] for i in rendered.find("Issuer")] == [certificate["spec"]["issuerRef"]["name"]]


def test_watched_namespaces_scope_the_webhook() -> None:
    rendered = render_chart(CHART, {**CERT_MANAGER, "watchNamespaces": ["shop"]})
    (config,) = rendered.find("ValidatingWebhookConfiguration")
    selector = config["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]
    assert selector == {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop"]}


def test_own_certificate_needs_secret_and_ca() -> None:
    with pytest.raises(jsonschema.ValidationError):
        render_chart(CHART, {"webhook": {"enabled": True, "certManager": {"enabled": False}}})
