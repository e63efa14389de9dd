"""Redis Cluster for the store: how the app connects (one server or a cluster, told apart at start),
and `ClusterConnection`, the request path's commands routed by key slot over one multiplexed
connection per master.

Every wallet script touches only its wallet's `{w:<id>}` slot, so routing a command is reading its
first key. What lives outside a wallet's slot (the reaper's hold index, API key lookups) is written
by plain commands beside the scripts; a batch that mixes slots is split into runs of consecutive
commands for one node, sent one run after another, so a command never runs before one listed ahead
of it (the hold index entry is written before its hold, as on a single server).

The cluster's answers are followed as its spec says: MOVED (the slot lives elsewhere now: retry
there, and reload the slot map before the next batch), ASK (the slot is migrating: ASKING + the
command on the target, once), TRYAGAIN and CLUSTERDOWN (a migration or failover in progress: retry
shortly, then give up as unreachable, which callers already treat as "the store is down").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from proxy.store.redis_mux import MultiplexedConnection
from proxy.store.scripts import Commands, RedisPyCommands, StoreRedis, connect

log = logging.getLogger(__name__)

# Commands with no key: sent to any master, or to all of them when each keeps its own copy of what they change.
_KEYLESS = frozenset({b"PING", b"INFO", b"CLUSTER", b"ECHO", b"TIME", b"COMMAND", b"DBSIZE", b"HELLO", b"ASKING"})
_EVERY_MASTER = frozenset({b"SCRIPT", b"FUNCTION", b"FLUSHALL", b"FLUSHDB"})
_SCRIPT_CALLS = frozenset({b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"})


@dataclass(frozen=True)
class Node:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class _Everywhere:
    """Route of a command every master must run (SCRIPT LOAD: each master has its own script cache)."""


EVERY_MASTER = _Everywhere()
Route = Node | _Everywhere | None  # None: any node will do


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return b"%d" % value


def command_key(command: Sequence[Any]) -> bytes | None | _Everywhere:
    """The key that places `command` on a slot; None when it has none; `EVERY_MASTER` when all must run it."""
    name = _bytes(command[0]).upper()
    if name in _SCRIPT_CALLS:
        return _bytes(command[3]) if int(command[2]) > 0 else None
    if name in _EVERY_MASTER:
        return EVERY_MASTER
    if name in _KEYLESS or len(command) < 2:
        return None
    return _bytes(command[1])


@dataclass(frozen=True)
class Redirect:
    kind: str  # MOVED, ASK, TRYAGAIN or CLUSTERDOWN
    slot: int | None = None
    node: Node | None = None


def redirect_of(reply: Any, answered_by: Node) -> Redirect | None:
    """What a reply asks the client to do instead, or None when it is a real answer."""
    if not isinstance(reply, ResponseError):
        return None
    kind, _, rest = str(reply).partition(" ")
    if kind in ("MOVED", "ASK"):
        slot, _, address = rest.partition(" ")
        host, _, port = address.rpartition(":")
        # An empty host means "the one you asked" (a node that does not know its own address).
        return Redirect(kind, int(slot), Node(host or answered_by.host, int(port)))
    if kind in ("TRYAGAIN", "CLUSTERDOWN"):
        return Redirect(kind)
    return None


def parse_slot_map(reply: Sequence[Any], answered_by: Node) -> list[Node | None]:
    """CLUSTER SLOTS as a table slot -> master: one list lookup per command on the request path."""
    slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    for entry in reply:
        first, last, master = int(entry[0]), int(entry[1]), entry[2]
        host = _bytes(master[0]).decode()
        node = Node(host if host not in ("", "?") else answered_by.host, int(master[1]))
        slots[first : last + 1] = [node] * (last - first + 1)
    return slots


class ClusterConnection:
    """`Commands` on a Redis Cluster: each command to the master of its key's slot, over one
    `MultiplexedConnection` per master, redirections followed.

    Retrying is safe for the same reason as on one server (every script is
    idempotent, plain commands are index updates and reads), and a MOVED or ASK
    reply means the command did not run.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, max_redirects: int = 16):
        self._seed = MultiplexedConnection(url, timeout=timeout)  # checks the URL
        self.use_functions = True  # as MultiplexedConnection's
        if self._seed.db:
            raise ValueError("a Redis Cluster has only database 0: drop the /<db> from the URL")
        self._url = url
        self.timeout = timeout
        self.max_redirects = max_redirects
        seed = Node(self._seed.host, self._seed.port)
        self._seeds = [seed]
        self._connections: dict[Node, MultiplexedConnection] = {seed: self._seed}
        self._slots: list[Node | None] | None = None
        self._stale = False
        self._version = 0
        self._refreshing = asyncio.Lock()

    # -- the slot map

    def _connection(self, node: Node) -> MultiplexedConnection:
        connection = self._connections.get(node)
        if connection is None:
            connection = MultiplexedConnection(self._url, timeout=self.timeout, address=(node.host, node.port))
            self._connections[node] = connection
        return connection

    def _masters(self, slots: Sequence[Node | None]) -> list[Node]:
        return list(dict.fromkeys(n for n in slots if n is not None))

    async def _slot_map(self) -> list[Node | None]:
        if self._slots is None or self._stale:
            await self._refresh()
        assert self._slots is not None
        return self._slots

    async def _refresh(self) -> None:
        """Load the slot map from the first node that answers; callers that queued behind one refresh reuse it."""
        version = self._version
        async with self._refreshing:
            if self._version != version:
                return
            known = self._masters(self._slots) if self._slots is not None else []
            last_error: Exception | None = None
            for node in dict.fromkeys([*known, *self._seeds]):
                try:
                    reply = await self._connection(node).execute("CLUSTER", "SLOTS")
                except RedisError as exc:
                    last_error = exc
                    continue
                slots = parse_slot_map(reply, node)
                await self._forget_all_but(self._masters(slots))
                self._slots, self._stale = slots, False
                self._version += 1
                return
            if self._slots is not None:
                # Keep routing by the map we have: the redirections will correct what is wrong in it.
                log.warning("could not reload the Redis Cluster slot map: %s", last_error)
                return
            raise RedisConnectionError(f"no node of the Redis Cluster answered CLUSTER SLOTS: {last_error}")

    async def _forget_all_but(self, masters: Sequence[Node]) -> None:
        for node in [n for n in self._connections if n not in masters and n not in self._seeds]:
            await self._connections.pop(node).aclose()

    def _route(self, command: Sequence[Any], slots: Sequence[Node | None]) -> Route:
        key = command_key(command)
        if key is None:
            return None
        if isinstance(key, _Everywhere):
            return key
        node = slots[key_slot(key)]
        if node is None:
            raise RedisConnectionError(f"slot {key_slot(key)} is served by no node: the Redis Cluster is down")
        return node

    # -- sending

    async def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Replies in order; an error reply is returned as its exception, not raised."""
        return await self._batch(commands, retry_elsewhere=True)

    async def _batch(self, commands: Sequence[Sequence[Any]], *, retry_elsewhere: bool) -> list[Any]:
        slots = await self._slot_map()
        routes = [self._route(c, slots) for c in commands]
        any_node = None
        if any(r is None for r in routes):
            masters = self._masters(slots)
            if not masters:
                raise RedisConnectionError("the Redis Cluster serves no slot: it is down or not set up")
            any_node = masters[0]
        results: list[Any] = []
        start = 0
        while start < len(commands):
            route = routes[start] or any_node
            end = start + 1
            while end < len(commands) and not isinstance(route, _Everywhere) and (routes[end] or any_node) == route:
                end += 1
            run = commands[start:end]
            if isinstance(route, _Everywhere):
                results.append(await self._everywhere(run[0], slots))
            else:
                assert route is not None
                results += await self._run(route, run, retry_elsewhere=retry_elsewhere)
            start = end
        return results

    async def _run(self, node: Node, commands: Sequence[Sequence[Any]], *, retry_elsewhere: bool) -> list[Any]:
        try:
            replies = await self._connection(node).batch(commands)
        except RedisConnectionError:
            if not retry_elsewhere:
                raise
            # The master may have failed over to a replica: learn the new layout and try once where it says.
            self._stale = True
            before = self._slots
            await self._refresh()
            if self._slots is before:
                raise
            return await self._batch(commands, retry_elsewhere=False)
        return [await self._follow(c, r, node) for c, r in zip(commands, replies)]

    async def _follow(self, command: Sequence[Any], reply: Any, node: Node) -> Any:
        """The real answer to `command` after following where the cluster sent it."""
        waits = 0
        for _ in range(self.max_redirects):
            redirect = redirect_of(reply, node)
            if redirect is None:
                return reply
            if redirect.kind == "MOVED":
                assert redirect.node is not None and redirect.slot is not None
                node = redirect.node
                # Ask the named master now; reload the whole map before the next batch, since a
                # moved slot is seldom alone (resharding, failover).
                if self._slots is not None:
                    self._slots[redirect.slot] = node
                self._stale = True
                [reply] = await self._connection(node).batch([command])
            elif redirect.kind == "ASK":
                assert redirect.node is not None
                node = redirect.node
                _, reply = await self._connection(node).batch([("ASKING",), command])
            else:
                # TRYAGAIN: a script creating a key in a slot being migrated, until the migration
                # ends (milliseconds); CLUSTERDOWN: a failover in progress. Both mean "not run".
                await asyncio.sleep(min(0.02 * 2**waits, 0.5))
                waits += 1
                self._stale = True
                route = self._route(command, await self._slot_map())
                node = route if isinstance(route, Node) else node
                [reply] = await self._connection(node).batch([command])
        if redirect_of(reply, node) is None:
            return reply
        raise RedisConnectionError(f"the Redis Cluster kept redirecting a command ({reply}); it is being resharded or is down")

    async def _everywhere(self, command: Sequence[Any], slots: Sequence[Node | None]) -> Any:
        replies = await asyncio.gather(*(self._connection(n).batch([command]) for n in self._masters(slots)))
        errors = [r for [r] in replies if isinstance(r, Exception)]
        return errors[0] if errors else replies[0][0]

    async def execute(self, *args: Any) -> Any:
        [reply] = await self.batch([args])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def aclose(self) -> None:
        for connection in self._connections.values():
            await connection.aclose()
        self._connections = {}
        self._slots = None


# ------------------------------------------------------------ how the app connects


@dataclass
class StoreClients:
    """What the stores are built from: redis-py for admin, reaper and scans; `commands` for the request path."""

    redis: StoreRedis
    commands: Commands
    cluster: bool

    async def aclose(self) -> None:
        if isinstance(self.commands, MultiplexedConnection | ClusterConnection):
            await self.commands.aclose()
        await self.redis.aclose()


async def is_cluster(url: str, *, timeout: float = 10.0) -> bool:
    """Whether `url` names a Redis Cluster node (`INFO cluster`), so one setting, the URL, serves both:
    a managed cluster behind one endpoint needs nothing else, and a cluster can never be mistaken for a
    single server (which would answer MOVED for two thirds of the wallets)."""
    if urlparse(url).scheme not in ("redis", "rediss"):
        return False
    probe = MultiplexedConnection(url, timeout=timeout)
    try:
        info = await probe.execute("INFO", "cluster")
    except ResponseError as exc:  # INFO forbidden to this user: only a single server would be set up so tightly
        log.warning("could not ask Redis whether it is a cluster (%s); taking it for a single server", exc)
        return False
    finally:
        await probe.aclose()
    return b"cluster_enabled:1" in _bytes(info)


async def connect_store(url: str, *, timeout: float = 10.0) -> StoreClients:
    """The clients for `url`: cluster-aware ones when it names a Redis Cluster.

    Raises `redis.exceptions.ConnectionError` when Redis cannot be reached: the
    kind of server decides which clients to build, so it is asked at start.
    """
    if await is_cluster(url, timeout=timeout):
        log.info("Redis at %s is a cluster: routing each wallet's commands to its slot's master", urlparse(url).hostname)
        return StoreClients(connect(url, cluster=True), ClusterConnection(url, timeout=timeout), cluster=True)
    client = connect(url)
    if urlparse(url).scheme in ("redis", "rediss"):
        return StoreClients(client, MultiplexedConnection(url, timeout=timeout), cluster=False)
    return StoreClients(client, RedisPyCommands(client), cluster=False)


__all__ = ["ClusterConnection", "Node", "StoreClients", "command_key", "connect_store", "is_cluster"]
