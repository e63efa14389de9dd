"""Background.answer: work that outlives its awaiter's cancellation, and hands its outcome back."""

from __future__ import annotations

import asyncio

import pytest

from proxy.calls.lease import Background


async def test_the_awaiter_gets_the_works_result() -> None:
    background = Background()

    async def work() -> str:
        await asyncio.sleep(0)
        return "answer"

    assert await background.answer(work()) == "answer"


async def test_the_awaiter_gets_the_works_exception_and_the_task_is_reported(caplog) -> None:
    background = Background()

    async def work() -> str:
        raise ValueError("upstream said no")

    with pytest.raises(ValueError, match="upstream said no"):
        await background.answer(work())
    await asyncio.sleep(0)  # the task's done callback
    assert "background task failed: ValueError('upstream said no')" in caplog.text


async def test_cancelling_the_awaiter_leaves_the_work_running_to_its_end() -> None:
    background = Background()
    finished = asyncio.Event()

    async def work() -> str:
        await asyncio.sleep(0.05)
        finished.set()
        return "billed anyway"

    handler = asyncio.ensure_future(background.answer(work()))
    await asyncio.sleep(0.01)
    [task] = background.tasks
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert not task.done()
    assert await task == "billed anyway" and finished.is_set()
    assert not background.tasks


async def test_shutdown_cancelling_the_work_cancels_its_awaiter() -> None:
    background = Background()

    async def work() -> str:
        await asyncio.sleep(10)
        return "never"

    answered = background.answer(work())
    await asyncio.sleep(0)
    await background.drain(timeout=0.01)
    with pytest.raises(asyncio.CancelledError):
        await answered


async def test_the_awaiter_resumes_on_the_loop_turn_after_the_work_ends() -> None:
    background = Background()
    turns = 0

    async def work() -> None:
        nonlocal turns
        turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.ensure_future(count_turns())
    await asyncio.sleep(0)
    await background.answer(work())
    counted = turns
    counter.cancel()
    # The work's last step sets the answer; the awaiter runs on the next turn (a shield of the
    # task needs the task's done callback, then the shield's own, first).
    assert counted <= 1
