"""What an end-user credential may do, enforced before a call is forwarded.

A scoped `sk-eu_` key or an end-user token carries limits in `Caller.scopes`:

- `models`: the models it may call (enforced where the model is resolved);
- `expires_ms`: after it, the credential no longer authenticates (see auth);
- `requests_per_minute`, `tokens_per_minute`: sliding one-minute windows;
- `max_spend_micros` (lifetime) and `max_daily_spend_micros` (per UTC day).

`Admission` wraps the wallet hold: it counts the call and reserves the
hold's amount against the spend caps in one Lua step (`key_limits.lua`), and
undoes the reservation if the hold is refused. The caps are holds too: they
are written on the wallet hold, a stream that grows its hold reserves the
growth against them in the same script (or is cut), and the settle and expire
scripts capture no more than they leave, then replace the reservation by the
amount captured and the tokens used, in the same step as the charge
(`credential_spend()` names what they record). Spend never passes a cap,
under any concurrency.
Tokens per minute count the estimate at admission (prompt + the output bound,
as OpenAI's own limiter does) and are corrected to the real usage at
settlement. Over a rate: 429; over a spend cap: 402; nothing is forwarded and
no hold is left behind.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

from proxy.auth import Caller
from proxy.errors import ApiError
from proxy.metering import Quote
from proxy.schemas import usd
from proxy.store import MAX_AMOUNT_MICROS, CredentialSpend, Limited, LimitStore

RATE_FIELDS = ("requests_per_minute", "tokens_per_minute")
SPEND_FIELDS = ("max_spend_micros", "max_daily_spend_micros")


_LIMIT_FIELDS = (*RATE_FIELDS, *SPEND_FIELDS)


def has_limits(scopes: Mapping[str, Any]) -> bool:
    # Asked of every call; most keys have no scopes at all.
    return bool(scopes) and any(scopes.get(name) is not None for name in _LIMIT_FIELDS)


def _metered_key(caller: Caller) -> bool:
    """Operator calls are the operator's business; keys and tokens are counted."""
    return caller.key_id != "operator"


def _refusal(caller: Caller, limited: Limited, tokens: int, amount: int) -> ApiError:
    if limited.what == "tokens" and limited.retry_after_ms < 0:
        # Larger than the whole window: no wait helps, so no Retry-After to loop on.
        return ApiError(
            429, f"Request too large for {caller.key_id} on tokens per min (TPM): Limit {limited.limit}, "
            f"Requested {tokens}. The input or output tokens must be reduced in order to run successfully.",
            type="tokens", code="rate_limit_exceeded",
            headers={"X-RateLimit-Limit-Tokens": str(limited.limit)},
        )
    # The script's wait is when the call first fits; a header of whole seconds
    # rounds it up, so a client that waits exactly this long is admitted.
    retry = max(1, math.ceil(limited.retry_after_ms / 1000))
    if limited.what == "requests":
        return ApiError(
            429, f"Rate limit reached for {caller.key_id} on requests per min (RPM): Limit {limited.limit}, "
            f"Used {limited.used}, Requested 1. Please try again in {retry}s.",
            type="requests", code="rate_limit_exceeded",
            headers={"Retry-After": str(retry), "X-RateLimit-Limit-Requests": str(limited.limit),
                     "X-RateLimit-Remaining-Requests": str(max(0, limited.limit - limited.used))},
        )
    if limited.what == "tokens":
        return ApiError(
            429, f"Rate limit reached for {caller.key_id} on tokens per min (TPM): Limit {limited.limit}, "
            f"Used {limited.used}, Requested {tokens}. Please try again in {retry}s.",
            type="tokens", code="rate_limit_exceeded",
            headers={"Retry-After": str(retry), "X-RateLimit-Limit-Tokens": str(limited.limit),
                     "X-RateLimit-Remaining-Tokens": str(max(0, limited.limit - limited.used))},
        )
    period = "daily" if limited.what == "daily_spend" else "lifetime"
    return SpendCapRefusal(
        f"This key's {period} spend limit is {usd(limited.limit)} USD; it has spent {usd(limited.used)} "
        f"and this call may cost up to {usd(amount)}.", period=period, cap_micros=limited.limit,
    )


class SpendCapRefusal(ApiError):
    """A 402: the credential reached a spend cap (which one, for the operator's event)."""

    def __init__(self, message: str, *, period: str, cap_micros: int):
        super().__init__(402, message, type="insufficient_quota", code="spend_limit_exceeded")
        self.period, self.cap_micros = period, cap_micros


class Admission:
    """`async with Admission(...)`: admit the call under its credential's limits around the
    wallet hold (which runs in the body); a body that raises gives the admission back.

    A class, not an @asynccontextmanager: that costs ~1.8 µs a use here (a generator and
    its wrapper), and every metered call enters one, with limits or (nearly always) without.
    """

    __slots__ = ("store", "caller", "quote", "request_id", "_admitted")

    def __init__(self, store: LimitStore, caller: Caller, quote: Quote, request_id: str) -> None:
        self.store, self.caller, self.quote, self.request_id = store, caller, quote, request_id
        self._admitted = False

    async def __aenter__(self) -> None:
        caller, quote = self.caller, self.quote
        scopes = caller.scopes
        if not (_metered_key(caller) and has_limits(scopes)):
            return
        tokens = quote.prompt_tokens + quote.max_output_tokens
        amount = quote.hold.price_micros
        limited = await self.store.admit(
            caller.end_user_id, caller.key_id, self.request_id,
            requests_per_minute=int(scopes.get("requests_per_minute") or 0),
            tokens_per_minute=int(scopes.get("tokens_per_minute") or 0), tokens=tokens,
            max_spend_micros=scopes.get("max_spend_micros"), max_daily_spend_micros=scopes.get("max_daily_spend_micros"),
            amount_micros=amount,
        )
        if limited is not None:
            raise _refusal(caller, limited, tokens, amount)
        self._admitted = True

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None and self._admitted:
            # The hold was refused (or the handler cancelled): the call never ran.
            caller = self.caller
            await asyncio.shield(self.store.record(caller.end_user_id, caller.key_id, self.request_id,
                                                   captured_micros=0, tokens=0))


async def _spend_against_caps(store: LimitStore, caller: Caller) -> list[tuple[str, int, int]]:
    """(period, cap, spent) for each spend cap the credential has: one read, none without caps."""
    scopes = caller.scopes
    if not (_metered_key(caller) and any(scopes.get(f) is not None for f in SPEND_FIELDS)):
        return []
    spend = await store.spend(caller.end_user_id, caller.key_id)
    periods = (("lifetime", scopes.get("max_spend_micros"), spend.spent_micros),
               ("daily", scopes.get("max_daily_spend_micros"), spend.spent_today_micros))
    return [(period, cap, used) for period, cap, used in periods if cap is not None]


async def spend_room(store: LimitStore, caller: Caller) -> int:
    """What the credential's spend caps still allow (a large number when it has none)."""
    return max(min((cap - used for _, cap, used in await _spend_against_caps(store, caller)), default=MAX_AMOUNT_MICROS), 0)


async def binding_cap(store: LimitStore, caller: Caller) -> tuple[str, int] | None:
    """The spend cap (period, cap) that leaves the credential the least room: the one a refusal hit. One read."""
    caps = await _spend_against_caps(store, caller)
    if not caps:
        return None
    period, cap, _ = min(caps, key=lambda c: c[1] - c[2])
    return period, cap


async def refuse_spent_credential(store: LimitStore, caller: Caller) -> None:
    """A 402 for a credential whose spend already reached a cap: one read, before a
    large prompt is counted (admission checks it again, atomically, with the hold)."""
    for period, cap, used in await _spend_against_caps(store, caller):
        if used >= cap:
            raise SpendCapRefusal(f"This key's {period} spend limit is {usd(cap)} USD and it has spent {usd(used)}.",
                                  period=period, cap_micros=cap)


def credential_spend(caller: Caller, request_id: str, tokens: int) -> CredentialSpend | None:
    """What a settlement or release records against the caller's credential (in the same script).

    Every key and token is counted, limited or not, so that a cap set later by
    PATCH counts the spend since the credential was made; operator calls are not.
    """
    if not _metered_key(caller):
        return None
    cap, daily = caller.scopes.get("max_spend_micros"), caller.scopes.get("max_daily_spend_micros")
    return CredentialSpend(caller.key_id, request_id, tokens, max_spend_micros=cap, max_daily_spend_micros=daily,
                           limited=has_limits(caller.scopes))
