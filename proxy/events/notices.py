"""`Notices`: ledger notes for what moves no money but the operator wants to hear about.

A refusal for lack of funds, a stream cut for it, a key stopped at its spend
cap, a Checkout payment that failed: each is written as a ledger note (amount
0; see proxy/lua/note.lua) so that its event is derived in ledger order with
the money movements around it (a wallet's `balance_low` events come before its
`depleted`). Written in the background: a refusal is never slowed down by it,
and a note the store could not take is logged, not retried (no money moved).
Flags on the wallet make a storm of refusals write one note: one `depleted`
until funds come in, one `spend_cap_reached` per key and UTC day.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from proxy.store import WalletStore

log = logging.getLogger(__name__)


class Notices:
    def __init__(self, wallets: WalletStore, spawn: Callable[[Coroutine[Any, Any, Any]], object]):
        self.wallets = wallets
        self._spawn = spawn

    def depleted(self, wallet_id: str, reason: str, *, request_id: str | None = None, model: str | None = None) -> None:
        """A call refused (`reason` "refused") or a stream cut ("stream_cut") because the wallet could not pay."""
        meta = {k: v for k, v in (("request_id", request_id), ("model", model)) if v}
        self._note(wallet_id, "depleted", reason, meta, ("note:depleted", "1"))

    def spend_cap_reached(self, wallet_id: str, key_id: str, *, period: str, cap_micros: int | None,
                          request_id: str | None = None) -> None:
        day = str(int(time.time() // 86_400))
        meta = {"key_id": key_id, "period": period, "cap_micros": cap_micros, "request_id": request_id}
        self._note(wallet_id, "spend_cap_reached", f"{key_id} reached its {period} spend cap",
                   {k: v for k, v in meta.items() if v is not None}, (f"note:cap:{key_id}", day))

    def top_up_failed(self, wallet_id: str, payment_intent: str, reason: str) -> None:
        self._note(wallet_id, "top_up_failed", reason, {"payment_intent": payment_intent}, None)

    def _note(self, wallet_id: str, kind: str, reason: str, meta: Mapping[str, Any], once_per: tuple[str, str] | None) -> None:
        self._spawn(self._write(wallet_id, kind, reason, meta, once_per))

    async def _write(self, wallet_id: str, kind: str, reason: str, meta: Mapping[str, Any], once_per: tuple[str, str] | None) -> None:
        try:
            await self.wallets.note(wallet_id, kind, reason=reason, meta=meta, once_per=once_per)
        except Exception as exc:  # a lost note moves no money: say so and go on
            log.warning("wallet %s: could not record a %s note: %r", wallet_id, kind, exc)
