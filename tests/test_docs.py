"""Every command in README.md, CONTRIBUTING.md, docs/ and examples/README.md, run or checked.

Runnable here (against the sandbox: a throwaway PostgreSQL 15): every `marketplacedb` command that
talks to a database or prints manifests, `make -n` of every documented target, the SQL of the
database-role grants (then `doctor`, `apply` and `refresh` as that role), the reference DDL, and
examples/README's load commands. Not runnable here (no cluster, no container engine, no helm):
`kubectl`, `helm` and `docker` commands, checked against the code instead: resource and object
names, namespaces, annotation keys, flags that a repeated command needs (`--overwrite`), chart
values (rendered with tests/chart_render.py, which validates them against values.schema.json),
Dockerfile build arguments, operator settings variables and the files they reference.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import psycopg
import pytest
import yaml

from chart_render import render_chart
from docs_commands import ROOT, Command, all_blocks, all_commands
from harness.postgres import FreshDatabase, PostgresServer
from marketplacedb_operator import install, naming
from marketplacedb_operator.cli import build_parser, main
from marketplacedb_operator.settings import PREFIX, Settings

CHART = ROOT / "charts" / "marketplacedb-operator"
EXAMPLE_PATH = ROOT / "examples" / "marketplacedb.yaml"
EXAMPLE = yaml.safe_load(EXAMPLE_PATH.read_text())
EX_NS, EX_NAME = EXAMPLE["metadata"]["namespace"], EXAMPLE["metadata"]["name"]
EX_SECRET = EXAMPLE["spec"]["database"]["credentialsSecretRef"]
COMMANDS = all_commands()


def _by(program: str) -> list[Command]:
    return [c for c in COMMANDS if c.argv[0] == program]


def test_the_docs_have_commands_of_every_kind() -> None:
    """The extraction itself: a broken extractor must not make every check below vacuous."""
    counts = collections.Counter(c.argv[0] for c in COMMANDS)
    assert all(counts[p] >= 3 for p in ("kubectl", "helm", "make", "marketplacedb", "docker")), counts
    assert any(c.argv[:3] == ("kubectl", "-n", EX_NS) and "annotate" in c.argv for c in COMMANDS)
    # The credentials Secret is bound to the example's MarketplaceDB wherever it is labelled.
    labelled = [c for c in COMMANDS if "label" in c.argv and "secret" in c.argv]
    bound = [c for c in COMMANDS if "annotate" in c.argv and "secret" in c.argv
             and f"{naming.ANN_CREDENTIALS_FOR}={EX_NAME}" in c.argv]
    assert labelled and len(bound) >= len(labelled), (labelled, bound)


# ---------------------------------------------------------------- kubectl

_VALUE_FLAGS = {"-n", "--namespace", "-f", "--filename", "-p", "--patch", "-o", "--output", "--type", "-l"}
_RESOURCES = {"mdb", "marketplacedb", "marketplacedbs", "secret", "namespace", "deployment", "job", "cronjob"}


def _kubectl_parse(argv: tuple[str, ...]) -> tuple[list[str], dict[str, str], set[str]]:
    positional, options, flags = [], {}, set()
    words = list(argv[1:])
    while words:
        word = words.pop(0)
        if word in _VALUE_FLAGS:
            options[word.lstrip("-")[:1] if word in ("-n", "--namespace", "-f", "--filename") else word] = words.pop(0)
        elif word.startswith("--") and "=" in word:
            key, _, value = word.partition("=")
            options.setdefault(key, value)
            options[f"{key}={value.split('=', 1)[0]}"] = value  # --from-literal=KEY=...: one entry per key
        elif word.startswith("-"):
            flags.add(word)
        else:
            positional.append(word)
    return positional, options, flags


def _operator_deployment() -> dict[str, Any]:
    (deployment,) = [o for o in install.install_manifests() if o["kind"] == "Deployment"]
    return deployment


def _kubectl_problems(command: Command) -> list[str]:  # one rule per documented verb
    positional, options, flags = _kubectl_parse(command.argv)
    verb = positional[0] if positional else ""
    ns = options.get("n", "")
    problems = []
    known = {"apply", "create", "get", "describe", "annotate", "label", "rollout", "set", "patch", "logs", "wait",
             "delete"}
    if verb not in known:
        return [f"unknown kubectl verb {verb!r}"]
    if len(command.argv) == 2 or command.elided:
        return []  # a verb named in prose
    if options.get("f", "-") != "-" and not (ROOT / options["f"]).exists():  # `-f -`: stdin
        problems.append(f"-f {options['f']}: no such file in the repository")
    operator = _operator_deployment()
    operator_name = operator["metadata"]["name"]
    target = positional[1:]
    if verb in ("get", "describe", "annotate") and target and target[0] in ("mdb", "marketplacedb", "marketplacedbs"):
        if len(target) > 1 and target[1] == EX_NAME and ns != EX_NS:
            problems.append(f"mdb {EX_NAME} lives in namespace {EX_NS}: needs -n {EX_NS}")
    elif verb in ("get", "describe") and target and target[0] not in _RESOURCES:
        problems.append(f"unknown resource {target[0]!r}")
    pairs = dict(t.split("=", 1) for t in target if "=" in t)
    if verb == "annotate" and target[0] in ("mdb", "marketplacedb", "marketplacedbs"):
        if not pairs or not set(pairs) <= {naming.ANN_REFRESH_NOW, naming.ANN_APPROVE_PLAN}:
            problems.append(f"annotation {set(pairs)} is not one the operator reads")
        if "--overwrite" not in flags:
            problems.append("annotate needs --overwrite: the annotation stays from the previous request")
    elif verb == "annotate" and target[0].startswith("deployment"):
        probed = {p["deployment"] for p in EXAMPLE["spec"].get("healthProbes", [])}
        name = target[0].split("/", 1)[1] if "/" in target[0] else target[1]
        if pairs != {naming.ANN_PROBED_BY: EX_NAME} or name not in probed or ns != EX_NS:
            problems.append(f"a probed Deployment opts in with {naming.ANN_PROBED_BY}={EX_NAME} in {EX_NS} "
                            f"(one of {sorted(probed)})")
    elif verb == "annotate" and target[:2] == ["secret", EX_SECRET["name"]]:
        if pairs != {naming.ANN_CREDENTIALS_FOR: EX_NAME} or ns != EX_NS:
            problems.append(f"the credentials Secret names its MarketplaceDB with {naming.ANN_CREDENTIALS_FOR}="
                            f"{EX_NAME} in {EX_NS}")
    elif verb == "annotate":
        problems.append(f"annotate {target[0]}: not an object the operator reads annotations from")
    if verb == "label" and target[:2] == ["secret", EX_SECRET["name"]]:
        if pairs != {naming.LABEL_CREDENTIALS: "true"} or ns != EX_NS:
            problems.append(f"the credentials Secret opts in with {naming.LABEL_CREDENTIALS}=true in {EX_NS}")
    if verb == "create" and target[:2] == ["secret", "generic"] and target[2] == EX_SECRET["name"]:
        if ns != EX_NS:
            problems.append(f"Secret {EX_SECRET['name']} must be in {EX_NS}, the example's namespace")
        literal_keys = {k.split("=", 1)[1] for k in options if k.startswith("--from-literal=")}
        wanted = {EX_SECRET.get("usernameKey", "username"), EX_SECRET.get("passwordKey", "password")}
        if literal_keys != wanted:
            problems.append(f"Secret keys {literal_keys}, the resource reads {wanted}")
    if verb == "create" and target[:1] == ["namespace"] and target[1] not in (EX_NS, install.NAMESPACE):
        problems.append(f"namespace {target[1]} is neither the example's nor the operator's")
    if verb in ("rollout", "set", "patch"):
        ref = next((t for t in target if t.startswith("deployment")), "")
        name = ref.split("/", 1)[1] if "/" in ref else (target[target.index(ref) + 1] if ref else "")
        if name != operator_name or ns != install.NAMESPACE:
            problems.append(f"the operator is deployment/{operator_name} in {install.NAMESPACE}, not {name} in {ns}")
    if verb == "set" and target[0] == "image":
        containers = {c["name"] for c in operator["spec"]["template"]["spec"]["containers"]}
        for assignment in target[2:]:
            if assignment.split("=", 1)[0] not in containers:
                problems.append(f"no container {assignment.split('=', 1)[0]!r} in the operator (has {containers})")
    if verb == "set" and target[0] == "env":
        settable = {PREFIX + field.upper() for field in Settings.model_fields}
        env = dict(a.split("=", 1) for a in target[2:])
        unknown = set(env) - settable
        if unknown:
            problems.append(f"{unknown}: not operator settings")
        try:
            Settings.from_env(env)
        except ValueError as exc:
            problems.append(str(exc))
    if verb == "patch":
        patched = copy.deepcopy(operator)
        _merge(patched, json.loads(options["-p"]))
        kubernetes_validate.validate(patched, "1.30.0", strict=True)
    return problems


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@pytest.mark.parametrize("command", _by("kubectl"), ids=str)
def test_kubectl_commands_match_the_code(command: Command) -> None:
    assert _kubectl_problems(command) == [], str(command)


@pytest.mark.parametrize("argv", [
    ("kubectl", "annotate", "mdb", "shop", "marketplacedb.io/approve-plan=PLACEHOLDER"),
    ("kubectl", "-n", "prod", "annotate", "mdb", "shop", "marketplacedb.io/approve-plan=PLACEHOLDER"),
    ("kubectl", "-n", "prod", "annotate", "mdb", "shop", "marketplacedb.io/approve=PLACEHOLDER", "--overwrite"),
    ("kubectl", "create", "secret", "generic", "shop-db-owner", "--from-literal=username=x",
     "--from-literal=password=y"),
    ("kubectl", "-n", "marketplacedb-system", "set", "env", "deployment/marketplacedb-operator",
     "MARKETPLACEDB_PULL_SECRETS=x"),
    ("kubectl", "-n", "marketplacedb-system", "set", "image", "deployment/marketplacedb-operator", "manager=x:1"),
    ("kubectl", "-n", "prod", "label", "secret", "shop-db-owner", "marketplacedb.io/credential=true"),
    ("kubectl", "-n", "prod", "annotate", "deployment", "bff-marketplace-home", "marketplacedb.io/probed-by=other"),
    ("kubectl", "-n", "prod", "annotate", "secret", "shop-db-owner", "marketplacedb.io/credentials-for=other"),
])
def test_the_kubectl_checks_catch_the_mismatches_the_docs_had(argv: tuple[str, ...]) -> None:
    assert _kubectl_problems(Command("example", argv)), argv


# ---------------------------------------------------------------- helm


def _set_value(values: dict[str, Any], key: str, raw: str) -> None:
    value: Any = [v for v in raw[1:-1].split(",") if v] if raw.startswith("{") else raw
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", key)
    node: Any = values
    for part, following in zip(parts, [*parts[1:], None], strict=True):
        step: Any = int(part[1:-1]) if part.startswith("[") else part
        if following is None:
            if isinstance(node, list):
                node.extend([None] * (step + 1 - len(node)))
            node[step] = value
            return
        empty: Any = [] if following.startswith("[") else {}
        if isinstance(node, list):
            node.extend([None] * (step + 1 - len(node)))
            node[step] = node[step] if node[step] is not None else empty
        else:
            node.setdefault(step, empty)
        node = node[step]


def _helm(command: Command) -> tuple[str, str, dict[str, Any], str]:
    words = list(command.argv[2:])
    positional, values, namespace = [], {}, ""
    while words:
        word = words.pop(0)
        if word == "--set":
            key, _, raw = words.pop(0).partition("=")
            _set_value(values, key, raw)
        elif word in ("--namespace", "-n"):
            namespace = words.pop(0)
        elif not word.startswith("-"):
            positional.append(word)
    return positional[0], positional[1], values, namespace


@pytest.mark.parametrize("command", _by("helm"), ids=str)
def test_helm_commands_render_with_their_values(command: Command) -> None:
    assert command.argv[1] in ("install", "upgrade", "template"), str(command)
    if command.elided:
        return
    release, chart, values, namespace = _helm(command)
    assert (ROOT / chart / "Chart.yaml").exists(), f"{command}: no chart at {chart}"
    assert namespace == install.NAMESPACE, f"{command}: the other docs use namespace {install.NAMESPACE}"
    rendered = render_chart(ROOT / chart, values, release=release, namespace=namespace)  # schema-validated
    (deployment,) = rendered.find("Deployment")
    assert deployment["metadata"]["name"] == _operator_deployment()["metadata"]["name"], (
        f"{command}: the docs' kubectl commands name deployment/{_operator_deployment()['metadata']['name']}")
    (service,) = rendered.find("Service")
    assert service["metadata"]["name"] == f"{deployment['metadata']['name']}-metrics"
    # No image is published: an install must run the image the docs build and push.
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] in _pushed_images(), f"{command}: {container['image']} is never pushed"


# ---------------------------------------------------------------- docker and make


def _pushed_images() -> set[str]:
    pushed = {c.argv[2] for c in _by("docker") if c.argv[1] == "push"}
    for command in _by("make"):
        if "image-push" in command.argv:
            assigned = dict(a.split("=", 1) for a in command.argv if "=" in a)
            if "IMAGE" in assigned:  # not the bare target named in prose
                pushed.add(f"{assigned['IMAGE']}:{assigned.get('TAG', '')}")
    return pushed


@pytest.mark.parametrize("command", _by("docker"), ids=str)
def test_docker_commands_match_the_dockerfile(command: Command) -> None:
    verb = command.argv[1]
    assert verb in ("login", "build", "push"), str(command)
    if verb == "build":
        args = set(re.findall(r"^ARG (\w+)", (ROOT / "Dockerfile").read_text(), flags=re.M))
        words = list(command.argv)
        build_args = {words[i + 1].split("=", 1)[0] for i, w in enumerate(words) if w == "--build-arg"}
        assert build_args <= args, f"{command}: no ARG {build_args - args} in the Dockerfile"
        assert "-t" in words and words[-1] == ".", str(command)
        assert words[words.index("-t") + 1] in _pushed_images()


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z0-9-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


@pytest.mark.parametrize("command", _by("make"), ids=str)
def test_make_commands_name_real_targets_and_variables(command: Command) -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = [w for w in command.argv[1:] if "=" not in w and not w.startswith("-")]
    assert set(targets) <= _makefile_targets(), f"{command}: no target {set(targets) - _makefile_targets()}"
    for assignment in (w for w in command.argv[1:] if "=" in w):
        variable = assignment.split("=", 1)[0]
        assert f"$({variable})" in makefile or f"$(if $({variable})" in makefile, f"{command}: {variable} unused"
    result = subprocess.run(["make", "-n", *command.argv[1:]], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, f"{command}: {result.stderr}"


def test_make_help_lists_every_documented_target() -> None:
    listed = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    documented = {w for c in _by("make") for w in c.argv[1:] if "=" not in w and not w.startswith("-")}
    assert documented <= {line.split("\t")[0] for line in listed.splitlines()}


# ---------------------------------------------------------------- the marketplacedb CLI

_RUN_ORDER = ["validate", "crd", "install-manifests", "render", "doctor", "plan", "apply", "refresh"]
# A synopsis placeholder's stand-in, by the flag before it (None: any flag).
_PLACEHOLDERS = {("--view", "NAME"): "mv_category_counts", ("--image-pull-secret", "NAME"): "registry-cred",
                 (None, "REPOSITORY:TAG"): "registry.example.com/platform/marketplacedb-operator:0.1.0",
                 (None, "FILE"): str(EXAMPLE_PATH)}


def _stand_in(previous: str, word: str, dsn: str) -> str:
    if word == "DSN":
        return dsn
    return _PLACEHOLDERS.get((previous, word), _PLACEHOLDERS.get((None, word), word))


def _parse(argv: list[str]) -> Any:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"marketplacedb {shlex.join(argv)}: rejected by the parser") from exc


@pytest.mark.parametrize("command", _by("marketplacedb"), ids=str)
def test_marketplacedb_commands_parse(command: Command) -> None:
    argv = list(command.argv[1:])
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if argv[0] != "--help":
        assert argv[0] in commands, f"{command}: no such command"
    if command.elided:  # `refresh --view ... -o json`: the flags named must exist
        flags = {o for a in commands[argv[0]]._actions for o in a.option_strings}
        assert {w for w in argv if w.startswith("-")} <= flags, str(command)
    elif len(argv) > 1:
        _parse(argv)


def _runnable(dsn: str) -> list[tuple[Command, list[str], dict[str, str]]]:
    seen, out = set(), []
    for command in _by("marketplacedb"):
        argv = list(command.argv[1:])
        if argv[0] not in _RUN_ORDER or command.elided or "HASH" in argv or len(argv) == 1:
            continue
        argv = [_stand_in(previous, w, dsn) for previous, w in zip(["", *argv], argv, strict=False)]
        env = {k: (dsn if k == "MARKETPLACEDB_DSN" else v) for k, v in command.env}
        key = (tuple(argv), tuple(sorted(env.items())))
        if key not in seen:
            seen.add(key)
            out.append((command, argv, env))
    return sorted(out, key=lambda item: _RUN_ORDER.index(item[1][0]))


def test_runnable_marketplacedb_commands_succeed_against_the_sandbox(
        workload_db: FreshDatabase, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """validate, doctor, plan, apply, refresh, render, crd as documented, on the reference workload."""
    runs = _runnable(workload_db.dsn)
    assert {argv[0] for _, argv, _ in runs} >= {"validate", "doctor", "plan", "apply", "refresh", "render"}
    for command, argv, env in runs:
        monkeypatch.delenv("MARKETPLACEDB_DSN", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, f"{command}\n{out.out[-2000:]}\n{out.err[-2000:]}"


# ---------------------------------------------------------------- connection precedence, as README states it


def test_refresh_connection_precedence_is_what_readme_says(
        workload_db: FreshDatabase, pg: PostgresServer, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    manifest = copy.deepcopy(EXAMPLE)
    manifest["spec"]["database"].update(host=pg.host, port=pg.port, dbname=workload_db.name, sslMode="disable")
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(manifest))
    for key in ("PGHOST", "PGPORT", "PGDATABASE", "MARKETPLACEDB_DSN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PGUSER", workload_db.owner)
    monkeypatch.setenv("PGPASSWORD", workload_db.owner_password)
    assert main(["apply", "-f", str(path), "--dsn", workload_db.dsn]) == 0
    # With -f: the manifest's host and port, not PGHOST/PGPORT (pointing nowhere here).
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", "1")
    manifest_wins = "with `-f`, host, port, database and sslmode from the manifest's `spec.database`" in readme
    assert manifest_wins
    assert (main(["refresh", "-f", str(path), "--all"]) == 0) == manifest_wins
    # MARKETPLACEDB_DSN: read by refresh only if README says so.
    monkeypatch.setenv("MARKETPLACEDB_DSN", workload_db.dsn)
    ignored = "`refresh` does not read `MARKETPLACEDB_DSN`" in readme
    assert (main(["refresh", "--view", "mv_category_counts"]) == 0) != ignored
    capsys.readouterr()


# ---------------------------------------------------------------- SQL and shell blocks run on the sandbox


def _statements(text: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in text.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _sql_blocks(name: str) -> list[str]:
    return [b.text for b in all_blocks() if b.lang == "sql" and b.path.name == name]


def test_every_sql_block_is_run_by_a_test() -> None:
    # README.md's one block (the pooler's authQuery lookup function) is compared with what the
    # operator composes in tests/test_pgbouncer_pod.py and run as a DBA would in
    # tests/test_pgbouncer_production.py.
    assert {b.path.name for b in all_blocks() if b.lang == "sql"} == {"install.md", "architecture.md", "README.md"}


@pytest.fixture
def marketplace(pg: PostgresServer) -> Iterator[PostgresServer]:
    """The install doc's names as they are: database `marketplace`, tables owned by `app_owner`."""
    for statement in ("CREATE ROLE dba NOLOGIN", "CREATE ROLE app_owner LOGIN PASSWORD 'app'",
                      "CREATE DATABASE marketplace OWNER dba"):
        pg.execute(statement)
    try:
        pg.execute("GRANT CREATE ON SCHEMA public TO app_owner", dbname="marketplace")
        from marketplacedb_operator import workload
        with psycopg.connect(pg.dsn("marketplace", "app_owner", "app"), autocommit=True) as conn:
            conn.execute(workload.schema_sql())
            conn.execute(workload.data_sql(products=500))
        yield pg
    finally:
        pg.drop_database("marketplace")  # with it every object and grant; memberships go with the roles
        for role in ("shop_owner", "app_owner", "dba"):
            pg.drop_role(role)


def test_the_documented_grants_are_enough(marketplace: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    (block,) = _sql_blocks("install.md")
    dsn = marketplace.dsn("marketplace", "shop_owner", "change-me")
    for statement in _statements(block):
        marketplace.execute(statement, dbname="marketplace")
    assert main(["doctor", "-f", str(EXAMPLE_PATH), "--dsn", dsn]) == 0, capsys.readouterr().out
    assert main(["apply", "-f", str(EXAMPLE_PATH), "--dsn", dsn]) == 0, capsys.readouterr().out
    assert main(["refresh", "-f", str(EXAMPLE_PATH), "--all", "--dsn", dsn]) == 0, capsys.readouterr().out


def test_the_reference_ddl_runs_on_the_reference_schema(workload_db: FreshDatabase) -> None:
    (block,) = _sql_blocks("architecture.md")
    with psycopg.connect(workload_db.dsn, autocommit=True) as conn:
        for statement in _statements(block):
            conn.execute(statement)
        names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'idx_%'")}
    declared = {i["name"] for i in EXAMPLE["spec"]["indexes"]}
    assert names == declared


def test_examples_readme_loads_a_database(pg: PostgresServer) -> None:
    (block,) = [b for b in all_blocks() if b.path.parent.name == "examples" and b.lang == "sh"]
    # The documented size is 2 M products; the commands are the same at 2,000 (only the size differs).
    script = block.text.replace("--products 2000000", "--products 2000")
    assert script != block.text
    env = {**os.environ, "PGHOST": pg.host, "PGPORT": str(pg.port), "PGUSER": "postgres",
           "PGPASSWORD": pg.superuser_password, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    try:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                                text=True, check=False, timeout=240)
        assert result.returncode == 0, result.stderr
        rows = pg.execute("SELECT count(*) FROM seller_products", dbname="marketplace")
        assert rows[0][0] == 1400  # 70% of the products
    finally:
        pg.drop_database("marketplace")


# ---------------------------------------------------------------- the rest


def test_contributing_lists_every_test_file_in_one_tier() -> None:
    runs = [c for c in _by(".venv/bin/pytest") if not any(w.startswith("-k") for w in c.argv)]
    listed = [w for c in runs for w in c.argv if w.startswith("tests/")]
    for path in listed:
        assert (ROOT / path).exists(), path
    files = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")} | {"tests/reliability"}
    assert sorted(listed) == sorted(files), "CONTRIBUTING.md's tiers must name each test file exactly once"


def test_single_test_example_selects_tests() -> None:
    (command,) = [c for c in _by(".venv/bin/pytest") if "-k" in c.argv]
    args = [w for w in command.argv[1:] if w not in ("-q",)]
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-2000:]
    assert any("::" in line for line in result.stdout.splitlines()), "the example selects no test"


def test_gitops_snippet_names_the_operators_field_manager() -> None:
    (block,) = [b for b in all_blocks() if b.lang == "yaml" and "ignoreDifferences" in b.text]
    snippet = yaml.safe_load(block.text)
    assert snippet["spec"]["ignoreDifferences"][0]["managedFieldsManagers"] == [naming.FIELD_MANAGER]


def _anchors(path: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower-case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_and_anchors_exist() -> None:
    """Links in the docs, and `docs/...md#anchor` references in the code, point at real headings."""
    for path in {b.path for b in all_blocks()}:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", path.read_text(), flags=re.S))
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", prose):
            linked = (path.parent / target) if target else path
            assert linked.exists(), f"{path.relative_to(ROOT)} links {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{path.relative_to(ROOT)} links {target}#{anchor}"
    for source in (ROOT / "operator").rglob("*.py"):
        for target, anchor in re.findall(r"(docs/[\w-]+\.md)#([\w-]+)", source.read_text()):
            assert anchor in _anchors(ROOT / target), f"{source.relative_to(ROOT)} cites {target}#{anchor}"


def test_architecture_anchors_the_lead_maps_design_sections_to() -> None:
    """Code comments cite these anchors: keep them stable."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", text, re.M)}
    assert {"layers", "the-reconcile-loop", "postgresql-and-pgbouncer-facts", "ownership-and-trust", "refresh-state",
            "pooler-sizing-reload-and-drain", "testing-with-real-parts", "reference-workload"} <= anchors


def test_rbac_doc_names_the_secret_verbs_the_operator_is_granted() -> None:
    from marketplacedb_operator.gateways import kube

    text = (ROOT / "docs" / "rbac.md").read_text()
    section = " ".join(text.split("## Secrets", 1)[1].split("\n## ", 1)[0].split())
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    def named(text: str) -> set[str]:  # `get`, `patch, create`: verbs inside code spans
        return {w.strip() for span in re.findall(r"`([^`]+)`", text) for w in span.split(",")} & verbs

    denied = set().union(*(named(sentence) for sentence in re.findall(r"No [^.]*\.", section)))
    granted = named(section) - denied
    (needed,) = [set(v) for group, resource, v in kube.RBAC_NEEDS if resource == "secrets"]
    assert granted == needed and not denied & needed, (granted, denied, needed)
