"""Auto top-up: a capture that leaves a wallet below its threshold charges the saved card off-session, once.

What is tested here: the claim in the settle script (at most one attempt in flight per wallet, across replicas and
under 50 concurrent settles), the attempt's outcome written back (a success credits once, however many reports of it
arrive; declines and off-session authentication count as failures, the configured number in a row turn the rule off;
Stripe not answering does not count), the retry backoff, the tier's default rule when a card is saved, and the
operator's GET/PATCH of the rule.

Saved cards: where the test is about a card saved the way an end user saves one (the tier's rule, the 50 settles,
a card needing authentication: Checkout's page passes 3-D Secure, an off-session charge cannot), it goes through
Checkout and waits for the webhook. A card that declines (…0341) is declined by Checkout's page too, as Stripe's would
be, so it cannot be saved that way; it, and the good card of tests not about saving, is created and attached to the
wallet's Stripe customer with the `stripe` client, then made the wallet's card through `PaymentStore.set_rule`
(`card_saved=True`), which is what a paid Checkout with save_card does.

Money: every amount is exact micros; the store's invariants are audited after every test (the `redis` fixture) and
at the end of the money tests.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
import pytest
import stripe

from proxy.appstate import BACKGROUND, CONFIG, STRIPE_EVENTS, WALLETS
from proxy.billing.webhook import Applied
from proxy.store import WalletStore
from proxy.store.payments import AutoTopUpRule, PaymentStore
from tests.billing.conftest import BillingGateway, FakeStripe
from tests.conftest import ADMIN, EndUser, assert_ledger_invariants
from tests.mock_upstream import MockUpstream, make_usage

T = TypeVar("T")

USD = 1_000_000
THRESHOLD = 5 * USD
AMOUNT = 20 * USD
PAYS = "4242424242424242"
DECLINES = "4000000000000341"  # attaches; every charge is declined (card_declined)
NEEDS_AUTH = "4000002500003155"  # Checkout passes 3-D Secure; an off-session charge is left requires_action
DEADLINE_SECONDS = 15  # only so that a missing webhook fails the test instead of hanging it

AUTO_TOP_UP_DEFAULTS = {
    "default": {"enabled": True, "threshold": 5, "amount": 20},
    "manual": {"enabled": False, "threshold": 7, "amount": 30},  # a tier whose saved cards do not top up by themselves
}


@pytest.fixture
def stripe_overrides() -> dict[str, Any]:
    # Backoff 0: a failed attempt frees the claim at once, so one test can make several attempts in a row.
    return {"auto_top_up": AUTO_TOP_UP_DEFAULTS, "auto_top_up_retry_after_seconds": 0}


# ------------------------------------------------------------------ helpers


async def eventually(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str) -> T:
    """`probe()` once `done` holds of it (webhooks arrive asynchronously); fails after DEADLINE_SECONDS."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        found = await probe()
        if done(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what}; last seen: {found!r}")
        await asyncio.sleep(0.05)


async def drain(gw: BillingGateway) -> None:
    """Wait for every background task, including those spawned while waiting (a close can start an attempt)."""
    while gw.app[BACKGROUND].tasks:
        await gw.drain()


async def save_card_by_checkout(gw: BillingGateway, user: EndUser, card: str = PAYS, amount_micros: int = 5 * USD) -> AutoTopUpRule:
    """The end user buys `amount_micros` through Checkout with save_card; the rule once the webhook saved the card."""
    response = await gw.client.post("/v1/wallet/checkout-sessions", json={"amount_micros": amount_micros, "save_card": True},
                                    headers={"Authorization": f"Bearer {user.key}"})
    assert response.status == 201, await response.text()
    session = await response.json()
    await gw.fake.pay_checkout(session["id"], card)
    return await eventually(lambda: gw.payments.rule(user.id), lambda rule: rule.payment_method is not None, "the saved card")


async def attach_card(client: stripe.StripeClient, customer: str, number: str) -> str:
    method = await client.v1.payment_methods.create_async(
        params={"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2040, "cvc": "123"}})
    await client.v1.payment_methods.attach_async(method.id, params={"customer": customer})
    return method.id


async def save_card_in_store(gw: BillingGateway, client: stripe.StripeClient, wallet_id: str, number: str) -> str:
    """Make `number` the wallet's saved card as a Checkout with save_card would (the tier's rule if none is set);
    the payment method's id. For cards Checkout itself refuses (see the module docstring)."""
    billing = gw.app[STRIPE_EVENTS].billing
    customer = await billing.customer_for(wallet_id)
    method = await attach_card(client, customer, number)
    await gw.payments.set_rule(wallet_id, card_saved=True, enabled=True, threshold_micros=THRESHOLD, amount_micros=AMOUNT,
                               payment_method=method, card=f"visa •••• {number[-4:]}", customer=customer)
    return method


async def settle_once(wallets: WalletStore, wallet_id: str, amount_micros: int, *, hold_micros: int = 10_000) -> int:
    """One call's capture of `amount_micros` (more than its small hold); the auto top-up attempt it claimed (0: none)."""
    hold = await wallets.hold(wallet_id, hold_micros)
    settlement = await wallets.settle(wallet_id, hold.hold_id, amount_micros)
    return settlement.auto_top_up_attempt


async def auto_top_up_intents(fake: FakeStripe, customer: str | None) -> list[dict[str, Any]]:
    assert customer, "the wallet has no Stripe customer"
    return [i for i in await fake.payment_intents(customer) if i["metadata"].get("metergate_kind") == "auto_top_up"]


async def top_ups_of(wallets: WalletStore, wallet_id: str, payment_intent: str) -> list[Any]:
    return [e for e in await wallets.ledger(wallet_id, limit=500) if e.type == "top_up" and e.details.get("reference") == payment_intent]


async def admin_rule(gw: BillingGateway, wallet_id: str) -> dict[str, Any]:
    response = await gw.client.get(f"/admin/end-users/{wallet_id}/auto-top-up", headers=ADMIN)
    assert response.status == 200, await response.text()
    return await response.json()


@dataclass
class Claims:
    """What a WalletStore's hook was told: (wallet, attempt), in order."""

    seen: list[tuple[str, int]]

    def __call__(self, wallet_id: str, attempt: int) -> None:
        self.seen.append((wallet_id, attempt))


def record_claims(wallets: WalletStore) -> Claims:
    """Record every claim the store hands its hook, then hand it on (the app's hook still starts the attempt)."""
    claims, app_hook = Claims([]), wallets.auto_top_up_claimed

    def hook(wallet_id: str, attempt: int) -> None:
        claims(wallet_id, attempt)
        if app_hook is not None:
            app_hook(wallet_id, attempt)

    wallets.auto_top_up_claimed = hook
    return claims


@pytest.fixture
def applied_events(billing_gateway: BillingGateway) -> list[tuple[dict[str, Any], Applied]]:
    """Every webhook event the app applied, with its outcome (the app's StripeEvents.apply, recorded)."""
    events = billing_gateway.app[STRIPE_EVENTS]
    original = events.apply
    seen: list[tuple[dict[str, Any], Applied]] = []

    async def apply(event: dict[str, Any]) -> Applied:
        applied = await original(event)
        seen.append((event, applied))
        return applied

    events.apply = apply
    return seen


async def declined_attempts(gw: BillingGateway, wallet_id: str, times: int) -> None:
    """`times` low settles, each claiming an attempt that the saved card declines (backoff 0, drained in between)."""
    for _ in range(times):
        assert await settle_once(gw.wallets, wallet_id, 100_000) > 0
        await drain(gw)


# ------------------------------------------------------------------ the claim, in the store


@pytest.fixture
def claims(wallets: WalletStore) -> Claims:
    found = Claims([])
    wallets.auto_top_up_claimed = found
    return found


async def enable_rule(redis: Any, wallet_id: str) -> None:
    # Made-up Stripe ids: the store never calls Stripe; it only needs a saved card to enable the rule.
    await PaymentStore(redis).set_rule(wallet_id, card_saved=True, enabled=True, threshold_micros=THRESHOLD, amount_micros=AMOUNT,
                                       payment_method="pm_store_only", customer="cus_store_only")


async def test_settle_that_stays_above_the_threshold_claims_nothing(redis, wallets, make_end_user, claims):
    await make_end_user("u_1", funds=10 * USD)
    await enable_rule(redis, "u_1")

    # 10 - 5 = 5 USD available: exactly the threshold is not below it.
    attempt = await settle_once(wallets, "u_1", 5 * USD)

    assert attempt == 0
    assert claims.seen == []
    assert (await PaymentStore(redis).rule("u_1")).attempts == 0


async def test_settle_below_the_threshold_claims_an_attempt_and_its_replay_claims_no_other(redis, wallets, make_end_user, claims):
    await make_end_user("u_1", funds=10 * USD)
    await enable_rule(redis, "u_1")
    hold = await wallets.hold("u_1", 10_000)

    first = await wallets.settle("u_1", hold.hold_id, 5 * USD + 1)
    again = await wallets.settle("u_1", hold.hold_id, 5 * USD + 1)

    assert first.auto_top_up_attempt == 1 and not first.replayed
    assert again.replayed and again.auto_top_up_attempt == first.auto_top_up_attempt
    # The replay hands the same attempt on again (its first answer may have been lost); no new attempt is counted.
    assert claims.seen == [("u_1", 1), ("u_1", 1)]
    rule = await PaymentStore(redis).rule("u_1")
    assert rule.attempts == 1 and rule.blocked_until_ms > int(time.time() * 1000)
    assert (await wallets.get("u_1")).balance_micros == 5 * USD - 1


async def test_claim_in_flight_blocks_the_next_low_settle(redis, wallets, make_end_user, claims):
    await make_end_user("u_1", funds=10 * USD)
    await enable_rule(redis, "u_1")

    first = await settle_once(wallets, "u_1", 6 * USD)
    second = await settle_once(wallets, "u_1", 1 * USD)

    assert (first, second) == (1, 0)
    assert claims.seen == [("u_1", 1)]


async def test_operator_changing_an_enabled_rule_does_not_free_the_claim_of_an_attempt_in_flight(redis, wallets, make_end_user, claims):
    await make_end_user("u_1", funds=10 * USD)
    await enable_rule(redis, "u_1")
    assert await settle_once(wallets, "u_1", 6 * USD) == 1  # attempt 1 claimed; nothing has finished it

    # What PATCH /admin/end-users/u_1/auto-top-up {"amount_micros": 30000000} does (the rule stays on).
    await PaymentStore(redis).set_rule("u_1", enabled=True, threshold_micros=THRESHOLD, amount_micros=30 * USD)
    attempt = await settle_once(wallets, "u_1", 1 * USD)

    # A second attempt now would charge the card beside the first one.
    assert attempt == 0
    assert claims.seen == [("u_1", 1)]


# ------------------------------------------------------------------ one attempt, however many settles


async def test_fifty_concurrent_settles_crossing_the_threshold_start_exactly_one_auto_top_up(billing_gateway, make_end_user):
    gw = billing_gateway
    user = await make_end_user("u_1", funds=10 * USD)
    rule = await save_card_by_checkout(gw, user)
    assert rule.enabled and (rule.threshold_micros, rule.amount_micros) == (THRESHOLD, AMOUNT)
    start = (await gw.wallets.get("u_1")).balance_micros
    assert start == 15 * USD
    holds = [await gw.wallets.hold("u_1", 10_000) for _ in range(50)]

    # Each capture takes 210,000 micros (more than its hold): 10.5 USD in all, from 14.5 USD available to 4.5 USD.
    settlements = await asyncio.gather(*(gw.wallets.settle("u_1", h.hold_id, 210_000) for h in holds))
    await drain(gw)

    assert [s.auto_top_up_attempt for s in settlements if s.auto_top_up_attempt] == [1]
    intents = await auto_top_up_intents(gw.fake, rule.customer)
    assert len(intents) == 1
    intent = intents[0]
    assert (intent["status"], intent["amount"], intent["metadata"]["metergate_attempt"]) == ("succeeded", 2000, "1")
    wallet = await gw.wallets.get("u_1")
    assert (wallet.balance_micros, wallet.held_micros) == (start + AMOUNT - 50 * 210_000, 0)
    assert [e.amount_micros for e in await top_ups_of(gw.wallets, "u_1", intent["id"])] == [AMOUNT]
    after = await gw.payments.rule("u_1")
    assert (after.attempts, after.consecutive_failures, after.blocked_until_ms) == (1, 0, 0)
    await assert_ledger_invariants(gw.wallets)


async def test_fifty_concurrent_metered_calls_crossing_the_threshold_start_exactly_one_auto_top_up(
        billing_gateway, make_end_user, stripe_client, mock_upstream: MockUpstream):
    gw = billing_gateway
    user = await make_end_user("u_1", funds=7 * USD)
    await save_card_in_store(gw, stripe_client, "u_1", PAYS)
    # gpt-4o-mini (config/ratecards/default.yaml): 100,000 x 0.1875 + 50,000 x 0.75 = 56,250 micros a call.
    mock_upstream.usage_override = make_usage(100_000, 50_000)
    client = openai.AsyncOpenAI(base_url=str(gw.client.make_url("/v1")), api_key=user.key, max_retries=0)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}

    await asyncio.gather(*(client.chat.completions.create(**chat) for _ in range(50)))
    await drain(gw)

    # 7 USD - 50 x 56,250 = 4.1875 USD: below 5 USD once, somewhere among the 50 settles.
    intents = await auto_top_up_intents(gw.fake, await gw.payments.customer("u_1"))
    assert [(i["status"], i["metadata"]["metergate_attempt"]) for i in intents] == [("succeeded", "1")]
    assert (await gw.wallets.get("u_1")).balance_micros == 7 * USD + AMOUNT - 50 * 56_250
    assert len(await top_ups_of(gw.wallets, "u_1", intents[0]["id"])) == 1
    assert (await gw.payments.rule("u_1")).attempts == 1
    await assert_ledger_invariants(gw.wallets)


@pytest.fixture
async def second_replica(aiohttp_client, billing_gateway: BillingGateway) -> AsyncIterator[BillingGateway]:
    """Another metergate on the same Redis and config, with its own store, hook and background tasks."""
    from proxy.app import create_app

    app = create_app(billing_gateway.app[CONFIG])
    client = await aiohttp_client(app)
    yield BillingGateway(client=client, app=app, fake=billing_gateway.fake, webhook_url=billing_gateway.webhook_url)


async def test_settles_on_two_replicas_start_exactly_one_auto_top_up(billing_gateway, second_replica, make_end_user, stripe_client):
    replicas = [billing_gateway, second_replica]
    assert replicas[0].app[WALLETS] is not replicas[1].app[WALLETS]
    await make_end_user("u_1", funds=15 * USD)
    await save_card_in_store(billing_gateway, stripe_client, "u_1", PAYS)
    claims = [record_claims(gw.wallets) for gw in replicas]
    holds = [(gw, await gw.wallets.hold("u_1", 10_000)) for _ in range(25) for gw in replicas]

    await asyncio.gather(*(gw.wallets.settle("u_1", h.hold_id, 210_000) for gw, h in holds))
    for gw in replicas:
        await drain(gw)

    assert sorted(claims[0].seen + claims[1].seen) == [("u_1", 1)]
    intents = await auto_top_up_intents(billing_gateway.fake, await billing_gateway.payments.customer("u_1"))
    assert [i["status"] for i in intents] == ["succeeded"]
    assert (await billing_gateway.wallets.get("u_1")).balance_micros == 15 * USD + AMOUNT - 50 * 210_000
    await assert_ledger_invariants(billing_gateway.wallets)


# ------------------------------------------------------------------ a success


async def test_payment_succeeded_webhook_after_an_auto_top_up_credits_nothing_more(billing_gateway, make_end_user, stripe_client,
                                                                                  applied_events):
    gw = billing_gateway
    await make_end_user("u_1", funds=6 * USD)
    await save_card_in_store(gw, stripe_client, "u_1", PAYS)
    assert await settle_once(gw.wallets, "u_1", 2 * USD) == 1
    await drain(gw)
    [intent] = await auto_top_up_intents(gw.fake, await gw.payments.customer("u_1"))
    credited = (await gw.wallets.get("u_1")).balance_micros
    assert credited == 6 * USD - 2 * USD + AMOUNT

    def webhook_seen(seen: list[tuple[dict[str, Any], Applied]]) -> bool:
        return any(e["type"] == "payment_intent.succeeded" and e["data"]["object"]["id"] == intent["id"] for e, _ in seen)

    async def probe() -> list[tuple[dict[str, Any], Applied]]:
        return list(applied_events)

    seen = await eventually(probe, webhook_seen, f"payment_intent.succeeded for {intent['id']}")

    assert [a.outcome for e, a in seen if e["type"] == "payment_intent.succeeded"] == ["applied"]
    assert (await gw.wallets.get("u_1")).balance_micros == credited
    assert len(await top_ups_of(gw.wallets, "u_1", intent["id"])) == 1
    assert [(p.payment_intent, p.credited_micros) for p in await gw.payments.card_payments("u_1")] == [(intent["id"], AMOUNT)]
    await assert_ledger_invariants(gw.wallets)


# ------------------------------------------------------------------ failures


async def test_three_declines_in_a_row_turn_auto_top_up_off(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=4 * USD)
    await save_card_in_store(gw, stripe_client, "u_1", DECLINES)

    await declined_attempts(gw, "u_1", 3)

    rule = await gw.payments.rule("u_1")
    assert (rule.enabled, rule.consecutive_failures, rule.attempts) == (False, 3, 3)
    assert rule.disabled_reason and "card_declined" in rule.disabled_reason
    [note] = [e for e in await gw.wallets.ledger("u_1", limit=100) if e.type == "auto_top_up_disabled"]
    assert note.amount_micros == 0 and note.details["reason"] == rule.disabled_reason
    assert len(await auto_top_up_intents(gw.fake, rule.customer)) == 3
    # Off: the next low settle claims nothing, and Stripe is not asked again.
    assert await settle_once(gw.wallets, "u_1", 100_000) == 0
    await drain(gw)
    assert len(await auto_top_up_intents(gw.fake, rule.customer)) == 3
    assert (await gw.wallets.get("u_1")).balance_micros == 4 * USD - 4 * 100_000
    await assert_ledger_invariants(gw.wallets)


async def test_operator_sees_auto_top_up_turned_off_and_reenables_it(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=4 * USD)
    await save_card_in_store(gw, stripe_client, "u_1", DECLINES)
    await declined_attempts(gw, "u_1", 3)

    shown = await admin_rule(gw, "u_1")
    response = await gw.client.patch("/admin/end-users/u_1/auto-top-up", json={"enabled": True}, headers=ADMIN)

    assert (shown["enabled"], shown["consecutive_failures"], shown["card"]) == (False, 3, "visa •••• 0341")
    assert "3 consecutive auto top-up failures" in shown["disabled_reason"]
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (body["enabled"], body["consecutive_failures"], body["disabled_reason"]) == (True, 0, None)
    assert (body["threshold_micros"], body["amount_micros"]) == (THRESHOLD, AMOUNT)
    assert await admin_rule(gw, "u_1") == body
    # On again: the next low settle claims the next attempt.
    assert await settle_once(gw.wallets, "u_1", 100_000) == 4
    await drain(gw)


async def test_enabling_auto_top_up_without_a_saved_card_is_refused(billing_gateway, make_end_user):
    gw = billing_gateway
    await make_end_user("u_1", funds=4 * USD)

    response = await gw.client.patch("/admin/end-users/u_1/auto-top-up", json={"enabled": True}, headers=ADMIN)

    assert response.status == 400
    assert (await response.json())["error"]["code"] == "no_payment_method"
    rule = await gw.payments.rule("u_1")
    assert not rule.enabled and not rule.configured
    assert await settle_once(gw.wallets, "u_1", 100_000) == 0


async def test_success_after_declines_resets_the_failure_count(billing_gateway, make_end_user, stripe_client):
    gw = billing_gateway
    await make_end_user("u_1", funds=4 * USD)
    await save_card_in_store(gw, stripe_client, "u_1", DECLINES)
    await declined_attempts(gw, "u_1", 2)
    assert (await gw.payments.rule("u_1")).consecutive_failures == 2

    # The end user saves a card that pays; the rule (still on) is kept.
    good = await save_card_in_store(gw, stripe_client, "u_1", PAYS)
    assert await settle_once(gw.wallets, "u_1", 100_000) == 3
    await drain(gw)

    rule = await gw.payments.rule("u_1")
    assert (rule.enabled, rule.consecutive_failures, rule.payment_method, rule.last_error) == (True, 0, good, None)
    intents = await auto_top_up_intents(gw.fake, rule.customer)
    assert sorted(i["status"] for i in intents) == ["requires_payment_method"] * 2 + ["succeeded"]
    assert (await gw.wallets.get("u_1")).balance_micros == 4 * USD - 3 * 100_000 + AMOUNT
    await assert_ledger_invariants(gw.wallets)


async def test_card_needing_authentication_off_session_counts_as_a_failure(billing_gateway, make_end_user):
    gw = billing_gateway
    user = await make_end_user("u_1", funds=0)
    saved = await save_card_by_checkout(gw, user, NEEDS_AUTH)  # Checkout's page passes 3-D Secure; 5 USD credited
    assert saved.enabled

    assert await settle_once(gw.wallets, "u_1", 1 * USD) == 1
    await drain(gw)

    rule = await gw.payments.rule("u_1")
    assert (rule.enabled, rule.consecutive_failures) == (True, 1)
    assert rule.last_error and "authentication_required" in rule.last_error
    [intent] = await auto_top_up_intents(gw.fake, rule.customer)
    assert intent["status"] == "requires_action"
    assert (await gw.wallets.get("u_1")).balance_micros == 5 * USD - 1 * USD
    await assert_ledger_invariants(gw.wallets)


class TestRetryBackoff:
    @pytest.fixture
    def stripe_overrides(self) -> dict[str, Any]:
        return {"auto_top_up": AUTO_TOP_UP_DEFAULTS, "auto_top_up_retry_after_seconds": 3600}

    async def test_failed_attempt_blocks_the_next_claim_until_the_backoff_ends(self, billing_gateway, make_end_user, stripe_client):
        gw = billing_gateway
        await make_end_user("u_1", funds=4 * USD)
        await save_card_in_store(gw, stripe_client, "u_1", DECLINES)
        await declined_attempts(gw, "u_1", 1)

        attempt = await settle_once(gw.wallets, "u_1", 100_000)
        await drain(gw)

        assert attempt == 0
        rule = await gw.payments.rule("u_1")
        assert (rule.enabled, rule.consecutive_failures, rule.attempts) == (True, 1, 1)
        assert rule.blocked_until_ms > (time.time() + 3000) * 1000
        assert len(await auto_top_up_intents(gw.fake, rule.customer)) == 1


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port bound but never listening: a connection to it is refused, and nothing else can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


class TestStripeUnreachable:
    @pytest.fixture
    def stripe_overrides(self, closed_port: int) -> dict[str, Any]:
        return {"auto_top_up": AUTO_TOP_UP_DEFAULTS, "auto_top_up_retry_after_seconds": 0,
                "api_base": f"http://127.0.0.1:{closed_port}"}

    async def test_stripe_not_answering_is_not_a_card_failure_and_frees_the_claim(self, billing_gateway, redis, make_end_user):
        gw = billing_gateway
        await make_end_user("u_1", funds=4 * USD)
        await enable_rule(redis, "u_1")  # Stripe cannot be reached to make real ids; the store does not need them

        first = await settle_once(gw.wallets, "u_1", 100_000)
        await drain(gw)
        after_first = await gw.payments.rule("u_1")
        second = await settle_once(gw.wallets, "u_1", 100_000)
        await drain(gw)

        assert (first, second) == (1, 2)
        assert (after_first.enabled, after_first.consecutive_failures) == (True, 0)
        assert after_first.last_error and "Stripe unavailable" in after_first.last_error
        rule = await gw.payments.rule("u_1")
        assert (rule.enabled, rule.consecutive_failures, rule.disabled_reason) == (True, 0, None)
        assert (await gw.wallets.get("u_1")).balance_micros == 4 * USD - 2 * 100_000


# ------------------------------------------------------------------ the tier's default rule


async def test_card_saved_on_a_tier_with_auto_top_up_on_turns_it_on(billing_gateway, make_end_user):
    gw = billing_gateway
    user = await make_end_user("u_1", funds=0)

    rule = await save_card_by_checkout(gw, user)

    assert (rule.enabled, rule.threshold_micros, rule.amount_micros) == (True, THRESHOLD, AMOUNT)
    assert rule.card == "visa •••• 4242" and rule.customer
    # On: a low settle claims an attempt.
    assert await settle_once(gw.wallets, "u_1", 1 * USD) == 1
    await drain(gw)


async def test_card_saved_on_a_tier_with_auto_top_up_off_stores_the_rule_off(billing_gateway, make_end_user):
    gw = billing_gateway
    user = await make_end_user("u_1", funds=0, tier="manual")

    rule = await save_card_by_checkout(gw, user)

    assert (rule.enabled, rule.configured, rule.threshold_micros, rule.amount_micros) == (False, True, 7 * USD, 30 * USD)
    assert rule.payment_method
    assert await settle_once(gw.wallets, "u_1", 1 * USD) == 0
    assert (await gw.payments.rule("u_1")).attempts == 0
