"""The CRD is generated from the models, structural, in sync with crds/ and the chart, and valid."""

from __future__ import annotations

import pathlib
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from marketplacedb_operator.cli import main
from marketplacedb_operator.specs.crd import build_crd, crd_yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "marketplacedbs.marketplacedb.io.yaml"
CHART_CRD_FILE = ROOT / "charts" / "marketplacedb-operator" / "crds" / CRD_FILE.name
K8S_VERSION = "1.30.0"


def test_crds_directory_matches_generated() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "crds/ drifted from the models: run `make generate`"


def test_chart_crd_is_identical_copy() -> None:
    assert CHART_CRD_FILE.read_bytes() == CRD_FILE.read_bytes(), "chart crds/ differs: run `make generate`"


def test_cli_crd_prints_the_file_byte_for_byte(capsys: Any) -> None:
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == CRD_FILE.read_text()


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(build_crd(), K8S_VERSION, strict=True)


_ALLOWED_KEYS = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "pattern",
    "maxLength",
    "minLength",
    "maximum",
    "minimum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "maxItems",
    "minItems",
    "format",
    "nullable",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
    "maxProperties",
}


def _walk(node: dict[str, Any], path: str, problems: list[str]) -> None:
    """The structural-schema rules of apiextensions.k8s.io/v1, checked node by node."""
    unknown = set(node) - _ALLOWED_KEYS
    if unknown:
        problems.append(f"{path}: keys not allowed in a structural schema: {sorted(unknown)}")
    typed = "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if not typed:
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if node.get("x-kubernetes-list-type") == "map":
        item = node["items"]
        for key in node["x-kubernetes-list-map-keys"]:
            if key not in item.get("required", []) and "default" not in item["properties"][key]:
                problems.append(f"{path}: list-map key {key} must be required or defaulted")
    for name, child in node.get("properties", {}).items():
        _walk(child, f"{path}.{name}", problems)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], f"{path}[]", problems)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}{{}}", problems)


def test_schema_is_structural() -> None:
    version = build_crd()["spec"]["versions"][0]
    problems: list[str] = []
    _walk(version["schema"]["openAPIV3Schema"], "", problems)
    assert problems == []


def test_crd_shape() -> None:
    crd = build_crd()["spec"]
    version = crd["versions"][0]
    assert crd["names"]["shortNames"] == ["mdb"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Ready", "Indexes", "Views", "Pooler", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["indexes"]["x-kubernetes-list-map-keys"] == ["name"]
    assert spec["materializedViews"]["x-kubernetes-list-type"] == "map"


def test_example_is_valid_against_the_crd_schema() -> None:
    example = yaml.safe_load((ROOT / "examples" / "marketplacedb.yaml").read_text())
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate(example, _as_json_schema(schema))


def _as_json_schema(node: Any) -> Any:
    """OpenAPI v3 extensions to plain JSON Schema, so jsonschema can check a manifest."""
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    return out


def test_readme_reference_is_in_sync() -> None:
    from marketplacedb_operator.specs.reference import with_reference

    readme = (ROOT / "README.md").read_text()
    assert readme == with_reference(readme), "README resource reference drifted: run `make generate`"


def _leaves(node: dict[str, Any], path: str) -> Any:
    """Every property of the schema (spec and status, nested), with its path."""
    for name, child in node.get("properties", {}).items():
        yield f"{path}.{name}", child
        yield from _leaves(child, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(node.get(key), dict):
            yield from _leaves(node[key], path + suffix)


def test_every_field_has_a_description() -> None:
    """`kubectl explain` has text for every field, spec and status alike (from the models)."""
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    bare = [path for path, node in _leaves(root, "") if not node.get("description", "").strip()]
    assert bare == [], f"fields without a description (add Field(description=...) or a docstring): {bare}"


def test_every_string_list_and_map_is_bounded() -> None:
    """maxLength/maxItems/maxProperties everywhere: the API server bounds CEL cost with them."""
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = [("(root)", root), *_leaves(root, "")]
    unbounded = []
    for path, node in nodes:
        kind = node.get("type")
        if (kind == "string" or node.get("x-kubernetes-int-or-string")) and "enum" not in node:
            unbounded += [] if "maxLength" in node else [path]
        elif kind == "array":
            unbounded += [] if "maxItems" in node else [path]
            if node["items"].get("type") == "string" and "maxLength" not in node["items"]:
                unbounded.append(path + "[]")
        elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
            unbounded += [] if "maxProperties" in node else [path]
    assert [p for p in unbounded if p not in (".apiVersion", ".kind")] == []


def test_models_enforce_the_default_bounds_the_crd_declares() -> None:
    """A field without its own bound gets the CRD's default in the models too (same verdict)."""
    import pydantic

    from marketplacedb_operator.api import bounds
    from marketplacedb_operator.api.v1alpha1 import MarketplaceDB

    document = yaml.safe_load((ROOT / "examples" / "marketplacedb.yaml").read_text())
    document["spec"]["database"]["credentialsSecretRef"]["usernameKey"] = "u" * (bounds.DEFAULT_MAX_LENGTH + 1)
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    key = schema["properties"]["spec"]["properties"]["database"]["properties"]["credentialsSecretRef"]
    assert key["properties"]["usernameKey"]["maxLength"] == bounds.DEFAULT_MAX_LENGTH
    try:
        MarketplaceDB.model_validate(document)
    except pydantic.ValidationError as exc:
        assert "longer than 1024" in str(exc)
    else:
        raise AssertionError("an over-long unbounded field passed the models")
