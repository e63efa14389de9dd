"""`LimitStore`: per-credential rate windows and spend counters (`proxy/lua/key_limits.lua`)."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.store.keyspace import _limits_key
from proxy.store.scripts import Commands, RedisPyCommands, StoreRedis, _scripts
from proxy.store.wallets import now_ms


@dataclass(frozen=True)
class Limited:
    """Why a call was refused by its key's limits: `what` is requests|tokens|spend|daily_spend."""

    what: str
    limit: int
    used: int
    retry_after_ms: int


@dataclass(frozen=True)
class KeySpend:
    spent_micros: int
    spent_today_micros: int


class LimitStore:
    """Per-credential rate windows and spend counters (`proxy/lua/key_limits.lua`).

    Each credential (an `sk-eu_` key id, or `jwt:<jti>`) has one hash in its end
    user's `{w:<id>}` slot; admitting a call counts it and reserves its hold
    against the spend caps, recording it replaces the reservation by the capture.
    """

    def __init__(self, redis: StoreRedis, commands: Commands | None = None):
        self.redis = redis
        self.commands: Commands = commands or RedisPyCommands(redis)
        self._scripts = _scripts()

    async def admit(
        self, end_user_id: str, key_id: str, request_id: str, *, requests_per_minute: int, tokens_per_minute: int,
        tokens: int, max_spend_micros: int | None, max_daily_spend_micros: int | None, amount_micros: int,
    ) -> Limited | None:
        """Count the call and reserve `amount_micros`; or, over a limit, change nothing and say which."""
        out = await self._scripts.run(self.commands, "key_limits", [_limits_key(end_user_id, key_id)], [
            "admit", request_id, requests_per_minute, tokens_per_minute, tokens,
            -1 if max_spend_micros is None else max_spend_micros,
            -1 if max_daily_spend_micros is None else max_daily_spend_micros, amount_micros,
        ])
        if out[0] == "ok":
            return None
        return Limited(what=out[1], limit=int(out[2]), used=int(out[3]), retry_after_ms=int(out[4]))

    async def record(self, end_user_id: str, key_id: str, request_id: str, *, captured_micros: int, tokens: int) -> KeySpend:
        """Replace the call's reservation (if it had one) by what it captured and used."""
        out = await self._scripts.run(self.commands, "key_limits", [_limits_key(end_user_id, key_id)], [
            "record", request_id, captured_micros, tokens,
        ])
        return KeySpend(int(out[1]), int(out[2]))

    async def spend(self, end_user_id: str, key_id: str) -> KeySpend:
        """What a credential has spent (reservations of calls in flight included), in total and today (UTC)."""
        spent, day, spent_day = await self.redis.hmget(_limits_key(end_user_id, key_id), "spent", "day", "spent_day")
        today = now_ms() // 86_400_000
        return KeySpend(int(spent or 0), int(spent_day or 0) if day is not None and int(day) == today else 0)
