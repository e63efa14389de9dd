"""`EventStore`: the events' side of Redis -- which wallets have ledger entries not yet turned into
events, each wallet's derivation cursor, the event log, webhook endpoints, and their deliveries.

How an event is never lost: every script that appends a ledger entry an event
can come from runs with a `ZADD mg:events:dirty <now> <wallet>` before it, in
the same round trip (see `dirty_commands`), so a wallet with new entries is
always findable -- as a hold is by the reaper's index. A consumer (any replica,
one at a time per wallet by lease) derives the events from the entries after
the wallet's cursor, appends them to the event log, then moves the cursor. A
crash between the two derives the same events again, with the same ids
(at-least-once, deduplicated by id downstream); a crash before leaves the
wallet dirty. A wallet is only marked clean if no entry arrived meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.events.model import Event
from proxy.store.keyspace import ARCHIVE_DIRTY_KEY, PREFIX, _wallet_events_key
from proxy.store.leases import Leases, _raise_first
from proxy.store.scripts import Commands, RedisPyCommands, StoreRedis

DIRTY_KEY = f"{PREFIX}:events:dirty"
EVENTS_KEY = f"{PREFIX}:events"
ENDPOINTS_KEY = f"{PREFIX}:webhooks:endpoints"

_UNDIRTY = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


def dirty_commands(wallet_id: str) -> list[tuple[Any, ...]]:
    """Mark a wallet as having ledger entries to derive events from and to archive
    (proxy/ledger/archiver.py); sent before the script that writes them.

    The score is the time in microseconds (exact in a double until the year
    2255): `mark_clean_each` drops a mark only if its score did not change, and a
    finer clock makes a re-mark with an equal score practically impossible.
    """
    now_us = int(time.time() * 1_000_000)
    return [("ZADD", DIRTY_KEY, now_us, wallet_id), ("ZADD", ARCHIVE_DIRTY_KEY, now_us, wallet_id)]


def _event_id_key(event_id: str) -> str:
    return f"{PREFIX}:event:{event_id}"


def _endpoint_state_key(endpoint_id: str) -> str:
    return f"{PREFIX}:webhooks:{endpoint_id}:state"


def _delivery_log_key(endpoint_id: str, event_id: str) -> str:
    return f"{PREFIX}:webhooks:{endpoint_id}:log:{event_id}"


def _redeliver_key(endpoint_id: str) -> str:
    return f"{PREFIX}:webhooks:{endpoint_id}:redeliver"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class StoredEvent:
    """An event and its position in the event log (a stream id)."""

    position: str
    event: Event


@dataclass(frozen=True)
class Endpoint:
    id: str
    url: str
    events: tuple[str, ...]  # ("*",) for all
    enabled: bool
    secret: str
    created: int
    # While a rotation's grace lasts, deliveries are signed with both secrets.
    previous_secret: str | None = None
    previous_secret_expires: int = 0
    disabled_reason: str | None = None
    description: str = ""

    def wants(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Endpoint:
        d = orjson.loads(raw)
        d["events"] = tuple(d["events"])
        return cls(**d)


@dataclass(frozen=True)
class DeliveryState:
    """Where an endpoint's delivery stands: the last event it took, and the one being retried."""

    cursor: str  # log position of the last event delivered (or skipped as not wanted)
    attempts: int  # failed attempts of the event after the cursor
    next_attempt_ms: int
    failing_since_ms: int  # 0 when the last attempt succeeded


class EventStore(Leases):
    def __init__(self, redis: StoreRedis, commands: Commands | None = None, *, retention_days: int = 30):
        self.redis = redis
        # redis-py's annotations cover its many reply shapes loosely; this
        # module decodes the replies itself.
        self._r: Any = redis
        self.commands: Commands = commands or RedisPyCommands(redis)
        self.retention_ms = retention_days * 86_400_000

    # ---------------------------------------------------------- dirty wallets

    async def dirty_wallets(self, limit: int = 100) -> list[tuple[str, str]]:
        """Wallets with entries to derive, oldest mark first: (wallet id, the mark's score as stored)."""
        raw = await self._r.zrange(DIRTY_KEY, 0, limit - 1, withscores=True, score_cast_func=_s)
        return [(_s(member), score) for member, score in raw]

    async def mark_dirty(self, wallet_id: str) -> None:
        for command in dirty_commands(wallet_id):
            await self.commands.execute(*command)

    # ---------------------------------------------------------- a wallet's derivation state

    async def wallet_state(self, wallet_id: str) -> dict[str, str]:
        raw = await self._r.hgetall(_wallet_events_key(wallet_id))
        return {_s(k): _s(v) for k, v in raw.items()}

    async def save_wallet_state(self, wallet_id: str, state: Mapping[str, str]) -> None:
        if state:
            await self._r.hset(_wallet_events_key(wallet_id), mapping=dict(state))

    # The batched forms the consumer's pass uses: one round trip for all the wallets it holds.

    async def wallet_states(self, wallet_ids: Sequence[str]) -> list[dict[str, str]]:
        """`wallet_state` of each wallet, in order."""
        if not wallet_ids:
            return []
        replies = _raise_first(await self.commands.batch([("HGETALL", _wallet_events_key(w)) for w in wallet_ids]))
        # The multiplexer answers with the flat field list, redis-py's pipeline with a dict.
        return [{_s(k): _s(v) for k, v in (raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2]))}
                for raw in replies]

    async def save_wallet_states(self, states: Mapping[str, Mapping[str, str]]) -> None:
        """`save_wallet_state` for each wallet (wallet id: its fields)."""
        commands = [("HSET", _wallet_events_key(w), *(x for item in fields.items() for x in item))
                    for w, fields in states.items() if fields]
        if commands:
            _raise_first(await self.commands.batch(commands))

    async def mark_clean_each(self, marks: Sequence[tuple[str, str]]) -> None:
        """Drop each wallet's mark (wallet id, its score as read) unless a new entry re-marked it since."""
        if marks:
            _raise_first(await self.commands.batch(
                [("EVAL", _UNDIRTY, 1, DIRTY_KEY, w, score) for w, score in marks]))

    # ---------------------------------------------------------- the event log

    async def append(self, events: Sequence[Event]) -> list[StoredEvent]:
        """Add events to the log (one round trip); each is findable by id for the retention."""
        if not events:
            return []
        ttl = self.retention_ms
        async with self._r.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(EVENTS_KEY, {"id": event.id, "type": event.type, "json": event.to_json()})
            positions = [_s(p) for p in await pipe.execute()]
        async with self._r.pipeline(transaction=False) as pipe:
            for event, position in zip(events, positions, strict=True):
                pipe.set(_event_id_key(event.id), position, px=ttl)
            # Trim what is past the retention (approximately: cheap).
            pipe.xtrim(EVENTS_KEY, minid=f"{int(time.time() * 1000) - ttl}-0", approximate=True)
            await pipe.execute()
        return [StoredEvent(p, e) for p, e in zip(positions, events, strict=True)]

    async def after(self, position: str, count: int = 100) -> list[StoredEvent]:
        """Events after `position` ("0" for the start), oldest first."""
        raw = await self._r.xrange(EVENTS_KEY, min=f"({position}" if position != "0" else "-", max="+", count=count)
        return [StoredEvent(_s(pos), Event.from_json(fields[b"json"])) for pos, fields in raw]

    async def latest(self, count: int = 50, before: str | None = None) -> list[StoredEvent]:
        """Newest first; `before` is the position of the last event of the previous page."""
        raw = await self._r.xrevrange(EVENTS_KEY, max=f"({before}" if before else "+", min="-", count=count)
        return [StoredEvent(_s(pos), Event.from_json(fields[b"json"])) for pos, fields in raw]

    async def get(self, event_id: str) -> StoredEvent | None:
        position = await self._r.get(_event_id_key(event_id))
        if position is None:
            return None
        pos = _s(position)
        raw = await self._r.xrange(EVENTS_KEY, min=pos, max=pos)
        return StoredEvent(pos, Event.from_json(raw[0][1][b"json"])) if raw else None

    async def end_position(self) -> str:
        """The log's last position ("0" when empty): where a new endpoint starts."""
        raw = await self._r.xrevrange(EVENTS_KEY, count=1)
        return _s(raw[0][0]) if raw else "0"

    # ---------------------------------------------------------- endpoints

    async def save_endpoint(self, endpoint: Endpoint) -> None:
        await self._r.hset(ENDPOINTS_KEY, endpoint.id, endpoint.to_json())

    async def endpoints(self) -> list[Endpoint]:
        raw = await self._r.hgetall(ENDPOINTS_KEY)
        return sorted((Endpoint.from_json(v) for v in raw.values()), key=lambda e: (e.created, e.id))

    async def endpoint(self, endpoint_id: str) -> Endpoint | None:
        raw = await self._r.hget(ENDPOINTS_KEY, endpoint_id)
        return Endpoint.from_json(raw) if raw else None

    async def delete_endpoint(self, endpoint_id: str) -> None:
        await self._r.hdel(ENDPOINTS_KEY, endpoint_id)
        await self._r.delete(_endpoint_state_key(endpoint_id), _redeliver_key(endpoint_id))

    # ---------------------------------------------------------- deliveries

    async def delivery_state(self, endpoint_id: str) -> DeliveryState | None:
        raw = await self._r.hgetall(_endpoint_state_key(endpoint_id))
        if not raw:
            return None
        f = {_s(k): _s(v) for k, v in raw.items()}
        return DeliveryState(cursor=f.get("cursor", "0"), attempts=int(f.get("attempts", 0)),
                             next_attempt_ms=int(f.get("next_attempt_ms", 0)), failing_since_ms=int(f.get("failing_since_ms", 0)))

    async def save_delivery_state(self, endpoint_id: str, state: DeliveryState) -> None:
        await self._r.hset(_endpoint_state_key(endpoint_id), mapping={
            "cursor": state.cursor, "attempts": state.attempts, "next_attempt_ms": state.next_attempt_ms,
            "failing_since_ms": state.failing_since_ms,
        })

    async def log_attempt(self, endpoint_id: str, event_id: str, attempt: Mapping[str, Any]) -> None:
        key = _delivery_log_key(endpoint_id, event_id)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.rpush(key, orjson.dumps(dict(attempt)))
            pipe.ltrim(key, -100, -1)  # a day of hourly retries, and then some
            pipe.pexpire(key, self.retention_ms)
            await pipe.execute()

    async def attempts(self, endpoint_id: str, event_id: str) -> list[dict[str, Any]]:
        raw = await self._r.lrange(_delivery_log_key(endpoint_id, event_id), 0, -1)
        return [orjson.loads(r) for r in raw]

    async def request_redelivery(self, endpoint_id: str, event_id: str) -> None:
        await self._r.rpush(_redeliver_key(endpoint_id), event_id)

    async def next_redelivery(self, endpoint_id: str) -> str | None:
        raw = await self._r.lpop(_redeliver_key(endpoint_id))
        return _s(raw) if raw else None
