"""HTTP surface of the Stripe integration: the webhook, an end user's top-up, and the operator's controls.

- `POST /stripe/webhook`: Stripe's events (signature checked, applied once);
- `GET /v1/wallet/top-up-options`, `POST /v1/wallet/checkout-sessions`: an end
  user (their `sk-eu_` key or token, or an operator key naming `user`) starts a
  Checkout top-up;
- under /admin: `POST /end-users/{id}/checkout-sessions`,
  `GET|PATCH /end-users/{id}/auto-top-up`, `GET /end-users/{id}/card-payments`,
  `POST /end-users/{id}/card-refunds`.
Without a `stripe:` block every one of them answers 501.
"""

from __future__ import annotations

from aiohttp import web

from proxy import observability, schemas
from proxy.appstate import BILLING, STRIPE_EVENTS
from proxy.auth import authenticate
from proxy.billing.service import Billing, BillingError, CheckoutStarted
from proxy.billing.webhook import BadSignature
from proxy.config import StripeConfig
from proxy.errors import REPLAYED, ApiError, idempotency_key, json_model, read_json, read_model, validate_model
from proxy.store.payments import AutoTopUpRule

routes = web.RouteTableDef()
admin_routes = web.RouteTableDef()


def _billing(request: web.Request) -> Billing:
    billing = request.config_dict.get(BILLING)
    if billing is None:
        raise ApiError(501, "Stripe is not configured on this metergate: add a `stripe:` block to metergate.yaml "
                       "and set its secret key's environment variable", type="not_implemented", code="stripe_not_configured")
    return billing


def _refused(exc: BillingError) -> ApiError:
    return ApiError(exc.status, exc.message, code=exc.code, param=exc.param)


def _rule_view(rule: AutoTopUpRule) -> web.Response:
    return json_model(schemas.AutoTopUpView(
        end_user=rule.wallet_id, enabled=rule.enabled, threshold_micros=rule.threshold_micros,
        amount_micros=rule.amount_micros, card=rule.card, payment_method=rule.payment_method, customer=rule.customer,
        consecutive_failures=rule.consecutive_failures, last_error=rule.last_error, disabled_reason=rule.disabled_reason,
        attempts=rule.attempts, blocked_until_ms=rule.blocked_until_ms or None,
    ))


def _session_view(started: CheckoutStarted) -> web.Response:
    return json_model(schemas.CheckoutSessionView(
        id=started.id, url=started.url, amount_micros=started.amount_micros, currency=started.currency), 201)


# ------------------------------------------------------------------ webhook


@routes.post("/stripe/webhook")
async def stripe_webhook(request: web.Request) -> web.Response:
    _billing(request)
    events = request.config_dict[STRIPE_EVENTS]
    payload = await request.read()
    try:
        event = events.verify(payload, request.headers.get("Stripe-Signature"))
    except BadSignature as exc:
        observability.stripe_event("unknown", "bad_signature")
        raise ApiError(400, f"invalid Stripe signature: {exc}", code="invalid_signature") from None
    applied = await events.apply(event)
    observability.stripe_event(applied.type if applied.outcome != "ignored: not an event metergate uses" else "other",
                               applied.outcome)
    return web.json_response({"received": True, "id": applied.event_id, "type": applied.type, "outcome": applied.outcome})


# ------------------------------------------------------------ end users


def _options(config: StripeConfig) -> dict[str, object]:
    return {
        "currency": config.currency,
        "presets_micros": [StripeConfig.to_micros(p) for p in config.top_up_presets],
        "minimum_micros": StripeConfig.to_micros(config.minimum_top_up),
        "maximum_micros": StripeConfig.to_micros(config.maximum_top_up),
    }


@routes.get("/v1/wallet/top-up-options")
async def top_up_options(request: web.Request) -> web.Response:
    billing = _billing(request)
    await authenticate(request, None)
    return web.json_response(_options(billing.config))


@routes.post("/v1/wallet/checkout-sessions")
async def end_user_checkout(request: web.Request) -> web.Response:
    billing = _billing(request)
    raw = await read_json(request)
    body = validate_model(schemas.StartCheckout, raw)
    caller = await authenticate(request, raw if isinstance(raw, dict) else None)
    try:
        started = await billing.start_checkout(caller.end_user_id, body.amount_micros, save_card=body.save_card)
    except BillingError as exc:
        raise _refused(exc) from None
    return _session_view(started)


# ---------------------------------------------------------------- admin


@admin_routes.post("/end-users/{id}/checkout-sessions")
async def admin_checkout(request: web.Request) -> web.Response:
    billing = _billing(request)
    body = await read_model(request, schemas.AdminStartCheckout)
    try:
        started = await billing.start_checkout(request.match_info["id"], body.amount_micros, save_card=body.save_card,
                                               success_url=body.success_url, cancel_url=body.cancel_url)
    except BillingError as exc:
        raise _refused(exc) from None
    return _session_view(started)


async def _existing_wallet(request: web.Request, billing: Billing) -> str:
    wallet_id = request.match_info["id"]
    if await billing.wallets.get(wallet_id) is None:
        raise ApiError(404, f"no end user {wallet_id!r}", code="end_user_not_found", param="id")
    return wallet_id


@admin_routes.get("/end-users/{id}/auto-top-up")
async def get_auto_top_up(request: web.Request) -> web.Response:
    billing = _billing(request)
    wallet_id = await _existing_wallet(request, billing)
    return _rule_view(await billing.payments.rule(wallet_id))


@admin_routes.patch("/end-users/{id}/auto-top-up")
async def update_auto_top_up(request: web.Request) -> web.Response:
    billing = _billing(request)
    wallet_id = await _existing_wallet(request, billing)
    body = await read_model(request, schemas.UpdateAutoTopUp)
    current = await billing.payments.rule(wallet_id)
    profile = await billing.wallets.profile(wallet_id) or {}
    default = billing.config.auto_top_up_for(str(profile.get("tier") or "default"))
    def pick(sent: int | None, kept: int, fallback: int) -> int:
        return sent if sent is not None else (kept if current.configured else fallback)
    try:
        rule = await billing.set_rule(
            wallet_id,
            enabled=body.enabled if body.enabled is not None else current.enabled,
            threshold_micros=pick(body.threshold_micros, current.threshold_micros, StripeConfig.to_micros(default.threshold)),
            amount_micros=pick(body.amount_micros, current.amount_micros, StripeConfig.to_micros(default.amount)),
        )
    except BillingError as exc:
        raise _refused(exc) from None
    return _rule_view(rule)


@admin_routes.get("/end-users/{id}/card-payments")
async def card_payments(request: web.Request) -> web.Response:
    billing = _billing(request)
    wallet_id = await _existing_wallet(request, billing)
    found = await billing.payments.card_payments(wallet_id)
    return json_model(schemas.CardPaymentList(data=[
        schemas.CardPaymentView(payment_intent=p.payment_intent, credited_micros=p.credited_micros,
                                refunded_micros=p.refunded_micros, refundable_micros=p.refundable_micros)
        for p in found
    ]))


@admin_routes.post("/end-users/{id}/card-refunds")
async def card_refund(request: web.Request) -> web.Response:
    billing = _billing(request)
    key = idempotency_key(request)
    wallet_id = await _existing_wallet(request, billing)
    body = await read_model(request, schemas.StartCardRefund)
    try:
        refund = await billing.refund_to_card(wallet_id, body.payment_intent, body.amount_micros, request_key=key)
    except BillingError as exc:
        raise _refused(exc) from None
    headers = REPLAYED if refund.receipt.replayed else None
    return json_model(schemas.CardRefundView(
        refund=refund.refund_id, status=refund.status, payment_intent=refund.payment_intent,
        amount_micros=refund.amount_micros, ledger_id=refund.receipt.ledger_id,
        wallet=schemas.WalletView.of(refund.receipt.wallet),
    ), 201, headers)
