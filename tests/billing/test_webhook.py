"""`POST /stripe/webhook`: Stripe's events verified and applied once — a payment credits once however often and
concurrently it is reported, a bad signature changes nothing, refunds made in Stripe and disputes are debited (and a
won dispute given back), and what metergate does not use or never sold is acknowledged and ignored.

Events are the fake's real ones (listed from its API after a real paid Checkout) wherever localstripe makes them;
those it never sends (refunds, disputes) are built here around real objects where it has them, and signed with
`sign_stripe_event` as Stripe signs.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import stripe

from proxy.store.payments import CardPayment
from tests.billing.conftest import WEBHOOK_SECRET, BillingGateway, sign_stripe_event
from tests.conftest import ADMIN, EndUser, assert_ledger_invariants

T = TypeVar("T")
DEADLINE_SECONDS = 15  # only so that a webhook that never lands fails the test instead of hanging it
PAID_EVENTS = ("payment_intent.succeeded", "checkout.session.completed")


@dataclass(frozen=True)
class PaidCheckout:
    session_id: str
    payment_intent: str
    events: dict[str, dict[str, Any]]  # the two events Stripe sent for it, by type, as it sent them


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any


@pytest.fixture
def own_deliveries_only(billing_gateway: BillingGateway) -> BillingGateway:
    """metergate with the fake's own deliveries turned off: only what the test POSTs reaches the webhook."""
    billing_gateway.fake.register_webhook(billing_gateway.webhook_url, WEBHOOK_SECRET, events=[])
    return billing_gateway


async def eventually(probe: Callable[[], Awaitable[T]], what: str) -> T:
    deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
    while True:
        found = await probe()
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {DEADLINE_SECONDS} s")
        await asyncio.sleep(0.05)


async def paid_checkout(gateway: BillingGateway, stripe_client: stripe.StripeClient, user: EndUser, amount_micros: int,
                        *, save_card: bool = False) -> PaidCheckout:
    """A top-up started through metergate and paid on the fake, with the events Stripe made for it."""
    resp = await gateway.client.post("/v1/wallet/checkout-sessions", headers={"Authorization": f"Bearer {user.key}"},
                                     json={"amount_micros": amount_micros, "save_card": save_card})
    assert resp.status == 201, await resp.text()
    paid = await gateway.fake.pay_checkout((await resp.json())["id"])
    about = {"payment_intent.succeeded": paid["payment_intent"], "checkout.session.completed": paid["id"]}
    listed = (await stripe_client.v1.events.list_async(params={"limit": 100})).data
    events: dict[str, dict[str, Any]] = {event.type: event.to_dict() for event in listed if about.get(event.type) == event.data.object["id"]}
    assert set(events) == set(PAID_EVENTS), f"the fake made {sorted(events)}"
    return PaidCheckout(paid["id"], paid["payment_intent"], events)


def event(kind: str, obj: Any, event_id: str | None = None) -> dict[str, Any]:
    """An event as Stripe sends it, around `obj` (a stripe object or a dict)."""
    data = obj.to_dict() if isinstance(obj, stripe.StripeObject) else obj
    return {"id": event_id or f"evt_test_{kind.replace('.', '_')}_{data.get('id', 'x')}", "object": "event", "type": kind,
            "created": int(time.time()), "livemode": False, "api_version": "2024-06-20", "data": {"object": data}}


async def deliver(gateway: BillingGateway, sent: dict[str, Any] | bytes, *, secret: str = WEBHOOK_SECRET,
                  timestamp: int | None = None, signature: str | None = None, body: bytes | None = None,
                  signed: bool = True) -> Answer:
    """POST an event to metergate's webhook as Stripe would: `body` (default: the signed payload) with its signature."""
    payload = sent if isinstance(sent, bytes) else json.dumps(sent).encode()
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if signed:
        headers["Stripe-Signature"] = signature or sign_stripe_event(payload, secret, timestamp)
    resp = await gateway.client.post("/stripe/webhook", data=payload if body is None else body, headers=headers)
    return Answer(resp.status, await resp.json())


async def credit_by_webhook(gateway: BillingGateway, paid: PaidCheckout) -> None:
    for kind in PAID_EVENTS:
        answer = await deliver(gateway, paid.events[kind])
        assert answer.status == 200, answer.body


async def balance(gateway: BillingGateway, wallet_id: str) -> int:
    wallet = await gateway.wallets.get(wallet_id)
    assert wallet is not None
    return wallet.balance_micros


async def entries(gateway: BillingGateway, wallet_id: str, kind: str) -> list[Any]:
    return [entry for entry in await gateway.wallets.ledger(wallet_id, limit=1000) if entry.type == kind]


async def intent_and_charge(stripe_client: stripe.StripeClient, payment_intent: str) -> tuple[Any, Any]:
    intent = await stripe_client.v1.payment_intents.retrieve_async(payment_intent)
    charge = intent.latest_charge
    if isinstance(charge, str):
        charge = await stripe_client.v1.charges.retrieve_async(charge)
    return intent, charge


def dispute_object(paid: PaidCheckout, charge_id: str, amount_cents: int, status: str, dispute_id: str = "du_test_1") -> dict[str, Any]:
    """A Dispute as Stripe sends it in charge.dispute.* events. localstripe has no disputes at all (no object, no
    event, no API), so the object is built here around the real charge and PaymentIntent of a paid top-up."""
    return {"id": dispute_id, "object": "dispute", "amount": amount_cents, "currency": "usd", "charge": charge_id,
            "payment_intent": paid.payment_intent, "reason": "fraudulent", "status": status, "livemode": False,
            "metadata": {}, "created": int(time.time()), "is_charge_refundable": False}


async def spend(gateway: BillingGateway, wallet_id: str, amount_micros: int) -> None:
    """Spend as a call would: a hold, settled for `amount_micros`."""
    hold = await gateway.wallets.hold(wallet_id, amount_micros)
    await gateway.wallets.settle(wallet_id, hold.hold_id, amount_micros)


def assert_openai_error(body: Any, *, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# ------------------------------------------------------------------ a payment credits once


async def test_checkout_payment_credits_once_when_every_event_is_delivered_three_times_at_once(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    user = await make_end_user("u_1", funds=0)
    log_offset = billing_gateway.fake.log_size()
    paid = await paid_checkout(billing_gateway, stripe_client, user, 25_000_000)

    # The fake's own deliveries of the same two events (~1 s after the payment) race these six.
    answers = await asyncio.gather(*(deliver(billing_gateway, paid.events[kind]) for kind in PAID_EVENTS for _ in range(3)))

    assert [a.status for a in answers] == [200] * 6, answers
    assert {a.body["outcome"] for a in answers} <= {"applied", "duplicate"}

    def delivered_by_the_fake() -> list[str]:
        lines = billing_gateway.fake.log_since(log_offset).splitlines()
        return [line for line in lines for kind in PAID_EVENTS if f'webhook "{kind}"' in line]

    async def both_delivered() -> list[str]:
        found = delivered_by_the_fake()
        return found if len(found) == 2 else []

    for line in await eventually(both_delivered, "the fake delivers both events itself"):
        assert "successfully delivered" in line, line
    assert await balance(billing_gateway, "u_1") == 25_000_000
    [top_up] = await entries(billing_gateway, "u_1", "top_up")
    assert (top_up.amount_micros, top_up.details["reference"]) == (25_000_000, paid.payment_intent)
    assert await billing_gateway.payments.card_payments("u_1") == [CardPayment(paid.payment_intent, 25_000_000, 0)]
    await assert_ledger_invariants(billing_gateway.wallets)


async def test_an_event_redelivered_with_the_same_id_is_a_duplicate(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=0)
    paid = await paid_checkout(gateway, stripe_client, user, 25_000_000)
    succeeded = paid.events["payment_intent.succeeded"]

    first = await deliver(gateway, succeeded)
    again = await deliver(gateway, succeeded)

    assert (first.status, first.body["outcome"]) == (200, "applied")
    assert (again.status, again.body) == (200, {"received": True, "id": succeeded["id"], "type": "payment_intent.succeeded",
                                                "outcome": "duplicate"})
    assert await balance(gateway, "u_1") == 25_000_000
    assert len(await entries(gateway, "u_1", "top_up")) == 1


# ------------------------------------------------------------------ signatures


def _forged(payload: bytes) -> dict[str, Any]:
    return {"signature": sign_stripe_event(payload, "whsec_someone_else")}


def _stale(payload: bytes) -> dict[str, Any]:
    return {"signature": sign_stripe_event(payload, WEBHOOK_SECRET, timestamp=int(time.time()) - 600)}


def _missing(payload: bytes) -> dict[str, Any]:
    return {"signed": False}


def _changed_after_signing(payload: bytes) -> dict[str, Any]:
    # Signed as sent by Stripe, then the credit raised tenfold on the way.
    tampered = payload.replace(b'"metergate_credit_micros": "25000000"', b'"metergate_credit_micros": "250000000"')
    assert tampered != payload
    return {"signature": sign_stripe_event(payload, WEBHOOK_SECRET), "body": tampered}


@pytest.mark.parametrize("bad", [_forged, _stale, _missing, _changed_after_signing],
                         ids=["forged", "stale_10_minutes", "missing_header", "body_changed_after_signing"])
async def test_a_badly_signed_event_is_400_changes_nothing_and_a_correct_delivery_still_applies(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient,
        bad: Callable[[bytes], dict[str, Any]]):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=0)
    paid = await paid_checkout(gateway, stripe_client, user, 25_000_000)
    succeeded = paid.events["payment_intent.succeeded"]
    payload = json.dumps(succeeded).encode()

    refused = await deliver(gateway, payload, **bad(payload))

    assert refused.status == 400
    assert_openai_error(refused.body, code="invalid_signature")
    assert await balance(gateway, "u_1") == 0
    assert await entries(gateway, "u_1", "top_up") == []
    assert not await gateway.payments.event_applied(succeeded["id"])
    later = await deliver(gateway, payload)
    assert (later.status, later.body["outcome"]) == (200, "applied")
    assert await balance(gateway, "u_1") == 25_000_000


# ------------------------------------------------------------------ events metergate does not use


def _relabelled(kind: str, source: str) -> Callable[[PaidCheckout, list[dict[str, Any]]], dict[str, Any]]:
    def build(paid: PaidCheckout, listed: list[dict[str, Any]]) -> dict[str, Any]:
        # A real metergate payment's object under a type metergate does not act on: the type alone must decide.
        found = copy.deepcopy(paid.events[source])
        found["id"], found["type"] = f"evt_test_relabelled_{kind.replace('.', '_')}", kind
        return found
    return build


def _customer_created(paid: PaidCheckout, listed: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [e for e in listed if e["type"] == "customer.created"]  # the fake's own, for the wallet's customer
    return found


@pytest.mark.parametrize("build", [
    _relabelled("payment_intent.created", "payment_intent.succeeded"),
    _relabelled("payment_intent.processing", "payment_intent.succeeded"),
    _relabelled("checkout.session.expired", "checkout.session.completed"),
    _customer_created,
], ids=["payment_intent.created", "payment_intent.processing", "checkout.session.expired", "customer.created"])
async def test_an_event_type_metergate_does_not_use_is_acknowledged_and_ignored(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient,
        build: Callable[[PaidCheckout, list[dict[str, Any]]], dict[str, Any]]):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=10_000_000)
    paid = await paid_checkout(gateway, stripe_client, user, 25_000_000, save_card=True)
    listed = [e.to_dict() for e in (await stripe_client.v1.events.list_async(params={"limit": 100})).data]
    sent = build(paid, listed)
    ledger_before = await gateway.wallets.ledger("u_1")

    answer = await deliver(gateway, sent)

    assert answer.status == 200
    assert (answer.body["type"], answer.body["outcome"]) == (sent["type"], "ignored: not an event metergate uses")
    assert await balance(gateway, "u_1") == 10_000_000
    assert await gateway.wallets.ledger("u_1") == ledger_before
    assert await gateway.payments.card_payments("u_1") == []
    assert (await gateway.payments.rule("u_1")).payment_method is None


# ------------------------------------------------------------------ refunds made in Stripe


async def test_a_refund_made_in_stripe_debits_the_wallet_once(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=0)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    await credit_by_webhook(gateway, paid)
    # As the operator would in Stripe's dashboard: no metergate metadata on it.
    refund = await stripe_client.v1.refunds.create_async(params={"payment_intent": paid.payment_intent, "amount": 500})
    _, charge = await intent_and_charge(stripe_client, paid.payment_intent)
    assert not refund.to_dict().get("metadata")

    # localstripe sends no refund events: these are Stripe's, around the real refund and charge.
    created = event("refund.created", refund)
    answers = [await deliver(gateway, created), await deliver(gateway, event("charge.refunded", charge)),
               await deliver(gateway, event("refund.updated", refund)), await deliver(gateway, created)]

    assert [a.status for a in answers] == [200] * 4
    assert [a.body["outcome"] for a in answers] == ["applied", "applied", "applied", "duplicate"]
    assert await balance(gateway, "u_1") == 15_000_000
    [entry] = await entries(gateway, "u_1", "card_refund")
    assert entry.amount_micros == -5_000_000
    assert (entry.details["reference"], entry.details["payment_intent"]) == (refund.id, paid.payment_intent)
    assert "shortfall_micros" not in entry.details
    assert await gateway.payments.card_payments("u_1") == [CardPayment(paid.payment_intent, 20_000_000, 5_000_000)]
    await assert_ledger_invariants(gateway.wallets)


async def test_a_refund_in_stripe_beyond_what_the_wallet_has_records_a_shortfall_and_stops_at_the_credit_limit(
        own_deliveries_only: BillingGateway, wallets: Any, accounts: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    await wallets.open("u_1", credit_limit_micros=2_000_000, profile={"tier": "default", "metadata": {}})
    _, key = await accounts.create_key("u_1")
    paid = await paid_checkout(gateway, stripe_client, EndUser("u_1", key), 20_000_000)
    await credit_by_webhook(gateway, paid)
    await spend(gateway, "u_1", 17_000_000)
    in_flight = await gateway.wallets.hold("u_1", 1_000_000)  # a call still running: its money is not the refund's
    refund = await stripe_client.v1.refunds.create_async(params={"payment_intent": paid.payment_intent})

    answer = await deliver(gateway, event("refund.created", refund))

    assert (answer.status, answer.body["outcome"]) == (200, "applied")
    # 3 of balance, 1 of it held, 2 of credit: 4 can go; the other 16 are the operator's loss.
    [entry] = await entries(gateway, "u_1", "card_refund")
    assert entry.amount_micros == -4_000_000
    assert (entry.details["requested_micros"], entry.details["shortfall_micros"]) == (20_000_000, 16_000_000)
    wallet = await gateway.wallets.get("u_1")
    assert (wallet.balance_micros, wallet.held_micros, wallet.available_micros) == (-1_000_000, 1_000_000, 0)
    assert wallet.balance_micros - wallet.held_micros == -wallet.credit_limit_micros
    assert await gateway.wallets.active_holds("u_1") == {in_flight.hold_id: 1_000_000}
    await gateway.wallets.release("u_1", in_flight.hold_id)
    await assert_ledger_invariants(gateway.wallets)


# ------------------------------------------------------------------ disputes


async def test_an_opened_dispute_debits_the_disputed_amount_with_a_dispute_entry(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=5_000_000)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    await credit_by_webhook(gateway, paid)
    _, charge = await intent_and_charge(stripe_client, paid.payment_intent)

    answer = await deliver(gateway, event("charge.dispute.created", dispute_object(paid, charge.id, 2000, "needs_response")))

    assert (answer.status, answer.body["outcome"]) == (200, "applied")
    assert await balance(gateway, "u_1") == 5_000_000
    [entry] = await entries(gateway, "u_1", "dispute")
    assert entry.amount_micros == -20_000_000
    assert (entry.details["reference"], entry.details["payment_intent"]) == ("du_test_1", paid.payment_intent)
    assert (entry.details["requested_micros"], entry.details["shortfall_micros"]) == (20_000_000, 0)
    await assert_ledger_invariants(gateway.wallets)


async def test_a_dispute_delivered_again_and_concurrently_debits_once(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=5_000_000)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    await credit_by_webhook(gateway, paid)
    _, charge = await intent_and_charge(stripe_client, paid.payment_intent)
    opened = event("charge.dispute.created", dispute_object(paid, charge.id, 2000, "needs_response"))

    answers = await asyncio.gather(*(deliver(gateway, opened) for _ in range(3)))
    later = await deliver(gateway, opened)

    assert [a.status for a in answers] == [200] * 3 and {a.body["outcome"] for a in answers} <= {"applied", "duplicate"}
    assert (later.status, later.body["outcome"]) == (200, "duplicate")
    assert await balance(gateway, "u_1") == 5_000_000
    assert len(await entries(gateway, "u_1", "dispute")) == 1
    await assert_ledger_invariants(gateway.wallets)


async def test_a_won_dispute_gives_back_exactly_what_its_opening_debited(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=0)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    await credit_by_webhook(gateway, paid)
    await spend(gateway, "u_1", 15_000_000)
    _, charge = await intent_and_charge(stripe_client, paid.payment_intent)
    await deliver(gateway, event("charge.dispute.created", dispute_object(paid, charge.id, 2000, "needs_response")))
    [opened] = await entries(gateway, "u_1", "dispute")
    assert (opened.amount_micros, opened.details["shortfall_micros"]) == (-5_000_000, 15_000_000)

    won = await deliver(gateway, event("charge.dispute.closed", dispute_object(paid, charge.id, 2000, "won")))

    assert (won.status, won.body["outcome"]) == (200, "applied")
    [given_back] = await entries(gateway, "u_1", "dispute_won")
    assert given_back.amount_micros == 5_000_000
    assert await balance(gateway, "u_1") == 5_000_000
    await assert_ledger_invariants(gateway.wallets)


async def test_a_lost_dispute_changes_nothing(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=5_000_000)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    await credit_by_webhook(gateway, paid)
    _, charge = await intent_and_charge(stripe_client, paid.payment_intent)
    await deliver(gateway, event("charge.dispute.created", dispute_object(paid, charge.id, 2000, "needs_response")))
    ledger_before = await gateway.wallets.ledger("u_1")

    lost = await deliver(gateway, event("charge.dispute.closed", dispute_object(paid, charge.id, 2000, "lost")))

    assert lost.status == 200 and lost.body["outcome"].startswith("ignored")
    assert await balance(gateway, "u_1") == 5_000_000
    assert await gateway.wallets.ledger("u_1") == ledger_before


async def test_a_dispute_won_event_delivered_before_its_opening_leaves_the_wallet_whole(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    # Stripe does not promise to deliver events in order (nor does a redelivery after an outage).
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=5_000_000)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    await credit_by_webhook(gateway, paid)
    _, charge = await intent_and_charge(stripe_client, paid.payment_intent)

    won = await deliver(gateway, event("charge.dispute.closed", dispute_object(paid, charge.id, 2000, "won")))
    opened = await deliver(gateway, event("charge.dispute.created", dispute_object(paid, charge.id, 2000, "needs_response")))

    assert (won.status, opened.status) == (200, 200)
    assert await balance(gateway, "u_1") == 25_000_000
    await assert_ledger_invariants(gateway.wallets)


async def test_card_payments_still_list_after_a_won_dispute(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=0)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    await credit_by_webhook(gateway, paid)
    _, charge = await intent_and_charge(stripe_client, paid.payment_intent)
    await deliver(gateway, event("charge.dispute.created", dispute_object(paid, charge.id, 2000, "needs_response")))
    await deliver(gateway, event("charge.dispute.closed", dispute_object(paid, charge.id, 2000, "won")))

    resp = await gateway.client.get("/admin/end-users/u_1/card-payments", headers=ADMIN)

    assert resp.status == 200, await resp.text()
    assert [(p["payment_intent"], p["credited_micros"], p["refunded_micros"]) for p in (await resp.json())["data"]] == [
        (paid.payment_intent, 20_000_000, 0)]


# ------------------------------------------------------------------ payments metergate never saw


async def _foreign_payment(stripe_client: stripe.StripeClient) -> tuple[Any, Any]:
    """A payment made in Stripe without metergate (no metadata): its PaymentIntent and charge."""
    method = await stripe_client.v1.payment_methods.create_async(
        params={"type": "card", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}})
    intent = await stripe_client.v1.payment_intents.create_async(
        params={"amount": 3000, "currency": "usd", "payment_method": method.id, "confirm": True})
    assert intent.status == "succeeded" and not intent.to_dict().get("metadata")
    return await intent_and_charge(stripe_client, intent.id)


async def _foreign_succeeded(stripe_client: stripe.StripeClient, intent: Any, charge: Any) -> dict[str, Any]:
    listed = (await stripe_client.v1.events.list_async(params={"type": "payment_intent.succeeded", "limit": 100})).data
    [found] = [e.to_dict() for e in listed if e.data.object["id"] == intent.id]  # the fake's own event
    return found


async def _foreign_refund(stripe_client: stripe.StripeClient, intent: Any, charge: Any) -> dict[str, Any]:
    refund = await stripe_client.v1.refunds.create_async(params={"payment_intent": intent.id, "amount": 1000})
    return event("refund.created", refund)


async def _foreign_charge_refunded(stripe_client: stripe.StripeClient, intent: Any, charge: Any) -> dict[str, Any]:
    await stripe_client.v1.refunds.create_async(params={"payment_intent": intent.id})
    return event("charge.refunded", await stripe_client.v1.charges.retrieve_async(charge.id))


async def _foreign_dispute(stripe_client: stripe.StripeClient, intent: Any, charge: Any) -> dict[str, Any]:
    paid = PaidCheckout("cs_none", intent.id, {})
    return event("charge.dispute.created", dispute_object(paid, charge.id, 3000, "needs_response"))


@pytest.mark.parametrize("build", [_foreign_succeeded, _foreign_refund, _foreign_charge_refunded, _foreign_dispute],
                         ids=["payment_intent.succeeded", "refund.created", "charge.refunded", "charge.dispute.created"])
async def test_an_event_about_a_payment_metergate_never_saw_is_ignored(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient,
        build: Callable[..., Awaitable[dict[str, Any]]]):
    gateway = own_deliveries_only
    await make_end_user("u_1", funds=10_000_000)
    intent, charge = await _foreign_payment(stripe_client)
    sent = await build(stripe_client, intent, charge)
    ledger_before = await gateway.wallets.ledger("u_1")

    answer = await deliver(gateway, sent)

    assert answer.status == 200
    assert answer.body["outcome"].startswith("ignored: not a metergate"), answer.body
    assert await balance(gateway, "u_1") == 10_000_000
    assert await gateway.wallets.ledger("u_1") == ledger_before
    assert await gateway.payments.wallet_of_payment(intent.id) is None


# ------------------------------------------------------------------ events out of order, failed refunds, inquiries


async def test_a_refund_made_in_stripe_that_fails_later_is_given_back(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=0)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    await credit_by_webhook(gateway, paid)
    refund = await stripe_client.v1.refunds.create_async(params={"payment_intent": paid.payment_intent, "amount": 500})
    await deliver(gateway, event("refund.created", refund))
    assert await balance(gateway, "u_1") == 15_000_000
    # Card refunds can fail after they were created (a closed card account): Stripe says so in refund.updated.
    failed = {**refund.to_dict(), "status": "failed", "failure_reason": "expired_or_canceled_card"}

    answer = await deliver(gateway, event("refund.updated", failed, "evt_test_refund_failed"))

    assert answer.status == 200
    assert await balance(gateway, "u_1") == 20_000_000



async def test_a_refund_made_in_stripe_reported_before_its_payment_is_still_debited(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    # metergate was down while the payment's events were sent; the operator refunded meanwhile; Stripe's retries
    # then arrive in any order.
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=0)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    refund = await stripe_client.v1.refunds.create_async(params={"payment_intent": paid.payment_intent, "amount": 500})

    await deliver(gateway, event("refund.created", refund))
    await credit_by_webhook(gateway, paid)

    assert await balance(gateway, "u_1") == 15_000_000



async def test_an_inquiry_which_withdraws_no_funds_debits_nothing(
        own_deliveries_only: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    gateway = own_deliveries_only
    user = await make_end_user("u_1", funds=0)
    paid = await paid_checkout(gateway, stripe_client, user, 20_000_000)
    await credit_by_webhook(gateway, paid)
    _, charge = await intent_and_charge(stripe_client, paid.payment_intent)

    await deliver(gateway, event("charge.dispute.created", dispute_object(paid, charge.id, 2000, "warning_needs_response")))
    await deliver(gateway, event("charge.dispute.closed", dispute_object(paid, charge.id, 2000, "warning_closed")))

    assert await balance(gateway, "u_1") == 20_000_000
