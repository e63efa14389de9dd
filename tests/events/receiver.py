"""A real webhook receiver for the events tests: an operator's endpoint on its own port.

It checks every request's `Metergate-Signature` with `proxy.events.delivery.verify_signature` against the
endpoint's secret (answering 400 to one that fails), records what it got in arrival order, and answers
`status` to the good ones. A test can make it answer 500s (`status`), stop it (the connection is then
refused) and start it again on the same port.

Also `eventually` and `until`, how these tests wait for what happens in the background (derivation, delivery): polled,
with a deadline only so that an outcome that never comes fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web

from proxy.events.delivery import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature

T = TypeVar("T")
DEADLINE_SECONDS = 30.0


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, *, deadline: float = DEADLINE_SECONDS) -> T:
    """The first truthy answer of the async `probe`, polled; AssertionError naming `what` past the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        found = await probe()
        if found:
            return found
        if loop.time() > end:
            raise AssertionError(f"{what}: not within {deadline:g} s")
        await asyncio.sleep(0.02)


async def until(predicate: Callable[[], T | None], what: str, *, deadline: float = DEADLINE_SECONDS) -> T:
    """`eventually` for a plain (not async) predicate."""

    async def probe() -> T | None:
        return predicate()

    return await eventually(probe, what, deadline=deadline)


@dataclass(frozen=True)
class Received:
    event_id: str  # the Metergate-Event-Id header
    raw: bytes
    signature: str
    headers: dict[str, str]
    verified: bool
    answered: int

    @property
    def body(self) -> dict[str, Any]:
        return orjson.loads(self.raw)


class Receiver:
    """An operator's webhook endpoint: verifies each signature with its secret, answers `status` to good ones.

    The secret may be set after the start: a test registering the endpoint through the admin API learns it
    from the answer, which needs the receiver's URL first.
    """

    def __init__(self, secret: str = ""):
        self.secret = secret
        self.status = 200
        self.hold = False  # answer only when released (for timeouts)
        self.delay = 0.0  # seconds before answering: a receiver doing some work
        self.got: list[Received] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        header = request.headers.get(SIGNATURE_HEADER, "")
        verified = bool(self.secret) and verify_signature(header, raw, self.secret)
        answered = self.status if verified else 400
        self.got.append(Received(request.headers.get(EVENT_ID_HEADER, ""), raw, header, dict(request.headers), verified, answered))
        if self.hold:
            await self._release.wait()
        await asyncio.sleep(self.delay)
        return web.Response(status=answered)

    async def start(self) -> None:
        """On a free port the first time, then on the same one (a restart)."""
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening: from now on a POST's connection is refused."""
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def delivered(self) -> list[str]:
        """Event ids answered with a 2xx, in arrival order."""
        return [r.event_id for r in self.got if 200 <= r.answered < 300]

    def delivered_events(self) -> list[dict[str, Any]]:
        """The bodies answered with a 2xx, in arrival order."""
        return [r.body for r in self.got if 200 <= r.answered < 300]

    def duplicates(self) -> list[str]:
        """Event ids delivered (2xx) more than once."""
        return [event_id for event_id, n in Counter(self.delivered()).items() if n > 1]

    def unverified(self) -> list[Received]:
        return [r for r in self.got if not r.verified]
