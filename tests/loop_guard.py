"""A test's event loop closes in bounded time, and a task that ignored its cancellation is named.

pytest-asyncio closes each test's loop through `asyncio.Runner.close`, which cancels
every task left and waits for all of them with no limit. A task that swallows its
one cancellation (Python 3.11's `wait_for` returns a finished result instead of
raising, and redis-py wraps commands in it) and then loops on, waits on, or retries
something, hangs the whole suite: CI once ran out of its 90 minutes that way with
no word of which task it was.

Here the tasks left at close are cancelled, given `GRACE_SECONDS`, and those still
running are cancelled again, up to `ROUNDS` times. Every task that needed more than
one cancellation is recorded with its stack and listed at the end of the run (it is
a bug: the same task would hold up `metergate serve`'s exit). One that survives
every round fails the run with its stack instead of hanging it.
"""

from __future__ import annotations

import asyncio
import asyncio.runners
import io
import os
from dataclasses import dataclass

GRACE_SECONDS = 5.0
ROUNDS = 6


@dataclass(frozen=True)
class StuckTask:
    test: str
    task: str
    stack: str
    cancelled_times: int
    finished: bool


stuck: list[StuckTask] = []


def _stack(task: asyncio.Task) -> str:
    out = io.StringIO()
    task.print_stack(file=out)
    return out.getvalue()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?")
    pending, seen = tasks, {}
    for round_ in range(1, ROUNDS + 1):
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.wait(pending, timeout=GRACE_SECONDS))
        pending = [t for t in pending if not t.done()]
        if not pending:
            break
        for task in pending:
            seen[task] = (_stack(task), round_ + 1)  # where it was after ignoring this round's cancellation
    for task, (stack, times) in seen.items():
        stuck.append(StuckTask(test, repr(task), stack, times, task.done()))
    if pending:
        raise RuntimeError(f"{len(pending)} task(s) ignored {ROUNDS} cancellations at the end of {test}: "
                           + "; ".join(f"{t!r}\n{seen[t][0]}" for t in pending))
    # As Runner.close does: an exception a task ended with, that nobody retrieved, is reported.
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({
                "message": "unhandled exception during asyncio.run() shutdown",
                "exception": task.exception(), "task": task,
            })


def install() -> None:
    asyncio.runners._cancel_all_tasks = _cancel_all_tasks  # type: ignore[attr-defined]


def report(terminalreporter) -> None:
    if not stuck:
        return
    terminalreporter.section("tasks that ignored a cancellation at their test's end (bugs: fix them)")
    for s in stuck:
        state = "finished after another cancellation" if s.finished else f"STILL RUNNING after {ROUNDS} cancellations"
        terminalreporter.write_line(f"{s.test}: {s.task}: {state}")
        terminalreporter.write_line(s.stack)
