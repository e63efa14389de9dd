"""Every wallet script and its error paths, against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from proxy.store import (
    BalanceLimit,
    ChargeNotFound,
    Checkpoint,
    CredentialSpend,
    HoldClosed,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidWalletRequest,
    LimitStore,
    RefundExceedsCharge,
    WalletExists,
    WalletNotFound,
    WalletStore,
)
from proxy.store.budgets import CallBudget


@pytest.fixture
def wallets(wallets_on_each_client: WalletStore) -> WalletStore:
    return wallets_on_each_client


async def funded(wallets: WalletStore, wallet_id: str = "u_1", amount: int = 10_000_000, credit: int = 0) -> None:
    await wallets.open(wallet_id, credit_limit_micros=credit, profile={"tier": "default"})
    if amount:
        await wallets.top_up(wallet_id, amount, idempotency_key=f"seed-{wallet_id}")


async def test_open_creates_an_empty_wallet_with_an_open_entry(wallets):
    state = await wallets.open("u_1", profile={"tier": "default"})
    assert (state.balance_micros, state.held_micros, state.credit_limit_micros) == (0, 0, 0)
    [entry] = await wallets.ledger("u_1")
    assert (entry.type, entry.amount_micros) == ("open", 0)


async def test_open_refuses_a_duplicate_id(wallets):
    await wallets.open("u_1", profile={})
    with pytest.raises(WalletExists):
        await wallets.open("u_1", profile={})


async def test_open_refuses_an_id_that_cannot_be_a_hash_tag(wallets):
    with pytest.raises(InvalidWalletRequest):
        await wallets.open("u}1{", profile={})


async def test_top_up_adds_to_the_balance_and_the_ledger(wallets):
    await wallets.open("u_1", profile={})
    receipt = await wallets.top_up("u_1", 5_000_000, idempotency_key="k1", reference="pi_123")
    assert receipt.wallet.balance_micros == 5_000_000
    assert not receipt.replayed
    [entry, _open] = await wallets.ledger("u_1")
    assert (entry.id, entry.type, entry.amount_micros, entry.balance_micros) == (receipt.ledger_id, "top_up", 5_000_000, 5_000_000)
    assert entry.details["reference"] == "pi_123"
    assert entry.details["idempotency_key"] == "k1"


async def test_top_up_replay_returns_the_first_result_and_changes_nothing(wallets):
    await wallets.open("u_1", profile={})
    first = await wallets.top_up("u_1", 5_000_000, idempotency_key="k1")
    again = await wallets.top_up("u_1", 5_000_000, idempotency_key="k1")
    assert again.replayed and again.ledger_id == first.ledger_id
    assert again.wallet == first.wallet
    assert (await wallets.get("u_1")).balance_micros == 5_000_000
    assert len(await wallets.ledger("u_1")) == 2


async def test_top_up_same_key_different_amount_is_a_conflict(wallets):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 5_000_000, idempotency_key="k1")
    with pytest.raises(IdempotencyConflict):
        await wallets.top_up("u_1", 6_000_000, idempotency_key="k1")
    assert (await wallets.get("u_1")).balance_micros == 5_000_000


async def test_idempotency_key_reused_for_another_operation_is_a_conflict(wallets):
    await funded(wallets)
    await wallets.top_up("u_1", 1_000, idempotency_key="shared")
    with pytest.raises(IdempotencyConflict):
        await wallets.adjust("u_1", 1_000, reason="x", idempotency_key="shared")


@pytest.mark.parametrize("amount", [0, -1, 10**15 + 1])
async def test_top_up_refuses_amounts_out_of_range(wallets, amount):
    await wallets.open("u_1", profile={})
    with pytest.raises(InvalidAmount):
        await wallets.top_up("u_1", amount, idempotency_key="k")
    assert len(await wallets.ledger("u_1")) == 1


async def test_top_up_refuses_a_balance_beyond_the_exact_integer_range(wallets):
    await wallets.open("u_1", profile={})
    for i in range(4):
        await wallets.top_up("u_1", 10**15, idempotency_key=f"k{i}")
    with pytest.raises(BalanceLimit):
        await wallets.top_up("u_1", 1, idempotency_key="one-more")
    assert (await wallets.get("u_1")).balance_micros == 4 * 10**15


async def test_top_up_of_an_unknown_wallet_is_refused(wallets):
    with pytest.raises(WalletNotFound):
        await wallets.top_up("nobody", 1, idempotency_key="k")


async def test_hold_reserves_funds_without_moving_the_balance(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    assert hold.amount_micros == 3_000_000
    assert hold.wallet.balance_micros == 10_000_000
    assert hold.wallet.held_micros == 3_000_000
    assert hold.wallet.available_micros == 7_000_000
    assert await wallets.active_holds("u_1") == {hold.hold_id: 3_000_000}


async def test_hold_larger_than_available_is_refused(wallets):
    await funded(wallets)
    await wallets.hold("u_1", 6_000_000)
    with pytest.raises(InsufficientFunds):
        await wallets.hold("u_1", 4_000_001)
    assert (await wallets.get("u_1")).held_micros == 6_000_000


async def test_hold_may_use_the_credit_limit(wallets):
    await funded(wallets, amount=1_000_000, credit=2_000_000)
    hold = await wallets.hold("u_1", 3_000_000)
    assert hold.wallet.available_micros == 0
    with pytest.raises(InsufficientFunds):
        await wallets.hold("u_1", 1)


async def test_hold_with_the_same_id_replays(wallets):
    await funded(wallets)
    first = await wallets.hold("u_1", 1_000_000, hold_id="hold_a")
    again = await wallets.hold("u_1", 1_000_000, hold_id="hold_a")
    assert again.replayed and (again.amount_micros, again.expires_at_ms) == (first.amount_micros, first.expires_at_ms)
    assert (await wallets.get("u_1")).held_micros == 1_000_000


async def test_a_hold_writes_no_entry_and_its_release_carries_what_the_call_was(wallets, redis):
    await funded(wallets)
    before = len(await wallets.ledger("u_1", limit=100))
    hold = await wallets.hold("u_1", 1_000_000, meta={"request_id": "req_1", "model": "gpt-4o-mini"})
    assert len(await wallets.ledger("u_1", limit=100)) == before
    await wallets.release("u_1", hold.hold_id, reason="upstream_error")
    [entry, *_] = await wallets.ledger("u_1", limit=100)
    assert (entry.type, entry.details["held_delta_micros"]) == ("release", -1_000_000)
    assert (entry.details["request_id"], entry.details["model"]) == ("req_1", "gpt-4o-mini")
    assert len(await wallets.ledger("u_1", limit=100)) == before + 1
    # The closed record, kept a day for replays, drops what its entry now says.
    record = await redis.hgetall(f"mg:{{w:u_1}}:hold:{hold.hold_id}")
    assert record[b"status"] == b"released" and b"meta" not in record


async def test_a_release_given_its_own_meta_records_that_instead_of_the_holds(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000_000, meta={"request_id": "req_1"})
    await wallets.release("u_1", hold.hold_id, reason="not forwarded",
                          meta={"request_id": "req_1", "model": "gpt-4o-mini", "key_id": "key_1"})
    [entry, *_] = await wallets.ledger("u_1", limit=100)
    assert {k: entry.details[k] for k in ("request_id", "model", "key_id")} == {
        "request_id": "req_1", "model": "gpt-4o-mini", "key_id": "key_1"}


# What a closed hold's record keeps a day: what replays of the hold and of its close read.
REPLAY_FIELDS = {b"status", b"amount", b"requested", b"created_ms", b"expires_ms"}


async def test_a_settled_calls_record_keeps_only_what_replays_read(wallets, redis):
    await funded(wallets)
    spend = CredentialSpend("key_a", "req_1", tokens=30, max_spend_micros=5_000_000, max_daily_spend_micros=4_000_000)
    budget = CallBudget(limit_micros=9_000_000, period="2026-12")
    hold = await wallets.hold("u_1", 1_000_000, meta={"request_id": "req_1"}, spend=spend, budget=budget)
    await wallets.extend("u_1", hold.hold_id, 0, current_micros=1_000_000,
                         checkpoint=Checkpoint(300, 5, {"request_id": "req_1", "model": "m"}))
    settled = await wallets.settle("u_1", hold.hold_id, 400_000, meta={"request_id": "req_1"}, spend=spend)
    record = await redis.hgetall(f"mg:{{w:u_1}}:hold:{hold.hold_id}")
    assert set(record) == REPLAY_FIELDS | {b"settle_result"}
    again = await wallets.settle("u_1", hold.hold_id, 400_000, meta={"request_id": "req_1"}, spend=spend)
    assert again.replayed and (again.captured_micros, again.ledger_id) == (400_000, settled.ledger_id)
    replayed_hold = await wallets.hold("u_1", 1_000_000, hold_id=hold.hold_id)
    assert replayed_hold.replayed and replayed_hold.amount_micros == 1_000_000
    assert (await wallets.get("u_1")).held_micros == 0


async def test_a_released_calls_record_keeps_only_what_replays_read(wallets, redis):
    await funded(wallets)
    spend = CredentialSpend("key_a", "req_1", max_spend_micros=5_000_000)
    hold = await wallets.hold("u_1", 1_000_000, meta={"request_id": "req_1"}, spend=spend)
    await wallets.release("u_1", hold.hold_id, reason="upstream_error", spend=spend)
    record = await redis.hgetall(f"mg:{{w:u_1}}:hold:{hold.hold_id}")
    assert set(record) == REPLAY_FIELDS | {b"release_result"}
    assert (await wallets.release("u_1", hold.hold_id, reason="upstream_error", spend=spend)).replayed


async def test_a_calls_closed_hold_record_stays_a_listpack(wallets, redis):
    # Kept a day per call: a field over 64 bytes would make it a hash table, twice the memory.
    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000_000, meta={"request_id": "req_" + "0" * 24})
    await wallets.settle("u_1", hold.hold_id, 400_000, meta={"request_id": "req_" + "0" * 24, "model": "m" * 80})
    assert await redis.object("encoding", f"mg:{{w:u_1}}:hold:{hold.hold_id}") == b"listpack"


async def test_hold_with_the_same_id_and_another_amount_conflicts(wallets):
    await funded(wallets)
    await wallets.hold("u_1", 1_000_000, hold_id="hold_a")
    with pytest.raises(IdempotencyConflict):
        await wallets.hold("u_1", 2_000_000, hold_id="hold_a")


async def test_hold_on_an_unknown_wallet_is_refused(wallets):
    with pytest.raises(WalletNotFound):
        await wallets.hold("nobody", 1)


async def test_settle_below_the_hold_captures_it_and_releases_the_rest(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    s = await wallets.settle("u_1", hold.hold_id, 1_250_000, meta={"model": "gpt-4o-mini"})
    assert (s.captured_micros, s.released_micros, s.shortfall_micros) == (1_250_000, 1_750_000, 0)
    assert (s.wallet.balance_micros, s.wallet.held_micros) == (8_750_000, 0)
    entry = (await wallets.ledger("u_1"))[0]
    assert (entry.type, entry.amount_micros, entry.details["model"]) == ("charge", -1_250_000, "gpt-4o-mini")


async def test_settle_at_the_hold_captures_exactly_it(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    s = await wallets.settle("u_1", hold.hold_id, 3_000_000)
    assert (s.captured_micros, s.released_micros, s.shortfall_micros) == (3_000_000, 0, 0)
    assert s.wallet.balance_micros == 7_000_000


async def test_settle_above_the_hold_takes_what_the_wallet_has(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    s = await wallets.settle("u_1", hold.hold_id, 4_500_000)
    assert (s.captured_micros, s.released_micros, s.shortfall_micros) == (4_500_000, 0, 0)
    assert s.wallet.balance_micros == 5_500_000


async def test_settle_above_the_hold_stops_at_zero_and_records_the_shortfall(wallets):
    await funded(wallets, amount=4_000_000)
    other = await wallets.hold("u_1", 1_000_000)
    hold = await wallets.hold("u_1", 2_000_000)
    s = await wallets.settle("u_1", hold.hold_id, 5_000_000)
    # The other hold's 1,000,000 stays reserved: only 3,000,000 can be taken.
    assert (s.captured_micros, s.shortfall_micros) == (3_000_000, 2_000_000)
    assert (s.wallet.balance_micros, s.wallet.held_micros) == (1_000_000, 1_000_000)
    assert (await wallets.ledger("u_1"))[0].details["shortfall_micros"] == 2_000_000
    await wallets.settle("u_1", other.hold_id, 1_000_000)
    assert (await wallets.get("u_1")).balance_micros == 0


async def test_settle_above_the_hold_goes_no_lower_than_the_credit_limit(wallets):
    await funded(wallets, amount=1_000_000, credit=500_000)
    hold = await wallets.hold("u_1", 1_000_000)
    s = await wallets.settle("u_1", hold.hold_id, 2_000_000)
    assert (s.captured_micros, s.shortfall_micros) == (1_500_000, 500_000)
    assert s.wallet.balance_micros == -500_000


async def test_settling_twice_replays_the_first_result(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    first = await wallets.settle("u_1", hold.hold_id, 1_000_000)
    again = await wallets.settle("u_1", hold.hold_id, 2_000_000)
    assert again.replayed and again.ledger_id == first.ledger_id
    assert again.captured_micros == 1_000_000
    assert (await wallets.get("u_1")).balance_micros == 9_000_000


async def test_settling_a_released_hold_is_an_error(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    await wallets.release("u_1", hold.hold_id)
    with pytest.raises(HoldClosed):
        await wallets.settle("u_1", hold.hold_id, 1)
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


async def test_settling_an_unknown_hold_is_an_error(wallets):
    await funded(wallets)
    with pytest.raises(HoldNotFound):
        await wallets.settle("u_1", "hold_missing", 1)


async def test_release_returns_the_whole_hold(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    s = await wallets.release("u_1", hold.hold_id, reason="upstream 500")
    assert (s.captured_micros, s.released_micros) == (0, 3_000_000)
    assert (s.wallet.balance_micros, s.wallet.held_micros) == (10_000_000, 0)
    entry = (await wallets.ledger("u_1"))[0]
    assert (entry.type, entry.details["reason"]) == ("release", "upstream 500")


async def test_release_twice_replays(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    first = await wallets.release("u_1", hold.hold_id)
    again = await wallets.release("u_1", hold.hold_id)
    assert again.replayed and again.ledger_id == first.ledger_id


async def test_releasing_a_settled_hold_is_an_error(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    await wallets.settle("u_1", hold.hold_id, 1)
    with pytest.raises(HoldClosed):
        await wallets.release("u_1", hold.hold_id)


async def test_adjust_credits_and_debits_with_a_reason(wallets):
    await funded(wallets)
    await wallets.adjust("u_1", 250_000, reason="promo", idempotency_key="a1")
    r = await wallets.adjust("u_1", -1_000_000, reason="chargeback", idempotency_key="a2")
    assert r.wallet.balance_micros == 9_250_000
    entry = (await wallets.ledger("u_1"))[0]
    assert (entry.type, entry.amount_micros, entry.details["reason"]) == ("adjustment", -1_000_000, "chargeback")


async def test_adjust_requires_a_reason(wallets):
    await funded(wallets)
    with pytest.raises(InvalidWalletRequest):
        await wallets.adjust("u_1", 1, reason="", idempotency_key="a1")


async def test_adjust_of_zero_is_refused(wallets):
    await funded(wallets)
    with pytest.raises(InvalidAmount):
        await wallets.adjust("u_1", 0, reason="nothing", idempotency_key="a1")


async def test_a_debit_adjustment_cannot_uncover_a_hold(wallets):
    await funded(wallets)
    await wallets.hold("u_1", 8_000_000)
    with pytest.raises(InsufficientFunds):
        await wallets.adjust("u_1", -2_000_001, reason="too much", idempotency_key="a1")
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


async def test_refund_gives_back_part_of_a_charge(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    charge = await wallets.settle("u_1", hold.hold_id, 2_000_000)
    r = await wallets.refund("u_1", 500_000, charge_id=charge.ledger_id, reason="bad answer", idempotency_key="r1")
    assert r.wallet.balance_micros == 8_500_000
    entry = (await wallets.ledger("u_1"))[0]
    assert (entry.type, entry.amount_micros, entry.details["charge_id"]) == ("refund", 500_000, charge.ledger_id)


async def test_refunds_of_a_charge_cannot_exceed_it(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    charge = await wallets.settle("u_1", hold.hold_id, 2_000_000)
    await wallets.refund("u_1", 1_500_000, charge_id=charge.ledger_id, reason="r", idempotency_key="r1")
    with pytest.raises(RefundExceedsCharge):
        await wallets.refund("u_1", 500_001, charge_id=charge.ledger_id, reason="r", idempotency_key="r2")
    await wallets.refund("u_1", 500_000, charge_id=charge.ledger_id, reason="r", idempotency_key="r3")
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


async def test_refund_must_name_a_charge(wallets):
    await funded(wallets)
    top_up_id = (await wallets.ledger("u_1"))[0].id
    with pytest.raises(ChargeNotFound):
        await wallets.refund("u_1", 1, charge_id=top_up_id, reason="r", idempotency_key="r1")
    with pytest.raises(InvalidWalletRequest):
        await wallets.refund("u_1", 1, charge_id="not-an-id", reason="r", idempotency_key="r2")


async def test_refund_replay_returns_the_first_result(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    charge = await wallets.settle("u_1", hold.hold_id, 2_000_000)
    first = await wallets.refund("u_1", 100, charge_id=charge.ledger_id, reason="r", idempotency_key="r1")
    again = await wallets.refund("u_1", 100, charge_id=charge.ledger_id, reason="r", idempotency_key="r1")
    assert again.replayed and again.ledger_id == first.ledger_id
    assert (await wallets.get("u_1")).balance_micros == 8_000_100


async def test_expired_hold_is_released_by_the_reaper(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000, ttl_ms=50)
    await asyncio.sleep(0.1)
    [expired] = await wallets.expire_due()
    assert (expired.hold_id, expired.released_micros) == (hold.hold_id, 3_000_000)
    assert (await wallets.get("u_1")).held_micros == 0
    entry = (await wallets.ledger("u_1"))[0]
    assert (entry.type, entry.details["hold_id"]) == ("expire", hold.hold_id)
    with pytest.raises(HoldClosed):
        await wallets.settle("u_1", hold.hold_id, 1)


async def test_reaper_leaves_holds_that_are_not_due(wallets):
    await funded(wallets)
    await wallets.hold("u_1", 3_000_000, ttl_ms=60_000)
    assert await wallets.expire_due() == []
    assert (await wallets.get("u_1")).held_micros == 3_000_000


async def test_reaper_forgets_holds_that_were_settled(wallets, redis):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000, ttl_ms=50)
    await wallets.settle("u_1", hold.hold_id, 1_000)
    await asyncio.sleep(0.1)
    assert await wallets.expire_due() == []
    assert await redis.zcard("mg:hold-index") == 0


async def test_ledger_pages_newest_first_with_a_cursor(wallets):
    await wallets.open("u_1", profile={})
    for i in range(5):
        await wallets.top_up("u_1", i + 1, idempotency_key=f"k{i}")
    page1 = await wallets.ledger("u_1", limit=2)
    page2 = await wallets.ledger("u_1", before=page1[-1].id, limit=2)
    page3 = await wallets.ledger("u_1", before=page2[-1].id, limit=2)
    assert [e.amount_micros for e in page1 + page2 + page3] == [5, 4, 3, 2, 1, 0]


async def test_all_keys_of_a_wallet_share_one_cluster_slot(wallets, redis):
    from redis.crc import key_slot

    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000)
    await wallets.settle("u_1", hold.hold_id, 10)
    keys = [k async for k in redis.scan_iter(match="mg:{w:u_1}*")]
    assert len(keys) >= 5
    assert len({key_slot(k) for k in keys}) == 1


async def test_settle_of_an_absurd_amount_is_capped_not_refused(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    s = await wallets.settle("u_1", hold.hold_id, 10**18)
    assert (s.captured_micros, s.shortfall_micros) == (10_000_000, 10**15 - 10_000_000)
    assert (await wallets.get("u_1")).held_micros == 0


async def test_settle_of_a_negative_amount_is_refused_and_the_hold_stays(wallets, redis):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    with pytest.raises(InvalidAmount):
        await wallets.settle("u_1", hold.hold_id, -1)
    assert await redis.zscore("mg:hold-index", f"u_1|{hold.hold_id}") is not None
    assert (await wallets.get("u_1")).held_micros == 3_000_000


async def test_extend_grows_an_active_hold(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 3_000_000)
    grown = await wallets.extend("u_1", hold.hold_id, 2_000_000, current_micros=3_000_000)
    assert (grown.amount_micros, grown.wallet.held_micros, grown.wallet.available_micros) == (5_000_000, 5_000_000, 5_000_000)
    assert grown.expires_at_ms >= hold.expires_at_ms
    assert (await wallets.ledger("u_1"))[0].type == "hold_extend"
    s = await wallets.settle("u_1", hold.hold_id, 4_000_000)
    assert (s.captured_micros, s.released_micros) == (4_000_000, 1_000_000)


async def test_extend_beyond_available_is_refused_and_the_hold_is_unchanged(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 8_000_000)
    with pytest.raises(InsufficientFunds):
        await wallets.extend("u_1", hold.hold_id, 2_000_001, current_micros=8_000_000)
    assert (await wallets.get("u_1")).held_micros == 8_000_000
    assert await wallets.active_holds("u_1") == {hold.hold_id: 8_000_000}


async def test_extend_retried_from_the_same_amount_grows_once(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000_000)
    await wallets.extend("u_1", hold.hold_id, 500_000, current_micros=1_000_000)
    again = await wallets.extend("u_1", hold.hold_id, 500_000, current_micros=1_000_000)
    assert again.replayed and again.amount_micros == 1_500_000
    assert (await wallets.get("u_1")).held_micros == 1_500_000


async def test_extending_a_settled_hold_is_an_error(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000_000)
    await wallets.settle("u_1", hold.hold_id, 1)
    with pytest.raises(HoldClosed):
        await wallets.extend("u_1", hold.hold_id, 1, current_micros=1_000_000)


async def test_profile_may_be_served_from_a_short_cache(wallets, redis):
    await wallets.open("u_1", profile={"tier": "default"})
    assert (await wallets.profile("u_1", max_age_seconds=60))["tier"] == "default"
    await redis.hset("mg:{w:u_1}:profile", "profile", '{"tier": "pro"}')
    assert (await wallets.profile("u_1", max_age_seconds=60))["tier"] == "default"
    assert (await wallets.profile("u_1"))["tier"] == "pro"


async def test_an_unknown_profile_is_not_cached(wallets):
    assert await wallets.profile("u_1", max_age_seconds=60) is None
    await wallets.open("u_1", profile={"tier": "default"})
    assert (await wallets.profile("u_1", max_age_seconds=60))["tier"] == "default"


async def test_expiring_a_hold_gives_back_its_credentials_spend_reservation(wallets, redis):
    limits = LimitStore(redis)
    await funded(wallets)
    limited = await limits.admit(
        "u_1", "key_a", "req_1", requests_per_minute=0, tokens_per_minute=0, tokens=10,
        max_spend_micros=5_000_000, max_daily_spend_micros=None, amount_micros=3_000_000,
    )
    assert limited is None and (await limits.spend("u_1", "key_a")).spent_micros == 3_000_000
    await wallets.hold("u_1", 3_000_000, ttl_ms=30, spend=CredentialSpend("key_a", "req_1"))
    await asyncio.sleep(0.08)
    [expired] = await wallets.expire_due()
    assert expired.released_micros == 3_000_000
    assert (await limits.spend("u_1", "key_a")).spent_micros == 0


async def test_extend_by_zero_only_pushes_back_the_expiry(wallets):
    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000_000, ttl_ms=1_000)
    entries = len(await wallets.ledger("u_1"))
    kept = await wallets.extend("u_1", hold.hold_id, 0, current_micros=1_000_000, ttl_ms=60_000)
    assert kept.amount_micros == 1_000_000 and kept.expires_at_ms > hold.expires_at_ms + 30_000
    assert len(await wallets.ledger("u_1")) == entries
    assert (await wallets.get("u_1")).held_micros == 1_000_000


async def test_ledger_after_reads_entries_as_the_ledger_pages_do_from_the_cursor_on(wallets):
    # Over the multiplexer ledger_after parses Redis's flat field lists; the ledger's pages
    # come through redis-py's dicts: both must give the same entries, details included.
    await funded(wallets)
    hold = await wallets.hold("u_1", 300, meta={"request_id": "req_1"})
    await wallets.settle("u_1", hold.hold_id, 500, meta={"request_id": "req_1", "model": "gpt-4o", "prompt_tokens": 3})
    newest_first = await wallets.ledger("u_1")
    assert [e.type for e in newest_first] == ["charge", "top_up", "open"]
    assert await wallets.ledger_after("u_1", "0") == newest_first[::-1]
    assert await wallets.ledger_after("u_1", newest_first[2].id) == newest_first[1::-1]
    charge = (await wallets.ledger_after("u_1", newest_first[1].id, limit=1))[0]
    assert (charge.amount_micros, charge.details["held_delta_micros"], charge.details["model"],
            charge.details["prompt_tokens"]) == (-500, -300, "gpt-4o", 3)
