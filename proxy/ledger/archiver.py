"""`Archiver`: copies every wallet's ledger entries to the ledger of record, then trims Redis behind it.

Runs on every replica. Work is found through the archive's dirty marks (written
before every script that appends an entry, see `ArchiveStore`) and shared by a
lease per wallet. For one wallet: read the entries after its cursor, insert them
(the entry id is the primary key, so a batch inserted twice is archived once),
then move the cursor. A crash between the insert and the cursor re-inserts the
batch after the restart, which changes nothing. Trimming (trim.lua) drops only
entries at or before the cursor, whose events were derived, and older than the
retention window; a wallet with entries left is looked at again when its oldest
leaves the window, so an idle wallet's stream is trimmed too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from proxy.config import ArchiveConfig
from proxy.ledger.db import LedgerDatabase
from proxy.store import WalletStore
from proxy.store.archive import ArchiveStore

log = logging.getLogger(__name__)

ARCHIVED = Counter("metergate_ledger_entries_archived", "Ledger entries copied to the ledger of record")
TRIMMED = Counter("metergate_ledger_entries_trimmed", "Archived ledger entries dropped from Redis")

_TRIM_PER_CALL = 1000

_Renew = Callable[[], Awaitable[bool]]
_WalletWork = Callable[[str, _Renew], Awaitable[int]]


def _now_ms() -> int:
    return int(time.time() * 1000)


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
        archived = 0
        for wallet_id, score in await self.store.dirty_wallets(limit=100):
            done = await self._leased(wallet_id, self.archive_wallet)
            if done is None:
                continue  # another replica has it
            archived += done
            await self.store.mark_clean(wallet_id, score)
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
        name = f"archive:{wallet_id}"
        token = await self.store.acquire(name, self.lease_ms)
        if token is None:
            return None
        try:
            return await work(wallet_id, lambda: self.store.renew(name, token, self.lease_ms))
        finally:
            await self.store.release(name, token)

    async def archive_wallet(self, wallet_id: str, renew: _Renew | None = None) -> int:
        """Copy the wallet's entries after its cursor, batch by batch, then trim; how many were read."""
        cursor = await self.store.cursor(wallet_id)
        read = 0
        while True:
            entries = await self.wallets.ledger_after(wallet_id, cursor, limit=self.config.batch_size)
            if not entries:
                break
            inserted = await self.db.insert_entries(wallet_id, entries)
            ARCHIVED.inc(inserted)
            cursor = entries[-1].id
            await self.store.save_cursor(wallet_id, cursor)
            read += len(entries)
            if len(entries) < self.config.batch_size or (renew is not None and not await renew()):
                break
        await self.trim_wallet(wallet_id)
        return read

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
