"""Buying credit with Stripe Checkout: starting a top-up (end user, operator, admin), what Stripe is asked for, what
paying it credits and saves, the Stripe customer made once per end user, the amounts refused, and a metergate without
a `stripe:` block (every Stripe endpoint 501) or with one whose secrets are unset (the startup check refuses it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import stripe
from aiohttp.test_utils import TestClient

from proxy.cli import _check_startup
from proxy.config import load_config
from proxy.store import WalletStore
from tests.billing.conftest import STRIPE_KEY_ENV, WEBHOOK_SECRET, BillingGateway, FakeStripe, sign_stripe_event
from tests.conftest import ADMIN, ADMIN_KEY, OPERATOR_KEY, EndUser, assert_ledger_invariants

T = TypeVar("T")
DEADLINE_SECONDS = 15  # only so that a webhook that never lands fails the test instead of hanging it
PAID_EVENTS = ("payment_intent.succeeded", "checkout.session.completed")
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}


@pytest.fixture
def stripe_overrides() -> dict[str, Any]:
    # Bounds and presets other than the defaults, so that the tests see the configured ones are used.
    return {"minimum_top_up": 5, "maximum_top_up": 500, "top_up_presets": [10, 25, 100]}


def bearer(user: EndUser) -> dict[str, str]:
    return {"Authorization": f"Bearer {user.key}"}


async def eventually(probe: Callable[[], Awaitable[T]], what: str) -> T:
    """`probe()`'s first truthy answer, polled until a deadline (localstripe delivers its webhooks ~1 s late)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
    while True:
        found = await probe()
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {DEADLINE_SECONDS} s")
        await asyncio.sleep(0.05)


async def start_checkout(gateway: BillingGateway, user: EndUser, amount_micros: int, *, save_card: bool = False) -> dict[str, Any]:
    resp = await gateway.client.post("/v1/wallet/checkout-sessions", headers=bearer(user),
                                     json={"amount_micros": amount_micros, "save_card": save_card})
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def paid_event_ids(stripe_client: stripe.StripeClient, session_id: str, payment_intent: str) -> list[str]:
    """The ids of the two events Stripe sends for a paid Checkout Session."""
    events = (await stripe_client.v1.events.list_async(params={"limit": 100})).data
    about = {"payment_intent.succeeded": payment_intent, "checkout.session.completed": session_id}
    found = [event.id for event in events if about.get(event.type) == event.data.object["id"]]
    assert len(found) == 2, f"expected one event of each of {PAID_EVENTS}, found {found}"
    return found


async def pay_and_wait_for_webhooks(gateway: BillingGateway, stripe_client: stripe.StripeClient, session_id: str,
                                    card_number: str = "4242424242424242") -> str:
    """Pay the session on the fake; once both of its webhooks were applied by metergate, its PaymentIntent id."""
    paid = await gateway.fake.pay_checkout(session_id, card_number)
    event_ids = await paid_event_ids(stripe_client, session_id, paid["payment_intent"])

    async def all_applied() -> bool:
        return all([await gateway.payments.event_applied(event_id) for event_id in event_ids])

    await eventually(all_applied, f"metergate applies {PAID_EVENTS} of {session_id}")
    return paid["payment_intent"]


async def customers_of(stripe_client: stripe.StripeClient) -> list[Any]:
    return list((await stripe_client.v1.customers.list_async(params={"limit": 100})).data)


def posts_to_stripe_api(fake: FakeStripe, log_offset: int) -> list[str]:
    """The fake's access-log lines of POSTs to its /v1 API since `log_offset`: what metergate asked Stripe to create."""
    return [line for line in fake.log_since(log_offset).splitlines() if '"POST /v1/' in line]


def metadata(found: stripe.StripeObject) -> dict[str, str]:
    return found.to_dict().get("metadata") or {}


def assert_openai_error(body: Any, *, code: str, param: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param


# ------------------------------------------------------------------ starting a top-up


@pytest.mark.parametrize("save_card", [True, False], ids=["save_card", "no_save_card"])
async def test_end_user_starts_a_checkout_top_up_for_their_own_wallet(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient, save_card: bool):
    user = await make_end_user("u_1", funds=0)
    assert user.key.startswith("sk-eu_")

    started = await start_checkout(billing_gateway, user, 25_000_000, save_card=save_card)

    assert started["id"].startswith("cs_") and started["url"].startswith(billing_gateway.fake.url)
    assert (started["amount_micros"], started["currency"]) == (25_000_000, "usd")
    session = await stripe_client.v1.checkout.sessions.retrieve_async(started["id"])
    customer = await billing_gateway.payments.customer("u_1")
    assert customer is not None and customer.startswith("cus_")
    assert (session.mode, session.customer, session.amount_total, session.currency) == ("payment", customer, 2500, "usd")
    assert session.url == started["url"]
    assert metadata(session)["metergate_end_user"] == "u_1"
    assert metadata(session)["metergate_credit_micros"] == "25000000"
    # Stripe shows the session's payment_intent_data only on the PaymentIntent it creates when the buyer pays.
    intent_id = await pay_and_wait_for_webhooks(billing_gateway, stripe_client, started["id"])
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert intent.setup_future_usage == ("off_session" if save_card else None)
    assert (metadata(intent)["metergate_end_user"], metadata(intent)["metergate_credit_micros"]) == ("u_1", "25000000")


async def test_paid_checkout_credits_the_wallet_once_with_a_top_up_entry(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    user = await make_end_user("u_1", funds=0)
    started = await start_checkout(billing_gateway, user, 25_000_000)

    intent = await pay_and_wait_for_webhooks(billing_gateway, stripe_client, started["id"])

    wallet = await billing_gateway.wallets.get("u_1")
    assert (wallet.balance_micros, wallet.held_micros) == (25_000_000, 0)
    top_ups = [entry for entry in await billing_gateway.wallets.ledger("u_1") if entry.type == "top_up"]
    assert len(top_ups) == 1
    [entry] = top_ups
    assert entry.amount_micros == 25_000_000
    assert entry.details["reference"] == intent and intent.startswith("pi_")
    assert entry.details["source"] == "stripe"
    await assert_ledger_invariants(billing_gateway.wallets)


async def test_paid_checkout_with_save_card_keeps_the_card_on_the_wallet(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    user = await make_end_user("u_1", funds=0)
    started = await start_checkout(billing_gateway, user, 25_000_000, save_card=True)

    intent_id = await pay_and_wait_for_webhooks(billing_gateway, stripe_client, started["id"])

    rule = await eventually(lambda: _rule_with_card(billing_gateway, "u_1"), "the card is saved")
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    customer = await billing_gateway.payments.customer("u_1")
    assert rule.payment_method == intent.payment_method
    assert rule.card == "visa •••• 4242"
    assert rule.customer == customer
    assert (await stripe_client.v1.payment_methods.retrieve_async(rule.payment_method)).customer == customer


async def _rule_with_card(gateway: BillingGateway, wallet_id: str) -> Any:
    rule = await gateway.payments.rule(wallet_id)
    return rule if rule.payment_method else None


async def test_paid_checkout_without_save_card_keeps_no_card(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    user = await make_end_user("u_1", funds=0)
    started = await start_checkout(billing_gateway, user, 25_000_000, save_card=False)

    await pay_and_wait_for_webhooks(billing_gateway, stripe_client, started["id"])

    rule = await billing_gateway.payments.rule("u_1")
    assert (rule.payment_method, rule.card) == (None, None)
    assert (await billing_gateway.wallets.get("u_1")).balance_micros == 25_000_000


# ------------------------------------------------------------------ one Stripe customer per end user


async def test_each_end_user_gets_one_stripe_customer_reused_by_later_top_ups(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    first_user, second_user = await make_end_user("u_1", funds=0), await make_end_user("u_2", funds=0)

    first = await start_checkout(billing_gateway, first_user, 10_000_000)
    again = await start_checkout(billing_gateway, first_user, 20_000_000)
    other = await start_checkout(billing_gateway, second_user, 10_000_000)

    sessions = [await stripe_client.v1.checkout.sessions.retrieve_async(s["id"]) for s in (first, again, other)]
    assert sessions[0].customer == sessions[1].customer != sessions[2].customer
    customers = {c.id: metadata(c) for c in await customers_of(stripe_client)}
    assert customers == {sessions[0].customer: {"metergate_end_user": "u_1"}, sessions[2].customer: {"metergate_end_user": "u_2"}}


async def test_concurrent_first_top_ups_of_an_end_user_share_one_customer(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    user = await make_end_user("u_1", funds=0)

    started = await asyncio.gather(*(start_checkout(billing_gateway, user, 10_000_000 * n) for n in range(1, 6)))

    sessions = [await stripe_client.v1.checkout.sessions.retrieve_async(s["id"]) for s in started]
    assert len({s.id for s in sessions}) == 5
    [customer] = await customers_of(stripe_client)
    assert {s.customer for s in sessions} == {customer.id}
    assert metadata(customer) == {"metergate_end_user": "u_1"}
    assert await billing_gateway.payments.customer("u_1") == customer.id


# ------------------------------------------------------------------ amounts refused


@pytest.mark.parametrize("amount_micros", [4_990_000, 500_010_000, 20_000_001, 20_005_000],
                         ids=["below_minimum", "above_maximum", "not_whole_cents", "half_a_cent"])
async def test_top_up_amount_outside_the_rules_is_refused_before_stripe_is_asked(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient, amount_micros: int):
    user = await make_end_user("u_1", funds=0)
    log_offset = billing_gateway.fake.log_size()

    resp = await billing_gateway.client.post("/v1/wallet/checkout-sessions", headers=bearer(user),
                                             json={"amount_micros": amount_micros})

    assert resp.status == 400
    body = await resp.json()
    assert_openai_error(body, code="invalid_amount", param="amount_micros")
    assert body["error"]["type"] == "invalid_request_error"
    assert await customers_of(stripe_client) == []
    assert posts_to_stripe_api(billing_gateway.fake, log_offset) == []
    assert await billing_gateway.payments.customer("u_1") is None


# ------------------------------------------------------------------ operator and admin


async def test_operator_key_naming_a_user_starts_that_users_top_up(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    await make_end_user("u_1", funds=0)
    await make_end_user("u_2", funds=0)

    resp = await billing_gateway.client.post("/v1/wallet/checkout-sessions", headers=OPERATOR,
                                             json={"amount_micros": 30_000_000, "user": "u_2"})

    assert resp.status == 201, await resp.text()
    session = await stripe_client.v1.checkout.sessions.retrieve_async((await resp.json())["id"])
    assert metadata(session)["metergate_end_user"] == "u_2"
    assert metadata(session)["metergate_credit_micros"] == "30000000"
    assert session.customer == await billing_gateway.payments.customer("u_2")
    assert await billing_gateway.payments.customer("u_1") is None


async def test_admin_starts_a_top_up_for_an_end_user_with_its_own_return_urls(
        billing_gateway: BillingGateway, make_end_user: Any, stripe_client: stripe.StripeClient):
    await make_end_user("u_1", funds=0)
    success = "https://ops.example.test/paid?session={CHECKOUT_SESSION_ID}"

    resp = await billing_gateway.client.post("/admin/end-users/u_1/checkout-sessions", headers=ADMIN, json={
        "amount_micros": 40_000_000, "save_card": True, "success_url": success, "cancel_url": "https://ops.example.test/no"})

    assert resp.status == 201, await resp.text()
    started = await resp.json()
    assert (started["amount_micros"], started["currency"]) == (40_000_000, "usd")
    session = await stripe_client.v1.checkout.sessions.retrieve_async(started["id"])
    assert (session.success_url, session.cancel_url) == (success, "https://ops.example.test/no")
    assert (session.amount_total, session.customer) == (4000, await billing_gateway.payments.customer("u_1"))
    assert metadata(session)["metergate_end_user"] == "u_1"


async def test_admin_top_up_for_an_unknown_end_user_is_404_and_creates_nothing_in_stripe(
        billing_gateway: BillingGateway, stripe_client: stripe.StripeClient):
    log_offset = billing_gateway.fake.log_size()

    resp = await billing_gateway.client.post("/admin/end-users/nobody/checkout-sessions", headers=ADMIN,
                                             json={"amount_micros": 40_000_000})

    assert resp.status == 404
    assert_openai_error(await resp.json(), code="wallet_not_found")
    assert await customers_of(stripe_client) == []
    assert posts_to_stripe_api(billing_gateway.fake, log_offset) == []


async def test_top_up_options_are_the_configured_presets_and_bounds_in_micros(
        billing_gateway: BillingGateway, make_end_user: Any):
    user = await make_end_user("u_1", funds=0)

    resp = await billing_gateway.client.get("/v1/wallet/top-up-options", headers=bearer(user))

    assert resp.status == 200
    assert await resp.json() == {"currency": "usd", "presets_micros": [10_000_000, 25_000_000, 100_000_000],
                                 "minimum_micros": 5_000_000, "maximum_micros": 500_000_000}


# ------------------------------------------------------------------ without Stripe


STRIPE_ENDPOINTS = [
    ("POST", "/stripe/webhook", "signed"),
    ("POST", "/v1/wallet/checkout-sessions", "end_user"),
    ("GET", "/v1/wallet/top-up-options", "end_user"),
    ("GET", "/admin/end-users/u_1/auto-top-up", "admin"),
    ("PATCH", "/admin/end-users/u_1/auto-top-up", "admin"),
    ("POST", "/admin/end-users/u_1/checkout-sessions", "admin"),
    ("GET", "/admin/end-users/u_1/card-payments", "admin"),
    ("POST", "/admin/end-users/u_1/card-refunds", "admin"),
]


@pytest.mark.parametrize(("method", "path", "caller"), STRIPE_ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in STRIPE_ENDPOINTS])
async def test_without_a_stripe_block_every_stripe_endpoint_is_501(
        gateway: TestClient, make_end_user: Any, wallets: WalletStore, method: str, path: str, caller: str):
    user = await make_end_user("u_1", funds=10_000_000)
    body = {"amount_micros": 20_000_000, "payment_intent": "pi_1", "enabled": True}
    payload = b'{"id": "evt_1", "object": "event", "type": "payment_intent.succeeded", "data": {"object": {}}}'
    headers = {"signed": {"Stripe-Signature": sign_stripe_event(payload, WEBHOOK_SECRET), "Content-Type": "application/json"},
               "end_user": bearer(user), "admin": {**ADMIN, "Idempotency-Key": "k-1"}}[caller]

    if caller == "signed":
        resp = await gateway.request(method, path, headers=headers, data=payload)
    elif method == "GET":
        resp = await gateway.request(method, path, headers=headers)
    else:
        resp = await gateway.request(method, path, headers=headers, json=body)

    assert resp.status == 501
    found = await resp.json()
    assert_openai_error(found, code="stripe_not_configured")
    assert found["error"]["type"] == "not_implemented"
    wallet = await wallets.get("u_1")
    assert wallet is not None and wallet.balance_micros == 10_000_000


@pytest.mark.parametrize(("secret_key", "webhook_secret", "named"), [
    ("", "", ["$METERGATE_TEST_STRIPE_KEY", "$METERGATE_TEST_STRIPE_WEBHOOK_SECRET"]),
    ("", "whsec_x", ["$METERGATE_TEST_STRIPE_KEY"]),
    ("sk_test_x", "", ["$METERGATE_TEST_STRIPE_WEBHOOK_SECRET"]),
], ids=["both_empty", "secret_key_empty", "webhook_secret_empty"])
def test_startup_check_refuses_a_stripe_block_whose_secrets_are_empty(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], secret_key: str, webhook_secret: str,
        named: list[str]):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("METERGATE_TEST_STRIPE_KEY", secret_key)
    monkeypatch.setenv("METERGATE_TEST_STRIPE_WEBHOOK_SECRET", webhook_secret)
    config = load_config(environ={}, admin_keys=[ADMIN_KEY], stripe={
        "secret_key_env": "METERGATE_TEST_STRIPE_KEY", "webhook_secret_env": "METERGATE_TEST_STRIPE_WEBHOOK_SECRET"})

    assert _check_startup(config) == 1

    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("metergate: stripe: is configured but ")
    for env in ["$METERGATE_TEST_STRIPE_KEY", "$METERGATE_TEST_STRIPE_WEBHOOK_SECRET"]:
        assert (env in line) == (env in named), line
    assert "not set" in line and "remove the stripe: block" in line


def test_startup_check_accepts_a_stripe_block_with_both_secrets_set(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("METERGATE_TEST_STRIPE_KEY", "sk_test_x")
    monkeypatch.setenv("METERGATE_TEST_STRIPE_WEBHOOK_SECRET", "whsec_x")
    config = load_config(environ={}, admin_keys=[ADMIN_KEY], stripe={
        "secret_key_env": "METERGATE_TEST_STRIPE_KEY", "webhook_secret_env": "METERGATE_TEST_STRIPE_WEBHOOK_SECRET"})

    assert _check_startup(config) is None
    assert "stripe" not in capsys.readouterr().err


async def test_a_wallet_in_another_asset_cannot_be_topped_up_by_card(billing_gateway: BillingGateway, make_end_user: Any):
    # A credits wallet is the operator's to fund (top-ups, grants): a card pays in the Stripe currency.
    user = await make_end_user("u_1", funds=0, asset="credits")
    resp = await billing_gateway.client.post("/v1/wallet/checkout-sessions", json={"amount_micros": 25_000_000},
                                             headers=bearer(user))
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "asset_not_purchasable"
    assert await billing_gateway.payments.customer("u_1") is None


async def test_a_test_end_users_wallet_is_not_bought_by_card_with_a_live_stripe_key(
        billing_gateway: BillingGateway, make_end_user: Any, monkeypatch: pytest.MonkeyPatch):
    # Its entries are simulated (left out of the money report): real money must not land there.
    monkeypatch.setenv(STRIPE_KEY_ENV, "sk_live_metergate_fake")
    user = await make_end_user("u_1", funds=0, livemode=False)
    resp = await billing_gateway.client.post("/v1/wallet/checkout-sessions", json={"amount_micros": 25_000_000},
                                             headers=bearer(user))
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "livemode_mismatch"
    assert await billing_gateway.payments.customer("u_1") is None
