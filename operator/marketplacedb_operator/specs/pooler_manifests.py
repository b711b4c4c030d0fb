"""The pooler's Kubernetes objects: ConfigMap, Secret, Deployment, Service, PDB, ServiceMonitor.

    build_pooler(resource, spec, settings, budget, credentials) -> list[dict]

`resource` is the MarketplaceDB object as a dict (metadata: name, namespace, uid for the owner
reference); `credentials` None renders the Secret with a placeholder (for `marketplacedb render`).

How a change reaches running pods (see specs/pgbouncer.classify_change):
- reload-safe: the ConfigMap and Secret are mounted as whole volumes (never subPath, so kubelet
  swaps them in place); the `pooler-agent` sidecar sees the new files, issues RELOAD on the admin
  socket and checks SHOW CONFIG (PgBouncer < 1.25 does not report reload errors);
- restart-required: the restart hash on the pod template changes and the Deployment rolls,
  one pod at a time, each draining through the agent's /drain preStop hook.
"""

from __future__ import annotations

import base64
from typing import Any

from .. import naming
from ..api.v1alpha1 import MarketplaceDBSpec, PoolerBudget
from ..settings import Settings
from . import pgbouncer as pgb
from .meta import image_pull_secrets, object_meta, restricted_container_security, restricted_pod_security
from .pooler_sizing import rollout_strategy

COMPONENT = "pooler"
# The uid of the `pgbouncer` user in the default image (ghcr.io/cloudnative-pg/pgbouncer); every
# container of the pod runs with it, so the agent and exporter pass PgBouncer's peer-uid check
# on the admin socket without any password.
POD_UID = 998
EXPORTER_PORT = 9127
# preStop: wait for the endpoints to drop the pod, then let transactions finish.
DRAIN_DELAY_SECONDS = 10
DRAIN_TIMEOUT_SECONDS = 40
TERMINATION_GRACE_SECONDS = DRAIN_DELAY_SECONDS + DRAIN_TIMEOUT_SECONDS + 10
DEFAULT_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "64Mi"},
    "limits": {"memory": "256Mi"},
}
PLACEHOLDER_USERLIST = '"<owner user>" "<SCRAM-SHA-256 verifier or password, filled in by the operator>"\n'


def _meta(resource: dict[str, Any], name: str) -> dict[str, Any]:
    return object_meta(resource, name, COMPONENT)


def config_map(resource: dict[str, Any], ini: str, config_hash: str) -> dict[str, Any]:
    meta = _meta(resource, naming.pooler_name(resource["metadata"]["name"]))
    meta["annotations"] = {naming.ANN_CONFIG_HASH: config_hash}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {pgb.INI_KEY: ini}}


def auth_secret(resource: dict[str, Any], userlist: str | None) -> dict[str, Any]:
    """The auth file lives only here (a verifier, or the password when no verifier can be used)."""
    text = PLACEHOLDER_USERLIST if userlist is None else userlist
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(resource, naming.pooler_auth_secret_name(resource["metadata"]["name"])),
        "type": "Opaque",
        "data": {pgb.AUTH_KEY: base64.b64encode(text.encode()).decode()},
    }


def _http_probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _pgbouncer_container(image: str, settings: Settings, resources: dict[str, Any]) -> dict[str, Any]:
    agent = settings.health_port
    return {
        "name": "pgbouncer",
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        # The binary itself as PID 1: the default image's entrypoint is a shell script that does not
        # `exec`, so signals would stop at the shell. The drain happens in preStop, not by signal.
        "command": ["pgbouncer", pgb.INI_PATH],
        "ports": [{"name": "pgbouncer", "containerPort": pgb.PORT, "protocol": "TCP"}],
        # Readiness: the agent asks the admin console whether the database is served and the last
        # reload took (not just an open port). Liveness: the admin console answers at all.
        "readinessProbe": _http_probe("/readyz", agent, period=5, failures=2),
        "livenessProbe": _http_probe("/healthz", agent, period=10, failures=6),
        "startupProbe": _http_probe("/healthz", agent, period=2, failures=30),
        # The agent drains (PAUSE+SHUTDOWN before 1.23, SHUTDOWN WAIT_FOR_SERVERS after) and returns
        # once PgBouncer exited; only then does kubelet send SIGTERM, which no longer matters.
        "lifecycle": {"preStop": {"httpGet": {"path": "/drain", "port": agent}}},
        "resources": resources,
        "securityContext": restricted_container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": pgb.CONFIG_DIR, "readOnly": True},
            {"name": "auth", "mountPath": pgb.AUTH_DIR, "readOnly": True},
            {"name": "run", "mountPath": pgb.RUN_DIR},
        ],
    }


def agent_args(spec: MarketplaceDBSpec, settings: Settings) -> list[str]:
    return [
        "pooler-agent",
        "--socket-dir", pgb.RUN_DIR,
        "--port", str(pgb.PORT),
        "--config", pgb.INI_PATH,
        "--auth-file", pgb.AUTH_PATH,
        "--database", spec.database.dbname,
        "--listen-port", str(settings.health_port),
        "--drain-delay", str(DRAIN_DELAY_SECONDS),
        "--drain-timeout", str(DRAIN_TIMEOUT_SECONDS),
    ]


def _agent_container(spec: MarketplaceDBSpec, settings: Settings) -> dict[str, Any]:
    return {
        "name": "agent",
        "image": settings.operator_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["marketplacedb"],
        "args": agent_args(spec, settings),
        "ports": [{"name": "agent", "containerPort": settings.health_port, "protocol": "TCP"}],
        # The agent's own loop, not PgBouncer's health: a dead agent restarts only itself.
        "livenessProbe": _http_probe("/livez", settings.health_port, period=10, failures=3),
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": restricted_container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": pgb.CONFIG_DIR, "readOnly": True},
            {"name": "auth", "mountPath": pgb.AUTH_DIR, "readOnly": True},
            {"name": "run", "mountPath": pgb.RUN_DIR},
        ],
    }


def _exporter_container(settings: Settings) -> dict[str, Any]:
    # Same uid as PgBouncer, so the Unix-socket admin login needs no password (lib/pq URL syntax).
    conn = f"postgres:///pgbouncer?host={pgb.RUN_DIR}&port={pgb.PORT}&user=pgbouncer&sslmode=disable"
    return {
        "name": "exporter",
        "image": settings.pgbouncer_exporter_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": [f"--pgBouncer.connectionString={conn}", f"--web.listen-address=:{EXPORTER_PORT}"],
        "ports": [{"name": "metrics", "containerPort": EXPORTER_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": restricted_container_security(),
        "volumeMounts": [{"name": "run", "mountPath": pgb.RUN_DIR}],
    }


def _spread(selector: dict[str, str]) -> dict[str, Any]:
    """Across nodes (and zones when labelled), preferred so that a small cluster still schedules."""
    constraints = [
        {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": selector}}
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]
    affinity = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100,
        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}},
    }]}}
    return {"topologySpreadConstraints": constraints, "affinity": affinity}


def deployment(resource: dict[str, Any], spec: MarketplaceDBSpec, settings: Settings, restart: str) -> dict[str, Any]:
    name = resource["metadata"]["name"]
    selector = naming.selector_labels(name, COMPONENT)
    pooler = spec.pooler
    containers = [
        _pgbouncer_container(pooler.image or settings.pgbouncer_image, settings, pooler.resources or DEFAULT_RESOURCES),
        _agent_container(spec, settings),
    ]
    if pooler.metrics.enabled:
        containers.append(_exporter_container(settings))
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": restricted_pod_security(POD_UID),
        **image_pull_secrets(settings),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": containers,
        "volumes": [
            {"name": "config", "configMap": {"name": naming.pooler_name(name)}},
            {"name": "auth", "secret": {"secretName": naming.pooler_auth_secret_name(name), "defaultMode": 0o440}},
            {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        ],
        **_spread(selector),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(resource, naming.pooler_name(name)),
        "spec": {
            "replicas": pooler.replicas,
            "selector": {"matchLabels": selector},
            "strategy": rollout_strategy(pooler.replicas),
            "minReadySeconds": 5,
            "template": {
                "metadata": {
                    "labels": naming.labels(name, COMPONENT),
                    # Only restart-relevant inputs: a reload-safe change must not roll the pods.
                    "annotations": {naming.ANN_RESTART_HASH: restart},
                },
                "spec": pod_spec,
            },
        },
    }


def service(resource: dict[str, Any], spec: MarketplaceDBSpec) -> dict[str, Any]:
    name = resource["metadata"]["name"]
    ports = [{"name": "pgbouncer", "port": pgb.PORT, "targetPort": "pgbouncer", "protocol": "TCP"}]
    if spec.pooler.metrics.enabled:
        ports.append({"name": "metrics", "port": EXPORTER_PORT, "targetPort": "metrics", "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(resource, naming.pooler_name(name)),
        "spec": {"type": "ClusterIP", "selector": naming.selector_labels(name, COMPONENT), "ports": ports},
    }


def disruption_budget(resource: dict[str, Any]) -> dict[str, Any]:
    name = resource["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(resource, naming.pooler_name(name)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": naming.selector_labels(name, COMPONENT)}},
    }


def service_monitor(resource: dict[str, Any]) -> dict[str, Any]:
    name = resource["metadata"]["name"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(resource, naming.pooler_name(name)),
        "spec": {
            "selector": {"matchLabels": naming.selector_labels(name, COMPONENT)},
            "endpoints": [{"port": "metrics", "interval": "30s"}],
        },
    }


def pooler_config(spec: MarketplaceDBSpec, settings: Settings, budget: PoolerBudget,
                  credentials: pgb.PoolerCredentials | None) -> pgb.PoolerConfig:
    ini = pgb.render_ini(spec, budget)
    userlist = PLACEHOLDER_USERLIST if credentials is None else pgb.render_userlist(credentials)
    return pgb.PoolerConfig(ini=ini, userlist=userlist, image=spec.pooler.image or settings.pgbouncer_image)


def build_pooler(resource: dict[str, Any], spec: MarketplaceDBSpec, settings: Settings, budget: PoolerBudget,
                 credentials: pgb.PoolerCredentials | None) -> list[dict[str, Any]]:
    """Every pooler object for `resource` (empty when the pooler is disabled)."""
    if not spec.pooler.enabled:
        return []
    config = pooler_config(spec, settings, budget, credentials)
    objects = [
        config_map(resource, config.ini, pgb.config_hash(config)),
        auth_secret(resource, None if credentials is None else config.userlist),
        deployment(resource, spec, settings, pgb.restart_hash(config)),
        service(resource, spec),
    ]
    if spec.pooler.replicas > 1:
        objects.append(disruption_budget(resource))
    if spec.pooler.metrics.enabled and spec.pooler.metrics.service_monitor:
        objects.append(service_monitor(resource))
    return objects
