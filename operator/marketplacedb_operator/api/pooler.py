"""MarketplaceDB spec: the PgBouncer pooler."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    field_validator,
)

from .bounds import cel
from .parameters import PGBOUNCER_PARAMETERS, check_named
from .types import Model, in_list

# --- pooler -----------------------------------------------------------------------------------


class PoolerMetrics(Model):
    """Prometheus metrics of the pooler."""

    enabled: bool = Field(False, description="Run a pgbouncer exporter sidecar.")
    service_monitor: bool = Field(False, description="Create a Prometheus Operator ServiceMonitor.")


class PoolerSpec(Model):
    """A PgBouncer Deployment in front of the database."""

    enabled: bool = Field(False, description="Run the pooler.")
    replicas: int = Field(2, ge=1, le=50, description="PgBouncer pods.")
    pool_mode: Literal["transaction", "session"] = Field("transaction", description="Pooling mode.")
    max_client_conn: int = Field(5000, ge=1, le=100000, description="Client connections per pod.")
    default_pool_size: int | Literal["auto"] = Field(
        "auto",
        description="Server connections per pod, 1..10000; auto derives it from max_connections and replicas.",
        json_schema_extra=cel(
            (
                "type(self) == int ? (self >= 1 && self <= 10000) : self == 'auto'",
                "defaultPoolSize must be 1..10000 or auto",
            )
        )
        | {"maxLength": 4},
    )
    image: str | None = Field(None, max_length=512, description="PgBouncer image (default: operator setting).")
    parameters: dict[str, int | str] = Field(
        default_factory=dict,
        max_length=len(PGBOUNCER_PARAMETERS),
        description="Extra pgbouncer.ini [pgbouncer] parameters (allow-listed, typed, range-checked): "
        f"{', '.join(sorted(PGBOUNCER_PARAMETERS))}.",
        json_schema_extra=cel(
            (f"self.all(k, k in {in_list(PGBOUNCER_PARAMETERS)})", "parameters: only the allow-listed names")
        ),
    )
    metrics: PoolerMetrics = Field(default_factory=PoolerMetrics, description="Exporter sidecar.")
    resources: dict[str, dict[str, str]] | None = Field(
        None,
        max_length=2,
        description="Container resources: requests and limits, e.g. {requests: {cpu: 100m, memory: 64Mi}}.",
        json_schema_extra=cel(("self.all(k, k in ['limits', 'requests'])", "resources: only requests and limits")),
    )

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]] | None:
        unknown = sorted(set(value or {}) - {"limits", "requests"})
        if unknown:
            raise ValueError(f"only requests and limits, not {unknown}")
        return value

    @field_validator("default_pool_size")
    @classmethod
    def _pool_size(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 10000:
            raise ValueError("defaultPoolSize must be 1..10000 or auto")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        checked: dict[str, int | str] = {}
        for name, raw in value.items():
            if name in ("pool_mode", "max_client_conn", "default_pool_size"):
                raise ValueError(f"{name!r} is a field of the pooler (poolMode, maxClientConn, defaultPoolSize)")
            try:
                checked[name] = check_named(PGBOUNCER_PARAMETERS, name, raw, "pooler parameter")
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return dict(sorted(checked.items()))
