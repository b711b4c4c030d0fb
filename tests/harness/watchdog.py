"""A pytest plugin: a teardown that hangs ends the run with a stack dump, even after a failure.

Why: pytest-timeout disarms its timer as soon as a test fails (its `pytest_exception_interact`
hook, so that a debugger is not killed), and the teardown that follows is then unbounded. After a
failed async test, pytest-asyncio's loop close cancels the leftover tasks once and waits for them;
a task that outlives the cancellation (kopf's watcher, see harness.kube._reap_kopf_tasks) made CI
sit there until its 90-minute limit. This bounds every teardown, failed test or not.

`MDB_TEARDOWN_LIMIT_SECONDS` (default 180) sets the bound; 0 disables it.

First line of defence, so that the run goes on: the event loop's close is bounded too. The
standard `asyncio.runners._cancel_all_tasks` (what pytest-asyncio's runner calls) cancels each
leftover task once and waits for all of them without limit. Here it cancels them again every
0.5 s (a task that swallowed one cancellation gets another) for at most 30 s
(`MDB_LOOP_CLOSE_LIMIT_SECONDS`);
tasks still alive then are named, with their stacks, in an error of that test's teardown, and the
loop is closed anyway. Seen under load: a kopf timer left asleep on an event whose wake-up never
reaches this loop.
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
LOOP_ENV = "MDB_LOOP_CLOSE_LIMIT_SECONDS"


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


def _describe(tasks: list[asyncio.Task[Any]]) -> str:
    out = io.StringIO()
    for task in tasks:
        out.write(f"--- task {task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(file=out)
    return out.getvalue()


def _pending_tasks() -> str:
    """The asyncio tasks still alive, with their stacks: what a hung loop close waits for."""
    loop = _running_loop_of_main_thread()
    if loop is None:
        return ""
    try:
        tasks = list(asyncio.all_tasks(loop))
    except RuntimeError:  # the set changed while read from this thread: best effort
        return "(tasks could not be listed)\n"
    return _describe(tasks)


class LeftoverTasks(Exception):  # not a RuntimeError: pytest-asyncio turns those into a warning
    """Tasks that outlived the test and ignored cancellation when its event loop closed."""


def _cancel_all_tasks_bounded(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio.runners._cancel_all_tasks, but repeated and bounded (see the module docstring)."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not pending:
        return
    limit = float(os.environ.get(LOOP_ENV, 30))

    async def reap() -> list[asyncio.Task[Any]]:
        deadline = loop.time() + limit
        left = list(pending)
        while left and loop.time() < deadline:
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=0.5)
            left = [t for t in left if not t.done()]
        return left

    stuck = loop.run_until_complete(reap())
    for task in pending:
        if task.done() and not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception during asyncio.run() shutdown",
                                         "exception": task.exception(), "task": task})
    if stuck:
        raise LeftoverTasks(f"{len(stuck)} task(s) still running {limit:.0f}s after the test's loop "
                            f"began to close, despite repeated cancellation:\n{_describe(stuck)}")


def pytest_configure(config: pytest.Config) -> None:
    asyncio.runners._cancel_all_tasks = _cancel_all_tasks_bounded  # type: ignore[attr-defined]


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
