"""MarketplaceDB spec: the PgBouncer pooler."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    field_validator,
)

from .bounds import cel
from .database import SecretRef
from .parameters import PGBOUNCER_PARAMETERS, check_pooler_parameters
from .types import DnsName, Model, in_list

# --- pooler -----------------------------------------------------------------------------------


class PoolerMetrics(Model):
    """Prometheus metrics of the pooler."""

    enabled: bool = Field(
        False, description="Serve PgBouncer's metrics (pgbouncer_exporter names) from the agent on port 9127."
    )
    service_monitor: bool = Field(False, description="Create a Prometheus Operator ServiceMonitor.")


class PoolerUser(Model):
    """An application role that logs in through the pooler with its own password."""

    credentials_secret_ref: SecretRef = Field(
        description="Secret with the role's user name and password (opted in like the owner's Secret)."
    )


class PoolerAuthQuery(Model):
    """Look users up in the database (PgBouncer auth_user + auth_query) instead of listing them."""

    credentials_secret_ref: SecretRef = Field(
        description="Secret of the auth_user, the role PgBouncer logs in as to run the lookup function."
    )
    function: str = Field(
        "pgbouncer.user_lookup",
        max_length=127,
        pattern=r"^[a-z_][a-z0-9_]{0,62}\.[a-z_][a-z0-9_]{0,62}$",
        description="schema.function(text) returning (usename, passwd); see the README for the exact SQL.",
    )


class LocalSecretName(Model):
    name: DnsName = Field(description="Secret name.")


class PoolerTLS(Model):
    """TLS between clients and PgBouncer."""

    secret_ref: LocalSecretName = Field(
        description="A kubernetes.io/tls Secret (tls.crt, tls.key), as cert-manager writes it; rotation reloads."
    )
    ssl_mode: Literal["allow", "prefer", "require"] = Field(
        "require", description="client_tls_sslmode: require refuses clients without TLS (client certificates "
        "are not requested)."
    )


KubeObject = Annotated[dict[str, Any], Field(description="A Kubernetes object (validated by the API server).")]


class PoolerPodTemplate(Model):
    """Placement and metadata of the pooler pods (the operator's security settings always win)."""

    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[KubeObject] = Field(default_factory=list, max_length=32, description="Pod tolerations.")
    affinity: KubeObject | None = Field(
        None, description="Pod affinity; without podAntiAffinity the default spread across nodes is kept."
    )
    topology_spread_constraints: list[KubeObject] = Field(
        default_factory=list, max_length=16,
        description="Added to the default spread (hostname, zone); one with the same topologyKey replaces it.",
    )
    priority_class_name: str | None = Field(None, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                                            description="Pod priorityClassName.")
    image_pull_secrets: list[LocalSecretName] = Field(default_factory=list, max_length=16,
                                                      description="Secrets to pull the images.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in value if k.startswith("app.kubernetes.io/"))
        if reserved:
            raise ValueError(f"labels {reserved} are set by the operator (they select the pods)")
        return value


class PoolerServiceTemplate(Model):
    """The pooler Service."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Service annotations (for example internal load balancers)."
    )


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
    metrics: PoolerMetrics = Field(default_factory=PoolerMetrics, description="PgBouncer metrics, served by the agent.")
    resources: dict[str, dict[str, str]] | None = Field(
        None,
        max_length=2,
        description="Container resources: requests and limits, e.g. {requests: {cpu: 100m, memory: 64Mi}}.",
        json_schema_extra=cel(("self.all(k, k in ['limits', 'requests'])", "resources: only requests and limits")),
    )
    users: Annotated[list[PoolerUser], Field(json_schema_extra={"x-kubernetes-list-type": "atomic"})] = Field(
        default_factory=list, max_length=50,
        description="Application roles that log in through the pooler (their SCRAM verifier or password, "
        "in a Secret only).",
    )
    owner_login: bool | None = Field(
        None, description="Let the owner (the DDL role) log in through the pooler; default: only when no users."
    )
    auth_query: PoolerAuthQuery | None = Field(
        None, description="Look users up with a database function (auth_user + auth_query)."
    )
    tls: PoolerTLS | None = Field(None, description="Client TLS (client_tls_*).")
    paused: bool = Field(
        False, description="PAUSE the database on every pod (running transactions finish, new ones wait); "
        "false issues RESUME."
    )
    pod: PoolerPodTemplate = Field(default_factory=PoolerPodTemplate, description="Pod placement and metadata.")
    service: PoolerServiceTemplate = Field(default_factory=PoolerServiceTemplate, description="The Service.")


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
        checked: dict[str, int | str] = {**check_pooler_parameters(value)}
        return checked
