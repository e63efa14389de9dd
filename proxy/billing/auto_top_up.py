"""`AutoTopUps`: charge a wallet's saved card off-session when a capture leaves it below its threshold.

Which capture starts an attempt is decided inside the settle script (see
claim_auto_top_up in _prelude.lua): at most one attempt per wallet is in flight,
across replicas. This module runs a claimed attempt: one PaymentIntent,
confirmed off-session with an idempotency key naming the wallet and the
attempt, so running an attempt twice charges once. Its outcome is written back:
a success credits the wallet (the same credit the webhook would make, so the
later webhook replays); a decline or a bank asking for authentication counts a
failure, and the configured number in a row turns the rule off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import stripe

from proxy import observability
from proxy.billing.service import META_ATTEMPT, META_CREDIT, META_END_USER, META_KIND, Billing, _key

log = logging.getLogger(__name__)

# Stripe's refusals that mean the saved card cannot be charged (it was detached,
# deleted, or is in a state that cannot pay): counted as the card's failures.
_CARD_FAULTS = frozenset({
    "resource_missing", "payment_method_unexpected_state", "payment_method_not_available", "payment_intent_authentication_failure",
    "card_declined", "authentication_required", "expired_card", "incorrect_cvc", "processing_error",
})


class AutoTopUps:
    def __init__(self, billing: Billing, spawn: Callable[[Coroutine[Any, Any, Any]], object]):
        self.billing = billing
        self._spawn = spawn

    def claimed(self, wallet_id: str, attempt: int) -> None:
        """The store's hook: a settle claimed `attempt`; run it in the background."""
        self._spawn(self.run(wallet_id, attempt))

    async def run(self, wallet_id: str, attempt: int) -> None:
        try:
            await self._run(wallet_id, attempt)
        except Exception:
            # The claim frees itself when its lease ends (AUTO_TOP_UP_CLAIM_MS);
            # a payment that did go through is credited by its webhook.
            log.exception("wallet %s: auto top-up attempt %d failed unexpectedly", wallet_id, attempt)

    async def _run(self, wallet_id: str, attempt: int) -> None:
        billing, config = self.billing, self.billing.config
        rule = await billing.payments.rule(wallet_id)
        if not rule.enabled or not rule.payment_method or not rule.customer:
            await self.record_failure(wallet_id, attempt, declined=False, error="auto top-up is off or has no saved card")
            return
        try:
            intent = await billing.stripe.v1.payment_intents.create_async(
                params={
                    "amount": billing.api.to_amount(rule.amount_micros), "currency": config.currency,
                    "customer": rule.customer, "payment_method": rule.payment_method,
                    "off_session": True, "confirm": True, "description": "metergate auto top-up",
                    "metadata": {META_END_USER: wallet_id, META_CREDIT: str(rule.amount_micros),
                                 META_KIND: "auto_top_up", META_ATTEMPT: str(attempt)},
                },
                options={"idempotency_key": _key("auto-top-up", wallet_id, str(attempt))},
            )
        except stripe.CardError as exc:
            # A decline, or `authentication_required`: the bank wants the card
            # holder present, which an off-session charge cannot give.
            await self.record_failure(wallet_id, attempt, declined=True, error=f"{exc.code or 'card_error'}: {exc.user_message or exc}")
            return
        except (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError) as exc:
            # Not the card's fault; if the charge did go through, its webhook credits it.
            await self.record_failure(wallet_id, attempt, declined=False, error=f"Stripe unavailable: {exc}")
            return
        except stripe.StripeError as exc:
            # The saved card gone or unusable counts against the card; any other
            # refusal (our request, an idempotency clash) is ours, not the card
            # holder's, and must not turn their auto top-up off.
            card_fault = isinstance(exc, stripe.InvalidRequestError) and exc.code in _CARD_FAULTS
            if not card_fault:
                log.error("wallet %s: Stripe refused auto top-up attempt %d: %s", wallet_id, attempt, exc)
            await self.record_failure(wallet_id, attempt, declined=card_fault,
                                      error=f"{exc.code or 'stripe_error'}: {exc.user_message or exc}")
            return
        if intent.status == "succeeded":
            await billing.credit_payment(wallet_id, intent.id, rule.amount_micros, attempt=attempt, kind="auto_top_up")
            observability.auto_top_up("succeeded")
            log.info("wallet %s: auto top-up %d charged %s", wallet_id, attempt, intent.id)
        elif intent.status == "processing":
            observability.auto_top_up("processing")
            log.info("wallet %s: auto top-up %d is processing (%s); its webhook settles it", wallet_id, attempt, intent.id)
        else:
            await self.record_failure(wallet_id, attempt, declined=True, error=f"authentication_required: payment {intent.status}")

    async def record_failure(self, wallet_id: str, attempt: int, *, declined: bool, error: str) -> None:
        config = self.billing.config
        outcome = await self.billing.payments.auto_top_up_failed(
            wallet_id, attempt, declined=declined, error=error,
            retry_after_ms=int(config.auto_top_up_retry_after_seconds * 1000), max_failures=config.auto_top_up_max_failures,
        )
        observability.auto_top_up("declined" if declined else "unavailable")
        if outcome.disabled_now:
            observability.auto_top_up("disabled")
            log.warning("wallet %s: auto top-up turned off after %d consecutive failures (last: %s)",
                        wallet_id, outcome.consecutive_failures, error)
        else:
            log.warning("wallet %s: auto top-up attempt %d failed (%s)", wallet_id, attempt, error)
