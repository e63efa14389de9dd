"""How the serving process runs Python's cyclic garbage collector.

With the interpreter's defaults, a young collection runs every 700 net new
container objects. A call in flight holds a few hundred (its request, lease,
quote, futures, the upstream's response), so with 16 calls in flight the
threshold is crossed every ~24 calls. Each collection finds next to nothing to
free: a call's objects die by reference counting once it ends. It only moves the
objects of the calls still in flight to older generations, and that is what
brings the full collections.

A full collection walks every object startup left: ~137,000 of them, from the
rate cards, pydantic, SQLAlchemy and tiktoken. It took ~65 ms, every ~5,000
calls, and every call in flight waited it out. Measured with `gc.callbacks`
over 10,000 calls against a private Redis:

- a billed call paid ~22 µs of collector time at 16 in flight, and ~66 µs at 64;
- a 20-word stream at 16 in flight paid ~36 µs.

After `tune_collector` the same runs did 0-2 young collections and no full one.

So, once startup is done, its objects are frozen (`gc.freeze`): no collection
walks them again. The young threshold is raised to `YOUNG_THRESHOLD`, far above
what the calls in flight hold. Cycles are still collected, at most 7,000
objects late.

What freezing costs: a startup object that later becomes cyclic garbage is
never freed. The config, the app and its services live as long as the process.
A rate card replaced by a reload is freed by reference counting, as long as it
forms no cycle.
"""

from __future__ import annotations

import gc
import logging

from aiohttp import web

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 7_000
"""Net new container objects between young collections (the interpreter's default is 700)."""


def tune_collector() -> int:
    """Freeze every object alive now and raise the young threshold; returns how many were frozen.
    The older generations keep their thresholds."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    return gc.get_freeze_count()


async def tune_after_startup(app: web.Application) -> None:
    """An `on_startup` hook for the serving process, appended after the app's own startup
    (its `cleanup_ctx` and sub-applications), so it freezes what they built too."""
    frozen = tune_collector()
    log.info("garbage collector: %d startup objects frozen, young threshold %d", frozen, YOUNG_THRESHOLD)
