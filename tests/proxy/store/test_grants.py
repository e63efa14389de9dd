"""Grants: a wallet's balance as credit of kinds, spent in a stated order, refunded to
where it came from, and expired without touching what calls in flight reserved.

Every test ends with the ledger invariants of tests/conftest.py (the `redis`
fixture), which include balance == Σ grants.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.store import CreditLimitInUse, InsufficientFunds, InvalidWalletRequest, WalletStore, now_ms
from proxy.store.grants import GRANT_DUE_KEY, Grant, GrantStore
from proxy.store.keyspace import _wallet_key


@pytest.fixture
def grants(wallets: WalletStore) -> GrantStore:
    return GrantStore(wallets.redis, wallets.commands)


def remaining(found: list[Grant]) -> dict[str, int]:
    return {g.id: g.remaining_micros for g in found}


async def promo(grants: GrantStore, amount: int, *, key: str, expires_in_ms: int | None = None, **terms) -> str:
    expires = now_ms() + expires_in_ms if expires_in_ms else None
    created = await grants.grant("u_1", amount, kind=terms.pop("kind", "promotional"), idempotency_key=key,
                                 expires_at_ms=expires, **terms)
    return created.grant_id


async def charge_of(wallets: WalletStore, amount: int, captured: int | None = None) -> str:
    hold = await wallets.hold("u_1", amount)
    settled = await wallets.settle("u_1", hold.hold_id, amount if captured is None else captured)
    return settled.ledger_id


async def test_top_ups_add_to_the_one_purchased_grant(wallets, grants):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 700, idempotency_key="a")
    await wallets.top_up("u_1", 300, idempotency_key="b")
    assert [(g.id, g.kind, g.remaining_micros, g.priority, g.expires_at_ms) for g in await grants.grants("u_1")] == [
        ("purchased", "purchased", 1_000, 50, None)]


async def test_promotional_credit_is_spent_before_purchased_credit(wallets, grants):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 1_000, idempotency_key="seed")
    gift = await promo(grants, 300, key="gift")
    charge_id = await charge_of(wallets, 400)
    assert remaining(await grants.grants("u_1")) == {gift: 0, "purchased": 900}
    [entry] = [e for e in await wallets.ledger("u_1") if e.id == charge_id]
    assert entry.details["grants"] == f"{gift}:300,purchased:100"


async def test_draw_order_is_priority_then_soonest_expiry_then_oldest(wallets, grants):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 100, idempotency_key="seed")  # purchased: priority 50, never expires
    late = await promo(grants, 100, key="late", priority=50, expires_in_ms=3_600_000)
    older = await promo(grants, 100, key="older", kind="referral", priority=50)
    newer = await promo(grants, 100, key="newer", kind="referral", priority=50)
    soon = await promo(grants, 100, key="soon", priority=50, expires_in_ms=60_000)
    first = await promo(grants, 100, key="first", kind="plan", priority=0)
    assert [g.id for g in await grants.grants("u_1")] == [first, soon, late, "purchased", older, newer]
    for i in range(6):
        await charge_of(wallets, 100)
        spent = [g.id for g in await grants.grants("u_1") if g.remaining_micros == 0]
        assert spent == [first, soon, late, "purchased", older, newer][: i + 1]


async def test_200_concurrent_holds_draw_across_three_grants_in_order(wallets, grants):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 10_000, idempotency_key="seed")  # purchased, drawn last
    plan = await promo(grants, 2_500, key="plan", kind="plan", priority=10)
    gift = await promo(grants, 3_000, key="gift", expires_in_ms=3_600_000)  # promotional: priority 25

    async def call(i: int) -> None:
        hold = await wallets.hold("u_1", 60)
        await wallets.settle("u_1", hold.hold_id, 35 + i % 3)  # 35, 36 or 37 micros

    await asyncio.gather(*(call(i) for i in range(200)))
    spent = sum(35 + i % 3 for i in range(200))  # 7,199
    assert remaining(await grants.grants("u_1")) == {plan: 0, gift: 0, "purchased": 15_500 - spent}
    # Read in ledger order, the charges never go back to a grant earlier in the order.
    order = {plan: 0, gift: 1, "purchased": 2}
    drawn = []
    for entry in reversed(await wallets.ledger("u_1", limit=1_000)):
        if entry.type == "charge":
            drawn += [order[part.split(":")[0]] for part in entry.details["grants"].split(",")]
    assert drawn == sorted(drawn) and set(drawn) == {0, 1, 2}


async def test_a_refund_goes_back_to_the_grants_the_charge_drew_from_last_drawn_first(wallets, grants):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 1_000, idempotency_key="seed")
    gift = await promo(grants, 300, key="gift")
    charge_id = await charge_of(wallets, 500)  # gift 300, then purchased 200
    await wallets.refund("u_1", 250, charge_id=charge_id, reason="bad answer", idempotency_key="r1")
    assert remaining(await grants.grants("u_1")) == {gift: 50, "purchased": 1_000}
    await wallets.refund("u_1", 250, charge_id=charge_id, reason="bad answer", idempotency_key="r2")
    assert remaining(await grants.grants("u_1")) == {gift: 300, "purchased": 1_000}


async def test_a_refund_to_an_expired_grant_lapses_with_a_grant_expired_entry(wallets, grants):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 1_000, idempotency_key="seed")
    gift = await promo(grants, 300, key="gift", expires_in_ms=400)
    charge_id = await charge_of(wallets, 100)  # all from the gift
    await asyncio.sleep(0.5)
    receipt = await wallets.refund("u_1", 100, charge_id=charge_id, reason="r", idempotency_key="r1")
    assert receipt.wallet.balance_micros == 1_000  # the gift's 200 expired; the refunded 100 lapsed too
    types = [(e.type, e.amount_micros) for e in await wallets.ledger("u_1", limit=3)]
    assert types == [("grant_expired", -100), ("refund", 100), ("grant_expired", -200)]
    assert gift not in remaining(await grants.grants("u_1"))


async def test_an_expiring_grant_keeps_what_a_live_hold_reserved_and_lapses_the_rest_at_its_close(wallets, grants):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 500, idempotency_key="seed")
    gift = await promo(grants, 1_000, key="gift", expires_in_ms=400)
    stream = await wallets.hold("u_1", 600)  # reserved of the gift, which is drawn first
    await asyncio.sleep(0.5)
    # The sweep (here: the next hold) expires only what the stream did not reserve.
    with pytest.raises(InsufficientFunds):
        await wallets.hold("u_1", 501)
    found = {g.id: g for g in await grants.grants("u_1")}
    assert (found[gift].remaining_micros, found[gift].state) == (600, "expired")
    state = await wallets.get("u_1")
    assert (state.balance_micros, state.held_micros, state.available_micros) == (1_100, 600, 500)
    # The stream runs on, extends by 100 (from purchased money) and settles for 650.
    await wallets.extend("u_1", stream.hold_id, 100, current_micros=600)
    settled = await wallets.settle("u_1", stream.hold_id, 650)
    assert settled.captured_micros == 650
    assert remaining(await grants.grants("u_1")) == {"purchased": 450}
    expired = [e.amount_micros for e in await wallets.ledger("u_1", limit=20) if e.type == "grant_expired"]
    assert expired == [-400]
    assert (await wallets.get("u_1")).balance_micros == 450


async def test_the_remainder_an_expired_grant_kept_for_a_released_hold_lapses(wallets, grants):
    await wallets.open("u_1", profile={})
    gift = await promo(grants, 1_000, key="gift", expires_in_ms=400)
    hold = await wallets.hold("u_1", 300)
    await asyncio.sleep(0.5)
    assert await grants.expire_due() == 1  # the reaper's pass: 700 lapse, 300 stay reserved
    await wallets.release("u_1", hold.hold_id)
    assert gift not in remaining(await grants.grants("u_1"))
    assert [e.amount_micros for e in await wallets.ledger("u_1", limit=20) if e.type == "grant_expired"] == [-300, -700]
    assert (await wallets.get("u_1")).balance_micros == 0


async def test_the_reaper_pass_expires_grants_of_a_wallet_nobody_touches(wallets, grants, redis):
    await wallets.open("u_1", profile={})
    await promo(grants, 1_000, key="gift", expires_in_ms=300)
    assert await redis.zscore(GRANT_DUE_KEY, "u_1") is not None
    assert await grants.expire_due() == 0  # not due yet
    await asyncio.sleep(0.4)
    assert await grants.expire_due() == 1
    assert (await wallets.get("u_1")).balance_micros == 0
    assert [e.type for e in await wallets.ledger("u_1", limit=1)] == ["grant_expired"]
    assert await redis.zscore(GRANT_DUE_KEY, "u_1") is None


async def test_a_grant_replayed_under_its_idempotency_key_credits_once(wallets, grants):
    await wallets.open("u_1", profile={})
    first = await grants.grant("u_1", 500, kind="promotional", idempotency_key="k")
    again = await grants.grant("u_1", 500, kind="promotional", idempotency_key="k")
    assert (again.grant_id, again.receipt.ledger_id, again.receipt.replayed) == (first.grant_id, first.receipt.ledger_id, True)
    assert (await wallets.get("u_1")).balance_micros == 500


@pytest.mark.parametrize("terms", [
    {"kind": "purchased"}, {"kind": "debt"}, {"kind": "Bad Kind"}, {"kind": "promotional", "priority": 101},
    {"kind": "promotional", "expires_at_ms": 1_000},
])
async def test_a_grant_with_bad_terms_is_refused_and_changes_nothing(wallets, grants, terms):
    await wallets.open("u_1", profile={})
    with pytest.raises(InvalidWalletRequest):
        await grants.grant("u_1", 500, idempotency_key="k", **terms)
    assert (await wallets.get("u_1")).balance_micros == 0
    assert [e.type for e in await wallets.ledger("u_1")] == ["open"]


async def test_a_wallet_from_before_grants_gets_its_balance_as_the_purchased_grant(wallets, grants, redis):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 1_000, idempotency_key="seed")
    await redis.hdel(_wallet_key("u_1"), "grants_v", "grant:purchased", "grant_seq")  # the layout before grants
    assert remaining(await grants.grants("u_1")) == {"purchased": 1_000}
    gift = await promo(grants, 100, key="gift")
    await charge_of(wallets, 300)
    assert remaining(await grants.grants("u_1")) == {gift: 0, "purchased": 800}


# ----------------------------------------------------------------- postpay


async def test_a_postpaid_wallet_goes_into_debt_and_purchased_money_repays_it_first(wallets, grants):
    await wallets.open("u_1", profile={})
    await grants.set_credit_limit("u_1", 1_000, reason="net-30 customer", idempotency_key="cl")
    gift = await promo(grants, 100, key="gift")
    await charge_of(wallets, 400)
    assert remaining(await grants.grants("u_1")) == {gift: 0, "debt": -300}
    await wallets.top_up("u_1", 500, idempotency_key="pay")
    assert remaining(await grants.grants("u_1")) == {gift: 0, "purchased": 200}


async def test_raising_the_credit_limit_lets_calls_through_and_writes_a_ledger_entry(wallets, grants):
    await wallets.open("u_1", profile={})
    with pytest.raises(InsufficientFunds):
        await wallets.hold("u_1", 100)
    receipt = await grants.set_credit_limit("u_1", 5_000, reason="trusted", idempotency_key="cl")
    assert receipt.wallet.credit_limit_micros == 5_000
    await wallets.hold("u_1", 5_000)
    [entry] = [e for e in await wallets.ledger("u_1") if e.type == "credit_limit"]
    assert (entry.amount_micros, entry.details["credit_limit_micros"], entry.details["previous_credit_limit"],
            entry.details["reason"]) == (0, 5_000, "0", "trusted")


async def test_the_credit_limit_cannot_go_below_what_the_wallet_uses_of_it(wallets, grants):
    await wallets.open("u_1", profile={})
    await grants.set_credit_limit("u_1", 1_000, reason="r", idempotency_key="cl1")
    await wallets.top_up("u_1", 200, idempotency_key="seed")
    await wallets.hold("u_1", 700)  # 500 of it on credit
    with pytest.raises(CreditLimitInUse):
        await grants.set_credit_limit("u_1", 499, reason="r", idempotency_key="cl2")
    lowered = await grants.set_credit_limit("u_1", 500, reason="r", idempotency_key="cl3")
    assert (lowered.wallet.credit_limit_micros, lowered.wallet.available_micros) == (500, 0)
