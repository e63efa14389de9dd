"""A real headless Chromium starts a card top-up with examples/browser/top-up.html, pays on the fake Stripe's page and
comes back; the wallet is credited once by Stripe's webhooks, and the card is saved.

metergate runs with a `stripe:` block pointed at the fake Stripe (tests/fake_stripe.py, localstripe in a subprocess),
whose webhooks are registered at metergate's /stripe/webhook, and with `success_url` on the page's own origin.

The fake comes from tests/billing/conftest.py: pytest loads that conftest only for tests under tests/billing, so its
`fake_stripe` fixture (started once, in a subprocess) and `_flush_fake_stripe` (autouse: a flushed fake for every
test that uses it) are imported here, which makes pytest register them for this module too. Nothing is copied or
moved; in a full run this module gets its own fake process, as a module-level definition of a session fixture does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import pytest

from proxy.app import create_app
from proxy.appstate import BILLING, WALLETS
from proxy.config import load_config
from proxy.store import WalletStore
from proxy.store.payments import CardPayment, PaymentStore
from tests.billing import conftest as billing
from tests.billing.conftest import WEBHOOK_SECRET, WEBHOOK_SECRET_ENV, FakeStripe, stripe_block
from tests.conftest import ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV, assert_ledger_invariants

fake_stripe = billing.fake_stripe
_flush_fake_stripe = billing._flush_fake_stripe

T = TypeVar("T")
TWENTY_USD = 20_000_000
PRESETS_SHOWN = ["$20.00", "$50.00", "$200.00", "$500.00"]  # the default presets (20, 50, 200, 500 USD), en-US
CARD = "4242424242424242"
WAIT_SECONDS = 20  # localstripe delivers its webhooks ~1 s after the event; this is only a deadline


@dataclass
class TopUpGateway:
    """metergate with Stripe, as the page sees it (`base`) and as the test checks it (the app's stores)."""

    base: str
    wallets: WalletStore
    payments: PaymentStore
    fake: FakeStripe
    success_url: str


@pytest.fixture
async def metergate(aiohttp_server, pages, redis_server, redis, mock_upstream, fake_stripe: FakeStripe, monkeypatch) -> TopUpGateway:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    monkeypatch.setenv(billing.STRIPE_KEY_ENV, fake_stripe.api_key)
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, WEBHOOK_SECRET)
    # Stripe sends the buyer back to the page that started the top-up (it fills {CHECKOUT_SESSION_ID}).
    success_url = f"{pages[0]}/top-up.html?session_id={{CHECKOUT_SESSION_ID}}"
    config = load_config(
        redis_url=redis_server.url, admin_keys=[ADMIN_KEY], operator_keys=[OPERATOR_KEY], cors_origins=[pages[0]],
        upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV}},
        stripe=stripe_block(fake_stripe, success_url=success_url, cancel_url=f"{pages[0]}/top-up.html"),
    )
    app = create_app(config)
    server = await aiohttp_server(app, host="127.0.0.1")
    fake_stripe.register_webhook(f"http://127.0.0.1:{server.port}/stripe/webhook", WEBHOOK_SECRET)
    return TopUpGateway(base=f"http://127.0.0.1:{server.port}/v1", wallets=app[WALLETS], payments=app[BILLING].payments,
                        fake=fake_stripe, success_url=success_url)


# ------------------------------------------------------------------ helpers


async def run(fn: Callable[..., T], *args: Any) -> T:
    """A blocking Selenium call, off the event loop that serves metergate and the pages."""
    return await asyncio.to_thread(fn, *args)


async def poll(what: str, check: Callable[[], Awaitable[T | None]], fake: FakeStripe, since: int) -> T:
    """`check()`'s first truthy answer before the deadline; else fail, with what the fake logged meanwhile."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.1)
    logged = "\n".join(line for line in fake.log_since(since).splitlines() if "GET /v1/events" not in line)  # not our polling
    raise AssertionError(f"{what} within {WAIT_SECONDS} s; the fake Stripe logged:\n{logged}")


async def page_state(browser: Any) -> dict[str, Any] | None:
    return await run(browser.execute_script, "return window.metergateTopUp || null;")


async def open_page(browser: Any, origin: str, gateway: TopUpGateway, key: str, since: int) -> dict[str, Any]:
    """Load top-up.html with the settings in its fragment; its state once the options were read or refused."""
    await run(browser.get, f"{origin}/top-up.html#base={gateway.base}&key={key}")

    async def settled() -> dict[str, Any] | None:
        state = await page_state(browser)
        return state if state and (state["options"] or state["error"]) else None

    return await poll("the page did not load its top-up options nor show an error", settled, gateway.fake, since)


async def fake_get(fake: FakeStripe, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {fake.api_key}"}) as http, \
            http.get(f"{fake.url}{path}") as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def events_applied(gateway: TopUpGateway, types: set[str]) -> list[dict[str, Any]] | None:
    """The fake's events of `types`, once there is one of each and metergate has applied every one; else None."""
    events = [e for e in (await fake_get(gateway.fake, "/v1/events?limit=100"))["data"] if e["type"] in types]
    if {e["type"] for e in events} != types:
        return None
    for event in events:
        if not await gateway.payments.event_applied(event["id"]):
            return None
    return events


# ------------------------------------------------------------------ tests


async def test_page_tops_up_twenty_usd_through_checkout_and_saves_the_card(browser, pages, metergate: TopUpGateway, make_end_user):
    from selenium.webdriver.common.by import By

    user = await make_end_user(funds=0)
    since = metergate.fake.log_size()
    state = await open_page(browser, pages[0], metergate, user.key, since)
    assert state["error"] is None, state["error"]
    assert state["options"]["currency"] == "usd"
    buttons = await run(browser.find_elements, By.CSS_SELECTOR, "#presets button")
    assert [b.text for b in buttons] == PRESETS_SHOWN

    save_card = await run(browser.find_element, By.ID, "save-card")
    assert not save_card.is_selected()  # saving a card is the buyer's choice, never the default
    await run(save_card.click)
    await run(next(b for b in buttons if b.text == "$20.00").click)

    # Stripe's hosted page (the fake's one-field form) for this wallet's 20 USD.
    checkout_prefix = f"{metergate.fake.url}/_test/checkout/"

    async def on_checkout() -> str | None:
        url: str = await run(lambda: browser.current_url)
        return url if url.startswith(checkout_prefix) else None

    session_id = (await poll("the page did not go to the Checkout page", on_checkout, metergate.fake, since))[len(checkout_prefix):]
    assert await run(lambda: browser.find_element(By.TAG_NAME, "h1").text) == "Pay 20.00 USD"
    card = await run(browser.find_element, By.NAME, "card_number")
    await run(card.clear)
    await run(card.send_keys, CARD)
    await run(lambda: browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click())

    back = metergate.success_url.replace("{CHECKOUT_SESSION_ID}", session_id)

    async def returned() -> str | None:
        url: str = await run(lambda: browser.current_url)
        return url if url == back else None

    await poll("the browser did not come back to success_url", returned, metergate.fake, since)
    assert session_id in await run(lambda: browser.find_element(By.ID, "returned").text)

    # Both reports of the payment (the session's and the PaymentIntent's) reached metergate; it credited once.
    events = await poll("metergate did not apply both payment events", lambda: events_applied(
        metergate, {"checkout.session.completed", "payment_intent.succeeded"}), metergate.fake, since)
    intent = next(e["data"]["object"] for e in events if e["type"] == "payment_intent.succeeded")
    assert next(e["data"]["object"] for e in events if e["type"] == "checkout.session.completed")["id"] == session_id
    wallet = await metergate.wallets.get(user.id)
    assert wallet is not None and wallet.balance_micros == TWENTY_USD
    credits = [e for e in await metergate.wallets.ledger(user.id) if e.details.get("source") == "stripe"]
    assert [(c.type, c.amount_micros, c.details["reference"]) for c in credits] == [("top_up", TWENTY_USD, intent["id"])]
    assert await metergate.payments.card_payments(user.id) == [CardPayment(intent["id"], TWENTY_USD, 0)]

    # The card is saved: it is the payment's card, on the wallet's customer.
    rule = await poll("the card was not saved", lambda: _saved_rule(metergate.payments, user.id), metergate.fake, since)
    assert rule.payment_method == intent["payment_method"]
    assert rule.customer == intent["customer"] == await metergate.payments.customer(user.id)
    assert rule.card and rule.card.endswith("4242")
    assert "POST /v1/checkout/sessions" in metergate.fake.log_since(since)  # what the unlisted-origin test looks for
    await assert_ledger_invariants(metergate.wallets)


async def _saved_rule(payments: PaymentStore, wallet_id: str) -> Any:
    rule = await payments.rule(wallet_id)
    return rule if rule.payment_method else None


async def test_page_from_an_unlisted_origin_cannot_start_a_checkout(browser, pages, metergate: TopUpGateway, make_end_user):
    from selenium.webdriver.common.by import By

    user = await make_end_user(funds=0)
    since = metergate.fake.log_size()
    page = f"{pages[1]}/top-up.html"
    state = await open_page(browser, pages[1], metergate, user.key, since)
    # The browser refused to read the options (metergate's preflight answer has no CORS header): no amounts to click.
    assert state["options"] is None and "cors_origins" in state["error"]
    assert await run(browser.find_elements, By.CSS_SELECTOR, "#presets button") == []

    # Asked directly (as a script on that origin could), the page still cannot start one.
    state = await run(browser.execute_async_script,
                      "const done = arguments[arguments.length - 1];"
                      "window.metergateTopUp.error = null;"
                      "window.metergateTopUp.start(20000000, true).then(() => done(window.metergateTopUp));")
    assert state["session"] is None and "cors_origins" in state["error"]
    assert "cors_origins" in await run(lambda: browser.find_element(By.ID, "status").text)
    assert (await run(lambda: browser.current_url)).startswith(page)  # never left for a payment page

    # Nothing was created in Stripe: no customer, no Checkout Session, not even an attempt.
    assert (await fake_get(metergate.fake, "/v1/customers"))["data"] == []
    calls = metergate.fake.log_since(since)
    assert "POST /v1/customers" not in calls and "POST /v1/checkout/sessions" not in calls, calls
    assert await metergate.payments.customer(user.id) is None
    wallet = await metergate.wallets.get(user.id)
    assert wallet is not None and wallet.balance_micros == 0
