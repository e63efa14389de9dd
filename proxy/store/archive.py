"""`ArchiveStore`: the archive's side of Redis -- which wallets have ledger entries not yet
copied to the ledger of record, each wallet's archive cursor, and trimming behind it.

Every script that appends a ledger entry is preceded, in the same round trip, by a
`ZADD mg:archive:dirty <now> <wallet>` (see `events.dirty_commands`), so a wallet
with entries to archive is always findable. The archiver (proxy/ledger/archiver.py)
copies the entries after the cursor, then moves the cursor; `trim.lua` drops only
entries at or before it. A wallet is marked clean only if no entry arrived meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.store.events import _UNDIRTY
from proxy.store.keyspace import ARCHIVE_DIRTY_KEY, ARCHIVE_TRIM_KEY, _archive_key, _ledger_key, _wallet_events_key
from proxy.store.leases import Leases, _raise_first
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


@dataclass(frozen=True)
class ArchivePosition:
    """Where a wallet's archiving stands: the last entry archived ("0": none) and the time of
    the oldest entry still in Redis (None: the stream is empty)."""

    cursor: str
    oldest_ms: int | None


class ArchiveStore(Leases):
    def __init__(self, redis: StoreRedis, commands: Commands | None = None):
        self._r: Any = redis  # replies are decoded here
        self.commands: Commands = commands or RedisPyCommands(redis)

    async def dirty_wallets(self, limit: int = 100) -> list[tuple[str, str]]:
        """Wallets with entries to archive, oldest mark first: (wallet id, the mark's score as stored)."""
        raw = await self._r.zrange(ARCHIVE_DIRTY_KEY, 0, limit - 1, withscores=True, score_cast_func=_s)
        return [(_s(member), score) for member, score in raw]

    async def cursor(self, wallet_id: str) -> str:
        """The id of the last entry archived ("0": none)."""
        return _s(await self._r.hget(_archive_key(wallet_id), "cursor") or b"0")

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

    # The batched forms the archiver's pass uses: one round trip for all the wallets it holds.

    async def positions(self, wallet_ids: Sequence[str]) -> list[ArchivePosition]:
        """Each wallet's `ArchivePosition`, in order."""
        if not wallet_ids:
            return []
        commands: list[tuple[Any, ...]] = []
        for wallet_id in wallet_ids:
            commands += [("HGET", _archive_key(wallet_id), "cursor"),
                         ("XRANGE", _ledger_key(wallet_id), "-", "+", "COUNT", 1)]
        replies = _raise_first(await self.commands.batch(commands))
        return [ArchivePosition(_s(cursor or b"0"), int(_s(oldest[0][0]).partition("-")[0]) if oldest else None)
                for cursor, oldest in zip(replies[::2], replies[1::2])]

    async def save_cursors(self, cursors: Mapping[str, str]) -> None:
        """Move each wallet's cursor (wallet id: entry id) forward; never back (a replica that lost
        its lease while a batch was slow may save an older position after another moved on)."""
        if cursors:
            _raise_first(await self.commands.batch(
                [("EVAL", _FORWARD, 1, _archive_key(w), entry_id) for w, entry_id in cursors.items()]))

    async def schedule_trims(self, due: Mapping[str, int]) -> None:
        """`schedule_trim` for each wallet (wallet id: when its look is due, in ms)."""
        if due:
            _raise_first(await self.commands.batch([("ZADD", ARCHIVE_TRIM_KEY, ms, w) for w, ms in due.items()]))

    async def mark_clean_each(self, marks: Sequence[tuple[str, str]]) -> None:
        """Drop each wallet's mark (wallet id, its score as read) unless a new entry re-marked it since."""
        if marks:
            _raise_first(await self.commands.batch(
                [("EVAL", _UNDIRTY, 1, ARCHIVE_DIRTY_KEY, w, score) for w, score in marks]))
