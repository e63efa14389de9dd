"""`JobHolds`: holds an operator opens for a long job (an agent run of many steps), outside any one call.

TigerBeetle's pending transfers as an API: open a hold of an amount for a TTL, grow it
or push its expiry back, capture parts of it (each capture its own idempotent ledger
`charge`, capture.lua), then release what is left -- or let the reaper expire it,
which releases the rest, as for any hold whose proxy died. The hold's id is derived
from the operator's idempotency key, so a retried open is the same hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.store.errors import HoldNotFound
from proxy.store.events import dirty_commands
from proxy.store.keyspace import _hold_key, _idempotency_key
from proxy.store.scripts import fingerprint
from proxy.store.wallets import Hold, HoldExtension, Settlement, WalletState, WalletStore, _meta, _state

JOB_HOLD_PREFIX = "job_"


def job_hold_id(wallet_id: str, idempotency_key: str) -> str:
    """The hold an open with this key makes: the same key opens the same hold."""
    return JOB_HOLD_PREFIX + hashlib.sha256(f"{wallet_id}\x00{idempotency_key}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Capture:
    ledger_id: str
    captured_micros: int
    left_micros: int  # still held
    wallet: WalletState
    replayed: bool


@dataclass(frozen=True)
class JobHold:
    hold_id: str
    status: str  # active, settled, released, expired
    amount_micros: int  # held now
    captured_micros: int
    expires_at_ms: int
    created_ms: int
    description: str


class JobHolds:
    def __init__(self, wallets: WalletStore):
        self.wallets = wallets

    async def open(self, wallet_id: str, amount_micros: int, *, ttl_seconds: int, idempotency_key: str,
                   description: str = "", meta: Mapping[str, Any] | None = None) -> Hold:
        hold_id = job_hold_id(wallet_id, idempotency_key)
        hold = await self.wallets.hold(wallet_id, amount_micros, hold_id=hold_id, ttl_ms=ttl_seconds * 1000,
                                       meta={"job": True, "description": description, **(meta or {})})
        if description and not hold.replayed:
            await self.wallets.commands.execute("HSET", _hold_key(wallet_id, hold_id), "description", description)
        return hold

    async def get(self, wallet_id: str, hold_id: str) -> JobHold:
        if not hold_id.startswith(JOB_HOLD_PREFIX):
            raise HoldNotFound(f"no job hold {hold_id} in this wallet")
        raw = await self.wallets.commands.execute("HGETALL", _hold_key(wallet_id, hold_id))
        fields = _decode(raw)
        if not fields:
            raise HoldNotFound(f"no job hold {hold_id} in this wallet")
        return JobHold(hold_id=hold_id, status=fields.get("status", "?"), amount_micros=int(fields.get("amount", 0)),
                       captured_micros=int(fields.get("captured", 0)), expires_at_ms=int(fields.get("expires_ms", 0)),
                       created_ms=int(fields.get("created_ms", 0)), description=fields.get("description", ""))

    async def extend(self, hold: JobHold, wallet_id: str, *, to_amount_micros: int, ttl_seconds: int) -> HoldExtension:
        """Grow `hold` (as just read) to `to_amount_micros` (never shrink it) and expire it `ttl_seconds` from now.
        Naming the new total, not an increment, makes a retry harmless; a hold that moved since it
        was read is not grown twice (extend.lua replays when its amount is not the one read)."""
        current = hold.amount_micros
        return await self.wallets.extend(wallet_id, hold.hold_id, max(to_amount_micros - current, 0), current_micros=current,
                                         ttl_ms=ttl_seconds * 1000)

    async def capture(self, wallet_id: str, hold_id: str, amount_micros: int, *, idempotency_key: str,
                      meta: Mapping[str, Any] | None = None) -> Capture:
        fp = fingerprint("capture", hold_id, amount_micros, meta)
        out = await self.wallets._scripts.run(
            self.wallets.commands, "capture",
            [*self.wallets._hold_keys(wallet_id, hold_id), _idempotency_key(wallet_id, idempotency_key)],
            [hold_id, amount_micros, fp, self.wallets.idempotency_ttl_seconds, _meta(meta)],
            before=dirty_commands(wallet_id),
        )
        return Capture(ledger_id=out[1], captured_micros=int(out[2]), left_micros=int(out[3]),
                       wallet=_state(wallet_id, *out[4:7]), replayed=out[0] == "replay")

    async def release(self, wallet_id: str, hold_id: str, *, reason: str) -> Settlement:
        await self.get(wallet_id, hold_id)  # only job holds: a call's hold belongs to its lease
        return await self.wallets.release(wallet_id, hold_id, reason=reason)


def _decode(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        items = list(raw.items())
    else:
        items = list(zip(raw[::2], raw[1::2]))
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in items}
