"""MarketplaceDB spec, materialized views: the checked query, the unique key, and the refresh policy
(cron schedule or interval, time zone, skip-if-unchanged, staleness)."""

from __future__ import annotations

import zoneinfo
from typing import Annotated, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..durations import parse_duration
from ..querydeps import volatile_calls
from ..sqlcheck import SqlCheckError, normalize_select
from .bounds import cel
from .types import CRON_PATTERN, AdoptPolicy, Duration, Identifier, Model, check_cron, not_temporary, unique_rule


class RefreshPolicy(Model):
    """When and how a materialized view is refreshed (never overlapping)."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("has(self.schedule) != has(self.every)", "set exactly one of schedule and every"),
        ("!has(self.every) || self.mode == 'Operator'", "every needs mode: Operator"),
    ))

    schedule: str | None = Field(
        None,
        max_length=128,
        description="Cron schedule: five fields (minute hour day-of-month month day-of-week) or a macro "
        "(@hourly, @daily, @weekly, @monthly, @yearly); required unless `every` is set.",
        json_schema_extra={"pattern": CRON_PATTERN},
    )
    mode: Literal["CronJob", "Operator"] = Field(
        "CronJob", description="CronJob: a Kubernetes CronJob per view; Operator: the operator's own timer."
    )
    every: Duration | None = Field(
        None, max_length=16,
        description="mode Operator only: refresh at this interval instead of a cron schedule, from 5s to 24h "
        "(e.g. 30s: the option when one minute is too coarse).",
    )
    time_zone: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_+\-/]+$",
        description="IANA time zone the schedule is read in (e.g. Europe/Berlin); default Etc/UTC. Passed to "
        "the CronJob and honoured by mode Operator.",
    )
    skip_if_unchanged: bool = Field(True, description="Skip when the base tables saw no writes since the last refresh.")
    depends_on: list[Annotated[str, Field(max_length=127, pattern=r"^[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)?$")]] = (
        Field(
            default_factory=list, max_length=64,
            description="Tables (table in the view's schema, or schema.table) whose writes count for skipIfUnchanged "
            "besides those the "
            "view reads directly: declare the tables its functions read, else a view calling a non-built-in, "
            "stable or volatile function is refreshed on every schedule.",
        )
    )
    history_limit: int = Field(20, ge=1, le=1000, description="Runs kept in the refresh history of this view.")
    max_staleness: Duration = Field("1h", description="Refresh anyway after this long; beyond it the view is Stale.")
    timeout: Duration = Field("5m", description="statement_timeout of one refresh (and the Job's deadline).")
    suspend: bool = Field(False, description="Pause scheduled refreshes.")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("time_zone")
    @classmethod
    def _time_zone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timeZone {value!r} is not an IANA time zone name (e.g. Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _when(self) -> RefreshPolicy:
        if self.every is not None:
            if self.mode != "Operator":
                raise ValueError("every needs mode: Operator (a CronJob cannot run more often than once a minute)")
            if not 5 <= parse_duration(self.every) <= 86400:
                raise ValueError(f"every {self.every!r} must be between 5s and 24h")
            if self.schedule is not None:
                raise ValueError("set either schedule or every, not both")
        elif self.schedule is None:
            raise ValueError("schedule is required (or every, with mode: Operator)")
        return self


class MaterializedViewSpec(Model):
    """A materialized view with the unique index that REFRESH ... CONCURRENTLY needs."""

    name: Identifier = Field(description="View name.")
    _name_not_temporary = field_validator("name")(not_temporary)
    schema_name: Identifier = Field("public", alias="schema", description="Schema.")
    allow_volatile_functions: bool = Field(
        False,
        description="DANGEROUS: accept calls to volatile functions (setval, nextval, lo_*, pg_terminate_backend, "
        "random, ...) in the query. They run with the role's full rights when the view is created and at every "
        "refresh; refused by default, with the function named.",
    )
    query: str = Field(
        min_length=1,
        max_length=65536,
        description="Exactly one SELECT (checked by PostgreSQL's parser): no INTO, FOR UPDATE, parameters or "
        "data-modifying statements. Nested at most about 45 operators deep.",
    )
    unique_key: list[Identifier] = Field(
        min_length=1,
        max_length=32,
        description="Columns of the unique index (plain columns the view returns); at least one.",
        json_schema_extra=cel(unique_rule("", "uniqueKey must not repeat a column")),
    )
    refresh: RefreshPolicy | None = Field(None, description="Refresh schedule; none means refresh only on demand.")
    adopt: AdoptPolicy = Field(
        "IfIdentical",
        description="An existing materialized view of this name that the operator did not create: IfIdentical "
        "adopts it only when its query equals this one (else Conflict, left alone); Replace builds the "
        "declared view under a temporary name and swaps it in (privileges, owner, options, comments and "
        "indexes carried over).",
    )

    @field_validator("query")
    @classmethod
    def _query(cls, value: str, info: ValidationInfo) -> str:
        try:
            query = normalize_select(value)
        except SqlCheckError as exc:
            raise ValueError(f"query {exc}") from None
        calls = [] if info.data.get("allow_volatile_functions") else volatile_calls(query)
        if calls:
            raise ValueError(
                f"query calls volatile function(s) {', '.join(calls)}: they can write or act on every refresh; "
                "set allowVolatileFunctions: true to accept (dangerous)"
            )
        return query

    @field_validator("unique_key")
    @classmethod
    def _key(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("uniqueKey has duplicate columns")
        return value
