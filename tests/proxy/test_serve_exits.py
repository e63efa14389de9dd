"""`metergate serve` ends when it must: a busy port is one clear error, and the reaper stops when told to."""

from __future__ import annotations

import asyncio
import socket

from proxy.app import run_reaper
from tests.proxy.test_first_hour import serve_until_exit


async def test_serve_on_a_busy_port_exits_with_one_clear_line(repo_root):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        returncode, lines = await serve_until_exit(repo_root, port=port)
    assert returncode == 1
    assert lines == [f"metergate: cannot listen on 127.0.0.1:{port}: address already in use"]


class SwallowingStore:
    """A store whose pass swallows the reaper's cancellation, as redis-py's writes
    through Python 3.11's `asyncio.wait_for` do when the write has just completed."""

    def __init__(self) -> None:
        self.in_pass = asyncio.Event()

    async def expire_due(self, *, limit: int) -> list:
        self.in_pass.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
        return []


async def test_the_reaper_ends_when_a_library_swallows_its_cancellation():
    store = SwallowingStore()
    reaper = asyncio.create_task(run_reaper(store, interval=3600))  # type: ignore[arg-type]
    await asyncio.wait_for(store.in_pass.wait(), 5)
    reaper.cancel()
    done, _ = await asyncio.wait({reaper}, timeout=5)
    if not done:
        reaper.cancel()  # let the test end; the assertion below says what went wrong
    assert reaper in done and reaper.cancelled()
