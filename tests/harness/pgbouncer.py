"""The real Debian `pgbouncer` binary, started on a given (rendered) config for tests.

The config text is used as is, except for what cannot be the same on a test machine: the listen
port, the unix socket dir, the log file, the pid file and the auth_file path (all in a temp dir).
Everything that matters to behaviour (pool_mode, auth_type, pool sizes, timeouts, admin_users...)
comes from the caller's text, so a test exercises the config the operator renders.

pgbouncer refuses to run as root, so as root it runs as the `postgres` OS user, like PostgreSQL.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from psycopg.conninfo import make_conninfo

from .postgres import as_service_user, free_port, make_service_dir, write_service_file

__all__ = ["PgBouncerFactory", "PgBouncerProcess", "free_port", "override_ini", "pgbouncer_binary"]


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if not found:
        raise RuntimeError("pgbouncer not found: run `bash scripts/bootstrap.sh` (apt pgbouncer)")
    return found


_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.*-]+)\s*=")


def override_ini(text: str, section: str, overrides: dict[str, str]) -> str:
    """Set `key = value` in one section of a pgbouncer ini, replacing or appending, keeping the rest.

    Not configparser: it would rewrite keys, comments and `%` values that pgbouncer reads verbatim.
    """
    lines = text.splitlines()
    out: list[str] = []
    current: str | None = None
    seen: set[str] = set()
    found_section = False

    def flush_missing() -> None:
        out.extend(f"{key} = {value}" for key, value in overrides.items() if key not in seen)
        seen.update(overrides)

    for line in lines:
        match = _SECTION.match(line)
        if match:
            if current == section:
                flush_missing()
            current = match.group(1).strip().lower()
            found_section = found_section or current == section
            out.append(line)
            continue
        key = _KEY.match(line)
        if current == section and key and key.group(1).lower() in overrides:
            name = key.group(1).lower()
            if name not in seen:
                out.append(f"{name} = {overrides[name]}")
                seen.add(name)
            continue  # a duplicate key: pgbouncer would take the last one; we keep only ours
        out.append(line)
    if current == section:
        flush_missing()
    if not found_section:
        out.append(f"[{section}]")
        flush_missing()
    return "\n".join(out) + "\n"


class PgBouncerProcess:
    """One pgbouncer process in the foreground (so its pid is ours to signal)."""

    host = "127.0.0.1"

    def __init__(self, ini_text: str, userlist_text: str = "", *, port: int | None = None) -> None:
        self.ini_text = ini_text
        self.userlist_text = userlist_text
        self.workdir = make_service_dir("mdb-pgbouncer-")
        self.port = port or 0
        self._fixed_port = port is not None
        self.ini_path = self.workdir / "pgbouncer.ini"
        self.userlist_path = self.workdir / "userlist.txt"
        self.logfile = self.workdir / "pgbouncer.log"
        self.pidfile = self.workdir / "pgbouncer.pid"
        self.stderr_path = self.workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- config -----------------------------------------------------------------------------------

    def write_config(self, ini_text: str | None = None, userlist_text: str | None = None) -> None:
        """(Re)write the files: call before reload() to test a config change."""
        if ini_text is not None:
            self.ini_text = ini_text
        if userlist_text is not None:
            self.userlist_text = userlist_text
        effective = override_ini(self.ini_text, "pgbouncer", {
            "listen_port": str(self.port),
            "unix_socket_dir": str(self.workdir),
            "logfile": str(self.logfile),
            "pidfile": str(self.pidfile),
            "auth_file": str(self.userlist_path),
        })
        write_service_file(self.ini_path, effective)
        write_service_file(self.userlist_path, self.userlist_text)

    @property
    def socket_path(self) -> Path:
        return self.workdir / f".s.PGSQL.{self.port}"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 15) -> None:
        if self.is_running():
            return
        last_error = ""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            if not self._fixed_port and (not self.port or last_error):
                self.port = free_port()
            self.write_config()
            self.pidfile.unlink(missing_ok=True)
            with open(self.stderr_path, "ab") as stderr:
                self.proc = subprocess.Popen([pgbouncer_binary(), str(self.ini_path)], cwd=self.workdir,
                                             stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                             **as_service_user())
            error = self._wait_accepting(timeout)
            if error is None:
                return
            last_error = error
            if self._fixed_port:
                break
        raise RuntimeError(f"pgbouncer did not start: {last_error}\n{self.log_text()[-4000:]}")

    def _wait_accepting(self, timeout: float) -> str | None:
        """None once the TCP port accepts; else why not (the process exited, or the time ran out)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with code {self.proc.returncode}"
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    # The unix socket too: admin() goes through it.
                    if self.socket_path.exists():
                        return None
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        return f"not accepting on {self.host}:{self.port} after {timeout}s"

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("pgbouncer was not started")
        return self.proc.pid

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Stop and wait. SIGTERM: immediate shutdown in 1.18; SIGINT: safe shutdown (waits for
        server connections to be released, i.e. transactions to end). Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def reload(self, how: Literal["sighup", "admin"] = "sighup", timeout: float = 10) -> None:
        """Re-read the config files. pgbouncer < 1.25 reports no reload errors: check SHOW CONFIG."""
        if how == "admin":
            self.admin("RELOAD")
            return
        marker = self.log_text().count("got SIGHUP")
        self.send(signal.SIGHUP)
        # SIGHUP is asynchronous: wait until pgbouncer logs it, so the caller sees the new config.
        deadline = time.monotonic() + timeout
        while self.log_text().count("got SIGHUP") <= marker:
            if time.monotonic() > deadline:
                raise TimeoutError("pgbouncer did not log the SIGHUP reload")
            time.sleep(0.05)
        self.admin("SHOW VERSION")  # a round trip through the event loop: the reload has finished

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- clients ----------------------------------------------------------------------------------

    def dsn(self, dbname: str, user: str, password: str | None = None) -> str:
        params: dict[str, Any] = {"host": self.host, "port": self.port, "dbname": dbname, "user": user,
                                     "connect_timeout": 10}
        if password is not None:
            params["password"] = password
        return make_conninfo(**params)

    def admin(self, command: str, *, user: str = "pgbouncer", password: str | None = None
              ) -> list[dict[str, str]]:
        """Run one admin-console command (SHOW POOLS, RELOAD, ...) through the unix socket.

        Default: user `pgbouncer` with no password, which pgbouncer admits on its unix socket when the
        client has the same OS uid as the pgbouncer process (so psql runs as that user too). Another
        user from admin_users/stats_users works with its password. psql, because the console speaks
        only the simple query protocol. The password goes through the environment, never argv.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if password is not None:
            env["PGPASSWORD"] = password
        result = subprocess.run(
            ["psql", "-X", "-q", "--csv", "-v", "ON_ERROR_STOP=1", "-h", str(self.workdir),
             "-p", str(self.port), "-U", user, "-d", "pgbouncer", "-c", command],
            capture_output=True, text=True, timeout=30, env=env, cwd=self.workdir, **as_service_user())
        if result.returncode != 0:
            raise RuntimeError(f"pgbouncer admin {command!r} failed: {result.stderr.strip()}")
        if not result.stdout.strip():
            return []
        return list(csv.DictReader(io.StringIO(result.stdout)))

    def config(self) -> dict[str, str]:
        """SHOW CONFIG as {key: value}: what the running process actually uses."""
        return {row["key"]: row["value"] for row in self.admin("SHOW CONFIG")}

    def log_text(self) -> str:
        parts = []
        for path in (self.logfile, self.stderr_path):
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "\n".join(parts)


#: conftest's pgbouncer_factory: (ini_text, userlist_text="", *, start=True, port=None) -> process
PgBouncerFactory = Callable[..., PgBouncerProcess]
