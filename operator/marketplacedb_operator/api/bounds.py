"""Size bounds every spec field gets, and the CEL rules the models hand to the CRD.

The API server can bound the cost of a CEL rule only when every string, list and map it may
touch has a maximum size (maxLength, maxItems, maxProperties); without one it assumes the whole
3 MiB request. A field that declares no bound of its own gets the defaults below, in the CRD
(specs/crd.py adds them) and in the models (check_field), so both refuse the same input.
"""

from __future__ import annotations

from typing import Any

import annotated_types
from pydantic.fields import FieldInfo

DEFAULT_MAX_LENGTH = 1024
DEFAULT_MAX_ITEMS = 64
DEFAULT_MAX_PROPERTIES = 64
# Status is written by the operator: generous bounds, never reached, so a status write never fails.
STATUS_MAX_LENGTH = 32768
STATUS_MAX_ITEMS = 4096
STATUS_MAX_PROPERTIES = 4096


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """x-kubernetes-validations for a model or field: (rule, message) pairs, checked by the API server."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


def _declared_max(field: FieldInfo) -> int | None:
    for item in field.metadata:
        if isinstance(item, annotated_types.MaxLen):
            return int(item.max_length)
    return None


def _check_string(text: str, limit: int) -> None:
    if "\x00" in text:
        raise ValueError("contains a NUL byte (\\u0000)")
    if len(text) > limit:
        raise ValueError(f"is longer than {limit} characters")


def check_field(value: Any, field: FieldInfo) -> None:
    """ValueError when `value` holds a NUL byte or exceeds the field's bound (or the default)."""
    declared = _declared_max(field)
    if isinstance(value, str):
        _check_string(value, declared or DEFAULT_MAX_LENGTH)
    elif isinstance(value, list):
        if len(value) > (declared or DEFAULT_MAX_ITEMS):
            raise ValueError(f"has more than {declared or DEFAULT_MAX_ITEMS} items")
        for item in value:
            if isinstance(item, str):
                _check_string(item, DEFAULT_MAX_LENGTH)
    elif isinstance(value, dict):
        _check_map(value, declared or DEFAULT_MAX_PROPERTIES)


def _check_map(value: dict[Any, Any], limit: int) -> None:
    if len(value) > limit:
        raise ValueError(f"has more than {limit} entries")
    for key, item in value.items():
        if isinstance(key, str):
            _check_string(key, DEFAULT_MAX_LENGTH)
        if isinstance(item, str):
            _check_string(item, DEFAULT_MAX_LENGTH)
        elif isinstance(item, dict):
            _check_map(item, DEFAULT_MAX_PROPERTIES)
