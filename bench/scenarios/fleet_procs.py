"""The processes of scenario 6 (bench/scenarios/operator_scale.py): the API emulator
(bench/kube_server.py) and the operator under benchmark (bench/operator_proc.py), each in a
subprocess of its own so that the operator's resident memory is its own."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from .._harness import ROOT, free_port

NAMESPACE = "bench"
# /metrics is scraped as the chart's ServiceMonitor does (interval 30 s): a scrape builds the whole
# exposition (~5 MB at N = 1,000) in the operator, and production pays that, so the peak includes it.
SCRAPE_EVERY = 30.0
# Prometheus 2.x's scrape Accept header (scrape/scrape.go); it always asks for gzip too.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


class KubeServer:
    """bench/kube_server.py in a subprocess, spoken to over its stdin/stdout."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.kube_server"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(workdir / "kube.log", "ab"), text=True)
        self.url = str(self._read()["url"])
        self._files = 0

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the API emulator exited: {(self.workdir / 'kube.log').read_text()[-2000:]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def create(self, objects: list[dict[str, Any]]) -> dict[str, Any]:
        self._files += 1
        path = self.workdir / f"objects-{self._files}.json"
        path.write_text(json.dumps(objects))
        return self.call({"op": "create", "file": str(path)})

    def stats(self) -> dict[str, Any]:
        return self.call({"op": "stats"})

    def close(self) -> None:
        try:
            self.call({"op": "quit"})
            self.proc.wait(10)
        except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)


class Operator:
    """`python -m bench.operator_proc LOG -- run -n bench` against the emulator (kubeconfig)."""

    def __init__(self, workdir: Path, url: str, label: str, *, trace: bool = False) -> None:
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": url}}],
            "users": [{"name": "anonymous", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "anonymous",
                                                        "namespace": NAMESPACE}}],
        }))
        self.log = workdir / f"reconciles-{label}.jsonl"
        self.log.write_text("")
        self.liveness = free_port()
        self.metrics_port = free_port()
        # The operator's own defaults (resync 300 s, JSON logs at INFO), as `marketplacedb run` has them.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "MARKETPLACEDB_"))}
        env.update(KUBECONFIG=str(kubeconfig))
        if env.get("BENCH_TRACEMALLOC"):  # one growth report per operator process
            env["BENCH_TRACEMALLOC"] = f"{env['BENCH_TRACEMALLOC']}.{label}"
        self.trace = workdir / f"tracemalloc-{label}.txt" if trace else None
        if self.trace is not None:  # where the memory goes, reported at memory_profile() only
            env.update(BENCH_TRACEMALLOC=str(self.trace), BENCH_TRACEMALLOC_SECONDS="86400",
                       BENCH_TRACEMALLOC_FRAMES="6")
        self.stderr: IO[bytes] = open(workdir / f"operator-{label}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.operator_proc", str(self.log), "--", "run", "-n", NAMESPACE,
             "--liveness-port", str(self.liveness), "--metrics-port", str(self.metrics_port)],
            cwd=ROOT, env=env, stdout=self.stderr, stderr=self.stderr)
        self.rss_samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self.scrapes: list[int] = []  # bytes of each /metrics scrape
        threading.Thread(target=self._scrape, daemon=True).start()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the operator's liveness endpoint did not answer")

    def status_mib(self, key: str) -> float:
        """VmRSS (resident now) or VmHWM (peak resident) of the operator process, in MiB."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
        except OSError:
            pass
        return float("nan")

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.rss_samples.append((time.time(), self.status_mib("VmRSS")))

    def _scrape(self) -> None:
        """As Prometheus scrapes: its Accept header (OpenMetrics first) and gzip."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.metrics_port}/metrics", headers={
            "Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
        while not self._stop.wait(SCRAPE_EVERY):
            try:
                with urllib.request.urlopen(request, timeout=20) as resp:
                    body = resp.read()
                    gzipped = resp.headers.get("Content-Encoding") == "gzip"
                self.scrapes.append(len(gzip.decompress(body) if gzipped else body))
            except OSError:
                pass  # not up yet, or stopping: the next interval tries again

    def memory_profile(self, timeout: float = 120) -> dict[str, Any] | None:
        """The traced process's growth by owner since start-up, taken now (SIGUSR1)."""
        if self.trace is None or self.proc.poll() is not None:
            return None
        asked = time.time()
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        result = Path(f"{self.trace}.json")
        while time.monotonic() < deadline:
            try:
                profile: dict[str, Any] = json.loads(result.read_text())
                if profile["time"] >= asked:
                    profile["text_tail"] = self.trace.read_text()[:6000]
                    return profile
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        return None

    def reconciles(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.stderr.close()
