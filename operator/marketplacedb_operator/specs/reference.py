"""The README's resource reference, generated from the models (kept in sync by a test)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from ..api.v1alpha1 import MarketplaceDBSpec
from .crd import model_schema

START = "<!-- reference:start (generated from api/v1alpha1.py by `make generate`) -->"
END = "<!-- reference:end -->"


def _type(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int or string"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "object")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map of {_type(schema['additionalProperties'])}"
    return str(kind)


def _range(low: Any, high: Any, unit: str) -> str | None:
    if low is None and high is None:
        return None
    if low is None:
        return f"at most {high}{unit}"
    if high is None:
        return f"at least {low}{unit}"
    return f"{low}..{high}{unit}"


def _constraints(schema: dict[str, Any]) -> str:
    """What the API server checks for the field, in words (the CRD carries the same rules)."""
    parts = [
        _range(schema.get("minimum"), schema.get("maximum"), ""),
        _range(schema.get("minLength"), schema.get("maxLength"), " chars"),
        _range(schema.get("minItems"), schema.get("maxItems"), " items"),
        _range(None, schema.get("maxProperties"), " entries"),
    ]
    pattern = schema.get("pattern")
    if pattern:
        parts.append(f"pattern `{pattern}`" if len(pattern) <= 48 else "format in the description")
    if schema.get("x-kubernetes-list-type") == "map":
        parts.append("unique " + ", ".join(schema["x-kubernetes-list-map-keys"]))
    parts += [rule["message"] for rule in schema.get("x-kubernetes-validations", [])]
    return "; ".join(p.replace("|", "\\|") for p in parts if p)


def _rows(schema: dict[str, Any], prefix: str, rows: list[str]) -> None:
    required = set(schema.get("required", []))
    for name, field in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        default = field.get("default")
        cells = [
            f"`{path}`",
            _type(field),
            "yes" if name in required else "",
            "" if default is None else f"`{json.dumps(default)}`",
            _constraints(field),
            (field.get("description") or "").replace("\n", " ").replace("|", "\\|"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
        if field.get("type") == "object" and "properties" in field:
            _rows(field, path, rows)
        elif field.get("type") == "array" and "properties" in field.get("items", {}):
            _rows(field["items"], f"{path}[]", rows)


def reference_markdown(model: type[BaseModel] = MarketplaceDBSpec) -> str:

    rows = [
        "| field | type | required | default | constraints | description |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    _rows(model_schema(model), "spec", rows)
    return "\n".join([START, *rows, END])


def with_reference(readme: str) -> str:
    """`readme` with the text between the reference markers replaced by the current reference."""
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return head + reference_markdown() + tail


if __name__ == "__main__":  # `make generate`: python -m marketplacedb_operator.specs.reference README.md
    import pathlib
    import sys

    target = pathlib.Path(sys.argv[1])
    target.write_text(with_reference(target.read_text()))
