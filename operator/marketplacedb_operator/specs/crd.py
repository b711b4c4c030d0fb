"""The MarketplaceDB CustomResourceDefinition, generated from the pydantic models.

pydantic emits JSON Schema with `$ref`, `anyOf` for optionals, `const` and `title`; a CRD needs a
*structural* schema: every node typed, no `$ref`, unions only as int-or-string. This module
turns one into the other, deterministically, so `crds/` can be checked for drift byte for byte.
"""

from __future__ import annotations

from typing import Any

import yaml

from .. import naming
from ..api import bounds
from ..api.v1alpha1 import MarketplaceDBSpec, MarketplaceDBStatus

_DROP = {"title", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return {k: _resolve(v, defs) for k, v in node.items() if k not in _DROP and k != "$defs"}


_SPEC_BOUNDS = (bounds.DEFAULT_MAX_LENGTH, bounds.DEFAULT_MAX_ITEMS, bounds.DEFAULT_MAX_PROPERTIES)
_STATUS_BOUNDS = (bounds.STATUS_MAX_LENGTH, bounds.STATUS_MAX_ITEMS, bounds.STATUS_MAX_PROPERTIES)


def _bounded(node: dict[str, Any], limits: tuple[int, int, int]) -> None:
    """Every string, list and map gets a maximum size (the model's, else the default): the API
    server estimates a CEL rule's cost from them, and refuses a CRD whose rules may cost too much."""
    max_length, max_items, max_properties = limits
    kind = node.get("type")
    if (kind == "string" or node.get("x-kubernetes-int-or-string")) and "enum" not in node:
        node.setdefault("maxLength", max_length)
    elif kind == "array":
        node.setdefault("maxItems", max_items)
    elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
        node.setdefault("maxProperties", max_properties)


def _structural(node: Any, limits: tuple[int, int, int] = _SPEC_BOUNDS) -> Any:
    """Rewrite unions, consts and nulls into what the Kubernetes API server accepts."""
    if isinstance(node, list):
        return [_structural(item, limits) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: (v if k == "x-kubernetes-validations" else _structural(v, limits)) for k, v in node.items()}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        types = {o.get("type") for o in options}
        if len(options) == 1:
            node = {**options[0], **node}
        elif types <= {"integer", "string"}:
            # int | "auto", int | port name: Kubernetes' int-or-string.
            node["x-kubernetes-int-or-string"] = True
        else:  # pragma: no cover - guarded by the structural-schema test
            raise ValueError(f"union not representable in a CRD: {options}")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("default", "absent") is None:
        del node["default"]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if node.get("additionalProperties") is False:
        # extra="forbid" in the models; a CRD may not say so (the API server prunes unknown fields).
        del node["additionalProperties"]
    if node.get("type") == "object" and node.get("additionalProperties") is True:
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
        node["x-kubernetes-preserve-unknown-fields"] = True
    _bounded(node, limits)
    return node


def model_schema(model: type[Any], limits: tuple[int, int, int] = _SPEC_BOUNDS) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _structural(_resolve(raw, raw.get("$defs", {})), limits)
    return schema


# metadata.name is the one metadata field CEL may read; it also becomes a label value and part of
# object names, so it must be a DNS-1123 label (the models check the same: api/v1alpha1.py).
NAME_RULE = {
    "rule": f"self.metadata.name.matches('{naming.DNS_LABEL_PATTERN}')",
    "message": "metadata.name must be a DNS-1123 label: at most 63 lower-case letters, digits and '-'",
}


def _condition_column(name: str, type_: str) -> dict[str, str]:
    return {"name": name, "type": "string", "jsonPath": f'.status.conditions[?(@.type=="{type_}")].status'}


def build_crd() -> dict[str, Any]:
    spec = model_schema(MarketplaceDBSpec)
    status = model_schema(MarketplaceDBStatus, _STATUS_BOUNDS)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": naming.CRD_NAME,
            "labels": {"app.kubernetes.io/name": naming.APP_NAME, "app.kubernetes.io/part-of": "marketplacedb"},
        },
        "spec": {
            "group": naming.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": naming.KIND,
                "listKind": f"{naming.KIND}List",
                "plural": naming.PLURAL,
                "singular": naming.SINGULAR,
                "shortNames": naming.SHORT_NAMES,
                "categories": ["marketplacedb"],
            },
            "versions": [
                {
                    "name": naming.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        _condition_column("Ready", "Ready"),
                        {"name": "Indexes", "type": "string", "jsonPath": ".status.summary.indexes"},
                        {"name": "Views", "type": "string", "jsonPath": ".status.summary.views"},
                        {"name": "Pooler", "type": "string", "jsonPath": ".status.summary.pooler"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "MarketplaceDB: indexes, materialized views, refreshes, a "
                            "PgBouncer pooler and health probes for one existing PostgreSQL database.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [NAME_RULE],
                            "properties": {
                                "apiVersion": {
                                    "type": "string",
                                    "description": "marketplacedb.io/v1alpha1 (the API group and version).",
                                },
                                "kind": {"type": "string", "description": "MarketplaceDB."},
                                "metadata": {
                                    "type": "object",
                                    "description": "Standard object metadata; the name must be a DNS-1123 label.",
                                },
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `marketplacedb crd` from the pydantic models. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=True, width=100)
