"""The fake Stripe itself: every step metergate takes through the official `stripe` library works against it, the
way Stripe answers (idempotency keys, card errors, checkout, refunds, signed webhooks)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web

from tests.billing.conftest import FakeStripe, FakeStripeError, sign_stripe_event
from tests.redis_server import free_port

PAYS = "4242424242424242"
DECLINED = "4000000000000341"  # attaches, then every charge is declined
NEEDS_3DS = "4000002500003155"
WEBHOOK_SECRET = "whsec_fake_stripe_tests"
EVENT_DEADLINE_SECONDS = 20  # only so a missing delivery fails the test instead of hanging it


@dataclass
class Delivery:
    payload: bytes
    signature: str

    def event(self, secret: str = WEBHOOK_SECRET) -> stripe.Event:
        return stripe.Webhook.construct_event(self.payload, self.signature, secret)


@dataclass
class WebhookReceiver:
    url: str
    deliveries: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)

    async def next_event(self, secret: str = WEBHOOK_SECRET) -> tuple[Delivery, stripe.Event]:
        delivery = await asyncio.wait_for(self.deliveries.get(), EVENT_DEADLINE_SECONDS)
        return delivery, delivery.event(secret)

    async def events_until(self, *types: str) -> list[stripe.Event]:
        """Every event received until one of each of `types` has arrived."""
        events: list[stripe.Event] = []
        while not set(types) <= {event.type for event in events}:
            events.append((await self.next_event())[1])
        return events


@pytest.fixture
async def receiver(fake_stripe: FakeStripe) -> AsyncIterator[WebhookReceiver]:
    """A webhook endpoint on a free port, registered with the fake."""
    port = free_port()
    found = WebhookReceiver(f"http://127.0.0.1:{port}/webhook")

    async def receive(request: web.Request) -> web.Response:
        found.deliveries.put_nowait(Delivery(await request.read(), request.headers.get("Stripe-Signature", "")))
        return web.Response()

    app = web.Application()
    app.router.add_post("/webhook", receive)
    # A delivery still arriving when the test ends is of no interest: don't wait aiohttp's default 60 s for it.
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    fake_stripe.register_webhook(found.url, WEBHOOK_SECRET)
    yield found
    await runner.cleanup()


async def new_customer(client: stripe.StripeClient, user_id: str = "u_1") -> str:
    customer = await client.v1.customers.create_async(params={"metadata": {"metergate_user": user_id}})
    return customer.id


async def new_checkout(client: stripe.StripeClient, customer: str, *, save_card: bool = True, amount: int = 2000) -> Any:
    intent_data: dict[str, Any] = {"metadata": {"metergate_user": "u_1", "topup_micros": str(amount * 10_000)}}
    if save_card:
        intent_data["setup_future_usage"] = "off_session"
    return await client.v1.checkout.sessions.create_async(params={
        "mode": "payment",
        "customer": customer,
        "line_items": [{"price_data": {"currency": "usd", "unit_amount": amount, "product_data": {"name": "Credits"}},
                        "quantity": 1}],
        "payment_intent_data": intent_data,
        "metadata": {"metergate_user": "u_1"},
        "client_reference_id": "u_1",
        "success_url": "https://example.test/paid?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://example.test/cancelled",
    })


async def saved_card(client: stripe.StripeClient, customer: str, number: str) -> str:
    method = await client.v1.payment_methods.create_async(
        params={"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"}})
    await client.v1.payment_methods.attach_async(method.id, params={"customer": customer})
    return method.id


async def charge_off_session(client: stripe.StripeClient, customer: str, method: str, key: str | None = None,
                             amount: int = 1500) -> Any:
    params: dict[str, Any] = {"amount": amount, "currency": "usd", "customer": customer, "payment_method": method,
                              "off_session": True, "confirm": True, "metadata": {"metergate_user": "u_1"}}
    options: dict[str, Any] = {"idempotency_key": key} if key else {}
    return await client.v1.payment_intents.create_async(params=params, options=options)


async def paid_intent(fake_stripe: FakeStripe, client: stripe.StripeClient, amount: int = 2000) -> str:
    customer = await new_customer(client)
    session = await fake_stripe.pay_checkout((await new_checkout(client, customer, amount=amount)).id)
    return session["payment_intent"]


# ------------------------------------------------------------------ customers and idempotency keys


async def test_customer_created_twice_with_one_idempotency_key_is_one_customer(stripe_client: stripe.StripeClient):
    params = {"metadata": {"metergate_user": "u_1"}}
    first = await stripe_client.v1.customers.create_async(params=params, options={"idempotency_key": "cus-u_1"})
    again = await stripe_client.v1.customers.create_async(params=params, options={"idempotency_key": "cus-u_1"})

    assert again.id == first.id
    assert (await stripe_client.v1.customers.retrieve_async(first.id)).metadata["metergate_user"] == "u_1"
    assert len((await stripe_client.v1.customers.list_async(params={"limit": 100})).data) == 1


async def test_idempotency_key_reused_with_other_parameters_is_an_idempotency_error(stripe_client: stripe.StripeClient):
    await stripe_client.v1.customers.create_async(params={"metadata": {"u": "1"}}, options={"idempotency_key": "k"})

    with pytest.raises(stripe.IdempotencyError):
        await stripe_client.v1.customers.create_async(params={"metadata": {"u": "2"}}, options={"idempotency_key": "k"})


# ------------------------------------------------------------------ checkout sessions


async def test_checkout_session_is_shaped_like_stripes(stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    customer = await new_customer(stripe_client)
    session = await new_checkout(stripe_client, customer)

    assert session.id.startswith("cs_test_")
    assert session.object == "checkout.session"
    assert session.url.startswith(fake_stripe.url)
    assert (session.mode, session.customer, session.client_reference_id) == ("payment", customer, "u_1")
    assert (session.amount_total, session.currency) == (2000, "usd")
    assert session.metadata.to_dict() == {"metergate_user": "u_1"}
    assert (session.status, session.payment_status, session.payment_intent) == ("open", "unpaid", None)
    assert (await stripe_client.v1.checkout.sessions.retrieve_async(session.id)).to_dict() == session.to_dict()


async def test_paid_checkout_is_complete_and_its_payment_intent_carries_the_metadata(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    customer = await new_customer(stripe_client)
    session = await new_checkout(stripe_client, customer)

    await fake_stripe.pay_checkout(session.id)

    done = await stripe_client.v1.checkout.sessions.retrieve_async(session.id)
    assert (done.status, done.payment_status) == ("complete", "paid")
    intent = await stripe_client.v1.payment_intents.retrieve_async(done.payment_intent)
    assert (intent.status, intent.amount, intent.amount_received, intent.customer) == ("succeeded", 2000, 2000, customer)
    assert intent.metadata.to_dict() == {"metergate_user": "u_1", "topup_micros": "20000000"}
    assert intent.setup_future_usage == "off_session"


async def test_checkout_with_setup_future_usage_saves_the_card_for_off_session_charges(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    customer = await new_customer(stripe_client)
    session = await fake_stripe.pay_checkout((await new_checkout(stripe_client, customer, save_card=True)).id)
    method = (await stripe_client.v1.payment_intents.retrieve_async(session["payment_intent"])).payment_method

    assert (await stripe_client.v1.payment_methods.retrieve_async(method)).customer == customer
    intent = await charge_off_session(stripe_client, customer, method)
    assert (intent.status, intent.amount_received) == ("succeeded", 1500)


async def test_checkout_without_setup_future_usage_does_not_save_the_card(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    customer = await new_customer(stripe_client)
    session = await fake_stripe.pay_checkout((await new_checkout(stripe_client, customer, save_card=False)).id)
    intent = await stripe_client.v1.payment_intents.retrieve_async(session["payment_intent"])

    assert intent.setup_future_usage is None
    assert (await stripe_client.v1.payment_methods.retrieve_async(intent.payment_method)).customer is None


async def test_declined_card_leaves_the_checkout_open_and_another_card_pays_the_same_intent(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    customer = await new_customer(stripe_client)
    session = await new_checkout(stripe_client, customer)

    with pytest.raises(FakeStripeError) as declined:
        await fake_stripe.pay_checkout(session.id, DECLINED)
    assert declined.value.status == 402
    assert (await stripe_client.v1.checkout.sessions.retrieve_async(session.id)).status == "open"

    paid = await fake_stripe.pay_checkout(session.id, PAYS)
    assert paid["status"] == "complete"
    assert [intent["status"] for intent in await fake_stripe.payment_intents(customer)] == ["succeeded"]


async def test_completed_checkout_cannot_be_paid_twice(stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    session = await new_checkout(stripe_client, await new_customer(stripe_client))
    await fake_stripe.pay_checkout(session.id)

    with pytest.raises(FakeStripeError) as again:
        await fake_stripe.pay_checkout(session.id)
    assert again.value.status == 400


async def test_hosted_page_pays_and_sends_the_customer_to_the_success_url(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    session = await new_checkout(stripe_client, await new_customer(stripe_client))

    async with aiohttp.ClientSession() as browser:
        async with browser.get(session.url) as page:
            assert page.status == 200
            assert 'name="card_number"' in await page.text()
        form = {"card_number": PAYS, "redirect": "1"}
        async with browser.post(f"{fake_stripe.url}/_test/checkout/sessions/{session.id}/pay", data=form,
                                allow_redirects=False) as paid:
            assert paid.status == 303
            assert paid.headers["Location"] == f"https://example.test/paid?session={session.id}"
    assert (await stripe_client.v1.checkout.sessions.retrieve_async(session.id)).payment_status == "paid"


# ------------------------------------------------------------------ webhooks


async def test_paid_checkout_sends_signed_events_that_construct_event_accepts(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe, receiver: WebhookReceiver):
    customer = await new_customer(stripe_client)
    session = await new_checkout(stripe_client, customer)
    await fake_stripe.pay_checkout(session.id)

    events = {event.type: event for event in await receiver.events_until("payment_intent.succeeded", "checkout.session.completed")}

    completed = events["checkout.session.completed"].data.object
    assert (completed.id, completed.payment_status, completed.customer) == (session.id, "paid", customer)
    assert completed.metadata.to_dict() == {"metergate_user": "u_1"}
    succeeded = events["payment_intent.succeeded"].data.object
    assert (succeeded.id, succeeded.amount_received) == (completed.payment_intent, 2000)


async def test_webhook_signature_does_not_verify_with_another_secret(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe, receiver: WebhookReceiver):
    await fake_stripe.pay_checkout((await new_checkout(stripe_client, await new_customer(stripe_client))).id)
    delivery, _ = await receiver.next_event()

    with pytest.raises(stripe.SignatureVerificationError):
        delivery.event("whsec_someone_else")


async def test_flush_cancels_deliveries_still_waiting(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe, receiver: WebhookReceiver):
    before = await paid_intent(fake_stripe, stripe_client)  # its events wait ~1 s in localstripe before delivery
    fake_stripe.flush()
    fake_stripe.register_webhook(receiver.url, WEBHOOK_SECRET)
    after = await paid_intent(fake_stripe, stripe_client)

    events = await receiver.events_until("payment_intent.succeeded", "checkout.session.completed")

    paid = {"payment_intent.succeeded": "id", "checkout.session.completed": "payment_intent"}
    intents = {event.data.object[paid[event.type]] for event in events if event.type in paid}
    assert intents == {after} and before != after


def test_sign_stripe_event_makes_a_header_construct_event_accepts():
    payload = json.dumps({"id": "evt_1", "object": "event", "type": "charge.dispute.created",
                          "data": {"object": {"id": "dp_1", "object": "dispute"}}}).encode()

    event = stripe.Webhook.construct_event(payload, sign_stripe_event(payload, WEBHOOK_SECRET), WEBHOOK_SECRET)

    assert event.type == "charge.dispute.created"


def test_sign_stripe_event_with_a_stale_timestamp_is_rejected():
    payload = b'{"id": "evt_1", "object": "event"}'
    stale = sign_stripe_event(payload, WEBHOOK_SECRET, timestamp=1_000_000_000)

    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, stale, WEBHOOK_SECRET)


# ------------------------------------------------------------------ off-session charges


async def test_off_session_charge_with_a_saved_card_succeeds(stripe_client: stripe.StripeClient):
    customer = await new_customer(stripe_client)

    intent = await charge_off_session(stripe_client, customer, await saved_card(stripe_client, customer, PAYS))

    assert (intent.status, intent.amount_received, intent.customer) == ("succeeded", 1500, customer)
    assert intent.metadata.to_dict() == {"metergate_user": "u_1"}


async def test_declined_off_session_charge_is_a_card_error_naming_its_payment_intent(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    customer = await new_customer(stripe_client)
    method = await saved_card(stripe_client, customer, DECLINED)

    with pytest.raises(stripe.CardError) as declined:
        await charge_off_session(stripe_client, customer, method)

    assert declined.value.code == "card_declined"
    [intent] = await fake_stripe.payment_intents(customer)
    assert declined.value.json_body["error"]["payment_intent"]["id"] == intent["id"]
    assert (intent["status"], intent["amount_received"]) == ("requires_payment_method", 0)


async def test_off_session_charge_on_a_card_needing_authentication_requires_action(stripe_client: stripe.StripeClient):
    customer = await new_customer(stripe_client)

    intent = await charge_off_session(stripe_client, customer, await saved_card(stripe_client, customer, NEEDS_3DS))

    assert (intent.status, intent.amount_received) == ("requires_action", 0)


async def test_charge_repeated_with_one_idempotency_key_charges_once(stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    customer = await new_customer(stripe_client)
    method = await saved_card(stripe_client, customer, PAYS)

    first = await charge_off_session(stripe_client, customer, method, key="topup-u_1-1")
    again = await charge_off_session(stripe_client, customer, method, key="topup-u_1-1")

    assert again.id == first.id
    assert [intent["id"] for intent in await fake_stripe.payment_intents(customer)] == [first.id]


async def test_declined_charge_repeated_with_its_idempotency_key_is_the_same_decline(
        stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    customer = await new_customer(stripe_client)
    method = await saved_card(stripe_client, customer, DECLINED)
    declines = []
    for _ in range(2):
        with pytest.raises(stripe.CardError) as declined:
            await charge_off_session(stripe_client, customer, method, key="topup-u_1-2")
        declines.append(declined.value.json_body["error"]["payment_intent"]["id"])

    assert declines[0] == declines[1]
    assert len(await fake_stripe.payment_intents(customer)) == 1


async def test_payment_intents_list_filters_by_customer_newest_first(stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    mine, theirs = await new_customer(stripe_client, "u_1"), await new_customer(stripe_client, "u_2")
    my_card, their_card = await saved_card(stripe_client, mine, PAYS), await saved_card(stripe_client, theirs, PAYS)
    older = await charge_off_session(stripe_client, mine, my_card)
    await charge_off_session(stripe_client, theirs, their_card)
    newer = await charge_off_session(stripe_client, mine, my_card)

    listed = await stripe_client.v1.payment_intents.list_async(params={"customer": mine})

    assert [intent.id for intent in listed.data] == [newer.id, older.id]
    assert [intent["id"] for intent in await fake_stripe.payment_intents(mine)] == [newer.id, older.id]


# ------------------------------------------------------------------ refunds


async def refund(client: stripe.StripeClient, intent: str, amount: int, key: str) -> Any:
    return await client.v1.refunds.create_async(
        params={"payment_intent": intent, "amount": amount, "metadata": {"metergate_refund": key}},
        options={"idempotency_key": key})


async def test_refund_repeated_with_one_idempotency_key_refunds_once(stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    intent = await paid_intent(fake_stripe, stripe_client)

    first = await refund(stripe_client, intent, 500, "refund-1")
    again = await refund(stripe_client, intent, 500, "refund-1")

    assert again.id == first.id
    assert (first.status, first.amount, first.payment_intent) == ("succeeded", 500, intent)
    refunds = await stripe_client.v1.refunds.list_async(params={"payment_intent": intent})
    assert [r.id for r in refunds.data] == [first.id]


async def test_refund_beyond_what_is_left_to_refund_is_refused(stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    intent = await paid_intent(fake_stripe, stripe_client)
    await refund(stripe_client, intent, 1500, "refund-1")

    with pytest.raises(stripe.InvalidRequestError):
        await refund(stripe_client, intent, 501, "refund-2")
    assert (await refund(stripe_client, intent, 500, "refund-3")).amount == 500


async def test_fail_next_refund_refuses_one_refund_only(stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    intent = await paid_intent(fake_stripe, stripe_client)
    fake_stripe.fail_next_refund()

    with pytest.raises(stripe.InvalidRequestError) as refused:
        await refund(stripe_client, intent, 500, "refund-1")
    assert refused.value.code == "charge_disputed"
    assert (await refund(stripe_client, intent, 500, "refund-2")).status == "succeeded"


async def test_fail_next_refund_with_402_is_a_card_error(stripe_client: stripe.StripeClient, fake_stripe: FakeStripe):
    intent = await paid_intent(fake_stripe, stripe_client)
    fake_stripe.fail_next_refund(status=402, code="expired_or_canceled_card")

    with pytest.raises(stripe.CardError) as refused:
        await refund(stripe_client, intent, 500, "refund-1")
    assert refused.value.code == "expired_or_canceled_card"
