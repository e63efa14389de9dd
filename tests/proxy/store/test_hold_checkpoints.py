"""Checkpoints on holds, and what the reaper does with them; the reaper's index outlives every active hold."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.store import HOLD_INDEX_KEY, Checkpoint, CredentialSpend, HoldClosed, LimitStore, WalletStore

META = {"request_id": "req_1", "outcome": "proxy_lost", "usage_source": "counted", "completion_tokens": 40}


async def funded(wallets: WalletStore, amount: int = 10_000_000) -> None:
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", amount, idempotency_key="seed")


async def test_the_reaper_charges_an_expired_holds_checkpoint(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000, ttl_ms=50)
    await wallets.extend("u_1", hold.hold_id, 0, current_micros=3_000_000, ttl_ms=50,
                         checkpoint=Checkpoint(1_234, 52, META))
    await asyncio.sleep(0.1)
    [expired] = await wallets.expire_due()
    assert (expired.captured_micros, expired.released_micros, expired.shortfall_micros) == (1_234, 3_000_000 - 1_234, 0)
    state = await wallets.get("u_1")
    assert (state.balance_micros, state.held_micros) == (10_000_000 - 1_234, 0)
    entry = (await wallets.ledger("u_1"))[0]
    assert (entry.type, entry.amount_micros, entry.details["outcome"]) == ("charge", -1_234, "proxy_lost")
    assert entry.details["completion_tokens"] == 40


async def test_a_hold_without_a_checkpoint_expires_free(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000, ttl_ms=50)
    await asyncio.sleep(0.1)
    [expired] = await wallets.expire_due()
    assert (expired.captured_micros, expired.released_micros) == (0, 3_000_000)
    assert (await wallets.ledger("u_1"))[0].type == "expire"
    with pytest.raises(HoldClosed):
        await wallets.settle("u_1", hold.hold_id, 1)


async def test_an_older_checkpoint_never_replaces_a_newer_one(wallets, redis):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000, ttl_ms=60_000)
    await wallets.extend("u_1", hold.hold_id, 0, current_micros=3_000_000, checkpoint=Checkpoint(900, 30, META))
    await wallets.extend("u_1", hold.hold_id, 0, current_micros=3_000_000, checkpoint=Checkpoint(400, 10, META))
    record = await redis.hmget(f"mg:{{w:u_1}}:hold:{hold.hold_id}", "checkpoint", "checkpoint_tokens")
    assert record == [b"900", b"30"]
    await wallets.release("u_1", hold.hold_id)


async def test_a_checkpoint_capture_is_bounded_by_the_wallet(wallets):
    await funded(wallets, 1_000)
    hold = await wallets.hold("u_1", 1_000, ttl_ms=50)
    await wallets.extend("u_1", hold.hold_id, 0, current_micros=1_000, ttl_ms=50, checkpoint=Checkpoint(5_000, 99, META))
    await asyncio.sleep(0.1)
    [expired] = await wallets.expire_due()
    assert (expired.captured_micros, expired.shortfall_micros) == (1_000, 4_000)
    assert (await wallets.get("u_1")).balance_micros == 0


async def test_expiring_a_checkpointed_hold_counts_the_capture_against_its_credential(wallets, redis):
    limits = LimitStore(redis)
    await funded(wallets)
    await limits.admit("u_1", "key_a", "req_1", requests_per_minute=0, tokens_per_minute=0, tokens=10,
                       max_spend_micros=5_000_000, max_daily_spend_micros=None, amount_micros=3_000_000)
    hold = await wallets.hold("u_1", 3_000_000, ttl_ms=50, spend=CredentialSpend("key_a", "req_1"))
    await wallets.extend("u_1", hold.hold_id, 0, current_micros=3_000_000, ttl_ms=50, checkpoint=Checkpoint(700, 20, META))
    await asyncio.sleep(0.1)
    [expired] = await wallets.expire_due()
    assert expired.captured_micros == 700
    assert (await limits.spend("u_1", "key_a")).spent_micros == 700
    # The expired record keeps what a replay reads; the checkpoint and credential went with the close.
    record = await redis.hgetall(f"mg:{{w:u_1}}:hold:{hold.hold_id}")
    assert set(record) == {b"status", b"amount", b"requested", b"created_ms", b"expires_ms", b"release_result"}


class _FailingAfterScript:
    """Commands that run the script, then lose the reply: the close ran, the caller saw a timeout."""

    def __init__(self, inner):
        self.inner = inner
        self.fail_next_script = False

    async def execute(self, *args):
        return await self.inner.execute(*args)

    async def batch(self, commands):
        results = await self.inner.batch(commands)
        if self.fail_next_script and any(c[0] == "EVALSHA" for c in commands):
            self.fail_next_script = False
            raise RedisTimeoutError("reply lost")
        return results


async def test_a_hold_whose_close_failed_stays_in_the_reapers_index(redis):
    from proxy.store import RedisPyCommands

    commands = _FailingAfterScript(RedisPyCommands(redis))
    wallets = WalletStore(redis, hold_ttl_ms=60_000, commands=commands)
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    member = f"u_1|{hold.hold_id}"
    commands.fail_next_script = True
    with pytest.raises(RedisTimeoutError):
        await wallets.settle("u_1", hold.hold_id, 1_000)
    # The settle ran but its caller could not know: the entry stays until a close is seen to succeed.
    assert await redis.zscore(HOLD_INDEX_KEY, member) is not None
    again = await wallets.settle("u_1", hold.hold_id, 1_000)
    assert again.replayed and again.captured_micros == 1_000
    await wallets.flush_unindexed()  # (else it goes with the next hold or close)
    assert await redis.zscore(HOLD_INDEX_KEY, member) is None
