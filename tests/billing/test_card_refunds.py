"""Refunds of a top-up back to the card that paid it, through the admin API against the fake Stripe.

`POST /admin/end-users/{id}/card-refunds` debits the wallet first (never below what calls in flight hold, never
more than the payment credited), then asks Stripe, under the request's Idempotency-Key: a refusal gives the debit
back, Stripe not answering leaves it standing until a retry with the same key completes the refund. The webhook
events Stripe sends about metergate's own refunds move no money, except a refund that failed after all (restored
once). Every payment here is a real Checkout paid at the fake, credited by the fake's own webhook.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import stripe

from proxy.appstate import BILLING
from proxy.billing import StripeApi
from proxy.store.wallets import LedgerEntry, WalletState
from tests.billing.conftest import WEBHOOK_SECRET, BillingGateway, sign_stripe_event
from tests.conftest import ADMIN, assert_ledger_invariants
from tests.redis_server import free_port

USD = 1_000_000
CENT = 10_000
EVENT_DEADLINE_SECONDS = 15  # only so a webhook that never comes fails the test instead of hanging it

T = TypeVar("T")


# ------------------------------------------------------------------ helpers


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """`probe()`'s first truthy answer; the fake delivers its webhooks asynchronously (about a second later)."""
    deadline = asyncio.get_running_loop().time() + EVENT_DEADLINE_SECONDS
    while True:
        found = await probe()
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {EVENT_DEADLINE_SECONDS} s")
        await asyncio.sleep(0.05)


async def card_payments(gw: BillingGateway, user_id: str) -> dict[str, dict[str, Any]]:
    response = await gw.client.get(f"/admin/end-users/{user_id}/card-payments", headers=ADMIN)
    assert response.status == 200, await response.text()
    return {p["payment_intent"]: p for p in (await response.json())["data"]}


async def paid_top_up(gw: BillingGateway, user_id: str, amount_micros: int) -> str:
    """A Checkout top-up paid with a good card, once metergate has credited it; its PaymentIntent."""
    response = await gw.client.post(f"/admin/end-users/{user_id}/checkout-sessions", json={"amount_micros": amount_micros},
                                    headers=ADMIN)
    assert response.status == 201, await response.text()
    paid = await gw.fake.pay_checkout((await response.json())["id"])
    payment_intent = paid["payment_intent"]

    async def credited() -> bool:
        return (await card_payments(gw, user_id)).get(payment_intent, {}).get("credited_micros") == amount_micros

    await eventually(credited, f"{payment_intent} credited")
    return str(payment_intent)


async def refund(gw: BillingGateway, user_id: str, body: Any, key: str | None = "refund-1") -> tuple[int, dict[str, str], Any]:
    headers = {**ADMIN, **({"Idempotency-Key": key} if key is not None else {})}
    response = await gw.client.post(f"/admin/end-users/{user_id}/card-refunds", json=body, headers=headers)
    return response.status, dict(response.headers), await response.json()


async def wallet(gw: BillingGateway, user_id: str) -> WalletState:
    found = await gw.wallets.get(user_id)
    assert found is not None
    return found


async def ledger(gw: BillingGateway, user_id: str, *types: str) -> list[LedgerEntry]:
    """The wallet's entries of `types`, oldest first."""
    return [e for e in reversed(await gw.wallets.ledger(user_id, limit=1000)) if e.type in types]


async def stripe_refunds(client: stripe.StripeClient, payment_intent: str) -> list[stripe.Refund]:
    return list((await client.v1.refunds.list_async(params={"payment_intent": payment_intent, "limit": 100})).data)


async def send_event(gw: BillingGateway, event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A signed event as Stripe would deliver it, with a fresh id; the webhook's answer."""
    payload = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": event_type, "created": int(time.time()),
                          "livemode": False, "data": {"object": obj}}).encode()
    response = await gw.client.post("/stripe/webhook", data=payload,
                                    headers={"Stripe-Signature": sign_stripe_event(payload, WEBHOOK_SECRET),
                                             "Content-Type": "application/json"})
    assert response.status == 200, await response.text()
    return dict(await response.json())


def assert_openai_error(body: Any, code: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


# ------------------------------------------------------------------ a refund, once


async def test_a_refund_debits_the_wallet_and_refunds_the_card_once(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)

    status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 7_500_000})

    assert status == 201, body
    assert (body["object"], body["payment_intent"], body["amount_micros"], body["status"]) == ("card_refund", pi, 7_500_000, "succeeded")
    assert body["wallet"]["balance_micros"] == (await wallet(gw, "u_1")).balance_micros == 12_500_000
    [entry] = await ledger(gw, "u_1", "card_refund", "card_refund_reversed")
    assert (entry.id, entry.amount_micros, entry.details["payment_intent"]) == (body["ledger_id"], -7_500_000, pi)
    [made] = await stripe_refunds(stripe_client, pi)
    assert (made.id, made.amount, made.status) == (body["refund"], 750, "succeeded")
    assert made.metadata["metergate_refund"] and made.metadata["metergate_end_user"] == "u_1"
    payment = (await card_payments(gw, "u_1"))[pi]
    assert (payment["refunded_micros"], payment["refundable_micros"]) == (7_500_000, 12_500_000)
    await assert_ledger_invariants(gw.wallets)


async def test_replaying_the_idempotency_key_answers_the_same_refund_and_moves_nothing(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    status, headers, first = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 7_500_000}, key="k-1")
    assert status == 201 and "Idempotent-Replayed" not in headers

    status, headers, again = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 7_500_000}, key="k-1")

    assert status == 201 and headers.get("Idempotent-Replayed") == "true"
    assert again == first
    assert (await wallet(gw, "u_1")).balance_micros == 12_500_000
    assert len(await ledger(gw, "u_1", "card_refund")) == 1
    assert [r.id for r in await stripe_refunds(stripe_client, pi)] == [first["refund"]]
    await assert_ledger_invariants(gw.wallets)


# ------------------------------------------------------------------ bounds


async def test_a_refund_never_takes_what_calls_in_flight_hold(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    await gw.wallets.hold("u_1", 15 * USD)

    status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 5 * USD + CENT})

    assert status == 402, body
    assert_openai_error(body)
    assert (await wallet(gw, "u_1")).balance_micros == 20 * USD
    assert await ledger(gw, "u_1", "card_refund") == []
    assert await stripe_refunds(stripe_client, pi) == []
    assert (await card_payments(gw, "u_1"))[pi]["refunded_micros"] == 0
    await assert_ledger_invariants(gw.wallets)


async def test_a_refund_of_more_than_the_payment_credited_is_refused(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=50 * USD)  # money of its own beside the payment: only the payment bounds the refund
    pi = await paid_top_up(gw, "u_1", 20 * USD)

    status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 20 * USD + CENT})

    assert status == 409, body
    assert_openai_error(body)
    assert (await wallet(gw, "u_1")).balance_micros == 70 * USD
    assert await ledger(gw, "u_1", "card_refund") == []
    assert await stripe_refunds(stripe_client, pi) == []
    await assert_ledger_invariants(gw.wallets)


async def test_a_refund_of_more_than_an_earlier_refund_left_is_refused(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=50 * USD)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    status, _, first = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 15 * USD}, key="k-1")
    assert status == 201, first

    status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 5 * USD + CENT}, key="k-2")

    assert status == 409, body
    assert_openai_error(body)
    assert (await wallet(gw, "u_1")).balance_micros == 55 * USD
    assert [r.id for r in await stripe_refunds(stripe_client, pi)] == [first["refund"]]
    assert (await card_payments(gw, "u_1"))[pi]["refundable_micros"] == 5 * USD
    await assert_ledger_invariants(gw.wallets)


async def test_a_refund_that_is_not_whole_cents_is_refused(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)

    status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 5 * USD + 1})

    assert status == 400, body
    assert_openai_error(body, "invalid_amount")
    assert (await wallet(gw, "u_1")).balance_micros == 20 * USD
    assert await stripe_refunds(stripe_client, pi) == []


# ------------------------------------------------------------------ amount left out


async def test_leaving_the_amount_out_refunds_the_whole_payment(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=50 * USD)
    pi = await paid_top_up(gw, "u_1", 20 * USD)

    status, _, body = await refund(gw, "u_1", {"payment_intent": pi})

    assert status == 201, body
    assert body["amount_micros"] == 20 * USD
    assert (await wallet(gw, "u_1")).balance_micros == 50 * USD
    assert [r.amount for r in await stripe_refunds(stripe_client, pi)] == [2000]
    await assert_ledger_invariants(gw.wallets)


async def test_leaving_the_amount_out_refunds_what_is_left_unheld_in_whole_cents(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    spent = await gw.wallets.hold("u_1", 4 * USD)
    await gw.wallets.settle("u_1", spent.hold_id, 3_333_333)
    await gw.wallets.hold("u_1", USD)  # a call still running
    # 16_666_667 left, 1_000_000 of it held: 15_666_667 is the wallet's own, 15_660_000 of it in whole cents.

    status, _, body = await refund(gw, "u_1", {"payment_intent": pi})

    assert status == 201, body
    assert body["amount_micros"] == 15_660_000
    state = await wallet(gw, "u_1")
    assert (state.balance_micros, state.held_micros) == (1_006_667, USD)
    assert [r.amount for r in await stripe_refunds(stripe_client, pi)] == [1566]
    await assert_ledger_invariants(gw.wallets)


async def test_leaving_the_amount_out_with_nothing_left_is_refused(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    await gw.wallets.hold("u_1", 20 * USD)

    status, _, body = await refund(gw, "u_1", {"payment_intent": pi})

    assert status == 409, body
    assert_openai_error(body, "nothing_to_refund")
    assert await stripe_refunds(stripe_client, pi) == []


async def test_replaying_a_refund_with_the_amount_left_out_answers_the_same_refund(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    await gw.wallets.adjust("u_1", -5 * USD, reason="spent", idempotency_key="spent")
    status, _, first = await refund(gw, "u_1", {"payment_intent": pi}, key="k-all")
    assert status == 201 and first["amount_micros"] == 15 * USD, first

    status, headers, again = await refund(gw, "u_1", {"payment_intent": pi}, key="k-all")

    assert status == 201, again
    assert headers.get("Idempotent-Replayed") == "true"
    assert again == first
    assert (await wallet(gw, "u_1")).balance_micros == 0
    assert [r.amount for r in await stripe_refunds(stripe_client, pi)] == [1500]
    await assert_ledger_invariants(gw.wallets)


# ------------------------------------------------------------------ Stripe refuses, or does not answer


@pytest.mark.parametrize(("status", "code"), [(400, "charge_disputed"), (402, "card_declined")])
async def test_a_refund_stripe_refuses_is_given_back(billing_gateway, make_end_user, stripe_client, status: int, code: str):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    gw.fake.fail_next_refund(status, code)

    answered, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 8 * USD})

    assert answered == 402, body
    assert_openai_error(body, "refund_refused")
    assert (await wallet(gw, "u_1")).balance_micros == 20 * USD
    moves = await ledger(gw, "u_1", "card_refund", "card_refund_reversed")
    assert [(e.type, e.amount_micros) for e in moves] == [("card_refund", -8 * USD), ("card_refund_reversed", 8 * USD)]
    payment = (await card_payments(gw, "u_1"))[pi]
    assert (payment["refunded_micros"], payment["refundable_micros"]) == (0, 20 * USD)
    assert await stripe_refunds(stripe_client, pi) == []
    await assert_ledger_invariants(gw.wallets)


async def test_replaying_a_refused_refund_refunds_nothing(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    gw.fake.fail_next_refund(400, "charge_disputed")
    status, _, refused = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 8 * USD}, key="k-1")
    assert status == 402, refused

    # The same request again (a client retrying what it did not see answered): the wallet was given its money
    # back, so no refund may leave for the card now.
    status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 8 * USD}, key="k-1")

    assert status == 402, body
    assert await stripe_refunds(stripe_client, pi) == []
    assert (await wallet(gw, "u_1")).balance_micros == 20 * USD
    await assert_ledger_invariants(gw.wallets)


async def test_stripe_not_answering_keeps_the_debit_until_a_retry_completes_it(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    billing = gw.app[BILLING]
    reachable = billing.api
    # Stripe out of reach: the app's client swapped for one aimed at a port nothing listens on (no retries, as
    # the fixture configures), then swapped back, the way Stripe comes back.
    billing.api = StripeApi.build(reachable.config.model_copy(update={"api_base": f"http://127.0.0.1:{free_port()}"}))
    try:
        status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 8 * USD}, key="k-1")
    finally:
        await billing.api.aclose()
        billing.api = reachable

    assert status == 502, body
    assert_openai_error(body, "stripe_unavailable")
    assert (await wallet(gw, "u_1")).balance_micros == 12 * USD
    assert await stripe_refunds(stripe_client, pi) == []

    status, headers, retried = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 8 * USD}, key="k-1")

    assert status == 201, retried
    assert headers.get("Idempotent-Replayed") == "true"  # the debit is the one made before
    assert (await wallet(gw, "u_1")).balance_micros == 12 * USD
    assert [(e.type, e.amount_micros) for e in await ledger(gw, "u_1", "card_refund", "card_refund_reversed")] == [("card_refund", -8 * USD)]
    assert [(r.id, r.amount) for r in await stripe_refunds(stripe_client, pi)] == [(retried["refund"], 800)]
    await assert_ledger_invariants(gw.wallets)


# ------------------------------------------------------------------ Stripe's events about metergate's refunds


async def test_stripes_events_about_metergates_own_refund_debit_nothing_more(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 8 * USD})
    assert status == 201, body
    made = await stripe_client.v1.refunds.retrieve_async(body["refund"])
    charge = await stripe_client.v1.charges.retrieve_async(str(made.charge))

    created = await send_event(gw, "refund.created", made.to_dict())
    refunded = await send_event(gw, "charge.refunded", charge.to_dict())

    assert created["outcome"].startswith("applied") and refunded["outcome"].startswith("applied")
    assert (await wallet(gw, "u_1")).balance_micros == 12 * USD
    assert len(await ledger(gw, "u_1", "card_refund", "card_refund_reversed")) == 1
    assert (await card_payments(gw, "u_1"))[pi]["refunded_micros"] == 8 * USD
    await assert_ledger_invariants(gw.wallets)


async def test_a_refund_of_metergates_that_failed_later_is_given_back_once(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)
    status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": 8 * USD})
    assert status == 201, body
    failed = {**(await stripe_client.v1.refunds.retrieve_async(body["refund"])).to_dict(), "status": "failed"}

    # Two deliveries of the news under different event ids (an event id alone would hide a second restore).
    await send_event(gw, "refund.updated", failed)
    await send_event(gw, "refund.updated", failed)

    assert (await wallet(gw, "u_1")).balance_micros == 20 * USD
    moves = await ledger(gw, "u_1", "card_refund", "card_refund_reversed")
    assert [(e.type, e.amount_micros) for e in moves] == [("card_refund", -8 * USD), ("card_refund_reversed", 8 * USD)]
    assert (await card_payments(gw, "u_1"))[pi]["refundable_micros"] == 20 * USD
    await assert_ledger_invariants(gw.wallets)


# ------------------------------------------------------------------ refused requests


async def test_a_refund_of_an_unknown_payment_is_not_found(billing_gateway, make_end_user):
    gw = billing_gateway
    await make_end_user("u_1", funds=20 * USD)

    status, _, body = await refund(gw, "u_1", {"payment_intent": "pi_never_paid", "amount_micros": USD})

    assert status == 404, body
    assert_openai_error(body, "payment_not_found")
    assert (await wallet(gw, "u_1")).balance_micros == 20 * USD


async def test_a_refund_of_another_wallets_payment_is_not_found(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    await make_end_user("u_2", funds=50 * USD)
    pi = await paid_top_up(gw, "u_1", 20 * USD)

    status, _, body = await refund(gw, "u_2", {"payment_intent": pi, "amount_micros": USD})

    assert status == 404, body
    assert_openai_error(body, "payment_not_found")
    assert (await wallet(gw, "u_2")).balance_micros == 50 * USD
    assert await stripe_refunds(stripe_client, pi) == []


async def test_a_refund_without_an_idempotency_key_is_refused(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=0)
    pi = await paid_top_up(gw, "u_1", 20 * USD)

    status, _, body = await refund(gw, "u_1", {"payment_intent": pi, "amount_micros": USD}, key=None)

    assert status == 400, body
    assert_openai_error(body, "idempotency_key_required")
    assert (await wallet(gw, "u_1")).balance_micros == 20 * USD
    assert await stripe_refunds(stripe_client, pi) == []


@pytest.mark.parametrize("bad", [
    {"payment_intent": "pi_x", "amount_micros": "1000000"},
    {"payment_intent": "pi_x", "amount_micros": 0},
    {"payment_intent": "ch_x", "amount_micros": USD},
    {"amount_micros": USD},
    {"payment_intent": "pi_x", "amount_micros": USD, "reason": "extra"},
    ["pi_x"],
], ids=["amount-as-text", "amount-zero", "not-a-payment-intent", "no-payment-intent", "unknown-field", "not-an-object"])
async def test_a_malformed_refund_request_is_a_400_in_openais_error_shape(billing_gateway, make_end_user, bad: Any):
    gw = billing_gateway
    await make_end_user("u_1", funds=20 * USD)

    status, _, body = await refund(gw, "u_1", bad)

    assert status == 400, body
    assert_openai_error(body)
    assert (await wallet(gw, "u_1")).balance_micros == 20 * USD


async def test_a_refund_for_an_unknown_end_user_is_not_found(billing_gateway):
    status, _, body = await refund(billing_gateway, "u_nobody", {"payment_intent": "pi_x", "amount_micros": USD})

    assert status == 404, body
    assert_openai_error(body, "end_user_not_found")


async def test_card_payments_of_an_unknown_end_user_are_not_found(billing_gateway):
    response = await billing_gateway.client.get("/admin/end-users/u_nobody/card-payments", headers=ADMIN)

    assert response.status == 404
    assert_openai_error(await response.json(), "end_user_not_found")
