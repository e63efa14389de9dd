"""`StripeEvents`: Stripe's webhook events, verified and applied to wallets once.

Each event is applied at most once by its id (remembered after it applied),
and each money movement it causes is keyed by the Stripe object it is about:
a payment by its PaymentIntent, a refund by its refund, a dispute by its
dispute. So whatever arrives first, twice, concurrently or out of order
(checkout.session.completed, payment_intent.succeeded, a redelivery), a payment
credits its wallet once.

Events handled:
- checkout.session.completed / checkout.session.async_payment_succeeded (paid):
  credit the session's PaymentIntent; keep the card when the buyer saved it;
- payment_intent.succeeded: credit it (Checkout purchases and auto top-ups),
  keep a saved card; payment_intent.payment_failed: an auto top-up's failure;
- charge.refunded, refund.created, refund.updated: refunds made in Stripe are
  debited, and given back if they fail (ours were debited when asked; a failed
  one of ours is restored);
- charge.dispute.created / funds_withdrawn: the disputed amount is debited (not
  for inquiries, which withdraw nothing); funds_reinstated, or closed as won:
  it comes back.
An event about a payment metergate has not seen credited yet reads the payment
from Stripe first (see `_wallet_paid_by`).
Anything else is acknowledged and ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
import stripe

from proxy.billing.auto_top_up import AutoTopUps
from proxy.billing.service import META_ATTEMPT, META_CREDIT, META_END_USER, META_KIND, META_REFUND, META_SAVE_CARD, Billing
from proxy.store import InvalidWalletRequest, WalletError

log = logging.getLogger(__name__)


class BadSignature(Exception):
    pass


@dataclass(frozen=True)
class Applied:
    event_id: str
    type: str
    outcome: str  # "applied", "duplicate", or why it was ignored


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class StripeEvents:
    def __init__(self, billing: Billing, auto_top_ups: AutoTopUps, webhook_secret: str, *, tolerance_seconds: int = 300):
        self.billing, self.auto_top_ups = billing, auto_top_ups
        self.secret, self.tolerance = webhook_secret, tolerance_seconds

    def verify(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        """The event, if `Stripe-Signature` proves Stripe sent this payload recently; else BadSignature."""
        try:
            stripe.WebhookSignature.verify_header(payload.decode("utf-8"), signature or "", self.secret, self.tolerance)
            event = orjson.loads(payload)
        except (stripe.SignatureVerificationError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
            raise BadSignature(str(exc)) from None
        if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(event.get("data"), dict):
            raise BadSignature("not a Stripe event")
        return event

    async def apply(self, event: dict[str, Any]) -> Applied:
        """Apply a verified event. Store or Stripe errors propagate (answered 500: Stripe redelivers)."""
        event_id, kind = event["id"], str(event.get("type"))
        payments = self.billing.payments
        if await payments.event_applied(event_id):
            return Applied(event_id, kind, "duplicate")
        obj = event["data"].get("object") or {}
        handler = _HANDLERS.get(kind)
        outcome = "ignored: not an event metergate uses"
        if handler is not None:
            try:
                outcome = await handler(self, obj)
            except WalletError as exc:
                # Nothing this event could do (no such wallet, a malformed amount):
                # redelivering it would fail the same way.
                log.error("stripe event %s (%s) cannot be applied: %s", event_id, kind, exc)
                outcome = f"ignored: {exc.code} {exc.message}"
        await payments.mark_event_applied(event_id)
        return Applied(event_id, kind, outcome)

    # ---------------------------------------------------------------- payments

    async def _checkout_completed(self, session: dict[str, Any]) -> str:
        meta = session.get("metadata") or {}
        if session.get("mode") != "payment" or session.get("payment_status") != "paid":
            return "ignored: not a paid payment session"
        payment_intent = session.get("payment_intent")
        if isinstance(payment_intent, dict):
            payment_intent = payment_intent.get("id")
        wallet_id, credit = meta.get(META_END_USER), _int(meta.get(META_CREDIT))
        if not wallet_id or not credit or not payment_intent:
            return "ignored: not a metergate top-up"
        await self.billing.credit_payment(wallet_id, payment_intent, credit)
        if meta.get(META_SAVE_CARD) == "1":
            # The session names its payment, not the card: read the card off the
            # payment (the latest card a buyer chose to save becomes the card).
            intent = await self.billing.stripe.v1.payment_intents.retrieve_async(payment_intent)
            await self.billing.save_card(wallet_id, intent.to_dict())
        return "applied"

    async def _payment_succeeded(self, intent: dict[str, Any]) -> str:
        meta = intent.get("metadata") or {}
        wallet_id, credit = meta.get(META_END_USER), _int(meta.get(META_CREDIT))
        if not wallet_id or not credit:
            return "ignored: not a metergate payment"
        kind = meta.get(META_KIND) or "checkout"
        attempt = (_int(meta.get(META_ATTEMPT)) or 0) if kind == "auto_top_up" else 0
        await self.billing.credit_payment(wallet_id, intent["id"], credit, attempt=attempt, kind=kind)
        if kind == "checkout" and (intent.get("setup_future_usage") == "off_session" or meta.get(META_SAVE_CARD) == "1"):
            await self.billing.save_card(wallet_id, intent)
        return "applied"

    async def _payment_failed(self, intent: dict[str, Any]) -> str:
        meta = intent.get("metadata") or {}
        wallet_id, attempt = meta.get(META_END_USER), _int(meta.get(META_ATTEMPT))
        error = (intent.get("last_payment_error") or {}).get("code") or "payment_failed"
        if wallet_id and meta.get(META_KIND) == "checkout":
            # The buyer may try another card on the same page; each failure is told once.
            await self.billing.wallets.note(wallet_id, "top_up_failed", reason=str(error),
                                            meta={"payment_intent": intent.get("id")},
                                            once_per=("note:top_up_failed", f"{intent.get('id')}|{error}"))
            return "applied: noted"
        if meta.get(META_KIND) != "auto_top_up" or not wallet_id or not attempt:
            return "ignored: not an auto top-up"
        await self.auto_top_ups.record_failure(wallet_id, attempt, declined=True, error=str(error))
        return "applied"

    async def _wallet_paid_by(self, payment_intent: str) -> str | None:
        """The wallet a payment credited; None when it is not a metergate payment.

        An event about a payment (a refund, a dispute) can arrive before the
        payment's own events (Stripe retries after an outage in any order): then
        the payment is read from Stripe and, if it is a metergate payment that
        succeeded, credited first, so that what follows applies to it.
        """
        wallet_id = await self.billing.payments.wallet_of_payment(payment_intent)
        if wallet_id is not None:
            return wallet_id
        intent = (await self.billing.stripe.v1.payment_intents.retrieve_async(payment_intent)).to_dict()
        meta = intent.get("metadata") or {}
        if not meta.get(META_END_USER) or not _int(meta.get(META_CREDIT)):
            return None
        if intent.get("status") == "succeeded":
            await self._payment_succeeded(intent)
        return str(meta[META_END_USER])

    # ----------------------------------------------------------------- refunds

    async def _refund(self, refund: dict[str, Any]) -> str:
        payment_intent = refund.get("payment_intent")
        amount, refund_id, status = _int(refund.get("amount")), refund.get("id"), refund.get("status")
        if not payment_intent or not amount or not refund_id:
            return "ignored: a refund without a payment"
        wallet_id = await self._wallet_paid_by(payment_intent)
        if wallet_id is None:
            return "ignored: not a metergate payment"
        micros = self.billing.api.to_micros(amount)
        ours = (refund.get("metadata") or {}).get(META_REFUND)
        if ours:
            if status in ("failed", "canceled"):
                await self.billing.payments.restore_refund(wallet_id, payment_intent, micros, request_id=ours,
                                                           reason=f"refund {refund_id} {status}")
                return "applied: restored"
            return "applied: debited when it was asked"
        payments = self.billing.payments
        if status in ("failed", "canceled"):
            # Given back only if its creation was recorded (and debited) before.
            try:
                await payments.external_refund_failed(wallet_id, payment_intent, refund_id=refund_id)
            except InvalidWalletRequest:
                return "ignored: a refund that did not happen"
            return "applied: restored"
        await payments.record_external_refund(wallet_id, payment_intent, micros, refund_id=refund_id)
        return "applied"

    async def _charge_refunded(self, charge: dict[str, Any]) -> str:
        payment_intent = charge.get("payment_intent")
        if not payment_intent or await self._wallet_paid_by(payment_intent) is None:
            return "ignored: not a metergate payment"
        refunds = await self.billing.stripe.v1.refunds.list_async(params={"payment_intent": payment_intent, "limit": 100})
        for refund in refunds.data:
            await self._refund(refund.to_dict())
        return "applied"

    # ---------------------------------------------------------------- disputes

    async def _dispute(self, dispute: dict[str, Any], *, gives_back: bool) -> str:
        payment_intent, amount = dispute.get("payment_intent"), _int(dispute.get("amount"))
        if not payment_intent or not amount or not dispute.get("id"):
            return "ignored: a dispute without a payment"
        if str(dispute.get("status") or "").startswith("warning_"):
            # An inquiry: Stripe withdraws nothing, so the wallet keeps its money.
            return "ignored: an inquiry moves no money"
        wallet_id = await self._wallet_paid_by(payment_intent)
        if wallet_id is None:
            return "ignored: not a metergate payment"
        await self.billing.payments.dispute(wallet_id, payment_intent, self.billing.api.to_micros(amount),
                                            dispute_id=dispute["id"], won=gives_back)
        return "applied"

    async def _dispute_opened(self, dispute: dict[str, Any]) -> str:
        # charge.dispute.created and charge.dispute.funds_withdrawn both report
        # one withdrawal: keyed by the dispute, it is debited once.
        return await self._dispute(dispute, gives_back=False)

    async def _dispute_reinstated(self, dispute: dict[str, Any]) -> str:
        return await self._dispute(dispute, gives_back=True)

    async def _dispute_closed(self, dispute: dict[str, Any]) -> str:
        if dispute.get("status") != "won":
            return "ignored: a lost dispute was debited when it opened"
        return await self._dispute(dispute, gives_back=True)


_HANDLERS = {
    "checkout.session.completed": StripeEvents._checkout_completed,
    "checkout.session.async_payment_succeeded": StripeEvents._checkout_completed,
    "payment_intent.succeeded": StripeEvents._payment_succeeded,
    "payment_intent.payment_failed": StripeEvents._payment_failed,
    "refund.created": StripeEvents._refund,
    "refund.updated": StripeEvents._refund,
    "charge.refunded": StripeEvents._charge_refunded,
    "charge.dispute.created": StripeEvents._dispute_opened,
    "charge.dispute.funds_withdrawn": StripeEvents._dispute_opened,
    "charge.dispute.funds_reinstated": StripeEvents._dispute_reinstated,
    "charge.dispute.closed": StripeEvents._dispute_closed,
}
