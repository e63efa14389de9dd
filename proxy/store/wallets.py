"""`WalletStore`: money operations on wallets, one method per Lua script in `proxy/lua/`.

Each is an atomic check-change-append on one wallet's keys; the hold index
(the reaper's) is written beside the scripts, never inside them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import RedisError, WatchError

from pricing.values import value
from proxy.ids import new_id
from proxy.store.budgets import CallBudget
from proxy.store.errors import HoldNotFound, IdempotencyConflict, InvalidAmount, InvalidWalletRequest, WalletError, WalletNotFound
from proxy.store.events import dirty_commands
from proxy.store.keyspace import (
    HOLD_INDEX_KEY,
    MAX_AMOUNT_MICROS,
    PREFIX,
    WALLET_ID_RE,
    _archive_key,
    _check_wallet_id,
    _hold_key,
    _holds_key,
    _idempotency_key,
    _index_member,
    _ledger_key,
    _limits_key,
    _profile_key,
    _refunded_key,
    _user_keys_key,
    _wallet_key,
)
from proxy.store.scripts import Commands, RedisPyCommands, StoreRedis, _scripts, fingerprint

log = logging.getLogger(__name__)


@value
class WalletState:
    wallet_id: str
    balance_micros: int
    held_micros: int
    credit_limit_micros: int

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.held_micros + self.credit_limit_micros


@dataclass(frozen=True)
class Receipt:
    """The outcome of a top-up, refund or adjustment."""

    ledger_id: str
    wallet: WalletState
    replayed: bool


@value
class Hold:
    wallet_id: str
    hold_id: str
    amount_micros: int
    expires_at_ms: int
    wallet: WalletState
    replayed: bool


@value
class KeyStamp:
    """Which version of an end-user key a cached lookup saw; a hold checks it (see proxy/store/accounts.py)."""

    end_user_id: str
    key_id: str
    stamp: str


@value
class CredentialSpend:
    """Which credential's limits a settlement counts against: its id, the call's request id, tokens used."""

    credential_id: str
    request_id: str
    tokens: int = 0
    # The credential's caps the call was admitted under (None: no cap); kept
    # on the hold so that its growth and its close respect them.
    max_spend_micros: int | None = None
    max_daily_spend_micros: int | None = None
    # False: the credential has no limits at all (no rate limit, no cap), so the call
    # reserved nothing and its settle counts only its spend, not its token window.
    limited: bool = True

    def caps(self) -> tuple[int, int]:
        return (-1 if self.max_spend_micros is None else self.max_spend_micros,
                -1 if self.max_daily_spend_micros is None else self.max_daily_spend_micros)


@value
class Checkpoint:
    """What a call in flight has consumed so far, written onto its hold: what the
    reaper charges if the call's proxy dies before closing it."""

    price_micros: int
    tokens: int
    meta: Mapping[str, Any]


@value
class HoldExtension:
    """A hold after it grew: its new total and expiry."""

    hold_id: str
    amount_micros: int
    expires_at_ms: int
    wallet: WalletState
    replayed: bool


@value
class Settlement:
    """How a hold closed: what was captured, released, and could not be captured."""

    hold_id: str
    ledger_id: str
    captured_micros: int
    released_micros: int
    shortfall_micros: int
    wallet: WalletState
    replayed: bool
    # Non-zero when this capture left the wallet below its auto top-up
    # threshold and claimed that attempt (see claim_auto_top_up in _prelude.lua).
    auto_top_up_attempt: int = 0


@dataclass(frozen=True)
class LedgerEntry:
    id: str
    type: str
    amount_micros: int
    balance_micros: int
    held_micros: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Audit:
    """The invariants, computed the slow way from the raw data: balance == Σ ledger == Σ grants, held == Σ holds."""

    wallet: WalletState
    ledger_sum_micros: int
    active_holds_sum_micros: int
    grants_sum_micros: int

    @property
    def holds(self) -> bool:
        return (
            self.wallet.balance_micros == self.ledger_sum_micros == self.grants_sum_micros
            and self.wallet.held_micros == self.active_holds_sum_micros
        )


def _state(wallet_id: str, balance: str, held: str, credit: str) -> WalletState:
    return WalletState(wallet_id, int(balance), int(held), int(credit))


def _meta(meta: Mapping[str, Any] | None) -> str:
    return orjson.dumps(meta).decode() if meta else ""


# --------------------------------------------------------------------- store


class WalletStore:
    """Money operations on wallets, each one Lua script run atomically in Redis."""

    def __init__(
        self,
        redis: StoreRedis,
        *,
        hold_ttl_ms: int = 600_000,
        idempotency_ttl_seconds: int = 7 * 24 * 3600,
        closed_hold_ttl_seconds: int = 24 * 3600,
        commands: Commands | None = None,
    ):
        self.redis = redis
        self.commands: Commands = commands or RedisPyCommands(redis)
        self._profiles: dict[str, tuple[float, dict[str, Any]]] = {}
        # Index members of holds closed here, dropped from the reaper's index by
        # the next hold or close (see _unindex).
        self._unindexed: list[str] = []
        self.hold_ttl_ms = hold_ttl_ms
        self.idempotency_ttl_seconds = idempotency_ttl_seconds
        self.closed_hold_ttl_seconds = closed_hold_ttl_seconds
        self._scripts = _scripts()
        # Told (wallet id, attempt) when a capture claims an auto top-up; set by
        # the app factory when Stripe is configured. It must not block: it
        # schedules the attempt and returns.
        self.auto_top_up_claimed: Callable[[str, int], None] | None = None

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> list[str]:
        return await self._scripts.run(self.commands, name, keys, args)

    # -- wallets

    async def open(
        self, wallet_id: str, *, credit_limit_micros: int = 0, profile: Mapping[str, Any], simulated: bool = False,
        asset: str = "USD",
    ) -> WalletState:
        """Create a wallet; a `simulated` (sandbox) one marks every ledger entry it ever gets
        `is_simulated`, and one in another `asset` than USD names it on every entry."""
        _check_wallet_id(wallet_id)
        out = await self._run(
            "open",
            [_wallet_key(wallet_id), _ledger_key(wallet_id), _profile_key(wallet_id)],
            [credit_limit_micros, orjson.dumps(profile).decode(), wallet_id, "1" if simulated else "", asset],
        )
        return _state(wallet_id, *out[2:5])

    async def get(self, wallet_id: str) -> WalletState | None:
        if not WALLET_ID_RE.match(wallet_id):
            return None
        balance, held, credit = await self.commands.execute("HMGET", _wallet_key(wallet_id), "balance", "held", "credit_limit")
        if balance is None:
            return None
        return WalletState(wallet_id, int(balance), int(held), int(credit))

    async def get_each(self, wallet_ids: Sequence[str]) -> list[WalletState | None]:
        """`get` for several wallets, in one round trip."""
        if not wallet_ids:
            return []
        replies = await self.commands.batch(
            [("HMGET", _wallet_key(w), "balance", "held", "credit_limit") for w in wallet_ids])
        out: list[WalletState | None] = []
        for wallet_id, reply in zip(wallet_ids, replies):
            if isinstance(reply, Exception):
                raise reply
            balance, held, credit = reply
            valid = balance is not None and WALLET_ID_RE.match(wallet_id)
            out.append(WalletState(wallet_id, int(balance), int(held), int(credit)) if valid else None)
        return out

    async def profiles(self, wallet_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """`profile` (uncached) for several wallets, in one round trip."""
        if not wallet_ids:
            return []
        replies = await self.commands.batch([("HMGET", _profile_key(w), "profile", "created_ms") for w in wallet_ids])
        out: list[dict[str, Any] | None] = []
        for wallet_id, reply in zip(wallet_ids, replies):
            if isinstance(reply, Exception):
                raise reply
            raw, created_ms = reply
            valid = raw is not None and WALLET_ID_RE.match(wallet_id)
            out.append({**orjson.loads(raw), "created_ms": int(created_ms)} if valid else None)
        return out

    async def profile(self, wallet_id: str, *, max_age_seconds: float = 0) -> dict[str, Any] | None:
        """The end user's profile; up to `max_age_seconds` old from this process's cache.

        The request path reads a profile on every call only for the tier and the
        card pin, which change rarely and are not a security boundary (keys and
        their revocation are never cached), so it may take a few seconds' old copy.
        """
        if not WALLET_ID_RE.match(wallet_id):
            return None
        if max_age_seconds > 0:
            cached = self._profiles.get(wallet_id)
            now = time.monotonic()
            if cached is not None and cached[0] > now:
                return cached[1]
            found = await self.profile(wallet_id)
            if found is not None:
                if len(self._profiles) >= 100_000:
                    self._profiles.clear()
                self._profiles[wallet_id] = (now + max_age_seconds, found)
            return found
        raw, created_ms = await self.commands.execute("HMGET", _profile_key(wallet_id), "profile", "created_ms")
        return {**orjson.loads(raw), "created_ms": int(created_ms)} if raw is not None else None

    async def update_profile(self, wallet_id: str, changes: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge `changes` into the end user's profile atomically (WATCH/MULTI); None if there is none."""
        key = _profile_key(wallet_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, "profile")
                    if raw is None:
                        return None
                    profile = {**orjson.loads(raw), **changes}
                    pipe.multi()
                    pipe.hset(key, "profile", orjson.dumps(profile))
                    await pipe.execute()
                    self._profiles.pop(wallet_id, None)
                    return profile
                except WatchError:
                    continue

    # -- funds

    async def _receipt_op(
        self, name: str, wallet_id: str, idempotency_key: str, extra_keys: Sequence[str], args: Sequence[Any]
    ) -> Receipt:
        _check_wallet_id(wallet_id)
        keys = [_wallet_key(wallet_id), _ledger_key(wallet_id), _idempotency_key(wallet_id, idempotency_key), *extra_keys]
        out = await self._scripts.run(self.commands, name, keys, args, before=dirty_commands(wallet_id))
        return Receipt(ledger_id=out[1], wallet=_state(wallet_id, *out[2:5]), replayed=out[0] == "replay")

    async def top_up(
        self, wallet_id: str, amount_micros: int, *, idempotency_key: str, reference: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> Receipt:
        fp = fingerprint("top_up", amount_micros, reference, meta)
        return await self._receipt_op(
            "top_up", wallet_id, idempotency_key, [],
            [amount_micros, fp, self.idempotency_ttl_seconds, reference, _meta(meta), idempotency_key],
        )

    async def adjust(
        self, wallet_id: str, amount_micros: int, *, reason: str, idempotency_key: str,
        meta: Mapping[str, Any] | None = None,
    ) -> Receipt:
        fp = fingerprint("adjust", amount_micros, reason, meta)
        return await self._receipt_op(
            "adjust", wallet_id, idempotency_key, [],
            [amount_micros, fp, self.idempotency_ttl_seconds, reason, _meta(meta), idempotency_key],
        )

    async def refund(
        self, wallet_id: str, amount_micros: int, *, charge_id: str, reason: str, idempotency_key: str,
        meta: Mapping[str, Any] | None = None, archived_charge_micros: int | None = None, archived_charge_grants: str = "",
    ) -> Receipt:
        """`archived_charge_micros`: what the charge captured per the ledger of record, for a charge
        trimmed from Redis (refund.lua takes it only for an entry it trimmed), and the grants it drew from."""
        fp = fingerprint("refund", amount_micros, charge_id, reason, meta)
        extra_keys, extra_args = [_refunded_key(wallet_id)], []
        if archived_charge_micros is not None:
            extra_keys.append(_archive_key(wallet_id))
            extra_args += [archived_charge_micros, archived_charge_grants]
        return await self._receipt_op(
            "refund", wallet_id, idempotency_key, extra_keys,
            [amount_micros, fp, self.idempotency_ttl_seconds, charge_id, reason, _meta(meta), idempotency_key, *extra_args],
        )

    async def note(
        self, wallet_id: str, entry_type: str, *, reason: str = "", meta: Mapping[str, Any] | None = None,
        once_per: tuple[str, str] | None = None,
    ) -> str | None:
        """Append a ledger note (amount 0) that becomes an event; its ledger id, or None when skipped.

        `once_per` = (field, value): written only if the wallet's `field` does not
        already hold `value` (see note.lua), so a storm of refusals writes one note.
        """
        _check_wallet_id(wallet_id)
        field_name, value = once_per or ("", "")
        out = await self._scripts.run(
            self.commands, "note", [_wallet_key(wallet_id), _ledger_key(wallet_id)],
            [entry_type, reason, _meta(meta), field_name, value], before=dirty_commands(wallet_id),
        )
        return out[1] if out[0] == "ok" else None

    # -- holds

    @staticmethod
    def new_hold_id() -> str:
        return new_id("hold_")

    def _hold_keys(self, wallet_id: str, hold_id: str) -> list[str]:
        return [_wallet_key(wallet_id), _holds_key(wallet_id), _hold_key(wallet_id, hold_id), _ledger_key(wallet_id)]

    async def hold(
        self, wallet_id: str, amount_micros: int, *, hold_id: str | None = None, ttl_ms: int | None = None,
        meta: Mapping[str, Any] | None = None, spend: CredentialSpend | None = None, budget: CallBudget | None = None,
        key_stamp: KeyStamp | None = None,
    ) -> Hold:
        """Reserve `amount_micros`; raises `InsufficientFunds` when it does not fit.

        `spend` names the credential whose limits reserved this call, so that
        the reaper can give that reservation back if the call never settles.
        `budget`: the end user's budget this period; `BudgetExceeded` when the
        hold does not fit what it leaves. `key_stamp`: the version of the caller's
        key a cached lookup saw; `StaleCredential` when the key changed since.
        """
        _check_wallet_id(wallet_id)
        hold_id = hold_id or self.new_hold_id()
        ttl_ms = ttl_ms or self.hold_ttl_ms
        # Index first: a hold that exists is always findable by the reaper. An
        # index entry without a hold (refused, or we died in between) is
        # dropped by the reaper when it finds nothing to expire.
        member = _index_member(wallet_id, hold_id)
        keys = self._hold_keys(wallet_id, hold_id)
        args: list[Any] = [hold_id, amount_micros, ttl_ms, _meta(meta)]
        if spend or budget or key_stamp:
            args += [spend.credential_id, spend.request_id, *spend.caps()] if spend else [""] * 4
        if budget or key_stamp:
            args += [budget.limit_micros, budget.period] if budget else ["", ""]
        if key_stamp:
            keys.append(_user_keys_key(wallet_id))
            args += [key_stamp.key_id, key_stamp.stamp]
        try:
            out = await self._scripts.run(
                self.commands, "hold", keys, args,
                before=[*self._take_unindexed(), ("ZADD", HOLD_INDEX_KEY, now_ms() + ttl_ms, member)],
            )
        except IdempotencyConflict:
            raise  # a hold with this id exists: its index entry stays
        except WalletError:
            await self.commands.execute("ZREM", HOLD_INDEX_KEY, member)
            raise
        return Hold(
            wallet_id=wallet_id, hold_id=out[1], amount_micros=int(out[2]), expires_at_ms=int(out[3]),
            wallet=_state(wallet_id, *out[4:7]), replayed=out[0] == "replay",
        )

    async def extend(
        self, wallet_id: str, hold_id: str, amount_micros: int, *, current_micros: int, ttl_ms: int | None = None,
        checkpoint: Checkpoint | None = None, spend: CredentialSpend | None = None, budget_period: str | None = None,
    ) -> HoldExtension:
        """Grow an active hold by `amount_micros`, push back its expiry, and record `checkpoint`;
        `InsufficientFunds` if the growth does not fit.

        `current_micros` is the hold's amount as the caller knows it: a retry
        after the hold already grew from that amount replays instead of
        growing it twice. An amount of 0 only refreshes the expiry and the checkpoint.
        With `spend`, the growth is reserved against the credential's caps too
        (`SpendLimitReached` when they cannot take it); a hold admitted under a
        budget grows only as far as it leaves in `budget_period` (the period now;
        None: the hold's own), else `BudgetExceeded`.
        """
        ttl_ms = ttl_ms or self.hold_ttl_ms
        args: list[Any] = [hold_id, amount_micros, ttl_ms, current_micros]
        if checkpoint is not None:
            args += [checkpoint.price_micros, checkpoint.tokens, _meta(checkpoint.meta)]
        if budget_period is not None:
            args += [""] * (7 - len(args)) + [budget_period]
        out = await self._scripts.run(
            self.commands, "extend", self._closing_keys(wallet_id, hold_id, spend), args,
            before=[("ZADD", HOLD_INDEX_KEY, now_ms() + ttl_ms, _index_member(wallet_id, hold_id))],
        )
        return HoldExtension(
            hold_id=hold_id, amount_micros=int(out[1]), expires_at_ms=int(out[2]),
            wallet=_state(wallet_id, *out[3:6]), replayed=out[0] == "replay",
        )

    def _settlement(self, wallet_id: str, hold_id: str, out: list[str]) -> Settlement:
        settlement = Settlement(
            hold_id=hold_id, ledger_id=out[1], captured_micros=int(out[2]), released_micros=int(out[3]),
            shortfall_micros=int(out[4]), wallet=_state(wallet_id, *out[5:8]), replayed=out[0] == "replay",
            auto_top_up_attempt=int(out[8]) if len(out) > 8 else 0,
        )
        # A replay hands the claim on again: the first answer may have been lost
        # with the connection, and the attempt's Stripe idempotency key makes a
        # second start of the same attempt charge nothing more.
        if settlement.auto_top_up_attempt and self.auto_top_up_claimed is not None:
            self.auto_top_up_claimed(wallet_id, settlement.auto_top_up_attempt)
        return settlement

    def _closing_keys(self, wallet_id: str, hold_id: str, spend: CredentialSpend | None) -> list[str]:
        keys = self._hold_keys(wallet_id, hold_id)
        return [*keys, _limits_key(wallet_id, spend.credential_id)] if spend else keys

    def _unindex(self, wallet_id: str, hold_id: str) -> None:
        """Drop a closed hold from the reaper's index: only after its close succeeded (an
        active hold must never be missing from the index), and not in a round trip of
        its own (one ZREM per call was ~3% of the request path's CPU) but in the next
        hold's or close's batch, many members at once. Lost with the process, or with
        a failed batch, is harmless: the reaper drops entries whose hold is closed."""
        self._unindexed.append(_index_member(wallet_id, hold_id))

    def _take_unindexed(self) -> list[tuple[Any, ...]]:
        if not self._unindexed:
            return []
        members, self._unindexed = self._unindexed[:_UNINDEX_PER_BATCH], self._unindexed[_UNINDEX_PER_BATCH:]
        return [("ZREM", HOLD_INDEX_KEY, *members)]

    async def flush_unindexed(self) -> None:
        """Drop every closed hold still waiting for the next batch from the index now (shutdown, tests)."""
        while batch := self._take_unindexed():
            try:
                await self.commands.execute(*batch[0])
            except RedisError as exc:
                log.warning("could not drop closed holds from the reaper's index: %s", exc)
                return

    async def settle(
        self, wallet_id: str, hold_id: str, amount_micros: int, *, meta: Mapping[str, Any] | None = None,
        spend: CredentialSpend | None = None,
    ) -> Settlement:
        """Capture `amount_micros` (may exceed the hold, as far as the wallet allows); release the rest."""
        if amount_micros < 0:
            raise InvalidAmount("the settle amount cannot be negative")
        # An absurd usage report is capped (and the wallet caps it further),
        # never allowed to make the script refuse and strand the hold.
        amount_micros = min(amount_micros, MAX_AMOUNT_MICROS)
        out = await self._scripts.run(
            self.commands, "settle", self._closing_keys(wallet_id, hold_id, spend),
            [hold_id, amount_micros, _meta(meta), self.closed_hold_ttl_seconds,
             *((spend.request_id, spend.tokens, "" if spend.limited else "1") if spend else ())],
            before=[*self._take_unindexed(), *dirty_commands(wallet_id)],
        )
        self._unindex(wallet_id, hold_id)
        return self._settlement(wallet_id, hold_id, out)

    async def release(
        self, wallet_id: str, hold_id: str, *, reason: str = "", spend: CredentialSpend | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Settlement:
        """Give the whole hold back. The release entry records `meta`, else what the hold was placed with."""
        out = await self._scripts.run(
            self.commands, "release", self._closing_keys(wallet_id, hold_id, spend),
            [hold_id, reason, self.closed_hold_ttl_seconds, spend.request_id if spend else "",
             _meta(meta) if meta else ""],
            before=[*self._take_unindexed(), *dirty_commands(wallet_id)],  # its entry is archived like any other
        )
        self._unindex(wallet_id, hold_id)
        return self._settlement(wallet_id, hold_id, out)

    async def expire(self, wallet_id: str, hold_id: str) -> Settlement | None:
        """Close one hold whose TTL has passed: charge its checkpoint, or release it.
        None if it is not due yet or was closed meanwhile."""
        credential: bytes | None = await self.redis.hget(_hold_key(wallet_id, hold_id), "credential")  # type: ignore[assignment]
        keys = self._hold_keys(wallet_id, hold_id)
        if credential:
            keys.append(_limits_key(wallet_id, credential.decode()))
        out = await self._scripts.run(self.commands, "expire", keys, [hold_id, self.closed_hold_ttl_seconds],
                                      before=dirty_commands(wallet_id))
        member = _index_member(wallet_id, hold_id)
        if out[0] == "not_due":
            await self.redis.zadd(HOLD_INDEX_KEY, {member: int(out[1])})
            return None
        await self.redis.zrem(HOLD_INDEX_KEY, member)
        return None if out[0] == "closed" else self._settlement(wallet_id, hold_id, out)

    async def expire_due(self, *, limit: int = 100) -> list[Settlement]:
        """One reaper pass: close up to `limit` holds whose TTL has passed."""
        due: list[bytes] = await self.redis.zrangebyscore(  # type: ignore[assignment]
            HOLD_INDEX_KEY, "-inf", now_ms(), start=0, num=limit)
        expired = []
        for raw in due:
            member = raw.decode()
            wallet_id, _, hold_id = member.partition("|")
            try:
                outcome = await self.expire(wallet_id, hold_id)
            except (HoldNotFound, InvalidWalletRequest):
                # Never granted (the index entry is written first): nothing to expire.
                await self.redis.zrem(HOLD_INDEX_KEY, member)
                continue
            if outcome is not None:
                expired.append(outcome)
        return expired

    async def active_holds(self, wallet_id: str) -> dict[str, int]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(_holds_key(wallet_id))  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in raw.items()}

    # -- ledger

    async def ledger(self, wallet_id: str, *, before: str | None = None, limit: int = 50) -> list[LedgerEntry]:
        """Entries newest first; `before` is the id of the last entry of the previous page."""
        top = f"({before}" if before else "+"
        raw: list[tuple[bytes, dict[bytes, bytes]]] = await self.redis.xrevrange(  # type: ignore[assignment]
            _ledger_key(wallet_id), max=top, min="-", count=limit)
        return [_ledger_entry(entry_id, fields) for entry_id, fields in raw]

    async def ledger_after(self, wallet_id: str, after: str, *, limit: int = 500) -> list[LedgerEntry]:
        """Entries after the entry `after` ("0": from the start), oldest first."""
        # Through the store's own connection: the archiver and the event consumer read
        # every entry this way, and its raw reply (flat field lists) skips redis-py's
        # reshaping into dicts, about half of what reading an entry costs before parsing.
        raw: list[tuple[bytes, list[bytes] | dict[bytes, bytes]]] = await self.commands.execute(
            "XRANGE", _ledger_key(wallet_id), "-" if after == "0" else f"({after}", "+", "COUNT", limit)
        return [_ledger_entry(entry_id, fields) for entry_id, fields in raw]

    async def ledgers_after(self, cursors: Mapping[str, str], *, limit: int = 500) -> dict[str, list[LedgerEntry]]:
        """`ledger_after` for several wallets (wallet id: its `after`) in one round trip."""
        if not cursors:
            return {}
        replies = await self.commands.batch(
            [("XRANGE", _ledger_key(w), "-" if after == "0" else f"({after}", "+", "COUNT", limit)
             for w, after in cursors.items()])
        out: dict[str, list[LedgerEntry]] = {}
        for wallet_id, raw in zip(cursors, replies):
            if isinstance(raw, Exception):
                raise raw
            out[wallet_id] = [_ledger_entry(entry_id, fields) for entry_id, fields in raw]
        return out

    async def audit(self, wallet_id: str) -> Audit:
        """Recompute both invariants from the full ledger and the hold set (slow; for tests and ops)."""
        wallet = await self.get(wallet_id)
        if wallet is None:
            raise WalletNotFound(wallet_id)
        # Entries archived and trimmed from the stream count through their kept sum
        # (trim.lua); read again if a trim ran while the stream was summed.
        while True:
            trimmed_to, trimmed_sum = await self.redis.hmget(_archive_key(wallet_id), "trimmed_to", "trimmed_sum")
            total = int(trimmed_sum or 0)
            async for entry in self._iter_ledger(wallet_id):
                total += entry.amount_micros
            if (await self.redis.hget(_archive_key(wallet_id), "trimmed_to")) == trimmed_to:
                break
        holds = await self.active_holds(wallet_id)
        from proxy.store.grants import parse_grants  # grants.py builds on this module

        fields: dict[bytes, bytes] = await self.redis.hgetall(_wallet_key(wallet_id))  # type: ignore[assignment]
        grants_sum = sum(g.remaining_micros for g in parse_grants(fields))
        return Audit(wallet=wallet, ledger_sum_micros=total, active_holds_sum_micros=sum(holds.values()),
                     grants_sum_micros=grants_sum)

    async def _iter_ledger(self, wallet_id: str) -> AsyncIterator[LedgerEntry]:
        start = "-"
        while True:
            batch: list[tuple[bytes, dict[bytes, bytes]]] = await self.redis.xrange(  # type: ignore[assignment]
                _ledger_key(wallet_id), min=start, max="+", count=1000)
            for entry_id, fields in batch:
                yield _ledger_entry(entry_id, fields)
            if len(batch) < 1000:
                return
            start = "(" + batch[-1][0].decode()

    async def wallet_ids(self) -> list[str]:
        """Every wallet in the store (SCAN; for audits and tests, not the request path)."""
        ids = []
        async for key in self.redis.scan_iter(match=f"{PREFIX}:{{w:*}}:wallet", count=1000):
            ids.append(key.decode()[len(PREFIX) + 4 : -len("}:wallet")])
        return ids


_UNINDEX_PER_BATCH = 256


# Ledger fields read into the entry's head, and those whose details carry micros.
_HEAD_FIELDS = frozenset((b"type", b"amount", b"balance", b"held"))
_MICROS_FIELDS = {k.encode(): k + "_micros" for k in ("held_delta", "requested", "shortfall", "credit_limit")}


def _ledger_entry(entry_id: bytes, fields: Sequence[bytes] | Mapping[bytes, bytes]) -> LedgerEntry:
    """An entry from its raw fields: a flat [name, value, ...] list as Redis sends it,
    or the dict redis-py makes of that."""
    # One pass over the raw bytes: every reader of the ledger (events, archiver,
    # audit, pages) parses each entry, so this runs once per entry per reader.
    if isinstance(fields, Mapping):
        pairs: Iterable[tuple[bytes, bytes]] = fields.items()
    else:
        names_and_values = iter(fields)
        pairs = zip(names_and_values, names_and_values, strict=True)
    head: dict[bytes, bytes] = {}
    details: dict[str, Any] = {}
    micros = _MICROS_FIELDS
    for k, v in pairs:
        if k in _HEAD_FIELDS:
            head[k] = v
        elif k == b"meta":
            details.update(orjson.loads(v))
        elif k in micros:
            details[micros[k]] = int(v)
        elif k == b"is_simulated":
            details["is_simulated"] = v == b"true"
        else:
            details[k.decode()] = v.decode()
    return LedgerEntry(
        id=entry_id.decode(), type=head[b"type"].decode(), amount_micros=int(head[b"amount"]),
        balance_micros=int(head[b"balance"]), held_micros=int(head[b"held"]), details=details,
    )


def now_ms() -> int:
    return int(time.time() * 1000)
