"""What the API server does with a MarketplaceDB and the generated CRD, before any webhook.

In the order of apiextensions-apiserver: drop nulls, apply the schema's defaults, validate
against the OpenAPI schema (types, patterns, bounds, enums; unknown fields refused as
`kubectl apply`'s default strict field validation does), list-map key uniqueness, then every
x-kubernetes-validations rule, evaluated with cel-python with `self` bound to its node. The
rules use only standard CEL (has, all, exists, exists_one, matches, size, type, in), which
cel-python implements; no Kubernetes-specific CEL library function is needed.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema

from marketplacedb_operator.specs.crd import build_crd


def crd_schema() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@functools.cache
def _checker() -> tuple[dict[str, Any], Any]:
    """The schema (never handed out: callers of crd_schema() may edit theirs) and its validator."""
    schema = crd_schema()
    return schema, _VALIDATOR(_json_schema(schema))


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        for name, child in schema["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(value[name], child)
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key in value:
            value[key] = apply_defaults(value[key], schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def _json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # strict field validation (kubectl's default)
    return out


def _nodes(value: Any, schema: dict[str, Any], path: str) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    yield path, value, schema
    if isinstance(value, dict) and "properties" in schema:
        for name, child in schema["properties"].items():
            if name in value:
                yield from _nodes(value[name], child, f"{path}.{name}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            yield from _nodes(item, schema["additionalProperties"], f"{path}[{key}]")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _nodes(item, schema["items"], f"{path}[{index}]")


# JSON Schema counts 0.0 as an integer; the models (strict) do not, and neither does this
# emulation: a float where an integer belongs is refused before CEL sees it (assumed, not
# checked against an API server here).
_VALIDATOR = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    type_checker=jsonschema.Draft7Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)
_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule))
    return _PROGRAMS[rule]


# ValidateObjectMeta: a custom resource's name is a DNS-1123 subdomain.
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _object_meta_problems(document: dict[str, Any]) -> list[str]:
    """What the API server refuses before the CRD's schema is consulted (routing, ObjectMeta)."""
    if document.get("apiVersion") != "marketplacedb.io/v1alpha1" or document.get("kind") != "MarketplaceDB":
        return ["apiVersion/kind: not a marketplacedb.io/v1alpha1 MarketplaceDB"]
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
        return ["metadata.name: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters"]
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    label = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
    if namespace is not None and not (isinstance(namespace, str) and re.fullmatch(label, namespace)):
        return ["metadata.namespace: a lowercase RFC 1123 label"]
    return []


def _too_big(value: Any) -> bool:
    """JSON integers beyond int64 do not decode as integers in the API server."""
    if isinstance(value, dict):
        return any(_too_big(v) for v in value.values())
    if isinstance(value, list):
        return any(_too_big(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63


def crd_problems(document: dict[str, Any]) -> list[str]:
    """Why the API server would refuse `document` with the generated CRD (empty: accepted)."""
    meta = _object_meta_problems(document)
    if meta:
        return meta
    if _too_big(document):
        return ["an integer beyond int64"]
    schema, validator = _checker()
    obj = apply_defaults(_drop_nulls(copy.deepcopy(document)), schema)
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(obj)
    ]
    if problems:
        return problems  # the API server stops before CEL on a schema error
    for path, value, node in _nodes(obj, schema, ""):
        if node.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
            keys = [tuple(item.get(k) for k in node["x-kubernetes-list-map-keys"]) for item in value]
            if len(set(keys)) != len(keys):
                problems.append(f"{path}: Duplicate value")
        for rule in node.get("x-kubernetes-validations", []):
            try:
                result = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
            except celpy.CELEvalError as exc:  # the API server refuses on an evaluation error too
                problems.append(f"{path}: error evaluating {rule['rule']!r}: {exc}")
                continue
            if isinstance(result, celpy.CELEvalError):
                problems.append(f"{path}: error evaluating {rule['rule']!r}: {result}")
            elif not bool(result):
                problems.append(f"{path}: {rule['message']}")
    return problems
