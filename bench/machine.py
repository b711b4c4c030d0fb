"""What the numbers came from: the machine, the software versions, how loaded it was."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from ._harness import pg_bindir, pgbouncer_binary


def _first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc.__class__.__name__})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    except OSError:
        return float("nan")
    return int(match.group(1)) / 1024 / 1024 if match else float("nan")


def cpu_busy_sample(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat), whoever used them."""

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    span = total1 - total0
    return 1 - (idle1 - idle0) / span if span else float("nan")


def describe() -> dict[str, Any]:
    bindir = pg_bindir()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "memory_gib": round(_mem_total_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": _first_line([str(bindir / "postgres"), "--version"]),
        "pgbench": _first_line([str(bindir / "pgbench"), "--version"]),
        "pgbouncer": _first_line([pgbouncer_binary(), "--version"]),
        "load_start": os.getloadavg(),
        "busy_before_start": cpu_busy_sample(2.0),
    }
