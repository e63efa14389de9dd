"""`EventConsumer` on the real Redis: wallets marked dirty by their money movements, events derived from the
ledger once (by lease across consumers), never lost to a crash between the log and the cursor; the notes a
storm of refusals writes; and the rate card reload events of a running app.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.app import create_app
from proxy.appstate import RATECARDS
from proxy.config import Config, EventsConfig
from proxy.events.consumer import EventConsumer
from proxy.events.model import Event, derived_event_id
from proxy.events.notices import Notices
from proxy.store import RedisPyCommands, WalletStore, connect
from proxy.store.events import DIRTY_KEY, EventStore, StoredEvent
from proxy.store.keyspace import ARCHIVE_DIRTY_KEY
from proxy.store.redis_mux import MultiplexedConnection
from tests.conftest import RecordingCommands
from tests.events.receiver import eventually
from tests.redis_server import RedisServer

USD = 1_000_000
CONFIG = EventsConfig(poll_interval_seconds=0.01)


class Crash(Exception):
    """The process dying at that point."""


class CrashBeforeTheCursor(EventStore):
    """Appends the events, then dies before the wallet's cursor is saved."""

    async def save_wallet_states(self, states: Any) -> None:
        raise Crash


class MovesMoneyWhileDeriving(EventStore):
    """While the consumer appends a wallet's events, another replica tops the wallet up."""

    def __init__(self, redis: aioredis.Redis, wallets: WalletStore, wallet_id: str):
        super().__init__(redis)
        self.wallets, self.wallet_id, self.moved = wallets, wallet_id, False

    async def append(self, events: Sequence[Event]) -> list[StoredEvent]:
        if not self.moved:
            self.moved = True
            await self.wallets.top_up(self.wallet_id, 2 * USD, idempotency_key="during-derivation")
        return await super().append(events)


@pytest.fixture
def store(redis: aioredis.Redis) -> EventStore:
    return EventStore(redis)


async def open_wallet(wallets: WalletStore, wallet_id: str = "u_1", funds: int = 0) -> None:
    await wallets.open(wallet_id, profile={"tier": "default", "metadata": {}})
    if funds:
        await wallets.top_up(wallet_id, funds, idempotency_key=f"seed-{wallet_id}")


async def logged(store: EventStore) -> list[Event]:
    """Every event in the log, oldest first."""
    events: list[Event] = []
    position = "0"
    while page := await store.after(position, count=500):
        events += [s.event for s in page]
        position = page[-1].position
    return events


async def dirty(store: EventStore) -> set[str]:
    return {wallet_id for wallet_id, _ in await store.dirty_wallets(1000)}


async def drained(consumer: EventConsumer) -> None:
    """Passes until no wallet is left to derive."""
    while await consumer.pass_once() > 0:
        pass


# ------------------------------------------------------------ dirty marks


async def test_a_money_movement_marks_its_wallet_dirty_for_events_and_archive_in_the_same_round_trip_before_its_script(redis, store):
    commands = RecordingCommands(RedisPyCommands(redis))
    wallets = WalletStore(redis, hold_ttl_ms=60_000, commands=commands)
    await open_wallet(wallets)
    commands.round_trips.clear()

    await wallets.top_up("u_1", 5 * USD, idempotency_key="t1")

    # (Sent twice when the script cache was empty: NOSCRIPT, then SCRIPT LOAD and the same round trip again.)
    round_trips = [b for b in commands.round_trips if any(c[0] == "EVALSHA" for c in b)]
    assert round_trips
    for round_trip in round_trips:
        assert [c[0] for c in round_trip] == ["ZADD", "ZADD", "EVALSHA"]
        assert [(c[1], c[3]) for c in round_trip[:2]] == [(DIRTY_KEY, "u_1"), (ARCHIVE_DIRTY_KEY, "u_1")]
    assert await dirty(store) == {"u_1"}


async def test_the_consumer_derives_a_movements_events_once_and_drops_the_mark(redis, store, wallets):
    await open_wallet(wallets)
    receipt = await wallets.top_up("u_1", 5 * USD, idempotency_key="t1")
    consumer = EventConsumer(store, wallets, CONFIG)

    assert await consumer.pass_once() == 1
    assert await dirty(store) == set()
    assert await consumer.pass_once() == 0
    assert await consumer.derive_wallet("u_1") == []  # the cursor is past it: nothing derived twice

    [event] = await logged(store)
    assert event.id == derived_event_id("u_1", receipt.ledger_id, "wallet.topped_up")
    assert (event.type, event.end_user, event.ledger_id) == ("wallet.topped_up", "u_1", receipt.ledger_id)
    assert event.data["amount_micros"] == 5 * USD and event.data["balance_micros"] == 5 * USD
    assert (await store.wallet_state("u_1"))["cursor"] == receipt.ledger_id


# ------------------------------------------------------------ crashes and late movements


async def test_a_crash_between_the_log_and_the_cursor_derives_the_same_ids_again_and_loses_nothing(redis, store, wallets):
    await open_wallet(wallets, funds=10 * USD)
    await wallets.adjust("u_1", -6 * USD, reason="usage", idempotency_key="a1")  # below 50 % of the top-up
    await wallets.note("u_1", "depleted", reason="refused", once_per=("note:depleted", "1"))

    with pytest.raises(Crash):
        await EventConsumer(CrashBeforeTheCursor(redis), wallets, CONFIG).pass_once()
    first = await logged(store)
    assert [e.type for e in first] == ["wallet.topped_up", "wallet.balance_low", "wallet.depleted"]
    assert await dirty(store) == {"u_1"}  # the mark outlives the crash
    assert (await store.wallet_state("u_1")).get("cursor") in (None, "0")

    await drained(EventConsumer(store, wallets, CONFIG))  # the restarted replica

    again = (await logged(store))[len(first):]
    assert [e.id for e in again] == [e.id for e in first]  # at least once, same ids: the receiver dedupes
    assert [e.data for e in again] == [e.data for e in first]
    assert await dirty(store) == set()
    assert await EventConsumer(store, wallets, CONFIG).derive_wallet("u_1") == []


async def test_a_movement_during_derivation_keeps_the_wallet_dirty_and_is_derived_next(redis, store, wallets):
    await open_wallet(wallets, funds=10 * USD)
    consumer = EventConsumer(MovesMoneyWhileDeriving(redis, wallets, "u_1"), wallets, CONFIG)

    assert await consumer.pass_once() == 1
    assert [e.type for e in await logged(store)] == ["wallet.topped_up"]
    assert await dirty(store) == {"u_1"}  # re-marked with a later score: mark_clean_each left it

    assert await consumer.pass_once() == 1
    events = await logged(store)
    assert [(e.type, e.data["amount_micros"]) for e in events] == [("wallet.topped_up", 10 * USD), ("wallet.topped_up", 2 * USD)]
    assert await dirty(store) == set()


async def test_a_pass_takes_as_many_round_trips_for_twenty_wallets_as_for_two(redis):
    wallet_commands, event_commands = RecordingCommands(RedisPyCommands(redis)), RecordingCommands(RedisPyCommands(redis))
    wallets = WalletStore(redis, hold_ttl_ms=60_000, commands=wallet_commands)
    store = EventStore(redis, event_commands)
    consumer = EventConsumer(store, wallets, CONFIG)
    round_trips: list[int] = []
    for prefix, count in (("a", 2), ("b", 20)):
        for n in range(count):
            await open_wallet(wallets, f"{prefix}_{n}", funds=USD)
        before = len(wallet_commands.round_trips) + len(event_commands.round_trips)

        assert await consumer.pass_once() == count

        round_trips.append(len(wallet_commands.round_trips) + len(event_commands.round_trips) - before)
    assert round_trips[0] == round_trips[1]
    assert await dirty(store) == set()
    topped_up = [e.end_user for e in await logged(store) if e.type == "wallet.topped_up"]
    assert sorted(topped_up) == sorted([f"a_{n}" for n in range(2)] + [f"b_{n}" for n in range(20)])


async def test_a_wallet_another_consumer_holds_is_left_to_it_with_its_mark(store, wallets):
    await open_wallet(wallets, "u_1", funds=USD)
    await open_wallet(wallets, "u_2", funds=USD)
    assert await store.acquire("derive:u_1", 60_000) is not None  # the other replica's

    assert await EventConsumer(store, wallets, CONFIG).pass_once() == 1

    assert [e.end_user for e in await logged(store)] == ["u_2"]
    assert await dirty(store) == {"u_1"}
    assert await store.acquire("derive:u_2", 60_000) is not None  # the pass let its own lease go


@pytest.mark.parametrize("client", ["redis-py", "multiplexed"])
async def test_the_batched_state_reads_agree_with_the_one_wallet_reads(client, redis, redis_server, wallets):
    commands = MultiplexedConnection(redis_server.url) if client == "multiplexed" else None
    store, batched_wallets = EventStore(redis, commands), WalletStore(redis, hold_ttl_ms=60_000, commands=commands)
    try:
        await open_wallet(wallets, "u_1", funds=3 * USD)
        await open_wallet(wallets, "u_2")
        await EventConsumer(EventStore(redis), wallets, CONFIG).pass_once()
        ids = ["u_1", "u_2", "u_missing"]

        states = await store.wallet_states(ids)
        found = await batched_wallets.get_each(ids)
        profiles = await batched_wallets.profiles(ids)

        assert states == [await store.wallet_state(w) for w in ids]
        assert states[0]["cursor"] != "0" and int(states[0]["last_top_up_micros"]) == 3 * USD
        assert found == [await wallets.get(w) for w in ids] and found[2] is None
        assert profiles == [await wallets.profile(w) for w in ids] and profiles[2] is None
    finally:
        if commands is not None:
            await commands.aclose()


class CountingConsumer(EventConsumer):
    passes = 0

    async def pass_once(self, limit: int = 100) -> int:
        self.passes += 1
        return await super().pass_once(limit)


async def test_under_steady_traffic_the_consumer_passes_once_per_interval_not_once_per_entry(store, wallets):
    # A wallet dirty again within milliseconds must not make the consumer pass again at once:
    # each pass costs round trips whatever it finds, so its entries wait for the interval and go in one pass.
    await open_wallet(wallets, funds=1 * USD)
    consumer = CountingConsumer(store, wallets, EventsConfig(poll_interval_seconds=0.2))
    task = asyncio.create_task(consumer.run())
    try:
        for i in range(60):
            await wallets.top_up("u_1", 1, idempotency_key=f"t{i}")
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert 1 <= consumer.passes <= 6  # ~0.6 s of traffic at 0.2 s: a spinning consumer makes ~60
    await drained(consumer)
    assert [e.type for e in await logged(store)].count("wallet.topped_up") == 61


# ------------------------------------------------------------ two consumers


async def test_two_consumers_on_the_same_dirty_wallets_derive_each_event_once(redis, store, wallets, redis_server: RedisServer):
    ids = [f"u_{i}" for i in range(30)]
    other = connect(redis_server.url)
    consumers = [EventConsumer(store, wallets, EventsConfig(poll_interval_seconds=0.001)),
                 EventConsumer(EventStore(other), WalletStore(other, hold_ttl_ms=60_000), EventsConfig(poll_interval_seconds=0.001))]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    try:
        # Moved while both run: each movement re-marks its wallet, so both keep finding the same ones.
        for step in range(5):
            for wallet_id in ids:
                if step == 0:
                    await open_wallet(wallets, wallet_id, funds=1 * USD)
                elif step < 4:
                    # 400k, 150k, 50k left: below 50 %, 20 %, 10 % of the top-up, one step each
                    amount = (600_000, 250_000, 100_000)[step - 1]
                    await wallets.adjust(wallet_id, -amount, reason="usage", idempotency_key=f"a{step}")
                else:
                    await wallets.note(wallet_id, "depleted", reason="refused", once_per=("note:depleted", "1"))
            await asyncio.sleep(0.005)
        await eventually(lambda: logged_at_least(store, 5 * len(ids)), "every wallet's five events derived")
        await eventually(lambda: no_dirty(store), "every wallet clean")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await other.aclose()

    events = await logged(store)
    assert [event_id for event_id, n in Counter(e.id for e in events).items() if n > 1] == []
    for wallet_id in ids:
        mine = [e for e in events if e.end_user == wallet_id]
        assert [(e.type, e.data.get("threshold")) for e in mine] == [
            ("wallet.topped_up", None), ("wallet.balance_low", "pct:50"), ("wallet.balance_low", "pct:20"),
            ("wallet.balance_low", "pct:10"), ("wallet.depleted", None)]


async def logged_at_least(store: EventStore, n: int) -> bool:
    return len(await logged(store)) >= n


async def no_dirty(store: EventStore) -> bool:
    return not await dirty(store)


# ------------------------------------------------------------ notes


async def test_a_storm_of_refusals_writes_one_depleted_note_until_a_top_up_rearms_it(redis, store, wallets):
    await open_wallet(wallets, funds=1 * USD)
    await wallets.adjust("u_1", -1 * USD, reason="usage", idempotency_key="drain")
    spawned: list[asyncio.Task[Any]] = []
    notices = Notices(wallets, lambda work: spawned.append(asyncio.ensure_future(work)))

    for i in range(50):
        notices.depleted("u_1", "refused", request_id=f"req_{i}", model="gpt-4o-mini")
    await asyncio.gather(*spawned)
    notes = [e for e in await wallets.ledger("u_1", limit=500) if e.type == "depleted"]
    assert len(notes) == 1 and notes[0].amount_micros == 0 and notes[0].details["reason"] == "refused"

    await wallets.top_up("u_1", 3 * USD, idempotency_key="rearm")
    for i in range(50):
        notices.depleted("u_1", "stream_cut", request_id=f"req_again_{i}")
    await asyncio.gather(*spawned)

    await drained(EventConsumer(store, wallets, CONFIG))
    depleted = [e for e in await logged(store) if e.type == "wallet.depleted"]
    assert [e.data["reason"] for e in depleted] == ["refused", "stream_cut"]
    assert depleted[0].data["available_micros"] == 0 and depleted[1].data["available_micros"] == 3 * USD
    assert len({e.id for e in depleted}) == 2


# ------------------------------------------------------------ rate cards


@pytest.fixture
def cards_dir(tmp_path: Path, repo_root: Path) -> Path:
    target = tmp_path / "ratecards"
    shutil.copytree(repo_root / "config" / "ratecards", target)
    return target


@pytest.fixture
async def running_app(gateway_config: Config, cards_dir: Path) -> AsyncIterator[web.Application]:
    """The app with its contexts up (consumer, deliverer, rate card wiring) but no server listening."""
    config = gateway_config.model_copy(update={"ratecards_dir": str(cards_dir), "ratecards_watch_interval_seconds": 3600.0,
                                               "events": CONFIG})
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        yield app
    finally:
        await runner.cleanup()


async def test_a_rate_card_reload_appends_ratecard_reloaded(running_app, store):
    assert await running_app[RATECARDS].reload()

    events = await eventually(lambda: typed(store, "ratecard.reloaded"), "ratecard.reloaded in the log")
    [event] = events
    assert "default@1" in event.data["cards"] and event.end_user is None and event.ledger_id is None


async def test_a_refused_rate_card_reload_appends_ratecard_refused_with_the_error(running_app, store, cards_dir):
    (cards_dir / "default.yaml").write_text((cards_dir / "default.yaml").read_text().replace("input: 0.1875", "input: -1"))

    assert not await running_app[RATECARDS].reload()

    [event] = await eventually(lambda: typed(store, "ratecard.refused"), "ratecard.refused in the log")
    assert "default.yaml" in event.data["error"] and "input" in event.data["error"]
    assert await typed(store, "ratecard.reloaded") == []


async def typed(store: EventStore, event_type: str) -> list[Event]:
    return [e for e in await logged(store) if e.type == event_type]
