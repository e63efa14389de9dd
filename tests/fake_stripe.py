"""The tests' fake Stripe: localstripe run as a server, plus what metergate needs from Stripe and localstripe lacks.

localstripe (GPL) is imported and run, never copied: its objects, store, webhook registry and webhook signing are
reused as they are, and a few of its classes are patched in `install()` (each patch says why). This module owns:

- Checkout Sessions (`POST /v1/checkout/sessions`, `GET /v1/checkout/sessions/{id}`, mode=payment only), a hosted
  page at the session's `url`, and `POST /_test/checkout/sessions/{id}/pay` doing what Stripe's page does when the
  customer pays: a card PaymentMethod, a localstripe PaymentIntent confirmed with it, `checkout.session.completed`.
- Idempotency-Key on POST /v1/...: the first answer is saved and replayed; the same key with other parameters is an
  `idempotency_error` (localstripe ignores the header, and metergate relies on it to never charge or refund twice).
- `POST /_test/refunds/fail_next`: the next refund creation is refused (tests of a refund Stripe turns down).
- `DELETE /_config/data` (localstripe's flush) also forgets saved idempotency keys, the refund switch, the registered
  webhooks and any webhook delivery still waiting, so nothing leaks from one test into the next.

Run: `python -m tests.fake_stripe --port N` (listens on 127.0.0.1; logs to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from localstripe import resources, server, webhooks
from localstripe.errors import UserError
from localstripe.resources import Customer, Event, PaymentIntent, PaymentMethod, Refund, StripeObject

SETUP_FUTURE_USAGES = (None, "on_session", "off_session")


@dataclass(frozen=True)
class SavedAnswer:
    """The first answer to an idempotent POST, with what identifies the request it answered."""

    path: str
    body: bytes
    status: int
    payload: bytes


@dataclass(frozen=True)
class RefundRefusal:
    status: int
    code: str
    message: str


@dataclass
class FakeState:
    origin: str = "http://127.0.0.1"
    answers: dict[tuple[str, str], SavedAnswer] = field(default_factory=dict)
    key_locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    refund_refusals: list[RefundRefusal] = field(default_factory=list)
    deliveries: set[asyncio.Future[Any]] = field(default_factory=set)

    def reset(self) -> None:
        self.answers.clear()
        self.key_locks.clear()
        self.refund_refusals.clear()
        for delivery in self.deliveries:
            delivery.cancel()
        self.deliveries.clear()
        webhooks._webhooks.clear()  # localstripe's registry: the webhooks registered by the previous test


STATE = FakeState()


# ------------------------------------------------------------------ checkout sessions


def _line_amount(item: Any) -> tuple[str, int]:
    """(currency, amount) of one `line_items` entry; only inline `price_data` is faked (no Price objects)."""
    try:
        assert isinstance(item, dict) and set(item) <= {"price_data", "quantity"}
        price = item["price_data"]
        assert isinstance(price, dict) and set(price) <= {"currency", "unit_amount", "product_data"}
        assert isinstance(price.get("product_data"), dict) and price["product_data"].get("name")
        unit_amount, quantity = int(price["unit_amount"]), int(item.get("quantity", 1))
        assert unit_amount >= 0 and quantity >= 1 and isinstance(price["currency"], str)
    except (AssertionError, KeyError, TypeError, ValueError):
        raise UserError(400, "Bad request: line_items[] needs price_data {currency, unit_amount, product_data.name}, quantity") from None
    return price["currency"].lower(), unit_amount * quantity


class CheckoutSession(StripeObject):
    object = "checkout.session"
    _id_prefix = "cs_test_"

    def __init__(self, mode: Any = None, line_items: Any = None, customer: Any = None, metadata: Any = None,
                 payment_intent_data: Any = None, client_reference_id: Any = None, success_url: Any = None,
                 cancel_url: Any = None, payment_method_types: Any = None, **kwargs: Any):
        if kwargs:  # as localstripe does: a parameter the fake does not know is an error, never silently dropped
            raise UserError(400, "Unexpected " + ", ".join(kwargs))
        if mode != "payment":
            raise UserError(400, "The fake Stripe supports Checkout Sessions in mode=payment only")
        if not isinstance(line_items, list) or not line_items:
            raise UserError(400, "Bad request: line_items is required")
        lines = [_line_amount(item) for item in line_items]
        currencies = {currency for currency, _ in lines}
        if len(currencies) != 1:
            raise UserError(400, "Bad request: line items in more than one currency")
        intent_data = payment_intent_data or {}
        if not isinstance(intent_data, dict) or not set(intent_data) <= {"metadata", "setup_future_usage"}:
            raise UserError(400, "Bad request: payment_intent_data takes metadata and setup_future_usage only here")
        if intent_data.get("setup_future_usage") not in SETUP_FUTURE_USAGES:
            raise UserError(400, "Bad request", {"param": "payment_intent_data[setup_future_usage]"})
        if customer is not None:
            Customer._api_retrieve(customer)  # 404 for an unknown customer, as Stripe answers

        super().__init__()  # stores the object; every check is above
        self.mode = mode
        self.customer = customer
        self.metadata = metadata or {}
        self.client_reference_id = client_reference_id
        self.success_url = success_url
        self.cancel_url = cancel_url
        self.currency = currencies.pop()
        self.amount_subtotal = self.amount_total = sum(amount for _, amount in lines)
        self.payment_method_types = payment_method_types or ["card"]
        # Stripe (API 2022-08-01 on) creates the PaymentIntent when the customer pays, not with the session.
        self.payment_intent: str | None = None
        self.payment_status = "unpaid"
        self.status = "open"
        self.expires_at = self.created + 24 * 3600
        self.url = f"{STATE.origin}/_test/checkout/{self.id}"
        self._intent_metadata = dict(intent_data.get("metadata") or {})
        self._setup_future_usage = intent_data.get("setup_future_usage")

    def _pay(self, card_number: str) -> None:
        """What Stripe's hosted page does when the customer pays with `card_number` (and passes any 3-D Secure)."""
        if self.status != "open":
            raise UserError(400, f"This Checkout Session is {self.status}, not open")
        card = {"number": card_number, "exp_month": "12", "exp_year": str(time.gmtime().tm_year + 5), "cvc": "123"}
        method = PaymentMethod(type="card", card=card)
        if method._attaching_is_declined():  # localstripe declines these cards at attach time only; a payment fails too
            raise UserError(402, "Your card was declined.", {"code": "card_declined"})
        if self.customer and self._setup_future_usage:
            # Stripe saves the card on the customer only when the session asked to set it up for future use.
            PaymentMethod._api_attach(method.id, customer=self.customer)
        if self.payment_intent is None:
            intent = PaymentIntent(amount=self.amount_total, currency=self.currency, customer=self.customer,
                                   payment_method=method.id, metadata=dict(self._intent_metadata),
                                   setup_future_usage=self._setup_future_usage)
            self.payment_intent = intent.id
        else:
            # A new card after a declined one: the page retries the same PaymentIntent. Dropping the failed charge
            # is what puts localstripe's PaymentIntent back in requires_confirmation.
            intent = PaymentIntent._api_retrieve(self.payment_intent)
            intent.payment_method = method.id
            intent.latest_charge = None
        intent._confirm(on_failure_now=intent._report_failure)  # a decline raises the 402 here
        if intent.status == "requires_action":  # the page shows the 3-D Secure challenge; the customer passes it
            intent.next_action = None
            intent._create_charge(on_failure_now=intent._report_failure)
        if intent.status != "succeeded":
            raise UserError(400, f"The fake cannot complete a checkout whose PaymentIntent is {intent.status}")
        self.status, self.payment_status = "complete", "paid"
        resources.schedule_webhook(Event("checkout.session.completed", self))


async def pay_checkout(request: web.Request) -> web.StreamResponse:
    data = await server.get_post_data(request) or {}
    session = CheckoutSession._api_retrieve(request.match_info["id"])
    session._pay(str(data.get("card_number", "4242424242424242")))
    if data.get("redirect") and session.success_url:  # the hosted page's form: back to the merchant, as Stripe does
        raise web.HTTPSeeOther(session.success_url.replace("{CHECKOUT_SESSION_ID}", session.id))
    return server.json_response(session._export())


async def checkout_page(request: web.Request) -> web.Response:
    """The page at a session's `url`: one card field, for browser tests (4242… pays, 4000000000000341 is declined)."""
    session = CheckoutSession._api_retrieve(request.match_info["id"])
    amount = f"{session.amount_total / 100:.2f} {session.currency.upper()}"
    page = (f"<!doctype html><title>Fake Stripe Checkout</title><h1>Pay {html.escape(amount)}</h1>"
            f'<form method="post" action="/_test/checkout/sessions/{html.escape(session.id)}/pay">'
            '<input name="card_number" value="4242424242424242"><input type="hidden" name="redirect" value="1">'
            '<button type="submit">Pay</button></form>')
    return web.Response(text=page, content_type="text/html")


# ------------------------------------------------------------------ refunds


async def fail_next_refund(request: web.Request) -> web.Response:
    data = await server.get_post_data(request) or {}
    status = int(data.get("status", 400))
    if status not in (400, 402):
        raise UserError(400, "status must be 400 or 402")
    STATE.refund_refusals.append(RefundRefusal(status, str(data.get("code", "charge_disputed")),
                                               str(data.get("message", "The fake Stripe was told to refuse this refund."))))
    return web.Response()


# ------------------------------------------------------------------ idempotency keys, test routes, flush


def _idempotency_mismatch(key: str) -> web.Response:
    message = (f"Keys for idempotent requests can only be used with the same parameters they were first used with. "
               f"Try using a key other than '{key}' if you meant to execute a different request.")
    return server.json_response({"error": {"type": "idempotency_error", "message": message}}, status=400)


@web.middleware
async def idempotency_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Outermost: replays the saved answer to a POST /v1/... whose Idempotency-Key was seen before."""
    key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or not key or not request.path.startswith("/v1/"):
        response = await handler(request)
        if request.method == "DELETE" and request.path == "/_config/data" and response.status == 200:
            STATE.reset()
        return response
    scope = (request.headers.get("Authorization", ""), key)  # Stripe scopes keys by account; here, by API key
    body = await request.read()
    # One request per key at a time: a concurrent retry waits for the first answer, then gets it replayed.
    async with STATE.key_locks.setdefault(scope, asyncio.Lock()):
        saved = STATE.answers.get(scope)
        if saved is not None:
            if (saved.path, saved.body) != (request.path, body):
                return _idempotency_mismatch(key)
            return web.Response(body=saved.payload, status=saved.status, content_type="application/json",
                                headers={"Idempotent-Replayed": "true"})
        response = await handler(request)
        # Stripe saves an answer once the endpoint ran: successes and card declines. A request that failed
        # validation (400, 401, 404) saves nothing, so a corrected retry with the same key is not stuck.
        if isinstance(response, web.Response) and isinstance(response.body, bytes) and (
                response.status < 300 or response.status == 402):
            STATE.answers[scope] = SavedAnswer(request.path, body, response.status, response.body)
        return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """localstripe's auth check, except for /_test/ routes (like its own /_config/): the hosted page has no key."""
    if request.path.startswith("/_test/"):
        return await handler(request)
    return await server.auth_middleware(request, handler)


def install(origin: str) -> web.Application:
    """Patch localstripe and add the routes above to its app; returns the app to run."""
    STATE.origin = origin

    # localstripe pickles its whole store to /tmp/localstripe.pickle after every write: slow, and shared by every
    # localstripe on the machine (two test runs would load each other's objects). The fake keeps it in memory.
    resources.Store.dump_to_disk = lambda self: None

    # localstripe fires webhook deliveries and forgets them; they are tracked here so a flush can cancel those
    # still waiting (it waits 1 s before sending), instead of delivering one test's events to the next test.
    def schedule_webhook(event: Event) -> None:
        delivery = asyncio.ensure_future(webhooks._send_webhook(event))
        STATE.deliveries.add(delivery)
        delivery.add_done_callback(STATE.deliveries.discard)

    resources.schedule_webhook = schedule_webhook  # resources imported the name: patch it where it is called
    webhooks.schedule_webhook = schedule_webhook

    # Every localstripe error says type invalid_request_error; Stripe's 402s are card errors.
    original_error_init = UserError.__init__

    def error_init(self: UserError, code: int, message: str | None = None, contents: dict[str, Any] | None = None) -> None:
        original_error_init(self, code, message, contents)
        if code == 402:
            self.body["error"]["type"] = "card_error"

    UserError.__init__ = error_init

    # Stripe's card error on a PaymentIntent carries the PaymentIntent (so a caller learns its id and status).
    original_report_failure = PaymentIntent._report_failure

    def report_failure(self: PaymentIntent) -> None:
        try:
            original_report_failure(self)
        except UserError as error:
            error.body["error"]["payment_intent"] = self._export()
            raise

    PaymentIntent._report_failure = report_failure

    # localstripe's PaymentIntent rejects setup_future_usage and description and has no amount_received; Stripe's has all three.
    original_intent_init = PaymentIntent.__init__

    def intent_init(self: PaymentIntent, *args: Any, setup_future_usage: Any = None, description: Any = None, **kwargs: Any) -> None:
        if setup_future_usage not in SETUP_FUTURE_USAGES:
            raise UserError(400, "Bad request", {"param": "setup_future_usage"})
        original_intent_init(self, *args, **kwargs)
        self.setup_future_usage = setup_future_usage
        self.description = description

    PaymentIntent.__init__ = intent_init
    PaymentIntent.amount_received = property(
        lambda self: self.amount if self.status == "succeeded" else 0)

    # Stripe lists PaymentIntents newest first and filters by customer; localstripe rejects `customer`.
    list_intents = StripeObject._api_list_all.__func__

    def list_payment_intents(cls: type[PaymentIntent], url: str, customer: str | None = None, **kwargs: Any) -> Any:
        listing = list_intents(cls, url, **kwargs)
        listing._list = [intent for intent in reversed(listing._list) if customer is None or intent.customer == customer]
        return listing

    PaymentIntent._api_list_all = classmethod(list_payment_intents)

    # Refunds: the test switch first, then Stripe's check that localstripe skips (never refund more than was paid).
    create_refund = Refund._api_create.__func__

    def refund_create(cls: type[Refund], **data: Any) -> Any:
        if STATE.refund_refusals:
            refusal = STATE.refund_refusals.pop(0)
            raise UserError(refusal.status, refusal.message, {"code": refusal.code})
        if isinstance(data.get("payment_intent"), str):
            charge = PaymentIntent._api_retrieve(data["payment_intent"]).latest_charge
            if charge is None:
                raise UserError(400, "This PaymentIntent has no charge to refund", {"param": "payment_intent"})
            left = charge.amount - charge.amount_refunded
            if left <= 0:
                raise UserError(400, f"Charge {charge.id} has already been refunded.", {"code": "charge_already_refunded"})
            amount = resources.try_convert_to_int(data.get("amount", left))
            if isinstance(amount, int) and amount > left:  # a malformed amount is left to localstripe's own check
                raise UserError(400, f"Refund amount is greater than the unrefunded amount on the charge ({left})",
                                {"param": "amount"})
        return create_refund(cls, **data)

    Refund._api_create = classmethod(refund_create)

    app: web.Application = server.app
    app.middlewares[app.middlewares.index(server.auth_middleware)] = auth_middleware
    app.middlewares.insert(0, idempotency_middleware)
    app.router.add_post("/v1/checkout/sessions", server.api_create(CheckoutSession, "/v1/checkout/sessions"))
    app.router.add_get("/v1/checkout/sessions/{id}", server.api_retrieve(CheckoutSession, "/v1/checkout/sessions/{id}"))
    app.router.add_get("/_test/checkout/{id}", checkout_page)
    app.router.add_post("/_test/checkout/sessions/{id}/pay", pay_checkout)
    app.router.add_post("/_test/refunds/fail_next", fail_next_refund)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = install(f"http://{args.host}:{args.port}")
    web.run_app(app, host=args.host, port=args.port, access_log=logging.getLogger("aiohttp.access"), print=None)


if __name__ == "__main__":
    main()
