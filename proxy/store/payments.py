"""`PaymentStore`: money in from cards, one method per Lua script, and the Stripe records beside them.

The scripts (`card_payment`, `card_refund`, `dispute`, `auto_top_up_rule`,
`auto_top_up_failed`) move a wallet's money or its auto top-up state atomically;
every money movement is keyed by a Stripe id, so each one happens once whatever
reports it and however often. The plain keys here (which wallet a payment paid,
which webhook events were applied, a wallet's Stripe customer) are lookups:
losing one delays work, never moves money.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.store.events import dirty_commands
from proxy.store.keyspace import (
    _billing_key,
    _card_payments_key,
    _check_wallet_id,
    _idempotency_key,
    _ledger_key,
    _stripe_event_key,
    _stripe_payment_key,
    _wallet_key,
)
from proxy.store.scripts import Commands, RedisPyCommands, StoreRedis, _scripts, fingerprint
from proxy.store.wallets import Receipt, _meta, _state

# Stripe redelivers an event for up to three days; an applied event is
# remembered for longer, and the money movements themselves are keyed by
# Stripe ids with the store's idempotency TTL.
_EVENT_TTL_SECONDS = 30 * 24 * 3600
_PAYMENT_INDEX_TTL_SECONDS = 400 * 24 * 3600  # disputes can come months later


@dataclass(frozen=True)
class AutoTopUpRule:
    """A wallet's saved card and auto top-up rule, as stored."""

    wallet_id: str
    enabled: bool
    threshold_micros: int
    amount_micros: int
    configured: bool  # False: no rule was ever set (the tier's default applies when a card is saved)
    customer: str | None
    payment_method: str | None
    card: str | None
    consecutive_failures: int
    last_error: str | None
    disabled_reason: str | None
    attempts: int
    blocked_until_ms: int  # no attempt is claimed before (one in flight, or backing off after a failure)


@dataclass(frozen=True)
class CardPayment:
    payment_intent: str
    credited_micros: int
    refunded_micros: int

    @property
    def refundable_micros(self) -> int:
        return self.credited_micros - self.refunded_micros


@dataclass(frozen=True)
class AutoTopUpFailure:
    consecutive_failures: int
    enabled: bool
    disabled_now: bool  # this failure turned the rule off (a ledger note says so)


class PaymentStore:
    """Card money for wallets: payments credited once, refunds, disputes, and the auto top-up rule."""

    def __init__(self, redis: StoreRedis, commands: Commands | None = None, *, idempotency_ttl_seconds: int = 7 * 24 * 3600):
        self.redis = redis
        self.commands: Commands = commands or RedisPyCommands(redis)
        # Longer than Stripe's redelivery window, whatever the store's own setting.
        self.idempotency_ttl_seconds = max(idempotency_ttl_seconds, _EVENT_TTL_SECONDS)
        self._scripts = _scripts()

    async def _receipt(self, name: str, wallet_id: str, idempotency_key: str, args: list[Any]) -> Receipt:
        _check_wallet_id(wallet_id)
        keys = [_wallet_key(wallet_id), _ledger_key(wallet_id), _idempotency_key(wallet_id, idempotency_key),
                _card_payments_key(wallet_id)]
        if name == "card_payment":
            keys.append(_billing_key(wallet_id))
        out = await self._scripts.run(self.commands, name, keys, args, before=dirty_commands(wallet_id))
        return Receipt(ledger_id=out[1], wallet=_state(wallet_id, *out[2:5]), replayed=out[0] == "replay")

    # -- money

    async def credit_payment(
        self, wallet_id: str, payment_intent: str, amount_micros: int, *, auto_top_up_attempt: int = 0,
        meta: Mapping[str, Any] | None = None,
    ) -> Receipt:
        """Credit a succeeded payment once (replayed for every later report of it)."""
        key = f"stripe:{payment_intent}"
        fp = fingerprint("card_payment", payment_intent, amount_micros)
        await self.remember_payment(payment_intent, wallet_id)
        return await self._receipt("card_payment", wallet_id, key, [
            amount_micros, fp, self.idempotency_ttl_seconds, payment_intent, _meta(meta), key, auto_top_up_attempt,
        ])

    async def refund_to_card(
        self, wallet_id: str, payment_intent: str, amount_micros: int, *, request_id: str,
        meta: Mapping[str, Any] | None = None,
    ) -> Receipt:
        """Debit a refund the operator asked for, before Stripe is asked (see card_refund.lua)."""
        key = f"card-refund:{request_id}"
        fp = fingerprint("card_refund", payment_intent, amount_micros)
        return await self._receipt("card_refund", wallet_id, key, [
            amount_micros, fp, self.idempotency_ttl_seconds, payment_intent, _meta(meta), key, "request", request_id,
        ])

    async def restore_refund(self, wallet_id: str, payment_intent: str, amount_micros: int, *, request_id: str, reason: str) -> Receipt:
        """Give back a refund Stripe refused."""
        key = f"card-refund-restore:{request_id}"
        fp = fingerprint("card_refund_restore", payment_intent, amount_micros)
        return await self._receipt("card_refund", wallet_id, key, [
            amount_micros, fp, self.idempotency_ttl_seconds, payment_intent, _meta({"reason": reason}), key, "restore", request_id,
        ])

    async def record_external_refund(self, wallet_id: str, payment_intent: str, amount_micros: int, *, refund_id: str) -> Receipt:
        """A refund made in Stripe (its dashboard), not through metergate."""
        key = f"stripe:{refund_id}"
        fp = fingerprint("card_refund_external", payment_intent, amount_micros)
        return await self._receipt("card_refund", wallet_id, key, [
            amount_micros, fp, self.idempotency_ttl_seconds, payment_intent, "", key, "external", refund_id,
        ])

    async def external_refund_failed(self, wallet_id: str, payment_intent: str, *, refund_id: str) -> Receipt:
        """A refund made in Stripe failed after it was recorded: give back what it debited."""
        key = f"stripe:{refund_id}:failed"
        fp = fingerprint("card_refund_external_failed", payment_intent, refund_id)
        return await self._receipt("card_refund", wallet_id, key, [
            1, fp, self.idempotency_ttl_seconds, payment_intent, "", key, "external_failed", refund_id,
        ])

    async def dispute(self, wallet_id: str, payment_intent: str, amount_micros: int, *, dispute_id: str, won: bool) -> Receipt:
        mode = "won" if won else "opened"
        key = f"stripe:{dispute_id}:{mode}"
        fp = fingerprint("dispute", payment_intent, amount_micros, mode)
        return await self._receipt("dispute", wallet_id, key, [
            amount_micros, fp, self.idempotency_ttl_seconds, payment_intent, "", key, mode, dispute_id,
        ])

    async def refund_requested(self, wallet_id: str, request_id: str) -> int | None:
        """What the refund request `request_id` debited (micros), or None when it debited nothing (yet)."""
        result: bytes | None = await self.redis.hget(_idempotency_key(wallet_id, f"card-refund:{request_id}"), "result")  # type: ignore[assignment]
        if not result:
            return None
        ledger_id = result.decode().split(",")[0]
        found: list[tuple[bytes, dict[bytes, bytes]]] = await self.redis.xrange(  # type: ignore[assignment]
            _ledger_key(wallet_id), min=ledger_id, max=ledger_id)
        return -int(found[0][1][b"amount"]) if found else None

    async def refund_restored(self, wallet_id: str, request_id: str) -> bool:
        """Whether the refund request `request_id` was given back (Stripe refused it, or it failed)."""
        key = _idempotency_key(wallet_id, f"card-refund-restore:{request_id}")
        return bool(await self.commands.execute("EXISTS", key))

    async def card_payments(self, wallet_id: str) -> list[CardPayment]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(_card_payments_key(wallet_id))  # type: ignore[assignment]
        # The hash also keeps disputes ("dispute:du_..." -> micros, or "won"): only payments' fields are numbers here.
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return [
            CardPayment(payment_intent=name, credited_micros=int(value), refunded_micros=int(fields.get(f"{name}:refunded", 0)))
            for name, value in sorted(fields.items()) if ":" not in name
        ]

    # -- auto top-up

    async def set_rule(
        self, wallet_id: str, *, enabled: bool, threshold_micros: int, amount_micros: int, card_saved: bool = False,
        payment_method: str = "", card: str = "", customer: str = "",
    ) -> None:
        """The operator's rule (`card_saved=False`), or a newly saved card with the tier's default rule."""
        _check_wallet_id(wallet_id)
        await self._scripts.run(
            self.commands, "auto_top_up_rule", [_wallet_key(wallet_id), _billing_key(wallet_id)],
            ["card_saved" if card_saved else "set", "1" if enabled else "0", threshold_micros, amount_micros,
             payment_method, card, customer],
        )

    async def rule(self, wallet_id: str) -> AutoTopUpRule:
        raw: dict[bytes, bytes] = await self.redis.hgetall(_billing_key(wallet_id))  # type: ignore[assignment]
        f = {k.decode(): v.decode() for k, v in raw.items()}
        blocked, attempts = await self.commands.execute("HMGET", _wallet_key(wallet_id), "at_block_until", "at_attempt")
        return AutoTopUpRule(
            wallet_id=wallet_id, enabled=f.get("at_enabled") == "1", threshold_micros=int(f.get("at_threshold", 0)),
            amount_micros=int(f.get("at_amount", 0)), configured="at_enabled" in f, customer=f.get("customer") or None,
            payment_method=f.get("payment_method") or None, card=f.get("card") or None,
            consecutive_failures=int(f.get("at_failures", 0)), last_error=f.get("at_last_error") or None,
            disabled_reason=f.get("at_disabled_reason") or None, attempts=int(attempts or 0), blocked_until_ms=int(blocked or 0),
        )

    async def auto_top_up_failed(
        self, wallet_id: str, attempt: int, *, declined: bool, error: str, retry_after_ms: int, max_failures: int,
    ) -> AutoTopUpFailure:
        out = await self._scripts.run(
            self.commands, "auto_top_up_failed", [_wallet_key(wallet_id), _billing_key(wallet_id), _ledger_key(wallet_id)],
            [attempt, "declined" if declined else "unavailable", error[:500], retry_after_ms, max_failures],
            before=dirty_commands(wallet_id),
        )
        return AutoTopUpFailure(consecutive_failures=int(out[1]), enabled=out[2] == "1", disabled_now=out[4] == "1")

    # -- lookups

    async def link_customer(self, wallet_id: str, customer: str) -> str:
        """Keep `customer` as the wallet's Stripe customer unless one is kept already; the one kept."""
        key = _billing_key(wallet_id)
        await self.commands.execute("HSETNX", key, "customer", customer)
        kept = await self.commands.execute("HGET", key, "customer")
        return kept.decode() if isinstance(kept, bytes) else str(kept)

    async def customer(self, wallet_id: str) -> str | None:
        kept = await self.commands.execute("HGET", _billing_key(wallet_id), "customer")
        return kept.decode() if isinstance(kept, bytes) else kept

    async def remember_payment(self, payment_intent: str, wallet_id: str) -> None:
        await self.commands.execute("SET", _stripe_payment_key(payment_intent), wallet_id, "EX", _PAYMENT_INDEX_TTL_SECONDS)

    async def wallet_of_payment(self, payment_intent: str) -> str | None:
        found = await self.commands.execute("GET", _stripe_payment_key(payment_intent))
        return found.decode() if isinstance(found, bytes) else found

    async def event_applied(self, event_id: str) -> bool:
        return bool(await self.commands.execute("EXISTS", _stripe_event_key(event_id)))

    async def mark_event_applied(self, event_id: str) -> None:
        await self.commands.execute("SET", _stripe_event_key(event_id), "1", "EX", _EVENT_TTL_SECONDS)
