"""`Archiver`: copies every wallet's ledger entries to the ledger of record, then trims Redis behind it.

Runs on every replica. Work is found through the archive's dirty marks (written
before every script that appends an entry, see `ArchiveStore`) and shared by a
lease per wallet. A pass takes up to 100 dirty wallets together: reads the entries
after each one's cursor, inserts them all in one transaction (the entry id is the
primary key, so a batch inserted twice is archived once), then moves the cursors.
A crash between the insert and the cursors re-inserts the batch after the restart,
which changes nothing. Trimming (trim.lua) drops only
entries at or before the cursor, whose events were derived, and older than the
retention window; a wallet with entries left is looked at again when its oldest
leaves the window, so an idle wallet's stream is trimmed too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from prometheus_client import Counter

from proxy.config import ArchiveConfig
from proxy.ledger.db import LedgerDatabase
from proxy.store import WalletStore
from proxy.store.archive import ArchivePosition, ArchiveStore

log = logging.getLogger(__name__)

ARCHIVED = Counter("metergate_ledger_entries_archived", "Ledger entries copied to the ledger of record")
TRIMMED = Counter("metergate_ledger_entries_trimmed", "Archived ledger entries dropped from Redis")

_TRIM_PER_CALL = 1000
_WALLETS_PER_PASS = 100

_Renew = Callable[[], Awaitable[bool]]
_WalletWork = Callable[[str, _Renew], Awaitable[int]]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _lease_name(wallet_id: str) -> str:
    return f"archive:{wallet_id}"


class Archiver:
    def __init__(self, store: ArchiveStore, wallets: WalletStore, db: LedgerDatabase, config: ArchiveConfig):
        self.store, self.wallets, self.db, self.config = store, wallets, db, config
        self.retention_ms = int(config.redis_retention_days * 86_400_000)
        self.lease_ms = int(config.lease_seconds * 1000)

    async def run(self) -> None:
        """Archive and trim until cancelled; a failing pass (database or Redis away) is retried."""
        task = asyncio.current_task()
        while True:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("ledger archive pass failed (retrying): %r", exc)
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(self.config.poll_interval_seconds)

    async def pass_once(self) -> int:
        """One pass over the wallets marked dirty and those due a trim; how many entries were archived."""
        archived = await self.archive_wallets(await self.store.dirty_wallets(limit=_WALLETS_PER_PASS))
        for wallet_id, score in await self.store.due_trims(_now_ms()):
            if await self._leased(wallet_id, self.trim_wallet) is not None:
                await self.store.trim_done(wallet_id, score)
        return archived

    async def drain(self) -> int:
        """Pass until no wallet is left dirty (for tests and shutdown); entries archived."""
        total = 0
        while True:
            total += await self.pass_once()
            if not await self.store.dirty_wallets(limit=1):
                return total

    async def _leased(self, wallet_id: str, work: _WalletWork) -> int | None:
        name = _lease_name(wallet_id)
        token = await self.store.acquire(name, self.lease_ms)
        if token is None:
            return None
        try:
            return await work(wallet_id, lambda: self.store.renew(name, token, self.lease_ms))
        finally:
            await self.store.release(name, token)

    async def archive_wallets(self, dirty: Sequence[tuple[str, str]]) -> int:
        """Archive the dirty wallets (id, its mark's score) this replica can lease; how many entries were read.

        All of them together: every step is one round trip to Redis, and one transaction
        in the database, however many wallets there are. Done one wallet at a time, a
        wallet with one new entry cost ~2.5 ms of CPU per pass (some ten round trips and
        a transaction of its own: bench/background.py), more than the call that wrote it.
        """
        if not dirty:
            return 0
        names = [_lease_name(wallet_id) for wallet_id, _ in dirty]
        tokens = await self.store.acquire_each(names, self.lease_ms)
        # A wallet another replica holds is left to it, mark and all.
        held = {wallet_id: token for (wallet_id, _), token in zip(dirty, tokens) if token is not None}
        try:
            done, read = await self._archive_held(held)
            await self.store.mark_clean_each([(wallet_id, score) for wallet_id, score in dirty if wallet_id in done])
            return read
        finally:
            await self.store.release_each({_lease_name(wallet_id): token for wallet_id, token in held.items()})

    async def _archive_held(self, held: Mapping[str, str]) -> tuple[set[str], int]:
        """Archive the leased wallets (id: lease token), then trim behind them: (the wallets whose
        entries were all archived, how many entries were read)."""
        positions = dict(zip(held, await self.store.positions(list(held))))
        done = set(held)
        pending = {wallet_id: position.cursor for wallet_id, position in positions.items()}
        read = 0
        while pending:
            batches = {w: entries for w, entries in
                       (await self.wallets.ledgers_after(pending, limit=self.config.batch_size)).items() if entries}
            if not batches:
                break
            ARCHIVED.inc(await self.db.insert_batches(batches))
            # Only once the entries are in: killed before this, the next pass inserts them again (a no-op).
            moved = {wallet_id: entries[-1].id for wallet_id, entries in batches.items()}
            await self.store.save_cursors(moved)
            read += sum(len(entries) for entries in batches.values())
            pending = {w: moved[w] for w, entries in batches.items() if len(entries) == self.config.batch_size}
            if pending:  # more to read: only under leases still ours
                still = await self.store.renew_each({_lease_name(w): held[w] for w in pending}, self.lease_ms)
                lost = {w for w in pending if _lease_name(w) not in still}
                done -= lost  # keeps its mark, so a pass (here or elsewhere) takes the rest up
                pending = {w: cursor for w, cursor in pending.items() if w not in lost}
        await self._trim_behind(positions)
        return done, read

    async def _trim_behind(self, positions: Mapping[str, ArchivePosition]) -> None:
        """Trim the wallets whose oldest entry has left the retention window, and schedule a
        look at the others for when it does (what `trim_wallet` does, without its round trips
        for the wallets, nearly all, with nothing to drop yet)."""
        below_ms = _now_ms() - self.retention_ms
        due: dict[str, int] = {}
        for wallet_id, position in positions.items():
            if position.oldest_ms is None:
                continue  # an empty stream: nothing to trim, nothing to look at later
            if position.oldest_ms < below_ms:
                await self.trim_wallet(wallet_id)
            else:
                due[wallet_id] = position.oldest_ms + self.retention_ms + 1
        await self.store.schedule_trims(due)

    async def trim_wallet(self, wallet_id: str, renew: _Renew | None = None) -> int:
        """Drop what may go from the wallet's stream; schedule the next look. Entries trimmed."""
        below = f"{_now_ms() - self.retention_ms}-0"
        trimmed = 0
        while True:
            n, _ = await self.store.trim(wallet_id, below, _TRIM_PER_CALL)
            trimmed += n
            if n < _TRIM_PER_CALL:
                break
        TRIMMED.inc(trimmed)
        oldest = await self.store.oldest_entry_ms(wallet_id)
        if oldest is not None:
            await self.store.schedule_trim(wallet_id, oldest + self.retention_ms + 1)
        return trimmed
