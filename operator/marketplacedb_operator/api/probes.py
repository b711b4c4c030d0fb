"""MarketplaceDB spec: health probes patched onto application Deployments."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    model_validator,
)

from .. import naming
from .bounds import cel
from .types import DnsName, Model, PortNumberOrName

# --- health probes ----------------------------------------------------------------------------


class HTTPGetAction(Model):
    """An HTTP GET probe."""

    path: str = Field(
        "/", pattern=r"^/[A-Za-z0-9/._~%!$&'()*+,;=:@-]*$", max_length=1024, description="Path, starting with /."
    )
    port: PortNumberOrName = Field(description="Container port: a number 1..65535 or a port name.")
    scheme: Literal["HTTP", "HTTPS"] = Field("HTTP", description="HTTP or HTTPS (certificate not verified).")


class TCPSocketAction(Model):
    """A TCP connect probe."""

    port: PortNumberOrName = Field(description="Container port: a number 1..65535 or a port name.")


class GRPCAction(Model):
    """A gRPC health-checking probe."""

    port: int = Field(ge=1, le=65535, description="Port number 1..65535.")
    service: str | None = Field(
        None, max_length=256, description="Service name sent in the health check request (default: the server)."
    )


_ONE_HANDLER = (
    "(has(self.httpGet) ? 1 : 0) + (has(self.tcpSocket) ? 1 : 0) + (has(self.grpc) ? 1 : 0) == 1",
    "a probe needs exactly one of httpGet, tcpSocket, grpc (exec is not allowed)",
)


class Probe(Model):
    """A Kubernetes probe limited to httpGet, tcpSocket or grpc (exec is not allowed)."""

    model_config = ConfigDict(json_schema_extra=cel(_ONE_HANDLER))

    http_get: HTTPGetAction | None = Field(None, description="HTTP GET handler.")
    tcp_socket: TCPSocketAction | None = Field(None, description="TCP connect handler.")
    grpc: GRPCAction | None = Field(None, description="gRPC health-check handler.")
    initial_delay_seconds: int | None = Field(None, ge=0, le=3600, description="Seconds before the first probe.")
    period_seconds: int | None = Field(None, ge=1, le=3600, description="Seconds between probes.")
    timeout_seconds: int | None = Field(None, ge=1, le=3600, description="Seconds before a probe times out.")
    success_threshold: int | None = Field(
        None, ge=1, le=100, description="Consecutive successes to count as healthy (1 for liveness and startup)."
    )
    failure_threshold: int | None = Field(None, ge=1, le=1000, description="Consecutive failures to count as failed.")

    @model_validator(mode="before")
    @classmethod
    def _no_exec(cls, data: Any) -> Any:
        if isinstance(data, dict) and "exec" in data:
            raise ValueError("exec probes are not allowed: use httpGet, tcpSocket or grpc")
        return data

    @model_validator(mode="after")
    def _one_handler(self) -> Probe:
        handlers = [n for n in ("http_get", "tcp_socket", "grpc") if getattr(self, n) is not None]
        if len(handlers) != 1:
            raise ValueError(_ONE_HANDLER[1])
        return self


class HealthProbeSpec(Model):
    """Probes patched (server-side apply, only these fields) onto an application Deployment."""

    deployment: DnsName = Field(description="Deployment in the resource's namespace.")
    container: str | None = Field(
        None,
        pattern=naming.DNS_LABEL_PATTERN,
        max_length=63,
        description="Container name (default: the only container).",
    )
    readiness: Probe | None = Field(None, description="Readiness probe (none: left as it is).")
    liveness: Probe | None = Field(None, description="Liveness probe (none: left as it is).")
    startup: Probe | None = Field(None, description="Startup probe (none: left as it is).")
