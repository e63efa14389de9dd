"""`MeterStore`: usage events of the operator's own meters (crawler hours, pages...), charged at the card's price.

Each event counts its units against the end user's free allowance for the period
(the card's `included`), then debits the rest's price, refused whole (402) when the
wallet cannot pay -- one meter.lua step. The price depends on the count, so it is
computed here from the count as read, and the script applies it only if the count
has not moved since (else the event is priced again): concurrent events never share
one free unit, and the arithmetic stays in exact Decimals, out of Lua's doubles.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.store.events import dirty_commands
from proxy.store.keyspace import _idempotency_key, _ledger_key, _meter_usage_key, _wallet_key
from proxy.store.scripts import fingerprint
from proxy.store.wallets import WalletState, WalletStore, _meta, _state

UNITS = 1_000_000  # quantities are counted in millionths of a unit
_MAX_REPRICES = 200  # a count that keeps moving is retried; each retry is one round trip


@dataclass(frozen=True)
class MeterCharge:
    ledger_id: str
    used_micro_units: int  # this period's count, after the event
    charged_micros: int
    wallet: WalletState
    replayed: bool


def period_of(per: str | None, at: dt.datetime) -> tuple[str, int]:
    """The calendar period (UTC) an event at `at` falls in, and how long its counter must live (s)."""
    if per == "day":
        return at.strftime("%Y-%m-%d"), 3 * 86_400
    return at.strftime("%Y-%m"), 70 * 86_400  # "month", and meters without an allowance


class StaleCount(Exception):
    pass


class MeterStore:
    def __init__(self, wallets: WalletStore):
        self.wallets = wallets

    async def used(self, wallet_id: str, meter: str, period: str) -> int:
        raw = await self.wallets.commands.execute("GET", _meter_usage_key(wallet_id, meter, period))
        return int(raw) if raw is not None else 0

    async def charge(self, wallet_id: str, meter: str, period: str, quantity: int, *, counter_ttl_seconds: int,
                     idempotency_key: str, price: Callable[[int], tuple[int, Mapping[str, Any]]],
                     event: Mapping[str, Any]) -> MeterCharge:
        """Count `quantity` micro-units of `meter` and debit `price(used before)` -> (micros, charge metadata).
        `event` is what identifies the request for its idempotency key (meter, quantity, period, ...)."""
        fp = fingerprint("meter", dict(event))
        keys = [_wallet_key(wallet_id), _ledger_key(wallet_id), _idempotency_key(wallet_id, idempotency_key),
                _meter_usage_key(wallet_id, meter, period)]
        used = await self.used(wallet_id, meter, period)
        for _ in range(_MAX_REPRICES):
            amount, meta = price(used)
            out = await self.wallets._scripts.run(
                self.wallets.commands, "meter", keys,
                [quantity, fp, self.wallets.idempotency_ttl_seconds, used, amount, counter_ttl_seconds, _meta(meta)],
                before=dirty_commands(wallet_id),
            )
            if out[0] == "stale":
                used = int(out[1])
                continue
            return MeterCharge(ledger_id=out[1], used_micro_units=int(out[5]), charged_micros=int(out[6]),
                               wallet=_state(wallet_id, *out[2:5]), replayed=out[0] == "replay")
        raise StaleCount(f"the count of meter {meter} kept moving; try again")
