"""Security review of what a live operator wrote (the chart and the builders are reviewed elsewhere:
tests/test_packaging.py::test_restricted_pod_security_profile, tests/test_rbac.py (least privilege, no
wildcards, Secrets narrow), tests/test_pgbouncer_specs.py (auth file only in a Secret, restricted
pooler Deployment)). What is added here: the same rules checked on the objects the running
operator actually applied, and the pooler's admin console not reachable over the network; and the
Secret-exfiltration scenario of issue 13 (a foreign Secret is never sent to a server nor shown)."""

from __future__ import annotations

import json
import secrets
from typing import Any

import kubernetes_validate
from rel_operator import all_cmdlines

from conftest import DEADLINE, NS, Rel
from harness.kube import eventually
from marketplacedb_operator import naming
from security_env import FakePostgres
from security_env import secret as secret_body


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    if obj["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    if obj["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def _restricted(pod: dict[str, Any]) -> list[str]:
    """Pod Security Standards, restricted profile (https://kubernetes.io/docs/concepts/security/pod-security-standards/)."""
    problems = []
    sec = pod.get("securityContext", {})
    if sec.get("runAsNonRoot") is not True:
        problems.append("pod runAsNonRoot")
    if (sec.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("pod seccompProfile")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(key)
    problems += [f"hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        csec = container.get("securityContext", {})
        name = container["name"]
        if csec.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if csec.get("privileged"):
            problems.append(f"{name}: privileged")
        if (csec.get("capabilities") or {}).get("drop") != ["ALL"] or (csec.get("capabilities") or {}).get("add"):
            problems.append(f"{name}: capabilities")
        if csec.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem")
    return problems


async def test_what_the_operator_applied_is_restricted_and_keeps_secrets_in_secrets(rel: Rel) -> None:
    await rel.operator.start()
    spec = rel.spec()
    spec["pooler"].update(enabled=True, replicas=2)
    await rel.create(spec)
    pooler = naming.pooler_name("shop")
    deployment = await eventually(lambda: rel.objects.get("apps/v1", "Deployment", pooler, NS), timeout=DEADLINE,
                                  message="pooler Deployment")
    await rel.objects.patch(deployment, {"status": {"readyReplicas": 2}}, subresource="status")
    await rel.wait_ready()
    written = [o for o in rel.api_objects() if o.get("kind", "Event") not in ("Namespace", "MarketplaceDB", "Event")
               and o["metadata"].get("name") != "shop-db-owner"]
    kinds = sorted({o["kind"] for o in written})
    assert {"ConfigMap", "CronJob", "Deployment", "Secret", "Service"} <= set(kinds), kinds
    for obj in written:
        clean = {k: v for k, v in obj.items() if k != "status"}
        clean["metadata"] = {k: v for k, v in obj["metadata"].items()
                             if k in ("name", "namespace", "labels", "annotations", "ownerReferences")}
        kubernetes_validate.validate(clean, "1.30.0", strict=True)
        for pod in _pod_specs(obj):
            assert _restricted(pod) == [], (obj["kind"], obj["metadata"]["name"])
            assert pod.get("automountServiceAccountToken") is False, obj["metadata"]["name"]
            for container in pod["containers"]:  # credentials by reference only, never a literal env value
                for env in container.get("env", []):
                    assert rel.canary not in json.dumps(env)
    for cm in (o for o in written if o["kind"] == "ConfigMap"):
        text = json.dumps(cm)
        assert rel.canary not in text and "SCRAM-SHA-256$" not in text and "userlist" not in json.dumps(
            list(cm.get("data", {})))
        ini = cm.get("data", {}).get("pgbouncer.ini", "")
        if ini:
            # The admin console: no admin_users/stats_users, so it answers only the `pgbouncer` user over
            # the Unix socket (peer), never over TCP.
            keys = {line.split("=")[0].strip() for line in ini.splitlines() if "=" in line}
            assert not keys & {"admin_users", "stats_users"}, keys
            assert "auth_type = scram-sha-256" in ini
    for svc in (o for o in written if o["kind"] == "Service"):
        ports = {p["port"] for p in svc["spec"]["ports"]}
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
        assert ports <= {5432, 9127}, ports
    await rel.assert_no_secret_anywhere()


async def test_a_foreign_secret_is_never_transmitted_nor_shown(rel: Rel) -> None:
    """Exfiltration attempt with only `create MarketplaceDB`: another team's TLS Secret named as the
    credentials, the host a fake PostgreSQL that asks for a cleartext password (a real attacker's
    best witness). Its values, user name included, must reach neither the wire nor any output. A
    second resource uses an opted-in Secret whose user name is a canary: the login does happen
    (the owner's choice) but its password is not handed over in cleartext, and no output repeats
    the user name."""
    token = secrets.token_hex(10)
    crt = f"-----BEGIN CERTIFICATE-----\nMIIcrt{token}\n-----END CERTIFICATE-----"
    key = f"-----BEGIN PRIVATE KEY-----\nMIIkey{token}\n-----END PRIVATE KEY-----"
    user = f"user-canary-{token}"
    await rel.objects.create(secret_body("team-b-tls", {"tls.crt": crt, "tls.key": key}, opted_in=False))
    await rel.objects.create(secret_body("witness-owner", {"username": user, "password": rel.canary}, opted_in=True,
                                         bound="witness"))
    attacker, witness = await FakePostgres().start(), await FakePostgres().start()
    try:
        await rel.operator.start()
        for name, server, ref in (
            ("exfil", attacker, {"name": "team-b-tls", "usernameKey": "tls.crt", "passwordKey": "tls.key"}),
            ("witness", witness, {"name": "witness-owner"}),
        ):
            spec = rel.spec()
            spec["database"].update(host="127.0.0.1", port=server.port, sslMode="prefer", credentialsSecretRef=ref)
            await rel.create(spec, name=name)
        refused = await rel.wait_condition("DatabaseReachable", "False", "SecretNotOptedIn", name="exfil")
        assert 'marketplacedb.io/credentials="true"' in refused["message"]
        await rel.wait_condition("DatabaseReachable", "False", "AuthenticationFailed", name="witness")
        await eventually(lambda: witness.connections >= 3, timeout=30, message="retries against the witness")
        # Never transmitted: the attacker's server saw no connection at all.
        assert attacker.connections == 0 and attacker.received == b""
        assert user.encode() in witness.received  # the witness works: it sees what a client sends
        assert rel.canary.encode() not in witness.received  # and no cleartext password (require_auth)
        # Never shown: logs, every stored object but Secrets (status, Events, CronJobs, annotations),
        # metrics, and every process's command line.
        outputs = {"operator logs": rel.operator.logs(), "metrics": await rel.operator.metrics()}
        for obj in rel.api_objects():
            if obj.get("kind") != "Secret":
                outputs[f"{obj.get('kind')} {obj['metadata'].get('name')}"] = json.dumps(obj, default=str)
        outputs.update({f"cmdline {pid}": line for pid, line in all_cmdlines().items()})
        for value in (crt, key, f"MIIcrt{token}", f"MIIkey{token}", user, token, rel.canary):
            assert [where for where, text in outputs.items() if value in text] == [], value
        # No CronJob points its pods at the refused Secret.
        assert all("team-b-tls" not in json.dumps(o) for o in rel.api_objects() if o.get("kind") == "CronJob")
    finally:
        await attacker.stop()
        await witness.stop()
