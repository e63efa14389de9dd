"""`Event`: what metergate tells the operator, as it is stored, signed and delivered."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

# Every type an endpoint can subscribe to ("*" subscribes to all).
EVENT_TYPES = (
    "wallet.balance_low",  # available crossed below a threshold (once per crossing; re-armed by a top-up)
    "wallet.depleted",  # a call was refused, or a stream cut, for lack of funds (once until a top-up)
    "wallet.topped_up",  # any credit: the admin API, a Checkout payment, an auto top-up
    "charge.shortfall",  # a settle could not capture all it owed
    "hold.expired",  # the reaper closed a hold whose proxy died (charged its checkpoint, or released it)
    "key.spend_cap_reached",  # a key or token was refused, or a stream cut, at its spend cap
    "ratecard.reloaded",
    "ratecard.refused",
    "top_up.failed",  # a Checkout payment failed
    "auto_top_up.succeeded",
    "auto_top_up.failed",
    "auto_top_up.disabled",  # consecutive failures turned it off
)


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    created: int  # unix seconds
    data: dict[str, Any]
    end_user: str | None = None
    # Where it came from: the ledger entry it was derived from, for wallet events.
    ledger_id: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "event", "type": self.type, "created": self.created}
        if self.end_user is not None:
            out["end_user"] = self.end_user
        if self.ledger_id is not None:
            out["ledger_id"] = self.ledger_id
        out["data"] = self.data
        return out

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        d = orjson.loads(raw)
        return cls(id=d["id"], type=d["type"], created=d["created"], data=d.get("data") or {},
                   end_user=d.get("end_user"), ledger_id=d.get("ledger_id"))


def derived_event_id(wallet_id: str, ledger_id: str, event_type: str, discriminator: str = "") -> str:
    """Deterministic: deriving the same ledger entry again (after a crash) gives the same id,
    so a receiver can drop the duplicate."""
    digest = hashlib.sha256(f"{wallet_id}|{ledger_id}|{event_type}|{discriminator}".encode()).hexdigest()
    return "evt_" + digest[:24]


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def now_seconds() -> int:
    return int(time.time())
