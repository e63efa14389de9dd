"""`GrantStore`: a wallet's grants (credit by kind, priority and expiry) and its credit limit.

The balance is the sum of the grants; the wallet scripts draw and refill them
(see "Grants" in `proxy/lua/_prelude.lua`). This module creates grants
(`grant.lua`), reads them, expires the ones nobody's calls sweep
(`expire_grants.lua`, from the reaper) and changes the credit limit
(`set_credit_limit.lua`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.store.events import dirty_commands
from proxy.store.keyspace import GRANT_DUE_KEY, _check_wallet_id, _idempotency_key, _ledger_key, _wallet_key
from proxy.store.scripts import Commands, RedisPyCommands, StoreRedis, _scripts, fingerprint
from proxy.store.wallets import Receipt, WalletNotFound, _meta, _state, now_ms

PURCHASED = "purchased"
DEBT = "debt"
DEFAULT_PRIORITY = 50
# Promotional credit is spent before purchased credit unless a grant says otherwise.
DEFAULT_PRIORITIES = {"promotional": 25}
# An expired grant whose remainder waits for live holds is looked at again this often
# (every close of one of those holds sweeps it anyway).
_REMAINDER_RECHECK_MS = 60_000


@dataclass(frozen=True)
class Grant:
    """Credit in a wallet: what is left of it, and in which order it is spent."""

    id: str
    kind: str
    remaining_micros: int
    priority: int
    expires_at_ms: int | None
    # 'expired': past its expiry, keeping only what live holds had reserved of it.
    state: Literal["live", "expired"]
    seq: int

    def draw_key(self) -> tuple[bool, int, float, int]:
        """The draw order of `_prelude.lua`'s grant_before."""
        return (self.state != "expired", self.priority,
                float("inf") if self.expires_at_ms is None else self.expires_at_ms, self.seq)


@dataclass(frozen=True)
class GrantReceipt:
    grant_id: str
    receipt: Receipt


def parse_grants(fields: Mapping[bytes, bytes]) -> list[Grant]:
    """The grants of a wallet hash (HGETALL), in draw order, the debt last.

    A wallet from before grants (no `grants_v`) has its balance as one grant,
    as the scripts will write it the first time they touch it.
    """
    f = {k.decode(): v.decode() for k, v in fields.items()}
    if "grants_v" not in f:
        balance = int(f.get("balance", "0"))
        if balance == 0:
            return []
        kind = PURCHASED if balance > 0 else DEBT
        return [Grant(kind, kind, balance, DEFAULT_PRIORITY, None, "live", 0)]
    grants = []
    for name, text in f.items():
        if not name.startswith("grant:"):
            continue
        remaining, priority, expires, seq, kind, state = text.split("|")
        grants.append(Grant(
            id=name[len("grant:"):], kind=kind, remaining_micros=int(remaining), priority=int(priority),
            expires_at_ms=int(expires) or None, state="expired" if state == "expired" else "live", seq=int(seq),
        ))
    live = sorted((g for g in grants if g.id != DEBT), key=Grant.draw_key)
    return live + [g for g in grants if g.id == DEBT]


class GrantStore:
    """Grants and the credit limit of wallets; each change is one Lua script."""

    def __init__(self, redis: StoreRedis, commands: Commands | None = None, *, idempotency_ttl_seconds: int = 7 * 24 * 3600):
        self.redis = redis
        self.commands: Commands = commands or RedisPyCommands(redis)
        self.idempotency_ttl_seconds = idempotency_ttl_seconds
        self._scripts = _scripts()

    async def grant(
        self, wallet_id: str, amount_micros: int, *, kind: str, idempotency_key: str, priority: int | None = None,
        expires_at_ms: int | None = None, meta: Mapping[str, Any] | None = None,
    ) -> GrantReceipt:
        """Credit a new grant of `kind`; with an expiry, the reaper is told when to look again."""
        _check_wallet_id(wallet_id)
        if priority is None:
            priority = DEFAULT_PRIORITIES.get(kind, DEFAULT_PRIORITY)
        fp = fingerprint("grant", amount_micros, kind, priority, expires_at_ms, meta)
        keys = [_wallet_key(wallet_id), _ledger_key(wallet_id), _idempotency_key(wallet_id, idempotency_key)]
        out = await self._scripts.run(
            self.commands, "grant", keys,
            [amount_micros, fp, self.idempotency_ttl_seconds, kind, priority, expires_at_ms or 0, _meta(meta), idempotency_key],
            before=dirty_commands(wallet_id),
            # Indexed after the grant exists; a lost ZADD only delays the sweep to
            # the wallet's next operation (every script sweeps what is due).
            after=[("ZADD", GRANT_DUE_KEY, "LT", expires_at_ms, wallet_id)] if expires_at_ms else (),
        )
        receipt = Receipt(ledger_id=out[1], wallet=_state(wallet_id, *out[2:5]), replayed=out[0] == "replay")
        return GrantReceipt(grant_id=out[5], receipt=receipt)

    async def grants(self, wallet_id: str) -> list[Grant]:
        """The wallet's grants in draw order (the debt last); WalletNotFound if none."""
        fields: dict[bytes, bytes] = await self.redis.hgetall(_wallet_key(wallet_id))  # type: ignore[assignment]
        if not fields:
            raise WalletNotFound(wallet_id)
        return parse_grants(fields)

    async def set_credit_limit(
        self, wallet_id: str, credit_limit_micros: int, *, reason: str, idempotency_key: str,
        meta: Mapping[str, Any] | None = None,
    ) -> Receipt:
        """Change the credit limit; CreditLimitInUse below what the wallet already uses of it."""
        _check_wallet_id(wallet_id)
        fp = fingerprint("set_credit_limit", credit_limit_micros, reason, meta)
        keys = [_wallet_key(wallet_id), _ledger_key(wallet_id), _idempotency_key(wallet_id, idempotency_key)]
        out = await self._scripts.run(
            self.commands, "set_credit_limit", keys,
            [credit_limit_micros, fp, self.idempotency_ttl_seconds, reason, _meta(meta), idempotency_key],
            before=dirty_commands(wallet_id),
        )
        return Receipt(ledger_id=out[1], wallet=_state(wallet_id, *out[2:5]), replayed=out[0] == "replay")

    async def expire_due(self, *, limit: int = 100) -> int:
        """One reaper pass over wallets with a grant due; how many wallets it swept."""
        now = now_ms()
        due: list[bytes] = await self.redis.zrangebyscore(GRANT_DUE_KEY, "-inf", now, start=0, num=limit)  # type: ignore[assignment]
        for raw in due:
            wallet_id = raw.decode()
            out = await self._scripts.run(
                self.commands, "expire_grants", [_wallet_key(wallet_id), _ledger_key(wallet_id)], [],
                before=dirty_commands(wallet_id),
            )
            if out[0] == "missing" or out[2] == "":
                await self.redis.zrem(GRANT_DUE_KEY, wallet_id)
            else:
                next_due = int(out[2]) or now + _REMAINDER_RECHECK_MS
                await self.redis.zadd(GRANT_DUE_KEY, {wallet_id: next_due})
        return len(due)
