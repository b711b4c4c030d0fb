"""MarketplaceDB v1alpha1: the resource's spec and status as pydantic v2 models.

These models are the single source of truth: the CRD's OpenAPI schema is generated from them
(`marketplacedb crd`), the CLI validates manifests with them, and the reconciler reads them.
Field descriptions become `kubectl explain` text and the README's resource reference.

The models are split by part, and this module assembles the resource and re-exports them all
(import from here): types.py (the base Model and shared field types), spec.py (database, DDL,
indexes, materialized views; itself split into database.py, indexes.py and views.py), pooler.py,
probes.py and status.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .. import naming
from .bounds import cel
from .pooler import PoolerMetrics, PoolerSpec
from .probes import GRPCAction, HealthProbeSpec, HTTPGetAction, Probe, TCPSocketAction
from .spec import (
    AdoptPolicy,
    ClientCertRef,
    DatabaseSpec,
    DatabaseTLS,
    DataKey,
    DDLPolicy,
    IndexColumn,
    IndexSpec,
    KeyRef,
    MaterializedViewSpec,
    RefreshPolicy,
    SecretRef,
)
from .status import (
    BlockingSession,
    DDLProgress,
    IndexState,
    IndexStatus,
    MarketplaceDBStatus,
    OwnedObject,
    PlanStatus,
    PoolerBudget,
    PoolerStatus,
    StatusModel,
    Summary,
    ViewStatus,
)
from .types import DnsName, Duration, Identifier, Model, PortNumberOrName, check_unique, list_map

__all__ = [
    "AdoptPolicy",
    "BlockingSession",
    "DDLProgress",
    "ClientCertRef",
    "DDLPolicy",
    "DataKey",
    "DatabaseSpec",
    "DatabaseTLS",
    "DnsName",
    "Duration",
    "GRPCAction",
    "HTTPGetAction",
    "HealthProbeSpec",
    "Identifier",
    "IndexColumn",
    "IndexSpec",
    "IndexState",
    "IndexStatus",
    "KeyRef",
    "MarketplaceDB",
    "MarketplaceDBSpec",
    "MarketplaceDBStatus",
    "OwnedObject",
    "MaterializedViewSpec",
    "Model",
    "PlanStatus",
    "PoolerBudget",
    "PoolerMetrics",
    "PoolerSpec",
    "PoolerStatus",
    "PortNumberOrName",
    "Probe",
    "RefreshPolicy",
    "SecretRef",
    "StatusModel",
    "Summary",
    "TCPSocketAction",
    "ViewStatus",
]


# --- the resource -----------------------------------------------------------------------------


_UNIQUE_RELATIONS = (
    "!has(self.indexes) || !has(self.materializedViews) || "
    "self.indexes.all(i, !self.materializedViews.exists(v, v.name == i.name && v.schema == i.schema))",
    "an index and a materialized view share a name",
)


class MarketplaceDBSpec(Model):
    """Desired state: database, DDL policy, indexes, materialized views, pooler, probes."""

    model_config = ConfigDict(json_schema_extra=cel(_UNIQUE_RELATIONS))

    database: DatabaseSpec = Field(description="The database (reached directly, never through the pooler).")
    ddl: DDLPolicy = Field(default_factory=DDLPolicy, description="How DDL runs: timeouts, deletion, approval.")
    indexes: Annotated[list[IndexSpec], Field(json_schema_extra=list_map("name"))] = Field(
        default_factory=list, max_length=200,
        description="Indexes (btree, hash, gin, gist, brin), built and dropped CONCURRENTLY."
    )
    materialized_views: Annotated[list[MaterializedViewSpec], Field(json_schema_extra=list_map("name"))] = Field(
        default_factory=list, max_length=50, description="Materialized views and their refresh schedules."
    )
    pooler: PoolerSpec = Field(default_factory=PoolerSpec, description="The PgBouncer pooler.")
    health_probes: Annotated[list[HealthProbeSpec], Field(json_schema_extra=list_map("deployment"))] = Field(
        default_factory=list, max_length=100, description="Probes to patch onto application Deployments."
    )

    @model_validator(mode="after")
    def _names(self) -> MarketplaceDBSpec:
        check_unique(self.indexes, "name", "index name")
        check_unique(self.materialized_views, "name", "materialized view name")
        check_unique(self.health_probes, "deployment", "healthProbes deployment")
        # Indexes and views share the relation namespace of their schema.
        relations = [(i.schema_name, i.name) for i in self.indexes]
        relations += [(v.schema_name, v.name) for v in self.materialized_views]
        if len(set(relations)) != len(relations):
            raise ValueError(_UNIQUE_RELATIONS[1])
        return self


class MarketplaceDB(Model):
    """A MarketplaceDB: indexes, materialized views, refreshes, a pooler and probes for one database."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    # metadata is the API server's (annotations may be long); the spec checks itself.
    checked_as_spec: ClassVar[bool] = False

    api_version: Literal["marketplacedb.io/v1alpha1"] = naming.API_VERSION  # type: ignore[assignment]
    kind: Literal["MarketplaceDB"] = naming.KIND  # type: ignore[assignment]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: MarketplaceDBSpec
    status: MarketplaceDBStatus | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        # As the API server would (plus: the name is also a label value, so at most 63 characters).
        name = value.get("name")
        if not isinstance(name, str):
            raise ValueError("name is required and must be a string")
        if not re.fullmatch(naming.DNS_LABEL_PATTERN, name):
            raise ValueError(
                f"name {name[:70]!r} must be a DNS-1123 label: at most 63 lower-case letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        namespace = value.get("namespace")
        if namespace is not None and not (
            isinstance(namespace, str) and re.fullmatch(naming.DNS_LABEL_PATTERN, namespace)
        ):
            raise ValueError(f"namespace {str(namespace)[:70]!r} must be a DNS-1123 label")
        return value
