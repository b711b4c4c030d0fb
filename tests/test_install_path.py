"""The install path from a private registry: chart values -> operator settings -> every pod it creates.

A platform team pushes the image to its own registry and sets `image.*` and `imagePullSecrets`.
The operator's pod gets them from the chart; the pods the operator creates in application
namespaces (refresh CronJobs, the pooler with its agent sidecar) must get them too, through the
operator's settings. The chart is rendered by tests/chart_render.py (Helm cannot run here).
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chart_render import render_chart
from marketplacedb_operator import install
from marketplacedb_operator.cli import main
from marketplacedb_operator.cli.manifest import load_resources
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.specs.cronjobs import build_cronjobs
from marketplacedb_operator.specs.pgbouncer import PoolerCredentials
from marketplacedb_operator.specs.pooler_manifests import build_pooler
from marketplacedb_operator.specs.pooler_sizing import compute_budget

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "marketplacedb-operator"
PRIVATE = {
    "image": {"repository": "registry.example.com/platform/marketplacedb-operator", "tag": "0.1.0-rc1",
              "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry-cred"}, {"name": "mirror-cred"}],
}


def _operator_env(values: dict[str, Any]) -> dict[str, str]:
    (deployment,) = render_chart(CHART, values).find("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _pods_the_operator_creates(settings: Settings) -> list[dict[str, Any]]:
    (resource,) = load_resources(str(ROOT / "examples" / "marketplacedb.yaml"))
    spec = resource.spec
    spec.pooler.metrics.enabled = True  # the exporter sidecar too
    meta = {"metadata": {"name": "shop", "namespace": "prod", "uid": "6c1a3c2e-0000-4000-8000-000000000001"}}
    budget = compute_budget(spec.pooler, settings, 100, 3)
    objects = [*build_cronjobs(meta, spec, settings),
               *build_pooler(meta, spec, settings, budget, PoolerCredentials("owner", "pw"))]
    for obj in objects:
        if obj["kind"] in ("CronJob", "Deployment"):
            kubernetes_validate.validate(copy.deepcopy(obj), "1.30.0", strict=True)
    pods = [o["spec"]["jobTemplate"]["spec"]["template"]["spec"] for o in objects if o["kind"] == "CronJob"]
    pods += [o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"]
    assert len(pods) == 3, "two refresh CronJobs and the pooler"
    return pods


def test_private_registry_reaches_every_pod_the_operator_creates() -> None:
    env = _operator_env(PRIVATE)
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("MARKETPLACEDB_")})
    assert settings.operator_image == "registry.example.com/platform/marketplacedb-operator:0.1.0-rc1"
    for pod in _pods_the_operator_creates(settings):
        assert pod["imagePullSecrets"] == [{"name": "registry-cred"}, {"name": "mirror-cred"}]
        for container in pod["containers"]:
            assert container["imagePullPolicy"] == "Always", container["name"]
        images = {c["name"]: c["image"] for c in pod["containers"]}
        for name in ("refresh", "agent"):  # one image for the operator, its CronJobs and the agent
            if name in images:
                assert images[name] == settings.operator_image


def test_defaults_give_no_pull_secret_and_if_not_present() -> None:
    env = _operator_env({})
    assert "MARKETPLACEDB_IMAGE_PULL_SECRETS" not in env
    settings = Settings.from_env(env)
    for pod in _pods_the_operator_creates(settings):
        assert "imagePullSecrets" not in pod
        assert {c["imagePullPolicy"] for c in pod["containers"]} == {"IfNotPresent"}


def test_install_yaml_builder_matches_the_chart_with_a_private_registry() -> None:
    """deploy/install.yaml's builder, given the same values, passes the same settings as the chart."""
    values = {**copy.deepcopy(install.DEFAULT_VALUES), **copy.deepcopy(PRIVATE)}
    (built,) = [o for o in install.install_manifests(values) if o["kind"] == "Deployment"]
    (rendered,) = render_chart(CHART, PRIVATE).find("Deployment")
    for deployment in (built, rendered):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["imagePullSecrets"] == PRIVATE["imagePullSecrets"]
    built_env = built["spec"]["template"]["spec"]["containers"][0]["env"]
    rendered_env = rendered["spec"]["template"]["spec"]["containers"][0]["env"]
    assert built_env == rendered_env


def test_the_chart_refuses_a_pull_secret_that_is_not_a_secret_name() -> None:
    with pytest.raises(jsonschema.ValidationError):
        render_chart(CHART, {"imagePullSecrets": [{"name": "Registry_Cred"}]})


@pytest.mark.parametrize(("variable", "value"), [
    ("MARKETPLACEDB_IMAGE_PULL_POLICY", "Sometimes"),
    ("MARKETPLACEDB_IMAGE_PULL_SECRETS", "Registry_Cred"),
])
def test_bad_pull_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=variable):
        Settings.from_env({variable: value})


def test_install_manifests_with_your_own_image(capsys: pytest.CaptureFixture[str]) -> None:
    """The plain-manifest route: `install-manifests --image ... --image-pull-secret ...` = the chart's objects."""
    image = "registry.example.com:5000/platform/marketplacedb-operator:0.1.0-rc1"
    assert main(["install-manifests", "--image", image, "--image-pull-policy", "Always",
                 "--image-pull-secret", "registry-cred", "--image-pull-secret", "mirror-cred"]) == 0
    documents = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    (rendered,) = render_chart(CHART, {**PRIVATE, "image": {"repository": image.rsplit(":", 1)[0],
                                                            "tag": "0.1.0-rc1", "pullPolicy": "Always"}},
                               ).find("Deployment")
    assert deployment["spec"]["template"] == {
        **rendered["spec"]["template"],
        "metadata": deployment["spec"]["template"]["metadata"],  # Helm's own labels aside
    }
    assert main(["install-manifests", "--image", "registry.example.com:5000/no-tag"]) == 2
    assert main(["install-manifests", "--image-pull-secret", "Not_A_Name"]) == 2
    assert "MARKETPLACEDB_IMAGE_PULL_SECRETS" in capsys.readouterr().err


# --- settings: typed by pydantic-settings, a bad value is one line naming the variable ----------

@pytest.mark.parametrize(("variable", "value", "words"), [
    ("MARKETPLACEDB_RESYNC_SECONDS", "abc", "valid number"),
    ("MARKETPLACEDB_RESYNC_SECONDS", "-1", "greater than 0"),
    ("MARKETPLACEDB_METRICS_PORT", "99999", "less than or equal to 65535"),
    ("MARKETPLACEDB_DDL_RETRIES", "1.5", "valid integer"),
])
def test_bad_setting_is_one_line_naming_variable_and_value(variable: str, value: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        Settings.from_env({variable: value})
    assert str(caught.value).startswith(f"{variable}={value!r}: ") and words in str(caught.value)
    assert "\n" not in str(caught.value) and "pydantic" not in str(caught.value)


def test_settings_read_only_the_mapping_given() -> None:
    environ = {"MARKETPLACEDB_NAMESPACES": "shop, billing,", "MARKETPLACEDB_TICK_SECONDS": "0.5",
               "MARKETPLACEDB_DSN": "not a setting: ignored"}
    settings = Settings.from_env(environ)
    assert settings.namespaces == ("shop", "billing") and settings.tick_seconds == 0.5
    assert Settings() == Settings.from_env({})  # construction reads no environment


def test_apply_with_a_bad_setting_is_a_clear_error_not_a_traceback(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MARKETPLACEDB_RESYNC_SECONDS", "soon")
    example = pathlib.Path(__file__).parent.parent / "examples" / "marketplacedb.yaml"
    assert main(["apply", "-f", str(example), "--dsn", "host=127.0.0.1 dbname=nowhere"]) == 2
    assert capsys.readouterr().err.strip() == (
        "marketplacedb: MARKETPLACEDB_RESYNC_SECONDS='soon': Input should be a valid number, "
        "unable to parse string as a number")
