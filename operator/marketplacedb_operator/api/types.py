"""Building blocks of the v1alpha1 models: the base Model (camelCase, strict, bounded, described),
identifier, duration, cron and port types, and helpers for CEL rules and list maps.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

from .. import naming
from ..durations import DURATION_PATTERN, parse_duration
from . import bounds
from .bounds import cel


class Model(BaseModel):
    """camelCase on the wire, unknown fields rejected, snake_case in Python.

    Attribute docstrings become field descriptions (`kubectl explain`). Every spec field is
    bounded (its own max_length, or the defaults in api/bounds.py that the CRD carries too) and
    refuses NUL bytes, whoever adds it.
    """

    # strict: types as the API server takes them (no `true` for 1, no "5" for 5, no 0 for false).
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        strict=True,
    )
    # Status models are written by the operator, not by users: no spec bounds on them.
    checked_as_spec: ClassVar[bool] = True

    @field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        if cls.checked_as_spec and info.field_name is not None:
            bounds.check_field(value, cls.model_fields[info.field_name])
        return value


def check_identifier(value: str) -> str:
    size = len(value.encode())
    if size > naming.MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"{value[:20]!r}... is {size} bytes: PostgreSQL identifiers are at most "
            f"{naming.MAX_IDENTIFIER_BYTES} bytes (longer ones are silently truncated)"
        )
    if not naming.is_identifier(value):
        raise ValueError(
            f"{value!r} is not a safe PostgreSQL identifier: use lower-case letters, digits and "
            f"underscores, starting with a letter or underscore, at most {naming.MAX_IDENTIFIER_BYTES} bytes"
        )
    return value


def check_duration(value: str) -> str:
    parse_duration(value)
    return value


def _cron_field(number: str, names: bool = False) -> str:
    atom = f"({number}{'|[A-Za-z]{3}' if names else ''})"
    item = rf"(\*|{atom}(-{atom})?)(/[0-9]{{1,2}})?"
    return f"{item}(,{item})*"


# Kubernetes CronJobs take five fields or a macro (robfig/cron's standard parser). The pattern
# goes to the CRD as is, so the API server refuses `every 5 minutes` or `61 * * * *` at apply.
CRON_PATTERN = (
    r"^(@(yearly|annually|monthly|weekly|daily|hourly|midnight)|"
    + r" +".join(
        [
            _cron_field("[0-5]?[0-9]"),
            _cron_field("[01]?[0-9]|2[0-3]"),
            _cron_field("0?[1-9]|[12][0-9]|3[01]|\\?"),
            _cron_field("0?[1-9]|1[0-2]", names=True),
            _cron_field("[0-7]|\\?", names=True),
        ]
    )
    + ")$"
)


def check_cron(value: str) -> str:
    if not re.fullmatch(CRON_PATTERN, value):
        raise ValueError(
            f"{value[:64]!r} is not a cron schedule: five fields (minute 0-59, hour 0-23, day 1-31, "
            "month 1-12, weekday 0-7) or @hourly/@daily/@weekly/@monthly/@yearly"
        )
    if not croniter.is_valid(value):
        raise ValueError(f"{value[:64]!r} is not a valid cron schedule")
    return value


# Patterns go to the CRD schema through json_schema_extra; in Python the validators below check
# the same rules and say in words what is wrong (a bare regex mismatch helps nobody).
Identifier = Annotated[
    str,
    Field(json_schema_extra={"pattern": naming.IDENTIFIER_PATTERN, "maxLength": naming.MAX_IDENTIFIER_BYTES}),
    AfterValidator(check_identifier),
]
Duration = Annotated[
    str, Field(max_length=32, json_schema_extra={"pattern": DURATION_PATTERN}), AfterValidator(check_duration)
]
DnsName = Annotated[str, Field(pattern=naming.DNS_LABEL_PATTERN, max_length=63)]


def check_port(value: int | str) -> int | str:
    """A container port: a number 1..65535 or an IANA service name, as Kubernetes accepts it."""
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError(f"{value} is not a port: use 1..65535 or a port name")
    elif not (re.fullmatch(PORT_NAME_PATTERN, value) and re.search("[a-z]", value)):
        raise ValueError(f"{value[:20]!r} is not a port name: 1-15 lower-case letters, digits, '-', with a letter")
    return value


# IANA_SVC_NAME (k8s.io/apimachinery validation.IsValidPortName), checked in CEL with the same words.
PORT_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$"
PORT_RULE = (
    "type(self) == int ? (self >= 1 && self <= 65535) : "
    f"(self.matches('{PORT_NAME_PATTERN}') && self.matches('[a-z]'))",
    "must be a port number 1..65535 or a port name (1-15 lower-case letters, digits, '-', with a letter)",
)
PortNumberOrName = Annotated[
    int | str, Field(json_schema_extra=cel(PORT_RULE) | {"maxLength": 15}), AfterValidator(check_port)
]


def list_map(key: str) -> dict[str, Any]:
    """A list keyed by `key` (x-kubernetes-list-type: map): merged per item by server-side apply."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


def in_list(names: Any) -> str:
    """A CEL list literal of allowed names."""
    return "[" + ", ".join(f"'{name}'" for name in sorted(names)) + "]"


def unique_rule(expression: str, message: str) -> tuple[str, str]:
    """CEL: every item's `expression` occurs once (lists are bounded, so the n^2 cost is too)."""
    return f"self.all(a, self.exists_one(b, b{expression} == a{expression}))", message


def check_unique(items: list[Any], key: str, what: str) -> None:
    seen: set[str] = set()
    for item in items:
        value = getattr(item, key)
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


def not_temporary(value: str) -> str:
    # The schema engine builds replacements as <name>__new, parks replaced indexes as <name>__old and
    # names a view's unique index <view>__key: a declared name of that form would collide with another
    # declared object's temporary name.
    for suffix in ("__new", "__old", "__key"):
        if value.endswith(suffix):
            raise ValueError(f"{value!r} ends in {suffix!r}, reserved for the operator's temporary names")
    return value


# What to do with an existing object of a declared name that the operator did not create.
AdoptPolicy = Literal["IfIdentical", "Replace"]
