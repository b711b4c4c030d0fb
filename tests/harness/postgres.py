"""A throwaway PostgreSQL 15 server for tests: initdb + pg_ctl in a temp dir on a free loopback port.

Why a real server: the operator's interesting behaviour (CREATE INDEX CONCURRENTLY, INVALID indexes,
lock timeouts, REFRESH ... CONCURRENTLY, advisory locks) only exists in PostgreSQL itself.

PostgreSQL refuses to run as root, so when the tests run as root every server process runs as the
`postgres` OS user (created by Debian's postgresql package), and the temp dir is owned by it.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

SERVICE_USER = "postgres"  # the OS user that runs servers when we are root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry if it got taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def running_as_root() -> bool:
    return os.geteuid() == 0


def pg_bindir() -> Path:
    """Where initdb/pg_ctl live: PostgreSQL 15 first (the version the project targets)."""
    candidates = [Path("/usr/lib/postgresql/15/bin")]
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidates.append(Path(out.stdout.strip()))
    except (OSError, subprocess.CalledProcessError):
        pass  # Debian's pg_config lives in libpq-dev, which the test machine need not have
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    raise RuntimeError("PostgreSQL 15 binaries not found: run `bash scripts/bootstrap.sh` (apt postgresql-15)")


def as_service_user() -> dict[str, Any]:
    """Popen kwargs that drop root to the `postgres` user (no-op when not root).

    Popen(user=...) switches uid in the forked child before exec, so the pid we get is the server's
    own pid (a `runuser` wrapper would sit in between and swallow signals such as SIGHUP).
    """
    if not running_as_root():
        return {}
    return {"user": SERVICE_USER, "group": SERVICE_USER, "extra_groups": []}


def make_service_dir(prefix: str) -> Path:
    """A temp dir the service user can write; under /tmp because pytest's tmp_path is 0700 root."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if running_as_root():
        shutil.chown(path, SERVICE_USER, SERVICE_USER)
    return path


def write_service_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file readable by the service user only (password files, configs)."""
    path.write_text(text)
    path.chmod(mode)
    if running_as_root():
        shutil.chown(path, SERVICE_USER, SERVICE_USER)


class PostgresServer:
    """One PostgreSQL cluster in a temp dir. `start()` it, `stop()` it, `cleanup()` removes it."""

    host = "127.0.0.1"

    def __init__(self, *, max_connections: int = 100, shared_buffers: str = "32MB",
                 extra_conf: dict[str, str] | None = None) -> None:
        self.bindir = pg_bindir()
        self.max_connections = max_connections
        self.shared_buffers = shared_buffers
        self.extra_conf = dict(extra_conf or {})
        self.superuser_password = secrets.token_urlsafe(18)
        self.basedir = make_service_dir("mdb-pg-")
        self.datadir = self.basedir / "data"
        self.logfile = self.datadir / "server.log"  # inside the datadir, as asked: one dir to inspect
        self.port = 0
        self._initdb()

    # -- lifecycle ------------------------------------------------------------------------------

    def _run(self, args: Sequence[str], *, check: bool = True, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
        # cwd=basedir: as the postgres user, the caller's cwd (e.g. /root/...) may be unreadable.
        return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout,
                              cwd=self.basedir, env=_child_env(), **as_service_user())

    def _initdb(self) -> None:
        pwfile = self.basedir / "pwfile"
        write_service_file(pwfile, self.superuser_password + "\n")
        try:
            self._run([str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                       f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                       "--encoding=UTF8", "--locale=C", "--no-sync"])
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed:\n{exc.stdout}\n{exc.stderr}") from exc
        finally:
            pwfile.unlink()
        # Our own pg_hba: trust on the unix socket (only reachable through the private temp dir),
        # SCRAM on loopback TCP so that clients and pgbouncer authenticate the way production does.
        write_service_file(self.datadir / "pg_hba.conf", (
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        ))

    def _write_conf(self) -> None:
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.basedir}'",
            "max_connections": str(self.max_connections),
            "shared_buffers": f"'{self.shared_buffers}'",
            "password_encryption": "'scram-sha-256'",
            # Test speed: durability is irrelevant for a server that lives for one session.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            **self.extra_conf,
        }
        # postgresql.auto.conf is read last, so these win over initdb's postgresql.conf.
        text = "".join(f"{key} = {value}\n" for key, value in conf.items())
        write_service_file(self.datadir / "postgresql.auto.conf", text)

    def start(self) -> None:
        if self.is_running():
            return
        # A free port can be taken between the probe and the bind: retry with another one.
        last_error = ""
        for _attempt in range(3):
            if not self.port or last_error:
                self.port = free_port()
            self._write_conf()
            result = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                                "-w", "-t", "60", "start"], check=False)
            if result.returncode == 0:
                return
            last_error = f"{result.stdout}\n{result.stderr}\n{self.log_text()[-4000:]}"
        raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")

    def stop(self, mode: str = "fast") -> None:
        if not self.is_running():
            return
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop"])

    def restart(self) -> None:
        self.stop()
        self.start()  # same port (unless it was taken meanwhile), same data

    def is_running(self) -> bool:
        result = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status"], check=False)
        return result.returncode == 0

    def cleanup(self) -> None:
        """Stop (immediately) and delete the cluster's files."""
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.basedir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- client side ------------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        """A libpq key=value conninfo over loopback TCP (SCRAM), values quoted by libpq's rules."""
        if password is None and user == "postgres":
            password = self.superuser_password
        params: dict[str, Any] = {"host": self.host, "port": self.port, "dbname": dbname, "user": user,
                                  "connect_timeout": 10}
        if password is not None:
            params["password"] = password
        return make_conninfo(**params)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname), autocommit=True, **kwargs)

    def execute(self, query: str | sql.Composable, *, dbname: str = "postgres",
                params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser in autocommit; returns its rows ([] when none)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]  # str is a valid Query
            return cur.fetchall() if cur.description is not None else []

    def create_role(self, name: str, password: str | None, *, superuser: bool = False,
                    login: bool = True) -> None:
        options: list[sql.Composable] = [sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"),
                   sql.SQL("LOGIN" if login else "NOLOGIN")]
        if password is not None:
            # Literal: the password is sent in the statement text; it is hashed (SCRAM) by the server.
            options.append(sql.SQL("PASSWORD {}").format(sql.Literal(password)))
        self.execute(sql.SQL("CREATE ROLE {} WITH {}").format(sql.Identifier(name), sql.SQL(" ").join(options)))

    def drop_role(self, name: str) -> None:
        self.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))

    def create_database(self, name: str, owner: str | None = None) -> None:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            query = sql.SQL("{} OWNER {}").format(query, sql.Identifier(owner))
        self.execute(query)

    def drop_database(self, name: str) -> None:
        # Terminate first so the drop never waits on a test's leftover session (or a pgbouncer pool);
        # WITH (FORCE) (PostgreSQL 13+) then also covers sessions that raced in meanwhile.
        self.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND pid <> pg_backend_pid()", params=[name])
        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def scram_verifier(self, role: str) -> str:
        """The role's stored SCRAM-SHA-256 verifier (for a pgbouncer userlist; not the password)."""
        rows = self.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", params=[role])
        if not rows or not rows[0][0]:
            raise LookupError(f"role {role!r} has no password")
        return str(rows[0][0])

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until a superuser connection succeeds (after a restart by other means)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@dataclasses.dataclass(frozen=True)
class FreshDatabase:
    """A database of its own for one test, owned by a login role of its own (conftest's fresh_db)."""

    name: str
    owner: str
    owner_password: str
    dsn: str  # as the owner: what the operator is given in production
    superuser_dsn: str
    server: PostgresServer

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit connection as the owner (autocommit: CREATE INDEX CONCURRENTLY needs it)."""
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)


def new_database(pg: PostgresServer) -> FreshDatabase:
    """A database of its own, owned by a new login role with a random password."""
    suffix = secrets.token_hex(5)
    name, owner, password = f"mdb_{suffix}", f"mdb_{suffix}_owner", secrets.token_urlsafe(16)
    pg.create_role(owner, password)
    pg.create_database(name, owner)
    return FreshDatabase(name=name, owner=owner, owner_password=password, dsn=pg.dsn(name, owner, password),
                         superuser_dsn=pg.dsn(name), server=pg)


def _child_env() -> dict[str, str]:
    # A minimal, predictable environment: no inherited PG* variables pointing elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if running_as_root():
        env["HOME"] = "/var/lib/postgresql" if Path("/var/lib/postgresql").is_dir() else "/tmp"
    return env
