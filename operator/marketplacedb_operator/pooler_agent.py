"""`marketplacedb pooler-agent`: the sidecar that reloads, checks and drains PgBouncer.

It talks to PgBouncer's admin console over the shared Unix socket as `pgbouncer`, which PgBouncer
admits without a password only for a peer with its own uid (the whole pod runs with one uid), so
the console needs no credentials and is unreachable over TCP.

- Reload: kubelet swaps the mounted ConfigMap/Secret in place; the agent sees the content change,
  issues RELOAD and compares SHOW CONFIG with the file, because PgBouncer < 1.25 does not report
  RELOAD errors (a rejected value silently keeps the old one).
- Health: /livez (the agent's own loop), /healthz (the admin console answers: PgBouncer's event
  loop runs), /readyz (not draining, the database is listed in SHOW DATABASES and not paused or
  disabled, and the running config matches the files). Readiness deliberately does not run
  `SELECT 1` through the pool: a database outage would then empty the Service of every pooler pod
  at once (clients get "connection refused" instead of PgBouncer's queueing and clear errors), and
  every probe would take a server connection from the pool.
- Drain (/drain, the pgbouncer container's preStop hook): become unready, wait for the endpoints
  to drop the pod, then let running transactions finish and stop: `PAUSE` + `SHUTDOWN` before
  1.23 (what SIGINT does there; SIGTERM would be an immediate shutdown), `SHUTDOWN
  WAIT_FOR_SERVERS` from 1.23 on. It returns when PgBouncer has exited or the timeout passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from .specs.pgbouncer import parse_ini

log = logging.getLogger("marketplacedb.pooler_agent")

# SHOW CONFIG prints some values differently from the file; everything else must match exactly.
_OCTAL_KEYS = {"unix_socket_mode"}


class AdminError(Exception):
    """The admin console did not answer or refused a command."""


@dataclasses.dataclass
class AdminConsole:
    """PgBouncer's admin console over its Unix socket (simple query protocol, autocommit)."""

    socket_dir: str
    port: int
    timeout: int = 3

    def query(self, command: str) -> list[dict[str, Any]]:
        try:
            with psycopg.connect(host=self.socket_dir, port=self.port, dbname="pgbouncer", user="pgbouncer",
                                 autocommit=True, connect_timeout=self.timeout,
                                 cursor_factory=psycopg.ClientCursor) as conn:
                cur = conn.execute(command)
                if cur.description is None:
                    return []
                names = [column.name for column in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        except psycopg.Error as exc:
            raise AdminError(f"{command}: {str(exc).strip() or type(exc).__name__}") from None

    def version(self) -> tuple[int, int]:
        rows = self.query("SHOW VERSION")
        match = re.search(r"([0-9]+)\.([0-9]+)", str(rows[0]["version"])) if rows else None
        if match is None:
            raise AdminError("SHOW VERSION: no version")
        return int(match.group(1)), int(match.group(2))


def _normalize(key: str, value: str) -> str:
    value = value.strip()
    if key in _OCTAL_KEYS and re.fullmatch(r"0[0-7]+", value):
        return str(int(value, 8))
    return value


def config_mismatches(ini_text: str, shown: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """{key: (in the file, running)} for every [pgbouncer] key PgBouncer runs with another value."""
    running = {str(row["key"]): "" if row["value"] is None else str(row["value"]) for row in shown}
    wanted = parse_ini(ini_text).get("pgbouncer", {})
    return {
        key: (value, running[key])
        for key, value in sorted(wanted.items())
        if key in running and _normalize(key, value) != _normalize(key, running[key])
    }


@dataclasses.dataclass
class AgentOptions:
    socket_dir: str
    port: int
    config: str
    auth_file: str
    database: str
    listen_port: int = 8080
    listen_host: str = "0.0.0.0"
    interval: float = 2.0
    drain_delay: float = 10.0
    drain_timeout: float = 40.0


class PoolerAgent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.console = AdminConsole(options.socket_dir, options.port)
        self.draining = False
        self.drained = threading.Event()
        self.stopping = threading.Event()
        self.reloads = 0
        self.mismatches: dict[str, tuple[str, str]] = {}
        self.last_error = ""
        self._digest = self._files_digest()
        self._lock = threading.Lock()

    # -- reload ----------------------------------------------------------------------------------

    def _files_digest(self) -> str:
        digest = hashlib.sha256()
        for path in (self.options.config, self.options.auth_file):
            try:
                digest.update(Path(path).read_bytes())
            except OSError:
                digest.update(b"<missing>")
            digest.update(b"\x00")
        return digest.hexdigest()

    def verify(self) -> dict[str, tuple[str, str]]:
        ini = Path(self.options.config).read_text()
        self.mismatches = config_mismatches(ini, self.console.query("SHOW CONFIG"))
        return self.mismatches

    def reload(self) -> dict[str, tuple[str, str]]:
        """RELOAD, then what SHOW CONFIG disagrees with (empty: the new config runs)."""
        with self._lock:
            self.console.query("RELOAD")
            self.reloads += 1
            mismatches = self.verify()
        if mismatches:
            log.warning("RELOAD did not apply: %s", ", ".join(sorted(mismatches)))
        else:
            log.info("RELOAD applied (reload %d)", self.reloads)
        return mismatches

    def check_once(self) -> bool:
        """Reload when the mounted files changed; True when a reload was issued."""
        digest = self._files_digest()
        if digest == self._digest or self.draining:
            return False
        try:
            self.reload()
            self._digest = digest  # only once applied: a failed RELOAD is retried next round
            self.last_error = ""
        except AdminError as exc:
            self.last_error = str(exc)
            log.warning("reload failed: %s", exc)
            return False
        return True

    # -- health ----------------------------------------------------------------------------------

    def alive(self) -> tuple[bool, str]:
        try:
            self.console.query("SHOW VERSION")
        except AdminError as exc:
            return False, str(exc)
        return True, "admin console answers"

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        try:
            rows = {str(r["name"]): r for r in self.console.query("SHOW DATABASES")}
        except AdminError as exc:
            return False, str(exc)
        row = rows.get(self.options.database)
        if row is None:
            return False, f"database {self.options.database!r} is not configured"
        if int(row.get("paused") or 0) or int(row.get("disabled") or 0):
            return False, f"database {self.options.database!r} is paused or disabled"
        if self.mismatches:
            return False, "running config differs from the files: " + ", ".join(sorted(self.mismatches))
        return True, "serving"

    # -- drain -----------------------------------------------------------------------------------

    def drain(self) -> bool:
        """Stop taking clients, let transactions finish, stop PgBouncer; True when it has exited."""
        with self._lock:
            if self.draining:
                return self.drained.wait(self.options.drain_delay + self.options.drain_timeout + 5)
            self.draining = True
        try:
            time.sleep(self.options.drain_delay)  # endpoints controllers drop the unready pod
            self._shutdown()
            deadline = time.monotonic() + self.options.drain_timeout
            while time.monotonic() < deadline:
                if not self.alive()[0]:
                    return True
                time.sleep(0.2)
            return False
        finally:
            self.drained.set()

    def _shutdown(self) -> None:
        try:
            major, minor = self.console.version()
            if (major, minor) >= (1, 23):
                commands = ["SHUTDOWN WAIT_FOR_SERVERS"]
            else:
                commands = ["PAUSE", "SHUTDOWN"]  # PAUSE returns once every server is released
            for command in commands:
                self.console.query(command)
        except AdminError as exc:
            # SHUTDOWN closes our own connection too: an error here is the expected outcome.
            log.info("shutdown: %s", exc)


class _Handler(http.server.BaseHTTPRequestHandler):
    agent: PoolerAgent

    def do_GET(self) -> None:
        checks: dict[str, Callable[[], tuple[bool, str]]] = {
            "/livez": lambda: (True, "agent running"),
            "/healthz": self.agent.alive,
            "/readyz": self.agent.ready,
            "/drain": lambda: (self.agent.drain(), "drained"),
        }
        check = checks.get(self.path.split("?")[0])
        if check is None:
            self._reply(404, {"ok": False, "reason": "not found"})
            return
        ok, reason = check()
        self._reply(200 if ok else 503, {"ok": ok, "reason": reason, "reloads": self.agent.reloads})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def serve(agent: PoolerAgent) -> http.server.ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"agent": agent})
    server = http.server.ThreadingHTTPServer((agent.options.listen_host, agent.options.listen_port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pooler-agent-http", daemon=True).start()
    return server


def run(options: AgentOptions) -> int:
    """Serve until a signal. On SIGTERM keep serving until the drain has finished or PgBouncer is
    gone (kubelet sends SIGTERM to every container at once, while the pgbouncer container's preStop
    hook is still waiting on our /drain); SIGINT stops at once."""
    agent = PoolerAgent(options)
    server = serve(agent)

    def on_term(signum: int, frame: Any) -> None:
        agent.stopping.set()

    def on_int(signum: int, frame: Any) -> None:
        agent.stopping.set()
        agent.drained.set()  # SIGINT (a human, a test): stop now, drain or not

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)
    try:
        agent.verify()
    except AdminError as exc:
        log.info("PgBouncer not answering yet: %s", exc)
    grace = options.drain_delay + options.drain_timeout + 5
    stop_deadline: float | None = None
    while True:
        if agent.stopping.is_set():
            stop_deadline = stop_deadline or time.monotonic() + grace
            if (agent.drained.is_set() or not agent.alive()[0] or time.monotonic() > stop_deadline):
                break
        else:
            agent.check_once()
        time.sleep(options.interval)
    server.shutdown()
    return 0
