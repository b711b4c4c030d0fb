"""A pytest plugin: a teardown that hangs ends the run with a stack dump, even after a failure.

Why: pytest-timeout disarms its timer as soon as a test fails (its `pytest_exception_interact`
hook, so that a debugger is not killed), and the teardown that follows is then unbounded. After a
failed async test, pytest-asyncio's loop close cancels the leftover tasks once and waits for them;
a task that outlives the cancellation (kopf's timer runner, see harness.kube.kopf_runner) made CI
sit there until its 90-minute limit. This bounds every teardown, failed test or not.

`MDB_TEARDOWN_LIMIT_SECONDS` (default 180) sets the bound; 0 disables it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import io
import os
import sys
import threading
from collections.abc import Generator
from typing import Any

import pytest

ENV = "MDB_TEARDOWN_LIMIT_SECONDS"
DEFAULT_LIMIT = 180.0


def _limit() -> float:
    return float(os.environ.get(ENV, DEFAULT_LIMIT))


def _running_loop_of_main_thread() -> asyncio.AbstractEventLoop | None:
    """The event loop the main thread is running now (found on its stack; no side effect)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, asyncio.AbstractEventLoop):
            return candidate
        frame = frame.f_back
    return None


def _pending_tasks() -> str:
    """The asyncio tasks still alive, with their stacks: what a hung loop close waits for."""
    loop = _running_loop_of_main_thread()
    if loop is None:
        return ""
    out = io.StringIO()
    try:
        tasks = list(asyncio.all_tasks(loop))
    except RuntimeError:  # the set changed while read from this thread: best effort
        return "(tasks could not be listed)\n"
    for task in tasks:
        out.write(f"--- task {task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(file=out)
    return out.getvalue()


def _expire(item: pytest.Item, limit: float) -> None:
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)  # so the dump reaches the terminal
    sys.stderr.write(f"\n+++ teardown of {item.nodeid} still running after {limit:.0f}s: stacks follow, "
                     f"then the run ends (harness/watchdog.py) +++\n")
    sys.stderr.write(_pending_tasks())
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[Any, None, None]:
    limit = _limit()
    if limit <= 0:
        yield
        return
    timer = threading.Timer(limit, _expire, args=(item, limit))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
