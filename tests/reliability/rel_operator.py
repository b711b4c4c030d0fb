"""The operator as a real subprocess (`marketplacedb run`) against the in-process KMock emulator.

Why a subprocess: a SIGKILL must be a real signal to a real process, its PostgreSQL sessions must
be closed by the kernel, and its stdout/stderr, /proc/PID/cmdline and /metrics must be what an SRE
would see. The emulator lives in the test's event loop, so everything here that waits does so
with asyncio (never blocking the loop that serves the operator's HTTP requests).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

import yaml

from harness.postgres import free_port

# Short timers so faults are seen and recovered from within seconds (settings.py lists every knob).
FAST_ENV = {
    "MARKETPLACEDB_RESYNC_SECONDS": "1",
    "MARKETPLACEDB_TICK_SECONDS": "0.5",
    "MARKETPLACEDB_CONNECT_TIMEOUT_SECONDS": "2",
    "MARKETPLACEDB_DDL_RETRY_BASE_SECONDS": "0.05",
    "MARKETPLACEDB_RETRY_BASE_SECONDS": "0.5",
    "MARKETPLACEDB_MAX_BACKOFF_SECONDS": "2",
    "MARKETPLACEDB_INDEX_LOCK_TIMEOUT_SECONDS": "1",
    "MARKETPLACEDB_DDL_RETRIES": "1",
    "MARKETPLACEDB_LOG_FORMAT": "json",
}


def write_kubeconfig(path: pathlib.Path, server: str) -> pathlib.Path:
    """A kubeconfig whose current context is the emulator (kopf.login_via_client reads it)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": "default"}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config))
    return path


class OperatorProcess:
    """`marketplacedb run --namespace NS` with its output captured to a file (every start appends)."""

    def __init__(self, workdir: pathlib.Path, kubeconfig: pathlib.Path, namespace: str,
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.extra_env = dict(env or {})
        self.log_path = workdir / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.liveness_port = 0
        self.starts = 0
        self.pids: list[int] = []

    def command(self) -> list[str]:
        return [sys.executable, "-m", "marketplacedb_operator.cli", "run", "--namespace", self.namespace,
                "--liveness-port", str(self.liveness_port), "--metrics-port", str(self.metrics_port), "-v"]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MARKETPLACEDB_", "KUBERNETES_"))}
        env.update(FAST_ENV)
        env.update(self.extra_env)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def start(self, timeout: float = 120) -> None:
        # 120 s: importing kopf, kubernetes and pydantic takes seconds on a busy 2-core machine.
        if self.running:
            raise RuntimeError("the operator is already running")
        self.metrics_port, self.liveness_port = free_port(), free_port()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.environment(), cwd=self.workdir, start_new_session=True)
        self.starts += 1
        self.pids.append(self.proc.pid)
        deadline = time.monotonic() + timeout
        while not await self._healthy():
            if not self.running:
                raise RuntimeError(f"the operator exited with {self.returncode}:\n{self.logs()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the operator was not live in {timeout}s:\n{self.logs()[-4000:]}")
            await asyncio.sleep(0.1)

    async def _healthy(self) -> bool:
        try:
            await self.http_get(self.liveness_port, "/healthz")
            return True
        except OSError:
            return False

    @staticmethod
    async def http_get(port: int, path: str) -> str:
        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return str(response.read().decode())

        return await asyncio.to_thread(get)

    async def metrics(self) -> str:
        return await self.http_get(self.metrics_port, "/metrics")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    async def signal(self, sig: int, timeout: float = 20) -> int | None:
        """Send `sig` and wait for the process to end (SIGKILL after `timeout`)."""
        if not self.running:
            return self.returncode
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.running:
            os.kill(self.proc.pid, signal.SIGKILL)
            while self.running:
                await asyncio.sleep(0.05)
        return self.returncode

    async def kill(self) -> int | None:
        return await self.signal(signal.SIGKILL)

    async def stop(self) -> int | None:
        return await self.signal(signal.SIGTERM)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def all_cmdlines() -> dict[int, str]:
    """/proc/*/cmdline of every process on the machine (arguments joined by spaces)."""
    found: dict[int, str] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended meanwhile
    return found


def api_requests(api: Any) -> int:
    """How many HTTP requests the emulator has served so far (every verb, watches included)."""
    return sum(1 for _ in api)
