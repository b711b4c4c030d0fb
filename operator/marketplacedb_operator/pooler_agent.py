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
- Drain (POST /drain on the loopback-only admin listener, the pgbouncer container's preStop
  exec): become unready, wait for the endpoints to drop the pod, then let running transactions
  finish and stop: `PAUSE` + `SHUTDOWN` before 1.23 (what SIGINT does there; SIGTERM would be an
  immediate shutdown), `SHUTDOWN WAIT_FOR_SERVERS` from 1.23 on. It returns when PgBouncer has
  exited or the timeout passed. The probe listener (pod IP) serves only read-only GETs. A drain
  is not final: when a new PgBouncer process answers (its socket is a new file: kubelet restarted
  the container after a liveness failure, whose preStop also drains), the agent serves again.
- Pause (`paused` file of the ConfigMap, from spec.pooler.paused): `PAUSE <db>` (returns once
  running transactions have finished; new ones wait in PgBouncer) and `RESUME <db>`. An intended
  pause keeps the pod ready, so clients queue instead of being refused.
- Version: SHOW VERSION, and the [pgbouncer] keys of the file that SHOW CONFIG does not list
  (PgBouncer ignores unknown keys with a log line): reported on /readyz and /status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from .pooler_console import AdminConsole, AdminError, config_mismatches, quote_name, unknown_keys
from .pooler_metrics import registry

log = logging.getLogger("marketplacedb.pooler_agent")

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
    admin_port: int = 8081
    admin_host: str = "127.0.0.1"
    paused_file: str | None = None
    watch: tuple[str, ...] = ()
    metrics_port: int | None = None  # PgBouncer's metrics (pooler_metrics.py), on listen_host


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
        self.version = ""
        self.unsupported: list[str] = []
        self.pausing = threading.Lock()  # one PAUSE/RESUME at a time (PAUSE may wait for transactions)
        self._drain_socket: tuple[int, int] | None = None
        self._digest = self._files_digest()
        self._lock = threading.Lock()

    # -- reload ----------------------------------------------------------------------------------

    def _files_digest(self) -> str:
        digest = hashlib.sha256()
        for path in (self.options.config, self.options.auth_file, *self.options.watch):
            try:
                digest.update(Path(path).read_bytes())
            except OSError:
                digest.update(b"<missing>")
            digest.update(b"\x00")
        return digest.hexdigest()

    def verify(self) -> dict[str, tuple[str, str]]:
        ini = Path(self.options.config).read_text()
        shown = self.console.query("SHOW CONFIG")
        self.mismatches = config_mismatches(ini, shown)
        unsupported = unknown_keys(ini, shown)
        if unsupported != self.unsupported or not self.version:
            self.version = str((self.console.query("SHOW VERSION") or [{}])[0].get("version", ""))
            if unsupported:
                log.warning("%s ignores parameters it does not know: %s", self.version, ", ".join(unsupported))
        self.unsupported = unsupported
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
        if int(row.get("disabled") or 0):
            return False, f"database {self.options.database!r} is disabled"
        if int(row.get("paused") or 0) and not self.want_paused():
            return False, f"database {self.options.database!r} is paused"
        if self.mismatches:
            return False, "running config differs from the files: " + ", ".join(sorted(self.mismatches))
        return True, "serving"

    # -- pause -----------------------------------------------------------------------------------

    def want_paused(self) -> bool:
        if not self.options.paused_file:
            return False
        try:
            return Path(self.options.paused_file).read_text().strip().lower() == "true"
        except OSError:
            return False

    def is_paused(self) -> bool:
        rows = {str(r["name"]): r for r in self.console.query("SHOW DATABASES")}
        return bool(int((rows.get(self.options.database) or {}).get("paused") or 0))

    def sync_pause(self) -> None:
        """PAUSE or RESUME the database to match the file; PAUSE runs in a thread (it waits for the
        running transactions), so reloads and probes go on meanwhile."""
        if not self.options.paused_file or self.draining or self.pausing.locked():
            return
        want, paused = self.want_paused(), self.is_paused()
        if want == paused:
            return
        command = ("PAUSE " if want else "RESUME ") + quote_name(self.options.database)

        def run() -> None:
            with self.pausing:
                try:
                    self.console.query(command)
                    log.info("%s done", command.split()[0])
                except AdminError as exc:
                    log.warning("%s failed: %s", command.split()[0], exc)

        threading.Thread(target=run, name="pooler-agent-pause", daemon=True).start()

    # -- drain -----------------------------------------------------------------------------------

    def _socket_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(Path(self.options.socket_dir) / f".s.PGSQL.{self.options.port}")
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def recover(self) -> bool:
        """After a finished drain: serve again once a *new* PgBouncer answers (True when it does)."""
        if not (self.draining and self.drained.is_set()):
            return False
        identity = self._socket_identity()
        if identity is None or identity == self._drain_socket or not self.alive()[0]:
            return False
        with self._lock:
            self.draining = False
            self.drained.clear()
            self._drain_socket = None
        log.info("PgBouncer is back after a drain: serving again")
        return True

    def drain(self) -> bool:
        """Stop taking clients, let transactions finish, stop PgBouncer; True when it has exited."""
        with self._lock:
            if self.draining:
                return self.drained.wait(self.options.drain_delay + self.options.drain_timeout + 5)
            self.draining = True
            self._drain_socket = self._socket_identity()
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
        except AdminError as exc:
            log.info("shutdown: %s", exc)
            return
        # PAUSE returns once every server is released; an error there must not skip SHUTDOWN.
        # SHUTDOWN closes our own connection too, so its error is the expected outcome.
        commands = ["SHUTDOWN WAIT_FOR_SERVERS"] if (major, minor) >= (1, 23) else ["PAUSE", "SHUTDOWN"]
        for command in commands:
            try:
                self.console.query(command)
            except AdminError as exc:
                log.info("%s: %s", command, exc)


class _Handler(http.server.BaseHTTPRequestHandler):
    agent: PoolerAgent
    admin: bool = False  # the loopback listener: POST /drain and /reload

    def _status(self) -> tuple[bool, str]:
        return True, "status"

    def do_GET(self) -> None:
        checks: dict[str, Callable[[], tuple[bool, str]]] = {
            "/livez": lambda: (True, "agent running"),
            "/healthz": self.agent.alive,
            "/readyz": self.agent.ready,
            "/status": self._status,
        }
        self._answer(checks)

    def do_POST(self) -> None:
        if not self.admin:
            self._reply(404, {"ok": False, "reason": "not found"})
            return
        self._answer({
            "/drain": lambda: (self.agent.drain(), "drained"),
            "/reload": lambda: (not self.agent.reload(), "reloaded"),
        })

    def _answer(self, checks: dict[str, Callable[[], tuple[bool, str]]]) -> None:
        check = checks.get(self.path.split("?")[0])
        if check is None:
            self._reply(404, {"ok": False, "reason": "not found"})
            return
        try:
            ok, reason = check()
        except AdminError as exc:
            ok, reason = False, str(exc)
        body: dict[str, Any] = {"ok": ok, "reason": reason, "reloads": self.agent.reloads}
        if self.agent.unsupported:
            body["unsupported"] = self.agent.unsupported
        if self.path.startswith("/status"):
            body.update(version=self.agent.version, paused=self.agent.want_paused(), draining=self.agent.draining,
                        unsupported=self.agent.unsupported)
        self._reply(200 if ok else 503, body)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def _listen(agent: PoolerAgent, host: str, port: int, admin: bool) -> http.server.ThreadingHTTPServer:
    handler = type("AdminHandler" if admin else "ProbeHandler", (_Handler,), {"agent": agent, "admin": admin})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"pooler-agent-http-{port}", daemon=True).start()
    return server


def serve(agent: PoolerAgent) -> list[http.server.ThreadingHTTPServer]:
    """The probe listener (pod network, read-only) and the admin listener (loopback only)."""
    if agent.options.admin_host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("--admin-host must be a loopback address: drain and reload are not for the pod network")
    return [
        _listen(agent, agent.options.listen_host, agent.options.listen_port, admin=False),
        _listen(agent, agent.options.admin_host, agent.options.admin_port, admin=True),
    ]


def run(options: AgentOptions) -> int:
    """Serve until a signal. On SIGTERM keep serving until the drain has finished or PgBouncer is
    gone (kubelet sends SIGTERM to every container at once, while the pgbouncer container's preStop
    hook is still waiting on our /drain); SIGINT stops at once."""
    agent = PoolerAgent(options)
    servers = serve(agent)
    if options.metrics_port is not None:
        start_http_server(options.metrics_port, options.listen_host, registry(agent.console))

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
            agent.recover()
            _quietly(agent.sync_pause)
        time.sleep(options.interval)
    for server in servers:
        server.shutdown()
    return 0


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except AdminError as exc:
        log.debug("admin console: %s", exc)
