"""Edges of the hold scripts that a model-based test found (zero amounts, a refused duplicate id), and how
closed holds leave the reaper's index."""

from __future__ import annotations

import pytest

from proxy.store import HOLD_INDEX_KEY, IdempotencyConflict, RedisPyCommands, WalletStore
from tests.conftest import RecordingCommands


async def funded(wallets: WalletStore) -> None:
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 1_000, idempotency_key="seed")


async def test_a_zero_hold_settles_for_zero(wallets):
    # Lua's -0 reached HINCRBY as "-0", which Redis 7.0 (not Valkey) refuses as an integer.
    await funded(wallets)
    hold = await wallets.hold("u_1", 0)
    settled = await wallets.settle("u_1", hold.hold_id, 0)
    assert (settled.captured_micros, settled.released_micros, settled.wallet.balance_micros) == (0, 0, 1_000)


async def test_a_zero_hold_releases(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 0)
    released = await wallets.release("u_1", hold.hold_id)
    assert (released.released_micros, released.wallet.held_micros) == (0, 0)


async def test_settling_a_hold_for_nothing_captures_nothing(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 500)
    settled = await wallets.settle("u_1", hold.hold_id, 0)
    assert (settled.captured_micros, settled.released_micros, settled.wallet.balance_micros) == (0, 500, 1_000)


async def test_a_refused_duplicate_hold_id_leaves_the_existing_hold_in_the_reapers_index(wallets, redis):
    await funded(wallets)
    hold = await wallets.hold("u_1", 100, hold_id="hold_dup")
    with pytest.raises(IdempotencyConflict):
        await wallets.hold("u_1", 200, hold_id="hold_dup")
    assert await redis.zscore(HOLD_INDEX_KEY, f"u_1|{hold.hold_id}") is not None
    await wallets.release("u_1", hold.hold_id)


async def test_a_closed_hold_leaves_the_reapers_index_with_the_next_round_trip_not_one_of_its_own(redis):
    commands = RecordingCommands(RedisPyCommands(redis))
    wallets = WalletStore(redis, hold_ttl_ms=60_000, commands=commands)
    await funded(wallets)
    first = await wallets.hold("u_1", 100)
    commands.round_trips.clear()
    await wallets.settle("u_1", first.hold_id, 50)
    assert len(commands.round_trips) == 1  # the close alone
    assert await redis.zscore(HOLD_INDEX_KEY, f"u_1|{first.hold_id}") is not None  # waits for the next batch
    second = await wallets.hold("u_1", 100)
    assert await redis.zscore(HOLD_INDEX_KEY, f"u_1|{first.hold_id}") is None
    assert await redis.zscore(HOLD_INDEX_KEY, f"u_1|{second.hold_id}") is not None
    await wallets.release("u_1", second.hold_id)
    await wallets.flush_unindexed()  # at shutdown
    assert await redis.zcard(HOLD_INDEX_KEY) == 0
