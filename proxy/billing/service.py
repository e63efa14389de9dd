"""`Billing`: buying credit with Stripe Checkout, the saved card's rule, and refunds to the card.

Built once in the app factory; takes explicit arguments, never the request.
Money moves only through `PaymentStore`'s scripts, keyed by Stripe ids; every
Stripe call that creates something carries an idempotency key derived from
metergate's own ids, so a retried call never creates (or charges) twice.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import stripe

from proxy.billing.stripe_api import StripeApi
from proxy.config import StripeConfig
from proxy.store import Receipt, WalletNotFound, WalletStore
from proxy.store.errors import RefundExceedsPayment
from proxy.store.payments import AutoTopUpRule, CardPayment, PaymentStore

log = logging.getLogger(__name__)

# Metadata metergate puts on what it creates in Stripe, and reads back from events.
META_END_USER = "metergate_end_user"
META_CREDIT = "metergate_credit_micros"
META_KIND = "metergate_kind"  # "checkout" or "auto_top_up"
META_ATTEMPT = "metergate_attempt"
META_SAVE_CARD = "metergate_save_card"
META_REFUND = "metergate_refund"


class BillingError(Exception):
    """A request Billing refuses, with what to tell the caller."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass(frozen=True)
class CheckoutStarted:
    id: str
    url: str
    amount_micros: int
    currency: str
    customer: str


@dataclass(frozen=True)
class CardRefund:
    receipt: Receipt
    payment_intent: str
    amount_micros: int
    refund_id: str
    status: str


def _stripe_test_key(key: str | None) -> bool:
    """Whether a Stripe secret (or restricted) key is a test-mode one: its payments are not real."""
    return key is not None and key.startswith(("sk_test_", "rk_test_"))


def _key(*parts: str) -> str:
    """A Stripe idempotency key from metergate ids (hashed: Stripe caps keys at 255 characters)."""
    return "metergate-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]


class Billing:
    def __init__(self, config: StripeConfig, api: StripeApi, wallets: WalletStore, payments: PaymentStore):
        self.config, self.api, self.wallets, self.payments = config, api, wallets, payments

    @property
    def stripe(self) -> stripe.StripeClient:
        return self.api.client

    # ------------------------------------------------------------ buying credit

    def check_top_up_amount(self, amount_micros: int) -> int:
        """Stripe's amount for a top-up of `amount_micros`, or a BillingError saying what is allowed."""
        low, high = StripeConfig.to_micros(self.config.minimum_top_up), StripeConfig.to_micros(self.config.maximum_top_up)
        if not low <= amount_micros <= high:
            raise BillingError(400, f"a top-up is between {low} and {high} micros", "invalid_amount", "amount_micros")
        try:
            return self.api.to_amount(amount_micros)
        except ValueError as exc:
            raise BillingError(400, f"amount_micros {exc}", "invalid_amount", "amount_micros") from None

    async def customer_for(self, wallet_id: str) -> str:
        """The wallet's Stripe customer, created once: concurrent first top-ups share one
        (Stripe's idempotency key on the create, then the store keeps the first)."""
        kept = await self.payments.customer(wallet_id)
        if kept:
            return kept
        customer = await self.stripe.v1.customers.create_async(
            params={"metadata": {META_END_USER: wallet_id}, "description": f"metergate end user {wallet_id}"},
            options={"idempotency_key": _key("customer", wallet_id)},
        )
        return await self.payments.link_customer(wallet_id, customer.id)

    async def start_checkout(
        self, wallet_id: str, amount_micros: int, *, save_card: bool, success_url: str | None = None,
        cancel_url: str | None = None,
    ) -> CheckoutStarted:
        """A Stripe Checkout Session (mode payment) that credits `amount_micros` once paid."""
        amount = self.check_top_up_amount(amount_micros)
        if await self.wallets.get(wallet_id) is None:
            raise WalletNotFound(f"no wallet {wallet_id!r}")
        await self._check_bought_with_money(wallet_id)
        try:
            return await self._create_session(wallet_id, amount_micros, amount, save_card, success_url, cancel_url)
        except stripe.StripeError as exc:
            log.error("wallet %s: Stripe refused or did not answer a Checkout Session: %s", wallet_id, exc)
            raise BillingError(502, f"Stripe could not start the payment: {exc.user_message or exc}", "stripe_error") from None

    async def _create_session(
        self, wallet_id: str, amount_micros: int, amount: int, save_card: bool, success_url: str | None, cancel_url: str | None,
    ) -> CheckoutStarted:
        customer = await self.customer_for(wallet_id)
        metadata = {META_END_USER: wallet_id, META_CREDIT: str(amount_micros), META_KIND: "checkout",
                    META_SAVE_CARD: "1" if save_card else "0"}
        payment_intent_data: dict[str, Any] = {"metadata": metadata}
        if save_card:
            payment_intent_data["setup_future_usage"] = "off_session"
        params: dict[str, Any] = {
            "mode": "payment",
            "customer": customer,
            "client_reference_id": wallet_id,
            "line_items": [{"quantity": 1, "price_data": {
                "currency": self.config.currency, "unit_amount": amount, "product_data": {"name": self.config.product_name},
            }}],
            "payment_intent_data": payment_intent_data,
            "metadata": metadata,
            "success_url": success_url or self.config.success_url,
            "cancel_url": cancel_url or self.config.cancel_url,
        }
        session = await self.stripe.v1.checkout.sessions.create_async(params=params)  # type: ignore[arg-type]
        return CheckoutStarted(id=session.id, url=session.url or "", amount_micros=amount_micros,
                               currency=self.config.currency, customer=customer)

    async def credit_payment(self, wallet_id: str, payment_intent: str, credit_micros: int, *, attempt: int = 0,
                             kind: str = "checkout") -> Receipt:
        """Credit a succeeded payment (once, whoever reports it)."""
        receipt = await self.payments.credit_payment(
            wallet_id, payment_intent, credit_micros, auto_top_up_attempt=attempt, meta={"kind": kind},
        )
        if not receipt.replayed:
            log.info("wallet %s: credited %d micros from Stripe payment %s (%s)", wallet_id, credit_micros, payment_intent, kind)
        return receipt

    async def save_card(self, wallet_id: str, payment_intent: dict[str, Any]) -> None:
        """Keep the card a payment was made with, for auto top-up; a first card gets the tier's rule."""
        method = payment_intent.get("payment_method")
        if isinstance(method, dict):
            method = method.get("id")
        if not method:
            return
        label = ""
        try:
            pm = await self.stripe.v1.payment_methods.retrieve_async(method)
            card = pm.card
            if card is not None:
                label = f"{card.brand} •••• {card.last4}"
        except stripe.StripeError as exc:  # the label is cosmetic; the card is saved anyway
            log.warning("wallet %s: could not read payment method %s: %s", wallet_id, method, exc)
        profile = await self.wallets.profile(wallet_id) or {}
        rule = self.config.auto_top_up_for(str(profile.get("tier") or "default"))
        await self.payments.set_rule(
            wallet_id, card_saved=True, enabled=rule.enabled, threshold_micros=StripeConfig.to_micros(rule.threshold),
            amount_micros=StripeConfig.to_micros(rule.amount), payment_method=method, card=label,
            customer=str(payment_intent.get("customer") or ""),
        )

    # ---------------------------------------------------------- auto top-up rule

    async def _check_bought_with_money(self, wallet_id: str) -> None:
        """A card pays in the Stripe currency: a wallet in another asset (credits) is funded by the
        operator's grants and top-ups, never by a card payment credited one micro for one micro."""
        profile = await self.wallets.profile(wallet_id) or {}
        asset = profile.get("asset") or "USD"
        if asset != "USD":
            raise BillingError(400, f"this wallet holds {asset}, which is not bought by card here; the operator "
                               "credits it (top-ups, grants)", "asset_not_purchasable")
        # Real money must not land in a test wallet, whose entries the money report leaves out:
        # a test end user pays by card only when Stripe itself runs in test mode (sk_test_/rk_test_).
        if profile.get("livemode", True) is False and not _stripe_test_key(self.config.secret_key):
            raise BillingError(400, "this is a test end user's wallet: it is not bought by card while Stripe runs "
                               "with a live key; the operator credits it (top-ups, grants)", "livemode_mismatch")

    async def set_rule(self, wallet_id: str, *, enabled: bool, threshold_micros: int, amount_micros: int) -> AutoTopUpRule:
        if enabled:
            await self._check_bought_with_money(wallet_id)
        try:
            self.api.to_amount(amount_micros)
        except ValueError as exc:
            raise BillingError(400, f"amount_micros {exc}", "invalid_amount", "amount_micros") from None
        await self.payments.set_rule(wallet_id, enabled=enabled, threshold_micros=threshold_micros, amount_micros=amount_micros)
        return await self.payments.rule(wallet_id)

    # ---------------------------------------------------------- refunds to the card

    async def refund_to_card(self, wallet_id: str, payment_intent: str, amount_micros: int | None, *, request_key: str) -> CardRefund:
        """Give unspent credit of one card payment back to that card.

        The wallet is debited first (bounded by what the payment credited and by
        balance - held), then Stripe is asked, with an idempotency key from
        `request_key`; a refusal restores the debit. When Stripe does not answer
        at all the debit stands and the caller retries with the same key.
        """
        payment = await self._payment(wallet_id, payment_intent)
        request_id = _key("refund", wallet_id, request_key)
        if amount_micros is None:
            # A retry of a request that left the amount out refunds what the first one debited, not what is left now.
            amount_micros = await self.payments.refund_requested(wallet_id, request_id)
        if amount_micros is None:
            wallet = await self.wallets.get(wallet_id)
            own = max((wallet.balance_micros - wallet.held_micros) if wallet else 0, 0)
            amount_micros = min(payment.refundable_micros, own)
            amount_micros -= amount_micros % self.config.micros_per_unit
            if amount_micros <= 0:
                raise BillingError(409, f"nothing of {payment_intent} is left to refund", "nothing_to_refund", "payment_intent")
        try:
            amount = self.api.to_amount(amount_micros)
        except ValueError as exc:
            raise BillingError(400, f"amount_micros {exc}", "invalid_amount", "amount_micros") from None
        try:
            receipt = await self.payments.refund_to_card(wallet_id, payment_intent, amount_micros, request_id=request_id)
        except RefundExceedsPayment as exc:
            raise BillingError(409, exc.message, "refund_exceeds_payment", "amount_micros") from None
        if receipt.replayed and await self.payments.refund_restored(wallet_id, request_id):
            # Given back already (Stripe refused it, or the refund failed): asking Stripe again could send money
            # to the card that the wallet no longer pays for.
            raise BillingError(402, "this refund was refused by Stripe and the wallet restored; ask again with a new "
                               "Idempotency-Key", "refund_refused")
        try:
            refund = await self.stripe.v1.refunds.create_async(
                params={"payment_intent": payment_intent, "amount": amount,
                        "metadata": {META_REFUND: request_id, META_END_USER: wallet_id}},
                options={"idempotency_key": request_id},
            )
        except (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError) as exc:
            log.error("wallet %s: Stripe did not answer a refund of %s (%s); the debit stands until it is retried",
                      wallet_id, payment_intent, exc)
            raise BillingError(502, "Stripe did not answer; the wallet is debited and the refund is pending: "
                               "retry with the same Idempotency-Key", "stripe_unavailable") from None
        except stripe.StripeError as exc:
            await self.payments.restore_refund(wallet_id, payment_intent, amount_micros, request_id=request_id,
                                               reason=str(exc.user_message or exc))
            raise BillingError(402, f"Stripe refused the refund: {exc.user_message or exc}; the wallet was restored",
                               "refund_refused") from None
        if refund.status in ("failed", "canceled"):
            await self.payments.restore_refund(wallet_id, payment_intent, amount_micros, request_id=request_id,
                                               reason=f"refund {refund.status}")
            raise BillingError(402, f"Stripe's refund {refund.id} {refund.status}; the wallet was restored", "refund_refused")
        return CardRefund(receipt=receipt, payment_intent=payment_intent, amount_micros=amount_micros,
                          refund_id=refund.id, status=refund.status or "pending")

    async def _payment(self, wallet_id: str, payment_intent: str) -> CardPayment:
        for payment in await self.payments.card_payments(wallet_id):
            if payment.payment_intent == payment_intent:
                return payment
        raise BillingError(404, f"no card payment {payment_intent!r} credited this wallet", "payment_not_found", "payment_intent")
