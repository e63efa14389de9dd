"""The archiver: every ledger entry copied to SQL exactly once, whatever stops it, and Redis trimmed only behind it.

Real Redis (the `redis` fixture audits balance == trimmed sum + Σ stream and held == Σ holds after each test),
and a real database on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from proxy.config import ArchiveConfig, EventsConfig
from proxy.events.consumer import EventConsumer
from proxy.ledger.archiver import Archiver
from proxy.ledger.db import LedgerDatabase
from proxy.ledger.schema import ledger_entries
from proxy.store import LedgerEntry, WalletStore
from proxy.store.archive import ArchiveStore
from proxy.store.events import EventStore
from proxy.store.scripts import RedisPyCommands
from tests.conftest import RecordingCommands

USD = 1_000_000
DAY_MS = 86_400_000


def archive_config(**overrides) -> ArchiveConfig:
    return ArchiveConfig(**({"batch_size": 7, "poll_interval_seconds": 0.01} | overrides))


async def busy_wallet(wallets: WalletStore, wallet_id: str, calls: int) -> None:
    """A wallet with a top-up, then `calls` calls held and charged (a charge entry each: a hold writes none) and an adjustment."""
    await wallets.open(wallet_id, profile={"tier": "default", "metadata": {}})
    await wallets.top_up(wallet_id, 10 * USD, idempotency_key=f"{wallet_id}-top-up")
    for n in range(calls):
        hold = await wallets.hold(wallet_id, 5_000, meta={"request_id": f"req_{n}"})
        await wallets.settle(wallet_id, hold.hold_id, 1_000 + n, meta={"model": "gpt-4o", "price_micros": 1_000 + n})
    await wallets.adjust(wallet_id, -123, reason="goodwill reversed", idempotency_key=f"{wallet_id}-adjust")


async def stream(wallets: WalletStore, wallet_id: str) -> list[LedgerEntry]:
    return await wallets.ledger_after(wallet_id, "0", limit=100_000)


async def archived(db: LedgerDatabase, wallet_id: str) -> list[tuple[str, int]]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(sa.select(ledger_entries.c.entry_id, ledger_entries.c.amount_micros)
                                  .where(ledger_entries.c.wallet_id == wallet_id))
    return sorted(((r.entry_id, r.amount_micros) for r in rows), key=lambda r: tuple(map(int, r[0].split("-"))))


def as_rows(entries: Sequence[LedgerEntry]) -> list[tuple[str, int]]:
    return [(e.id, e.amount_micros) for e in entries]


async def derive_events(redis: aioredis.Redis, wallets: WalletStore) -> None:
    """Run the events consumer over every dirty wallet: trimming waits for it too."""
    consumer = EventConsumer(EventStore(redis), wallets, EventsConfig())
    while await consumer.pass_once():
        pass


async def test_every_entry_of_every_wallet_is_archived_once(redis, wallets, ledger_db):
    await busy_wallet(wallets, "u_1", 20)
    await busy_wallet(wallets, "u_2", 3)
    archiver = Archiver(ArchiveStore(redis), wallets, ledger_db, archive_config())

    assert await archiver.drain() == len(await stream(wallets, "u_1")) + len(await stream(wallets, "u_2"))

    for wallet_id in ("u_1", "u_2"):
        assert await archived(ledger_db, wallet_id) == as_rows(await stream(wallets, wallet_id))
    assert await ArchiveStore(redis).dirty_wallets() == []


async def test_entries_written_after_a_pass_are_archived_by_the_next(redis, wallets, ledger_db):
    await busy_wallet(wallets, "u_1", 2)
    archiver = Archiver(ArchiveStore(redis), wallets, ledger_db, archive_config())
    await archiver.drain()
    await wallets.top_up("u_1", USD, idempotency_key="later")

    assert await archiver.drain() == 1
    assert await archived(ledger_db, "u_1") == as_rows(await stream(wallets, "u_1"))


class CrashAfterInsert(ArchiveStore):
    """Dies (as a SIGKILL would) after the first batch reached the database, before its cursor is saved."""

    crashed = False

    async def save_cursors(self, cursors: Mapping[str, str]) -> None:
        if not self.crashed:
            self.crashed = True
            raise ConnectionError("killed between the insert and the cursor")
        await super().save_cursors(cursors)


async def test_an_archiver_dying_between_insert_and_cursor_archives_the_batch_once_after_restart(redis, wallets, ledger_db):
    await busy_wallet(wallets, "u_1", 10)
    crashing = Archiver(CrashAfterInsert(redis), wallets, ledger_db, archive_config())
    with pytest.raises(ConnectionError):
        await crashing.pass_once()
    assert len(await archived(ledger_db, "u_1")) == 7  # the batch is in, its cursor is not
    assert await ArchiveStore(redis).cursor("u_1") == "0"

    restarted = Archiver(ArchiveStore(redis), wallets, ledger_db, archive_config())
    await restarted.drain()

    assert await archived(ledger_db, "u_1") == as_rows(await stream(wallets, "u_1"))


async def test_two_archivers_at_once_archive_every_entry_once(redis, wallets, ledger_db):
    for n in range(6):
        await busy_wallet(wallets, f"u_{n}", 5)
    replicas = [Archiver(ArchiveStore(redis), wallets, ledger_db, archive_config()) for _ in range(2)]

    await asyncio.gather(*(r.drain() for r in replicas))

    for n in range(6):
        assert await archived(ledger_db, f"u_{n}") == as_rows(await stream(wallets, f"u_{n}"))


async def test_a_pass_takes_as_many_round_trips_and_one_transaction_for_twenty_wallets_as_for_two(redis, ledger_db):
    wallet_commands, archive_commands = RecordingCommands(RedisPyCommands(redis)), RecordingCommands(RedisPyCommands(redis))
    wallets = WalletStore(redis, hold_ttl_ms=60_000, commands=wallet_commands)
    archiver = Archiver(ArchiveStore(redis, archive_commands), wallets, ledger_db, archive_config())
    transactions: list[object] = []
    sa.event.listen(ledger_db.engine.sync_engine, "begin", transactions.append)
    cost: list[tuple[int, int]] = []
    for prefix, count in (("a", 2), ("b", 20)):
        for n in range(count):
            await wallets.open(f"{prefix}_{n}", profile={"tier": "default", "metadata": {}})
            await wallets.top_up(f"{prefix}_{n}", USD, idempotency_key=f"{prefix}_{n}")
        round_trips, began = len(wallet_commands.round_trips) + len(archive_commands.round_trips), len(transactions)

        assert await archiver.pass_once() == 2 * count  # each wallet's open and top-up

        cost.append((len(wallet_commands.round_trips) + len(archive_commands.round_trips) - round_trips,
                     len(transactions) - began))
    assert cost[0] == cost[1]
    assert cost[0][1] == 1
    for n in range(20):
        assert await archived(ledger_db, f"b_{n}") == as_rows(await stream(wallets, f"b_{n}"))
    assert await ArchiveStore(redis).dirty_wallets() == []


class LosesItsLeases(ArchiveStore):
    """A replica whose leases all lapsed while it worked (paused longer than lease_seconds)."""

    async def renew_each(self, leases: Mapping[str, str], ttl_ms: int) -> set[str]:
        return set()


async def test_a_wallet_whose_lease_lapses_mid_pass_keeps_its_mark_and_the_rest_is_archived_later(
    redis, wallets, ledger_db
):
    await busy_wallet(wallets, "u_1", 10)  # 13 entries: more than a batch of 7
    await busy_wallet(wallets, "u_2", 1)  # 4 entries: one batch, done before any renewal
    losing = Archiver(LosesItsLeases(redis), wallets, ledger_db, archive_config())

    assert await losing.pass_once() == 7 + 4

    assert [w for w, _ in await ArchiveStore(redis).dirty_wallets()] == ["u_1"]
    assert len(await archived(ledger_db, "u_1")) == 7
    await Archiver(ArchiveStore(redis), wallets, ledger_db, archive_config()).drain()
    assert await archived(ledger_db, "u_1") == as_rows(await stream(wallets, "u_1"))


async def test_a_wallet_another_replica_holds_is_left_to_it_with_its_mark(redis, wallets, ledger_db):
    await busy_wallet(wallets, "u_1", 1)
    await busy_wallet(wallets, "u_2", 1)
    store = ArchiveStore(redis)
    assert await store.acquire("archive:u_1", 60_000) is not None  # the other replica's

    assert await Archiver(store, wallets, ledger_db, archive_config()).pass_once() == 4

    assert await archived(ledger_db, "u_1") == []
    assert await archived(ledger_db, "u_2") == as_rows(await stream(wallets, "u_2"))
    assert [w for w, _ in await store.dirty_wallets()] == ["u_1"]
    assert await store.acquire("archive:u_2", 60_000) is not None  # this pass let its own lease go


class FailingDatabase(LedgerDatabase):
    """A database that takes `accept` batches, then fails (down, or the network gone)."""

    def __init__(self, real: LedgerDatabase, accept: int):
        super().__init__(real.engine)
        self.accept = accept

    async def insert_batches(self, batches: Mapping[str, Sequence[LedgerEntry]]) -> int:
        if self.accept <= 0:
            raise ConnectionError("database unreachable")
        self.accept -= 1
        return await super().insert_batches(batches)


async def test_trimming_never_removes_an_entry_that_is_not_archived(redis, wallets, ledger_db):
    await busy_wallet(wallets, "u_1", 20)
    await derive_events(redis, wallets)
    everything = await stream(wallets, "u_1")
    # Every entry is past the retention window, but the database took only the first batch.
    archiver = Archiver(ArchiveStore(redis), wallets, FailingDatabase(ledger_db, accept=1),
                        archive_config(redis_retention_days=1e-12))
    with pytest.raises(ConnectionError):
        await archiver.pass_once()
    await archiver.trim_wallet("u_1")

    kept = await stream(wallets, "u_1")
    assert as_rows(kept) == as_rows(everything[7:])  # only the 7 archived went
    assert await archived(ledger_db, "u_1") == as_rows(everything[:7])
    assert await ArchiveStore(redis).trimmed_sum("u_1") == sum(e.amount_micros for e in everything[:7])


async def test_trimming_never_removes_an_entry_whose_events_are_not_derived(redis, wallets, ledger_db):
    await busy_wallet(wallets, "u_1", 3)
    archiver = Archiver(ArchiveStore(redis), wallets, ledger_db, archive_config(redis_retention_days=1e-12))

    await archiver.drain()  # archived, but the events consumer has not run

    assert len(await stream(wallets, "u_1")) == len(await archived(ledger_db, "u_1")) > 0
    await derive_events(redis, wallets)
    await archiver.trim_wallet("u_1")
    assert await stream(wallets, "u_1") == []


async def test_entries_inside_the_retention_window_stay_in_redis(redis, wallets, ledger_db):
    await busy_wallet(wallets, "u_1", 3)
    await derive_events(redis, wallets)
    archiver = Archiver(ArchiveStore(redis), wallets, ledger_db, archive_config(redis_retention_days=7))

    await archiver.drain()

    assert len(await stream(wallets, "u_1")) == len(await archived(ledger_db, "u_1")) == 6  # open, top-up, 3 charges, adjustment


async def test_a_trimmed_wallet_keeps_its_invariant_and_its_balance(redis, wallets, ledger_db):
    await busy_wallet(wallets, "u_1", 30)
    before = await wallets.get("u_1")
    await derive_events(redis, wallets)
    archiver = Archiver(ArchiveStore(redis), wallets, ledger_db, archive_config(redis_retention_days=1e-12))

    await archiver.drain()

    assert await stream(wallets, "u_1") == []
    audit = await wallets.audit("u_1")
    assert audit.wallet == before and audit.ledger_sum_micros == before.balance_micros
    async with ledger_db.engine.connect() as conn:
        total = (await conn.execute(sa.select(sa.func.sum(ledger_entries.c.amount_micros))
                                    .where(ledger_entries.c.wallet_id == "u_1"))).scalar_one()
    assert total == before.balance_micros  # the ledger of record sums to the balance too
    # Money still moves after a trim, and the invariant holds over trimmed + new entries.
    await wallets.top_up("u_1", USD, idempotency_key="after-trim")
    assert (await wallets.audit("u_1")).ledger_sum_micros == before.balance_micros + USD


async def test_an_idle_wallet_is_trimmed_once_its_entries_leave_the_window(redis, wallets, ledger_db):
    await busy_wallet(wallets, "u_1", 2)
    await derive_events(redis, wallets)
    archiver = Archiver(ArchiveStore(redis), wallets, ledger_db, archive_config(redis_retention_days=0.6 / 86_400))
    await archiver.drain()
    assert len(await stream(wallets, "u_1")) == 5  # open, top-up, 2 charges, adjustment: too young to go
    assert [w for w, _ in await ArchiveStore(redis).due_trims(10**15)] == ["u_1"]  # a look is scheduled

    await asyncio.sleep(0.7)
    await archiver.pass_once()  # no new entry: only the scheduled look finds it

    assert await stream(wallets, "u_1") == []
    assert await ArchiveStore(redis).due_trims(10**15) == []


async def test_the_cursor_never_moves_back(redis):
    store = ArchiveStore(redis)
    await store.save_cursors({"u_1": "1700000000005-1"})
    await store.save_cursors({"u_1": "1700000000005-0"})  # a replica that lost its lease, saving late
    await store.save_cursors({"u_1": "1699999999999-9"})
    assert await store.cursor("u_1") == "1700000000005-1"
    await store.save_cursors({"u_1": "1700000000010-0"})
    assert await store.cursor("u_1") == "1700000000010-0"


async def test_archiving_and_trimming_work_on_a_redis_cluster(cluster_client, ledger_db):
    wallets = WalletStore(cluster_client, hold_ttl_ms=60_000)
    for n in range(3):  # wallets spread over the masters' slots
        await busy_wallet(wallets, f"u_{n}", 4)
    consumer = EventConsumer(EventStore(cluster_client), wallets, EventsConfig())
    while await consumer.pass_once():
        pass
    balances = {f"u_{n}": (await wallets.get(f"u_{n}")).balance_micros for n in range(3)}
    archiver = Archiver(ArchiveStore(cluster_client), wallets, ledger_db, archive_config(redis_retention_days=1e-12))

    await archiver.drain()

    for wallet_id, balance in balances.items():
        assert await stream(wallets, wallet_id) == []
        assert len(await archived(ledger_db, wallet_id)) == 7  # open, top-up, 4 charges, adjustment
        assert (await wallets.audit(wallet_id)).ledger_sum_micros == balance
