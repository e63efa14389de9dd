"""`PaymentStore` on a real Redis (no Stripe): card payments credited once, refunds to the card within their
bounds, refunds made outside metergate and disputes debited as far as the wallet allows, and the auto top-up
rule's failure counting — each checked in exact micros, with the `redis` fixture auditing the ledger after
every test (and `assert_ledger_invariants` for the one on a Redis Cluster)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as RedisClusterClient
from redis.crc import key_slot

from proxy.store import InsufficientFunds, WalletStore
from proxy.store.cluster import ClusterConnection
from proxy.store.errors import IdempotencyConflict, InvalidWalletRequest, NoPaymentMethod, RefundExceedsPayment
from proxy.store.keyspace import _billing_key, _card_payments_key, _ledger_key, _wallet_key
from proxy.store.payments import CardPayment, PaymentStore
from proxy.store.wallets import LedgerEntry, now_ms
from tests.conftest import assert_ledger_invariants
from tests.redis_server import RedisCluster

W = "u_card"
PI = "pi_test_1"
USD = 1_000_000


@pytest.fixture
def payments(redis: aioredis.Redis) -> PaymentStore:
    return PaymentStore(redis)


async def open_wallet(wallets: WalletStore, wallet_id: str = W, *, credit_limit_micros: int = 0) -> None:
    await wallets.open(wallet_id, credit_limit_micros=credit_limit_micros, profile={"tier": "default"})


async def spend(wallets: WalletStore, amount_micros: int, wallet_id: str = W) -> None:
    """A finished call that cost `amount_micros` (a hold settled for that much)."""
    hold = await wallets.hold(wallet_id, amount_micros)
    await wallets.settle(wallet_id, hold.hold_id, amount_micros)


async def entries(wallets: WalletStore, entry_type: str, wallet_id: str = W) -> list[LedgerEntry]:
    return [e for e in await wallets.ledger(wallet_id, limit=1000) if e.type == entry_type]


async def balance(wallets: WalletStore, wallet_id: str = W) -> int:
    wallet = await wallets.get(wallet_id)
    assert wallet is not None
    return wallet.balance_micros


async def save_card(payments: PaymentStore, wallet_id: str = W, *, threshold: int = 5 * USD, amount: int = 20 * USD) -> None:
    """A saved card with the tier's rule on, as a Checkout with save_card leaves it."""
    await payments.set_rule(wallet_id, card_saved=True, enabled=True, threshold_micros=threshold, amount_micros=amount,
                            payment_method="pm_card_1", card="visa •••• 4242", customer="cus_1")


# ------------------------------------------------------------------ card payments credited


async def test_a_payment_intent_credits_its_wallet_once(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    first = await payments.credit_payment(W, PI, 20 * USD)
    again = await payments.credit_payment(W, PI, 20 * USD)

    assert (first.replayed, again.replayed) == (False, True)
    assert again.ledger_id == first.ledger_id
    assert again.wallet.balance_micros == first.wallet.balance_micros == 20 * USD
    assert await balance(wallets) == 20 * USD
    top_ups = await entries(wallets, "top_up")
    assert [(e.amount_micros, e.details["reference"]) for e in top_ups] == [(20 * USD, PI)]


async def test_the_same_payment_intent_with_another_amount_is_an_idempotency_conflict(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)

    with pytest.raises(IdempotencyConflict):
        await payments.credit_payment(W, PI, 25 * USD)
    assert await balance(wallets) == 20 * USD
    assert await payments.card_payments(W) == [CardPayment(PI, 20 * USD, 0)]


async def test_a_credited_payment_is_recorded_with_its_amount_and_wallet(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, "pi_a", 20 * USD)
    await payments.credit_payment(W, "pi_b", 50 * USD)

    assert await payments.card_payments(W) == [CardPayment("pi_a", 20 * USD, 0), CardPayment("pi_b", 50 * USD, 0)]
    assert await payments.wallet_of_payment("pi_a") == W
    assert await payments.wallet_of_payment("pi_unknown") is None


async def test_an_auto_top_up_payment_ends_its_attempt(wallets: WalletStore, payments: PaymentStore):
    # Its success is the attempt's outcome: the failures in a row are over and the next low balance may try again.
    await open_wallet(wallets)
    await save_card(payments)
    await payments.auto_top_up_failed(W, 1, declined=True, error="card_declined", retry_after_ms=3_600_000, max_failures=3)

    await payments.credit_payment(W, PI, 20 * USD, auto_top_up_attempt=2)

    rule = await payments.rule(W)
    assert (rule.consecutive_failures, rule.last_error, rule.blocked_until_ms, rule.enabled) == (0, None, 0, True)
    # A late report of the earlier attempt's failure counts nothing.
    late = await payments.auto_top_up_failed(W, 1, declined=True, error="card_declined", retry_after_ms=0, max_failures=3)
    assert late.consecutive_failures == 0 and (await payments.rule(W)).consecutive_failures == 0


# ------------------------------------------------------------------ refunds to the card


async def test_a_refund_to_the_card_debits_once_per_request(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)

    first = await payments.refund_to_card(W, PI, 7_500_000, request_id="req_1")
    again = await payments.refund_to_card(W, PI, 7_500_000, request_id="req_1")

    assert (first.replayed, again.replayed, again.ledger_id) == (False, True, first.ledger_id)
    assert await balance(wallets) == 12_500_000
    assert [(e.amount_micros, e.details["payment_intent"]) for e in await entries(wallets, "card_refund")] == [(-7_500_000, PI)]
    assert await payments.card_payments(W) == [CardPayment(PI, 20 * USD, 7_500_000)]


async def test_a_refund_to_the_card_is_at_most_what_the_payment_credited(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await wallets.top_up(W, 100 * USD, idempotency_key="other-money")
    await payments.credit_payment(W, PI, 20 * USD)

    with pytest.raises(RefundExceedsPayment):
        await payments.refund_to_card(W, PI, 20 * USD + 1, request_id="req_1")
    assert await balance(wallets) == 120 * USD
    assert await entries(wallets, "card_refund") == []
    assert await payments.card_payments(W) == [CardPayment(PI, 20 * USD, 0)]


async def test_a_refund_to_the_card_is_at_most_what_earlier_refunds_left(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await wallets.top_up(W, 100 * USD, idempotency_key="other-money")
    await payments.credit_payment(W, PI, 20 * USD)
    await payments.refund_to_card(W, PI, 15 * USD, request_id="req_1")

    with pytest.raises(RefundExceedsPayment):
        await payments.refund_to_card(W, PI, 5 * USD + 1, request_id="req_2")
    await payments.refund_to_card(W, PI, 5 * USD, request_id="req_3")  # exactly what is left is allowed
    assert await balance(wallets) == 100 * USD
    assert await payments.card_payments(W) == [CardPayment(PI, 20 * USD, 20 * USD)]


async def test_a_refund_to_the_card_never_takes_what_calls_in_flight_hold(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)
    await wallets.hold(W, 15 * USD)

    with pytest.raises(InsufficientFunds):
        await payments.refund_to_card(W, PI, 5 * USD + 1, request_id="req_1")
    await payments.refund_to_card(W, PI, 5 * USD, request_id="req_2")  # balance - held exactly
    wallet = await wallets.get(W)
    assert wallet is not None and (wallet.balance_micros, wallet.held_micros) == (15 * USD, 15 * USD)


async def test_a_refund_to_the_card_never_refunds_credit(wallets: WalletStore, payments: PaymentStore):
    # The credit limit lets calls run below zero; it is the operator's money, never the card holder's.
    await open_wallet(wallets, credit_limit_micros=10 * USD)
    await payments.credit_payment(W, PI, 20 * USD)
    await spend(wallets, 15 * USD)

    with pytest.raises(InsufficientFunds):
        await payments.refund_to_card(W, PI, 5 * USD + 1, request_id="req_1")
    assert await balance(wallets) == 5 * USD
    assert await payments.card_payments(W) == [CardPayment(PI, 20 * USD, 0)]


async def test_a_refund_of_a_payment_the_wallet_never_had_is_refused(wallets: WalletStore, payments: PaymentStore):
    from proxy.store.errors import PaymentNotFound

    await open_wallet(wallets)
    await open_wallet(wallets, "u_other")
    await payments.credit_payment("u_other", PI, 20 * USD)
    await wallets.top_up(W, 20 * USD, idempotency_key="seed")

    with pytest.raises(PaymentNotFound):
        await payments.refund_to_card(W, PI, USD, request_id="req_1")
    assert await balance(wallets) == 20 * USD


async def test_restoring_a_refused_refund_gives_it_back_exactly_once(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)
    await payments.refund_to_card(W, PI, 8 * USD, request_id="req_1")

    first = await payments.restore_refund(W, PI, 8 * USD, request_id="req_1", reason="charge_disputed")
    again = await payments.restore_refund(W, PI, 8 * USD, request_id="req_1", reason="charge_disputed")

    assert (first.replayed, again.replayed) == (False, True)
    assert await balance(wallets) == 20 * USD
    restored = await entries(wallets, "card_refund_reversed")
    assert [(e.amount_micros, e.details["reference"], e.details["reason"]) for e in restored] == [(8 * USD, "req_1", "charge_disputed")]
    assert await payments.card_payments(W) == [CardPayment(PI, 20 * USD, 0)]


async def test_restoring_when_nothing_was_refunded_is_refused(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)

    with pytest.raises(InvalidWalletRequest):
        await payments.restore_refund(W, PI, 8 * USD, request_id="req_never_debited", reason="refused")
    assert await balance(wallets) == 20 * USD


async def test_a_refund_request_is_known_by_what_it_debited_and_whether_it_was_given_back(wallets: WalletStore, payments: PaymentStore):
    # What Billing reads on a retry of the same request: the amount it debited, and whether it was restored.
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)
    await payments.refund_to_card(W, PI, 7_500_000, request_id="req_1")
    assert (await payments.refund_requested(W, "req_1"), await payments.refund_restored(W, "req_1")) == (7_500_000, False)
    assert await payments.refund_requested(W, "req_never") is None

    await payments.restore_refund(W, PI, 7_500_000, request_id="req_1", reason="refused")

    assert (await payments.refund_requested(W, "req_1"), await payments.refund_restored(W, "req_1")) == (7_500_000, True)


# ------------------------------------------------------------------ refunds made in Stripe


async def test_an_external_refund_is_debited_down_to_the_credit_limit_and_the_rest_is_a_shortfall(
    wallets: WalletStore, payments: PaymentStore,
):
    await open_wallet(wallets, credit_limit_micros=5 * USD)
    await payments.credit_payment(W, PI, 20 * USD)
    await spend(wallets, 18 * USD)  # 2 USD of the payment left

    receipt = await payments.record_external_refund(W, PI, 20 * USD, refund_id="re_dashboard")

    assert receipt.wallet.balance_micros == -5 * USD
    [entry] = await entries(wallets, "card_refund")
    assert entry.amount_micros == -7 * USD
    assert (entry.details["requested_micros"], entry.details["shortfall_micros"]) == (20 * USD, 13 * USD)
    assert entry.details["reference"] == "re_dashboard"
    assert await payments.card_payments(W) == [CardPayment(PI, 20 * USD, 20 * USD)]


async def test_an_external_refund_is_recorded_once(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)

    await payments.record_external_refund(W, PI, 6 * USD, refund_id="re_dashboard")
    again = await payments.record_external_refund(W, PI, 6 * USD, refund_id="re_dashboard")

    assert again.replayed
    assert await balance(wallets) == 14 * USD
    assert len(await entries(wallets, "card_refund")) == 1
    assert await payments.card_payments(W) == [CardPayment(PI, 20 * USD, 6 * USD)]


async def test_an_external_refund_of_an_empty_wallet_notes_the_whole_loss(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)
    await spend(wallets, 20 * USD)

    await payments.record_external_refund(W, PI, 20 * USD, refund_id="re_dashboard")

    assert await balance(wallets) == 0
    [entry] = await entries(wallets, "card_refund")
    assert (entry.amount_micros, entry.details["requested_micros"], entry.details["shortfall_micros"]) == (0, 20 * USD, 20 * USD)


async def test_an_external_refund_leaves_calls_in_flight_covered(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)
    await wallets.hold(W, 12 * USD)

    await payments.record_external_refund(W, PI, 20 * USD, refund_id="re_dashboard")

    wallet = await wallets.get(W)
    assert wallet is not None and (wallet.balance_micros, wallet.held_micros) == (12 * USD, 12 * USD)
    [entry] = await entries(wallets, "card_refund")
    assert (entry.amount_micros, entry.details["shortfall_micros"]) == (-8 * USD, 12 * USD)


# ------------------------------------------------------------------ disputes


async def test_a_won_dispute_gives_back_exactly_what_its_opening_took(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets, credit_limit_micros=2 * USD)
    await payments.credit_payment(W, PI, 20 * USD)
    await spend(wallets, 17 * USD)  # 3 USD left: the dispute can take 3 + 2 of credit

    opened = await payments.dispute(W, PI, 20 * USD, dispute_id="du_1", won=False)
    assert opened.wallet.balance_micros == -2 * USD
    [debit] = await entries(wallets, "dispute")
    assert (debit.amount_micros, debit.details["requested_micros"], debit.details["shortfall_micros"]) == (-5 * USD, 20 * USD, 15 * USD)

    won = await payments.dispute(W, PI, 20 * USD, dispute_id="du_1", won=True)
    assert won.wallet.balance_micros == 3 * USD
    assert [e.amount_micros for e in await entries(wallets, "dispute_won")] == [5 * USD]


async def test_a_dispute_opened_or_won_twice_moves_money_once(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)

    await payments.dispute(W, PI, 20 * USD, dispute_id="du_1", won=False)
    opened_again = await payments.dispute(W, PI, 20 * USD, dispute_id="du_1", won=False)
    assert opened_again.replayed and await balance(wallets) == 0

    await payments.dispute(W, PI, 20 * USD, dispute_id="du_1", won=True)
    won_again = await payments.dispute(W, PI, 20 * USD, dispute_id="du_1", won=True)
    assert won_again.replayed and await balance(wallets) == 20 * USD
    assert [e.amount_micros for e in await entries(wallets, "dispute")] == [-20 * USD]
    assert [e.amount_micros for e in await entries(wallets, "dispute_won")] == [20 * USD]


async def test_a_dispute_won_before_its_opening_arrives_takes_nothing(wallets: WalletStore, payments: PaymentStore):
    # Stripe does not promise delivery order: `closed` (won) can arrive before `created`.
    await open_wallet(wallets)
    await payments.credit_payment(W, PI, 20 * USD)

    won = await payments.dispute(W, PI, 20 * USD, dispute_id="du_1", won=True)
    opened = await payments.dispute(W, PI, 20 * USD, dispute_id="du_1", won=False)

    assert (won.wallet.balance_micros, opened.wallet.balance_micros) == (20 * USD, 20 * USD)
    assert [e.amount_micros for e in await entries(wallets, "dispute")] == [0]
    assert [e.amount_micros for e in await entries(wallets, "dispute_won")] == [0]


# ------------------------------------------------------------------ auto top-up rule and failures


async def test_a_failed_attempt_is_counted_once(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await save_card(payments)

    first = await payments.auto_top_up_failed(W, 1, declined=True, error="card_declined", retry_after_ms=60_000, max_failures=3)
    again = await payments.auto_top_up_failed(W, 1, declined=True, error="card_declined", retry_after_ms=60_000, max_failures=3)

    assert (first.consecutive_failures, again.consecutive_failures) == (1, 1)
    assert (again.enabled, again.disabled_now) == (True, False)
    rule = await payments.rule(W)
    assert (rule.consecutive_failures, rule.last_error, rule.enabled) == (1, "card_declined", True)


async def test_the_rule_turns_off_at_max_failures_with_one_note(wallets: WalletStore, payments: PaymentStore, redis: aioredis.Redis):
    await open_wallet(wallets)
    await save_card(payments)

    outcomes = [await payments.auto_top_up_failed(W, n, declined=True, error=f"card_declined {n}", retry_after_ms=0, max_failures=3)
                for n in (1, 2, 3)]
    replay = await payments.auto_top_up_failed(W, 3, declined=True, error="card_declined 3", retry_after_ms=0, max_failures=3)

    assert [(o.consecutive_failures, o.enabled, o.disabled_now) for o in outcomes] == [(1, True, False), (2, True, False), (3, False, True)]
    assert (replay.enabled, replay.disabled_now) == (False, False)
    rule = await payments.rule(W)
    assert not rule.enabled and rule.disabled_reason is not None and "card_declined 3" in rule.disabled_reason
    [note] = await entries(wallets, "auto_top_up_disabled")
    assert note.amount_micros == 0
    # No more claims: captures read the threshold off the wallet hash.
    assert await redis.hget(_wallet_key(W), "at_threshold") is None


async def test_stripe_being_unavailable_is_not_the_cards_failure(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await save_card(payments)

    before = now_ms()
    outcome = await payments.auto_top_up_failed(W, 1, declined=False, error="Stripe unavailable", retry_after_ms=60_000, max_failures=1)

    assert (outcome.consecutive_failures, outcome.enabled, outcome.disabled_now) == (0, True, False)
    rule = await payments.rule(W)
    assert rule.consecutive_failures == 0 and rule.enabled
    assert rule.blocked_until_ms >= before + 60_000  # it still waits before trying again
    assert await entries(wallets, "auto_top_up_disabled") == []


async def test_enabling_without_a_saved_card_is_refused(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)

    with pytest.raises(NoPaymentMethod):
        await payments.set_rule(W, enabled=True, threshold_micros=5 * USD, amount_micros=20 * USD)
    assert not (await payments.rule(W)).configured


async def test_a_saved_card_keeps_the_rule_the_operator_set(wallets: WalletStore, payments: PaymentStore):
    await open_wallet(wallets)
    await payments.set_rule(W, enabled=False, threshold_micros=1 * USD, amount_micros=10 * USD)

    await save_card(payments, threshold=5 * USD, amount=20 * USD)

    rule = await payments.rule(W)
    assert (rule.enabled, rule.threshold_micros, rule.amount_micros) == (False, 1 * USD, 10 * USD)
    assert (rule.payment_method, rule.customer) == ("pm_card_1", "cus_1")


async def test_enabling_resets_the_failures_and_the_back_off(wallets: WalletStore, payments: PaymentStore, redis: aioredis.Redis):
    await open_wallet(wallets)
    await save_card(payments)
    for n in (1, 2):
        await payments.auto_top_up_failed(W, n, declined=True, error="card_declined", retry_after_ms=3_600_000, max_failures=2)
    disabled = await payments.rule(W)
    assert (disabled.enabled, disabled.consecutive_failures) == (False, 2) and disabled.blocked_until_ms > now_ms()

    await payments.set_rule(W, enabled=True, threshold_micros=5 * USD, amount_micros=20 * USD)

    rule = await payments.rule(W)
    assert (rule.enabled, rule.consecutive_failures, rule.disabled_reason, rule.blocked_until_ms) == (True, 0, None, 0)
    assert await redis.hget(_wallet_key(W), "at_threshold") == str(5 * USD).encode()


# ------------------------------------------------------------------ on a Redis Cluster


@pytest.fixture
async def cluster_commands(cluster: RedisCluster, cluster_client: RedisClusterClient) -> AsyncIterator[ClusterConnection]:
    # The request path's commands on a cluster, as the app builds them (proxy.store.cluster.connect_store).
    connection = ClusterConnection(cluster.url, timeout=5)
    yield connection
    await connection.aclose()


async def test_credit_and_refund_on_a_redis_cluster(cluster_client: RedisClusterClient, cluster_commands: ClusterConnection):
    wallets = WalletStore(cluster_client, hold_ttl_ms=60_000, commands=cluster_commands)
    payments = PaymentStore(cluster_client, cluster_commands)
    # Every key a card script touches is in the wallet's slot (a cross-slot script would be refused).
    slots = {key_slot(k(W).encode()) for k in (_wallet_key, _ledger_key, _card_payments_key, _billing_key)}
    assert len(slots) == 1
    await open_wallet(wallets)

    await payments.credit_payment(W, PI, 20 * USD)
    await payments.credit_payment(W, PI, 20 * USD)
    await payments.refund_to_card(W, PI, 7 * USD, request_id="req_1")
    await payments.restore_refund(W, PI, 7 * USD, request_id="req_1", reason="refused")
    await payments.refund_to_card(W, PI, 4 * USD, request_id="req_2")

    assert await balance(wallets) == 16 * USD
    assert await payments.card_payments(W) == [CardPayment(PI, 20 * USD, 4 * USD)]
    assert await payments.wallet_of_payment(PI) == W
    assert [e.type for e in reversed(await wallets.ledger(W))] == ["open", "top_up", "card_refund", "card_refund_reversed", "card_refund"]
    await assert_ledger_invariants(wallets)
