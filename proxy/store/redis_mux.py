"""One multiplexed Redis connection for the request path.

Every call in flight writes its command to the same socket at once and waits
for its reply in order: Redis answers a connection's commands in the order
they arrive, so a FIFO of batches is all the bookkeeping needed, and
concurrent requests pipeline themselves. Measured on this project's 2-core
machine (bench notes in the README), a command costs ~15 µs of client CPU
this way against ~100 µs through redis-py's pooled client (and ~80 µs with
valkey-glide, ~170 µs with coredis), and the request path sends five or six
of them per call.

It speaks only what the wallet store needs: commands in, hiredis-parsed
replies out, errors as redis-py's exception classes (so the store does not
care which client it has). redis-py remains the client for everything else.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _encode(args: Sequence[Any]) -> bytes:
    # hiredis's C encoder: ~1.7 µs a command where the Python one took ~6 (five or six a call).
    return hiredis.pack_command(tuple(args))


def _error(reply: ResponseError) -> Exception:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("LOADING"):
        # A restarted server still reading its data: unreachable for now (as redis-py says), not a refusal.
        return BusyLoadingError(message)
    return reply


class _Batch:
    """Commands sent together and the one future their replies complete, in order."""

    __slots__ = ("future", "count", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, sent_at: float):
        self.future, self.count, self.sent_at = future, count, sent_at
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    """One connection: batches wait in a FIFO for their replies (Redis answers in order).

    A batch is one future, not one per command, and the deadline is one timer
    per connection, not one per call (`asyncio.timeout` per command was ~5% of
    the request path's CPU): when the oldest batch has waited `timeout`, every
    batch behind it is as late, so all fail with a timeout and the connection is
    dropped (the next command opens a fresh one rather than read stale replies).
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: collections.deque[_Batch] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.outgoing: list[bytes] = []
        self.timeout = timeout
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            batch = self.waiting[0]
            batch.replies.append(_error(reply) if isinstance(reply, ResponseError) else reply)
            if len(batch.replies) == batch.count:
                self.waiting.popleft()
                if not batch.future.done():  # a caller that was cancelled has gone away
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by server'}"))

    def _fail_all(self, error: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.waiting:
            future = self.waiting.popleft().future
            if not future.done():
                future.set_exception(error)

    def send(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        if self.closed:
            raise RedisConnectionError("connection to Redis lost")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        idle = not self.waiting
        self.waiting.append(_Batch(future, count, loop.time()))
        if self._watchdog is None:
            self._watchdog = loop.call_at(loop.time() + self.timeout, self._check_deadline)
        if idle and self.transport is not None:
            # Nothing in flight (a quiet moment, or one call at a time): write now rather than
            # spend a turn of the event loop waiting for company. Order holds: every command
            # still in `outgoing` has its batch in `waiting`, so with none waiting none is queued.
            self.transport.write(payload)
            return future
        # Commands sent during one turn of the event loop leave in one write:
        # a syscall per command was the largest single cost on the request path.
        if not self.outgoing:
            loop.call_soon(self._flush)
        self.outgoing.append(payload)
        return future

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self.waiting or self.closed:
            return
        loop = asyncio.get_running_loop()
        due = self.waiting[0].sent_at + self.timeout
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._check_deadline)
            return
        self._fail_all(RedisTimeoutError(f"Redis did not answer within {self.timeout} s"))
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        payload, self.outgoing = b"".join(self.outgoing), []
        if self.transport is not None and not self.closed:
            self.transport.write(payload)


class MultiplexedConnection:
    """`execute` one command or `batch` several; reconnects, and retries once, after a dropped connection.

    Retrying is safe for what the store sends: every wallet script is
    idempotent (holds by id, settles by hold state, the rest by idempotency
    key), and plain reads and index updates are too.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, address: tuple[str, int] | None = None):
        # Run the wallet's Lua as Redis Functions (see proxy/store/scripts.py); set False if the server refuses them.
        self.use_functions = True
        """`address` overrides the URL's host and port: another node of the same deployment
        (a Redis Cluster master), reached with the URL's credentials and TLS setting."""
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r}")
        self.host, self.port = address or (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        self.db = int(parsed.path.lstrip("/") or 0)
        self.tls = parsed.scheme == "rediss"
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        async with self._connecting:
            if self._protocol is None or self._protocol.closed:
                self._protocol = await self._connect()
            return self._protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self.timeout), self.host, self.port, ssl=ssl.create_default_context() if self.tls else None
                )
                setup: list[list[Any]] = []
                if self.password is not None:
                    setup.append(["AUTH", *([self.username] if self.username else []), self.password])
                if self.db:
                    setup.append(["SELECT", self.db])
                for command in setup:
                    [reply] = await protocol.send(_encode(command), 1)
                    if isinstance(reply, ResponseError):
                        raise reply
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from exc
        return protocol

    async def _send(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        protocol = await self._connected()
        return await protocol.send(b"".join([_encode(c) for c in commands]), len(commands))

    async def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Replies in order; an error reply is returned as its exception, not raised."""
        try:
            return await self._send(commands)
        except RedisConnectionError:
            return await self._send(commands)

    async def execute(self, *args: Any) -> Any:
        [reply] = await self.batch([args])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def aclose(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
