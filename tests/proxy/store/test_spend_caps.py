"""A credential's spend caps are holds too: growth and captures never take it past them."""

from __future__ import annotations

import pytest

from proxy.store import CredentialSpend, LimitStore, SpendLimitReached, WalletStore

CAPPED = CredentialSpend("key_a", "req_1", max_spend_micros=1_000)


async def admitted_hold(wallets: WalletStore, limits: LimitStore, amount: int, spend: CredentialSpend = CAPPED):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 1_000_000, idempotency_key="seed")
    refused = await limits.admit(
        "u_1", spend.credential_id, spend.request_id, requests_per_minute=0, tokens_per_minute=0, tokens=1,
        max_spend_micros=spend.max_spend_micros, max_daily_spend_micros=spend.max_daily_spend_micros, amount_micros=amount,
    )
    assert refused is None
    return await wallets.hold("u_1", amount, spend=spend)


async def test_a_growth_the_cap_cannot_take_is_refused_and_changes_nothing(wallets, redis):
    limits = LimitStore(redis)
    hold = await admitted_hold(wallets, limits, 600)
    with pytest.raises(SpendLimitReached):
        await wallets.extend("u_1", hold.hold_id, 500, current_micros=600, spend=CAPPED)
    assert (await limits.spend("u_1", "key_a")).spent_micros == 600
    assert (await wallets.active_holds("u_1")) == {hold.hold_id: 600}
    await wallets.release("u_1", hold.hold_id, spend=CAPPED)


async def test_a_growth_within_the_cap_is_reserved_against_it(wallets, redis):
    limits = LimitStore(redis)
    hold = await admitted_hold(wallets, limits, 600)
    await wallets.extend("u_1", hold.hold_id, 400, current_micros=600, spend=CAPPED)
    assert (await limits.spend("u_1", "key_a")).spent_micros == 1_000
    settled = await wallets.settle("u_1", hold.hold_id, 700, spend=CAPPED)
    assert settled.captured_micros == 700
    assert (await limits.spend("u_1", "key_a")).spent_micros == 700


async def test_a_settle_above_the_cap_captures_only_what_the_cap_leaves(wallets, redis):
    limits = LimitStore(redis)
    hold = await admitted_hold(wallets, limits, 600)
    settled = await wallets.settle("u_1", hold.hold_id, 5_000, spend=CAPPED)
    assert (settled.captured_micros, settled.shortfall_micros) == (1_000, 4_000)
    assert (await limits.spend("u_1", "key_a")).spent_micros == 1_000
    assert settled.wallet.balance_micros == 1_000_000 - 1_000


async def test_a_daily_cap_bounds_the_capture_too(wallets, redis):
    limits = LimitStore(redis)
    daily = CredentialSpend("key_a", "req_1", max_daily_spend_micros=800)
    hold = await admitted_hold(wallets, limits, 500, daily)
    settled = await wallets.settle("u_1", hold.hold_id, 2_000, spend=daily)
    assert (settled.captured_micros, settled.shortfall_micros) == (800, 1_200)
    assert (await limits.spend("u_1", "key_a")).spent_today_micros == 800


async def test_a_key_without_caps_settles_above_its_hold_as_the_wallet_allows(wallets, redis):
    limits = LimitStore(redis)
    uncapped = CredentialSpend("key_a", "req_1")
    hold = await admitted_hold(wallets, limits, 600, uncapped)
    settled = await wallets.settle("u_1", hold.hold_id, 5_000, spend=uncapped)
    assert (settled.captured_micros, settled.shortfall_micros) == (5_000, 0)
    assert (await limits.spend("u_1", "key_a")).spent_micros == 5_000
