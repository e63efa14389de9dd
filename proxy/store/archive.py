"""`ArchiveStore`: the archive's side of Redis -- which wallets have ledger entries not yet
copied to the ledger of record, each wallet's archive cursor, and trimming behind it.

Every script that appends a ledger entry is preceded, in the same round trip, by a
`ZADD mg:archive:dirty <now> <wallet>` (see `events.dirty_commands`), so a wallet
with entries to archive is always findable. The archiver (proxy/ledger/archiver.py)
copies the entries after the cursor, then moves the cursor; `trim.lua` drops only
entries at or before it. A wallet is marked clean only if no entry arrived meanwhile.
"""

from __future__ import annotations

from typing import Any

from proxy.store.events import _UNDIRTY
from proxy.store.keyspace import ARCHIVE_DIRTY_KEY, ARCHIVE_TRIM_KEY, _archive_key, _ledger_key, _wallet_events_key
from proxy.store.leases import Leases
from proxy.store.scripts import Commands, RedisPyCommands, StoreRedis, _scripts

_FORWARD = """
local current = redis.call('HGET', KEYS[1], 'cursor')
if current then
  local cm, cs = string.match(current, '^(%d+)-(%d+)$')
  local nm, ns = string.match(ARGV[1], '^(%d+)-(%d+)$')
  if tonumber(cm) > tonumber(nm) or (tonumber(cm) == tonumber(nm) and tonumber(cs) >= tonumber(ns)) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'cursor', ARGV[1])
return 1
"""


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ArchiveStore(Leases):
    def __init__(self, redis: StoreRedis, commands: Commands | None = None):
        self._r: Any = redis  # replies are decoded here
        self.commands: Commands = commands or RedisPyCommands(redis)

    async def dirty_wallets(self, limit: int = 100) -> list[tuple[str, str]]:
        """Wallets with entries to archive, oldest mark first: (wallet id, the mark's score as stored)."""
        raw = await self._r.zrange(ARCHIVE_DIRTY_KEY, 0, limit - 1, withscores=True, score_cast_func=_s)
        return [(_s(member), score) for member, score in raw]

    async def mark_clean(self, wallet_id: str, score: str) -> bool:
        """Drop the wallet's mark unless a new entry re-marked it since `score` was read."""
        return bool(await self._r.eval(_UNDIRTY, 1, ARCHIVE_DIRTY_KEY, wallet_id, score))

    async def cursor(self, wallet_id: str) -> str:
        """The id of the last entry archived ("0": none)."""
        return _s(await self._r.hget(_archive_key(wallet_id), "cursor") or b"0")

    async def save_cursor(self, wallet_id: str, entry_id: str) -> None:
        """Move the cursor forward to `entry_id`; never back (a replica that lost its lease
        while a batch was slow may save an older position after another moved on)."""
        await self._r.eval(_FORWARD, 1, _archive_key(wallet_id), entry_id)

    async def trimmed_sum(self, wallet_id: str) -> int:
        return int(await self._r.hget(_archive_key(wallet_id), "trimmed_sum") or 0)

    async def trim(self, wallet_id: str, below_id: str, limit: int) -> tuple[int, int]:
        """Drop up to `limit` of the oldest entries that are archived, derived, and older than
        `below_id` (see trim.lua): (how many, the sum of their amounts)."""
        out = await _scripts().run(
            self.commands, "trim", [_ledger_key(wallet_id), _archive_key(wallet_id), _wallet_events_key(wallet_id)],
            [below_id, limit])
        return int(out[1]), int(out[2])

    async def oldest_entry_ms(self, wallet_id: str) -> int | None:
        raw = await self._r.xrange(_ledger_key(wallet_id), "-", "+", count=1)
        return int(_s(raw[0][0]).partition("-")[0]) if raw else None

    async def schedule_trim(self, wallet_id: str, due_ms: int) -> None:
        """Look at the wallet again at `due_ms`, when its oldest entry leaves the retention window."""
        await self._r.zadd(ARCHIVE_TRIM_KEY, {wallet_id: due_ms})

    async def due_trims(self, now_ms: int, limit: int = 100) -> list[tuple[str, str]]:
        raw = await self._r.zrangebyscore(ARCHIVE_TRIM_KEY, "-inf", now_ms, start=0, num=limit, withscores=True,
                                          score_cast_func=_s)
        return [(_s(member), score) for member, score in raw]

    async def trim_done(self, wallet_id: str, score: str) -> None:
        await self._r.eval(_UNDIRTY, 1, ARCHIVE_TRIM_KEY, wallet_id, score)
