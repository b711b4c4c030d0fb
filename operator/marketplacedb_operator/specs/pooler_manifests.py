"""The pooler's Kubernetes objects: ConfigMap, Secret, Deployment, Service, PDB, ServiceMonitor.

    build_pooler(resource, spec, settings, budget, credentials) -> list[dict]

`resource` is the MarketplaceDB object as a dict (metadata: name, namespace, uid for the owner
reference); `credentials` None renders the Secret with a placeholder (for `marketplacedb render`).

How a change reaches running pods (see specs/pgbouncer.classify_change):
- reload-safe: the ConfigMap and Secret are mounted as whole volumes (never subPath, so kubelet
  swaps them in place); the `pooler-agent` sidecar sees the new files, issues RELOAD on the admin
  socket and checks SHOW CONFIG (PgBouncer < 1.25 does not report reload errors);
- restart-required: the restart hash on the pod template changes and the Deployment rolls,
  one pod at a time, each draining through the agent's drain (preStop hook).

The agent's admin actions (drain, reload) listen on 127.0.0.1 only: the preStop hook is an `exec`
in the pgbouncer container (same network namespace) that POSTs to it with bash's /dev/tcp, so no
client on the pod network can drain a pooler. The probes stay on the pod IP, read-only.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from .. import naming
from ..api.v1alpha1 import MarketplaceDBSpec, PoolerBudget
from ..settings import Settings
from . import db_tls
from . import pgbouncer as pgb
from .meta import image_pull_secrets, object_meta, restricted_container_security, restricted_pod_security
from .pooler_sizing import rollout_strategy

COMPONENT = "pooler"
EXPORTER_PORT = 9127
# The agent's admin listener (drain, reload): loopback only, reached by the preStop exec.
AGENT_ADMIN_PORT = 8081
# preStop: wait for the endpoints to drop the pod, then let transactions finish.
DRAIN_DELAY_SECONDS = 10
DRAIN_TIMEOUT_SECONDS = 40
TERMINATION_GRACE_SECONDS = DRAIN_DELAY_SECONDS + DRAIN_TIMEOUT_SECONDS + 10
DEFAULT_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "64Mi"},
    "limits": {"memory": "256Mi"},
}
PLACEHOLDER_USERLIST = '"<user>" "<SCRAM-SHA-256 verifier or password, filled in by the operator>"\n'
# bash (Debian's, in the default image) speaks HTTP to the agent over loopback: the drain is not
# reachable from the pod network, and the hook returns only when the agent answers (drained).
PRESTOP_DRAIN = (
    f"exec 3<>/dev/tcp/127.0.0.1/{AGENT_ADMIN_PORT} && "
    "printf 'POST /drain HTTP/1.0\\r\\nContent-Length: 0\\r\\n\\r\\n' >&3 && cat <&3"
)


def image_repository(image: str) -> str:
    """`registry/path/name` of an image reference (tag and digest removed)."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def pooler_image(spec: MarketplaceDBSpec, settings: Settings) -> str:
    """The PgBouncer image, refused unless its repository is allowed (the pod holds credentials)."""
    image = spec.pooler.image or settings.pgbouncer_image
    allowed = settings.pooler_allowed_images or (image_repository(settings.pgbouncer_image),)
    repository = image_repository(image)
    if not any(repository == entry or (entry.endswith("/") and repository.startswith(entry)) for entry in allowed):
        raise pgb.PoolerConfigError(
            f"spec.pooler.image: repository {repository!r} is not allowed by the operator "
            f"(setting MARKETPLACEDB_POOLER_ALLOWED_IMAGES: {', '.join(allowed)})"
        )
    return image


def _meta(resource: dict[str, Any], name: str) -> dict[str, Any]:
    return object_meta(resource, name, COMPONENT)


def config_map(resource: dict[str, Any], ini: str, config_hash: str, paused: bool = False) -> dict[str, Any]:
    meta = _meta(resource, naming.pooler_name(resource["metadata"]["name"]))
    meta["annotations"] = {naming.ANN_CONFIG_HASH: config_hash}
    data = {pgb.INI_KEY: ini, pgb.PAUSED_KEY: "true" if paused else "false"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


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


def _mounts(spec: MarketplaceDBSpec, upstream_tls: bool = False) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": pgb.CONFIG_DIR, "readOnly": True},
        {"name": "auth", "mountPath": pgb.AUTH_DIR, "readOnly": True},
        {"name": "run", "mountPath": pgb.RUN_DIR},
    ]
    if spec.pooler.tls is not None:
        mounts.append({"name": "tls", "mountPath": pgb.TLS_DIR, "readOnly": True})
    if upstream_tls:  # spec.database.tls for PgBouncer's server_tls_* (the agent does not need it)
        mounts += db_tls.volume_mounts(spec.database)
    return mounts


def _pgbouncer_container(spec: MarketplaceDBSpec, image: str, settings: Settings,
                         resources: dict[str, Any]) -> dict[str, Any]:
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
        # The agent drains (PAUSE+SHUTDOWN before 1.23, SHUTDOWN WAIT_FOR_SERVERS after) and answers
        # once PgBouncer exited; only then does kubelet send SIGTERM, which no longer matters.
        # An exec over loopback, not httpGet: kubelet's httpGet comes from the node to the pod IP,
        # which would need the drain to listen on the pod network.
        "lifecycle": {"preStop": {"exec": {"command": ["bash", "-c", PRESTOP_DRAIN]}}},
        "resources": resources,
        "securityContext": restricted_container_security(),
        "volumeMounts": _mounts(spec, upstream_tls=True),
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
        "--admin-port", str(AGENT_ADMIN_PORT),
        "--paused-file", pgb.PAUSED_PATH,
    ] + (["--watch", pgb.TLS_CERT_PATH, "--watch", pgb.TLS_KEY_PATH] if spec.pooler.tls is not None else []) \
      + (["--metrics-port", str(EXPORTER_PORT)] if spec.pooler.metrics.enabled else [])


def _agent_container(spec: MarketplaceDBSpec, settings: Settings) -> dict[str, Any]:
    ports = [{"name": "agent", "containerPort": settings.health_port, "protocol": "TCP"}]
    if spec.pooler.metrics.enabled:  # the agent serves PgBouncer's metrics (pooler_metrics.py)
        ports.append({"name": "metrics", "containerPort": EXPORTER_PORT, "protocol": "TCP"})
    return {
        "name": "agent",
        "image": settings.operator_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["marketplacedb"],
        "args": agent_args(spec, settings),
        "ports": ports,
        # The agent's own loop, not PgBouncer's health: a dead agent restarts only itself.
        "livenessProbe": _http_probe("/livez", settings.health_port, period=10, failures=3),
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": restricted_container_security(),
        "volumeMounts": _mounts(spec),
    }


def _placement(spec: MarketplaceDBSpec, selector: dict[str, str], settings: Settings) -> dict[str, Any]:
    """Across nodes (and zones when labelled), preferred so that a small cluster still schedules.

    The user's constraints are added; one with the same topologyKey replaces the default. A user
    affinity keeps the default podAntiAffinity unless it brings its own.
    """
    pod = spec.pooler.pod
    mine = {c.get("topologyKey") for c in pod.topology_spread_constraints}
    constraints = [
        {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": selector}}
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone") if key not in mine
    ] + [dict(c) for c in pod.topology_spread_constraints]
    affinity: dict[str, Any] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100,
        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}},
    }]}}
    affinity.update(pod.affinity or {})
    placement: dict[str, Any] = {"topologySpreadConstraints": constraints, "affinity": affinity}
    if pod.node_selector:
        placement["nodeSelector"] = dict(pod.node_selector)
    if pod.tolerations:
        placement["tolerations"] = [dict(t) for t in pod.tolerations]
    if pod.priority_class_name:
        placement["priorityClassName"] = pod.priority_class_name
    # The operator's pull Secrets (meta.image_pull_secrets: its own image runs the agent) and the spec's.
    names = [entry["name"] for entry in image_pull_secrets(settings).get("imagePullSecrets", [])]
    names += [ref.name for ref in pod.image_pull_secrets if ref.name not in names]
    if names:
        placement["imagePullSecrets"] = [{"name": name} for name in names]
    return placement


def _volumes(spec: MarketplaceDBSpec, name: str) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": naming.pooler_name(name)}},
        {"name": "auth", "secret": {"secretName": naming.pooler_auth_secret_name(name), "defaultMode": 0o440}},
        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    if spec.pooler.tls is not None:
        volumes.append({"name": "tls", "secret": {"secretName": spec.pooler.tls.secret_ref.name, "defaultMode": 0o440}})
    return volumes + db_tls.volumes(spec.database)


def deployment(resource: dict[str, Any], spec: MarketplaceDBSpec, settings: Settings, restart: str) -> dict[str, Any]:
    name = resource["metadata"]["name"]
    selector = naming.selector_labels(name, COMPONENT)
    pooler = spec.pooler
    containers = [
        _pgbouncer_container(spec, pooler_image(spec, settings), settings, pooler.resources or DEFAULT_RESOURCES),
        _agent_container(spec, settings),
    ]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Every container runs with PgBouncer's uid: the agent (reload, drain, metrics) passes its peer-uid check
        # on the admin socket without a password (a setting: it depends on the image).
        "securityContext": restricted_pod_security(settings.pooler_run_as_uid),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": containers,
        "volumes": _volumes(spec, name),
        **_placement(spec, selector, settings),
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
                    # The operator's labels win: they select the pods.
                    "labels": {**pooler.pod.labels, **naming.labels(name, COMPONENT)},
                    # Only restart-relevant inputs: a reload-safe change must not roll the pods.
                    "annotations": {**pooler.pod.annotations, naming.ANN_RESTART_HASH: restart},
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
    meta = _meta(resource, naming.pooler_name(name))
    if spec.pooler.service.annotations:
        meta["annotations"] = dict(spec.pooler.service.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"type": spec.pooler.service.type, "selector": naming.selector_labels(name, COMPONENT),
                 "ports": ports},
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


Credentials = pgb.PoolerCredentials | Sequence[pgb.PoolerCredentials] | None


def _entries(credentials: Credentials) -> tuple[pgb.PoolerCredentials, ...] | None:
    if credentials is None:
        return None
    return (credentials,) if isinstance(credentials, pgb.PoolerCredentials) else tuple(credentials)


def pooler_config(spec: MarketplaceDBSpec, settings: Settings, budget: PoolerBudget,
                  credentials: Credentials, auth_user: str | None = None) -> pgb.PoolerConfig:
    """`credentials`: every auth-file entry (see specs/pooler_auth.pooler_users), None for a placeholder."""
    image = pooler_image(spec, settings)
    ini = pgb.render_ini(spec, budget, auth_user, pgb.image_version(image))
    entries = _entries(credentials)
    userlist = PLACEHOLDER_USERLIST if entries is None else pgb.render_userlist(*entries)
    return pgb.PoolerConfig(ini=ini, userlist=userlist, image=image, paused=spec.pooler.paused)


def build_pooler(resource: dict[str, Any], spec: MarketplaceDBSpec, settings: Settings, budget: PoolerBudget,
                 credentials: Credentials, auth_user: str | None = None) -> list[dict[str, Any]]:
    """Every pooler object for `resource` (empty when the pooler is disabled)."""
    if not spec.pooler.enabled:
        return []
    config = pooler_config(spec, settings, budget, credentials, auth_user)
    objects = [
        config_map(resource, config.ini, pgb.config_hash(config), spec.pooler.paused),
        auth_secret(resource, None if credentials is None else config.userlist),
        deployment(resource, spec, settings, pgb.restart_hash(config)),
        service(resource, spec),
    ]
    if spec.pooler.replicas > 1:
        objects.append(disruption_budget(resource))
    if spec.pooler.metrics.enabled and spec.pooler.metrics.service_monitor:
        objects.append(service_monitor(resource))
    return objects
