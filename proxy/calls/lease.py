"""The money of one metered call, from admission to its single close: the `Lease`.

A lease opens the call's hold (under its credential's limits), keeps it alive
while the call runs, grows it when a stream outruns it, checkpoints the usage
counted so far onto it, and closes it exactly once -- settle or release --
however the call ends: answered, client gone before the first byte or
mid-stream, upstream error, exception, store outage. If the process dies, the
reaper charges the hold's last checkpoint (`proxy/lua/expire.lua`).

Forwarders only report what happened (`forwarded`, `take_output` and `cover_output`,
`report_usage`, `upstream_failed`, `outcome`); the lease decides the close:

- the upstream's usage (or usage counted from a whole answer) was reported:
  settle it;
- nothing reached the upstream, or it failed before any output: release;
- otherwise (client gone, stream cut): settle the prompt plus the output
  relayed so far -- the provider bills what it generated.

The close runs in a task that the handler's cancellation cannot stop, and is
retried while the store is unreachable (every close script is idempotent by
the hold's state), so a charge is never dropped because Redis blinked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pricing import ModelPrice, Usage, count_text_tokens, price_usage
from proxy import limits, metering, observability
from proxy.auth import Caller
from proxy.budgets import BudgetPolicy
from proxy.errors import ApiError
from proxy.events.notices import Notices
from proxy.store import (
    AccountStore,
    BudgetExceeded,
    Checkpoint,
    Hold,
    InsufficientFunds,
    LimitStore,
    Settlement,
    SpendLimitReached,
    StaleCredential,
    WalletError,
    WalletStore,
)
from proxy.store.budgets import BudgetStore, CallBudget

log = logging.getLogger(__name__)

T = TypeVar("T")

# A stream that outruns its hold (an upstream ignoring max_tokens) extends it
# by at least this many output tokens at a time.
MIN_EXTENSION_TOKENS = 256
# Store failures worth retrying: the script may not have run. A script's own
# refusal (WalletError) is an answer, not a failure.
STORE_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)
_CLOSE_RETRY_FOR_SECONDS = 3600.0


class FundsRefusal(ApiError):
    """A 402: the wallet cannot cover the call's hold."""

    def __init__(self, message: str):
        super().__init__(402, message, type="insufficient_quota", code="insufficient_quota")


class BudgetRefusal(ApiError):
    """A 402: the call does not fit what the end user's budget leaves this period."""

    def __init__(self, message: str):
        super().__init__(402, message, type="insufficient_quota", code="budget_exceeded")


class Background:
    """Tasks that outlive the request that started them (closes, whole answers
    read after the client left); the app waits for them at shutdown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def answer(self, work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run `work` in a task of its own; a future of its outcome, which cancelling (a
        handler's cancellation) leaves the work running. The task sets it as its last step, so
        its awaiter resumes a loop turn later (an asyncio.shield of the task takes three)."""
        answered: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.spawn(_answering(work, answered))
        return answered

    def runs(self, task: asyncio.Task[Any]) -> bool:
        """Whether `task` is one of these (only shutdown cancels them, after its grace)."""
        return task in self.tasks

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        # Nobody may be left to await it (its client went away): say what failed here.
        # (A StaleCredential is no failure: the call is admitted again on a fresh lookup.)
        if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, ApiError | StaleCredential):
            log.error("background task failed: %r", exc, exc_info=exc)

    async def drain(self, timeout: float) -> None:
        if not self.tasks:
            return
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        for task in pending:  # their holds are the reaper's now (it charges their checkpoints)
            task.cancel()


async def _answering(work: Coroutine[Any, Any, T], answered: asyncio.Future[T]) -> T:
    try:
        result = await work
    except asyncio.CancelledError:
        answered.cancel()  # shutdown gave up on it: so does its awaiter
        raise
    except BaseException as exc:
        if not answered.done():
            answered.set_exception(exc)
        raise
    if not answered.done():  # else its awaiter left (cancelled it)
        answered.set_result(result)
    return result


@dataclass
class Metering:
    """The service that opens leases; built once in the app factory."""

    wallets: WalletStore
    limits: LimitStore
    background: Background
    checkpoint_interval_seconds: float = 2.0
    # Ledger notes for refusals and cuts (they become the operator's events).
    notices: Notices | None = None
    # End users' budgets per period (proxy/budgets.py): which one a call counts against.
    budgets: BudgetPolicy = field(default_factory=lambda: BudgetPolicy({}))
    # Where a refusal of a call admitted on a cached key checks that key is still current.
    accounts: AccountStore | None = None

    def lease(self, caller: Caller, quote: metering.Quote, request_id: str, *, min_output_tokens: int = 0,
              choices: int = 1) -> Lease:
        return Lease(self, caller, quote, request_id, min_output_tokens=min_output_tokens, choices=choices)


@dataclass
class Lease:
    """One call's hold from admission to its single close. Use as `async with lease:`."""

    service: Metering
    caller: Caller
    quote: metering.Quote
    request_id: str
    # Clamping: the least output per choice worth forwarding when the wallet or
    # key cannot cover the worst case (0: refuse instead), and how many choices
    # the request asks for; `clamped_to` is the lowered max_tokens, if any.
    min_output_tokens: int = 0
    choices: int = 1
    clamped_to: int | None = None
    budget: CallBudget | None = None  # the end user's budget this call is held under, if any
    hold: Hold | None = None
    held_micros: int = 0  # the hold's amount now (it grows while a stream outruns it)
    covered_output_tokens: int = 0  # output tokens the hold pays for
    # Output relayed to the client: counted exactly (`completion_tokens`), or not yet
    # (`uncounted`, whose tokens are at most `uncounted_bound`, their UTF-8 bytes).
    completion_tokens: int = 0
    uncounted: list[str] = field(default_factory=list)
    uncounted_bound: int = 0
    response_id: str | None = None  # a Responses API answer's id, as the upstream named it
    outcome: str = "completed"
    # Set by the forwarders:
    is_forwarded: bool = False
    failure: str | None = None  # the upstream failed before any output: nothing is billed
    usage: Usage | None = None
    usage_source: str = "counted"
    client_left: bool = False
    # Set by the keep-alive when the store stopped answering: a stream stops
    # generating what could no longer be billed durably.
    store_lost: bool = False
    settlement: Settlement | None = None
    # For the call's metrics and log line: the HTTP status answered, when the
    # call began (the request's arrival, see observability.call_started), and
    # the usage its close charged (None: released).
    status: int = 200
    started_at: float = field(default_factory=time.perf_counter)
    billed_usage: Usage | None = None
    _closing: asyncio.Task[Settlement | None] | None = None
    _first_close: asyncio.Future[Settlement | None] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _timer: asyncio.TimerHandle | None = None
    _checkpointed: int = -1
    _refresh_at: float = 0.0

    @property
    def model(self) -> ModelPrice:
        return self.quote.model

    # ------------------------------------------------------------ opening

    async def __aenter__(self) -> Lease:
        await self.open()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.hold is None:
            return
        if exc_type is asyncio.CancelledError:
            self.client_left = True
            if self.outcome == "completed":
                self.outcome = "client_disconnected"
        elif isinstance(exc, ApiError):
            self.status = exc.status
        elif exc is not None:
            self.status = 500
            if self.outcome == "completed":
                log.error("request %s failed after its hold: %r", self.request_id, exc)
                self.outcome = "internal_error"
        await self.close()

    async def open(self) -> None:
        """Admit the call under its credential's limits and hold its worst case; or,
        when the wallet or the key's cap cannot cover that but can cover a useful
        answer, hold that and forward the call with a lowered max_tokens."""
        try:
            await self._admit_and_hold()
        except ApiError as refusal:
            # A refusal (a rate limit, a cap) resting on a cached key that changed since is not final.
            if self.service.accounts is not None:
                await self.service.accounts.refuse_only_on_a_current_key(self.caller.key_stamp)
            clamped = None
            if refusal.status == 402 and self.min_output_tokens > 0:
                clamped = await self._clamped_quote()
            if clamped is None:
                self._tell_refusal(refusal)
                raise
            self.quote = clamped
            try:
                await self._admit_and_hold()
            except ApiError as again:
                self._tell_refusal(again)
                raise
        assert self.hold is not None
        self.held_micros = self.hold.amount_micros
        self.covered_output_tokens = self.quote.max_output_tokens
        observability.hold_opened(self)
        loop = asyncio.get_running_loop()
        self._refresh_at = loop.time() + self.service.wallets.hold_ttl_ms / 2000
        self._timer = loop.call_later(self._beat_interval(), self._beat)

    async def _clamped_quote(self) -> metering.Quote | None:
        """The quote lowered to the output the wallet and the key's caps can pay for, if that
        is at least `min_output_tokens` per choice. Only on the refusal path: two reads."""
        caller = self.caller
        wallet = await self.service.wallets.get(caller.end_user_id)
        budget = wallet.available_micros if wallet is not None else 0
        budget = min(budget, await limits.spend_room(self.service.limits, caller))
        if self.budget is not None:
            used = await BudgetStore(self.service.wallets.commands).usage(caller.end_user_id, self.budget.period)
            budget = min(budget, self.budget.limit_micros - used.spent_micros - used.held_micros)
        per_choice = metering.affordable_output(self.quote, budget, self.choices)
        if per_choice < self.min_output_tokens or per_choice * self.choices >= self.quote.max_output_tokens:
            return None
        self.clamped_to = per_choice
        return self.quote.with_output_bound(per_choice * self.choices)

    def _tell_refusal(self, refusal: ApiError) -> None:
        """Note a refusal that stands (after any clamped retry) for the operator's events."""
        notices = self.service.notices
        if notices is None:
            return
        if isinstance(refusal, limits.SpendCapRefusal):
            notices.spend_cap_reached(self.caller.end_user_id, self.caller.key_id, period=refusal.period,
                                      cap_micros=refusal.cap_micros, request_id=self.request_id)
        elif isinstance(refusal, FundsRefusal):
            notices.depleted(self.caller.end_user_id, "refused", request_id=self.request_id, model=self.quote.model.name)

    async def _admit_and_hold(self) -> None:
        service = self.service
        hold_id = service.wallets.new_hold_id()
        self.budget = service.budgets.claim(self.caller.tier, self.caller.budget)
        async with limits.Admission(service.limits, self.caller, self.quote, self.request_id):
            try:
                self.hold = await service.wallets.hold(
                    self.caller.end_user_id, self.quote.hold.price_micros, hold_id=hold_id,
                    # Only the request id waits on the hold (a short field keeps its record compact);
                    # its close says the rest (see release_meta).
                    meta={"request_id": self.request_id},
                    spend=limits.credential_spend(self.caller, self.request_id, 0), budget=self.budget,
                    key_stamp=self.caller.key_stamp,
                )
            except InsufficientFunds as exc:
                raise FundsRefusal(f"You exceeded your current quota: {exc.message}. Top up the wallet to continue.") from None
            except BudgetExceeded as exc:
                raise BudgetRefusal(f"You reached your spending budget: {exc.message}.") from None
            except (WalletError, ApiError):
                raise
            except BaseException:
                # Store unreachable or the client gone while the hold was in
                # flight: it may still land. Give it back (if it did) in the
                # background; otherwise the reaper releases it at its TTL.
                service.background.spawn(self._abandon(hold_id))
                raise

    def release_meta(self) -> dict[str, Any]:
        """What a release entry records of the call that paid nothing."""
        return {"request_id": self.request_id, "model": self.quote.model.name, "key_id": self.caller.key_id}

    async def _abandon(self, hold_id: str) -> None:
        with contextlib.suppress(WalletError, *STORE_UNREACHABLE):
            await self.service.wallets.release(
                self.caller.end_user_id, hold_id, reason="call abandoned while its hold was placed",
                spend=limits.credential_spend(self.caller, self.request_id, 0), meta=self.release_meta(),
            )

    # ---------------------------------------------------------- reporting

    def forwarded(self) -> None:
        """The request is about to reach the upstream: from now on the provider bills the prompt."""
        self.is_forwarded = True

    def take_output(self, text: str) -> int | None:
        """Count `text` as relayed output when the hold pays for it (None); else its tokens,
        which the hold must grow to cover first (`cover_output`).

        Streams are not tokenized chunk by chunk: a token is at least one byte, so
        while the bytes relayed stay within what the hold covers, the text waits
        and is tokenized once, when a checkpoint or a close without the
        upstream's usage needs the count (with the usage, never). Near the
        hold's edge the wait ends and each chunk is counted exactly.
        """
        bound = len(text) if text.isascii() else len(text.encode())
        if self.completion_tokens + self.uncounted_bound + bound <= self.covered_output_tokens and not self.store_lost:
            self.uncounted.append(text)
            self.uncounted_bound += bound
            return None
        self.count_output()
        tokens = count_text_tokens(text)
        if not self.covers(tokens):
            return tokens
        self.completion_tokens += tokens
        return None

    async def cover_output(self, tokens: int) -> bool:
        """Grow the hold to pay for `tokens` more output (what `take_output` could not take)
        and count them; False (and `outcome` says why) when it cannot grow."""
        if not await self.cover(tokens):
            return False
        self.completion_tokens += tokens
        return True

    def count_output(self) -> int:
        """Tokenize the output not yet counted; the output tokens so far."""
        if self.uncounted:
            self.completion_tokens += count_text_tokens("".join(self.uncounted))
            self.uncounted.clear()
            self.uncounted_bound = 0
        return self.completion_tokens

    @property
    def has_output(self) -> bool:
        return self.completion_tokens > 0 or self.uncounted_bound > 0

    def report_usage(self, usage: Usage, source: str) -> None:
        self.usage, self.usage_source = usage, source

    def upstream_failed(self, reason: str) -> None:
        """The upstream failed before producing any output: the call costs nothing."""
        if not self.has_output and self.usage is None:
            self.failure = reason

    def counted_usage(self) -> Usage:
        return Usage(prompt_tokens=self.quote.prompt_tokens if self.is_forwarded else 0,
                     completion_tokens=self.count_output())

    # -------------------------------------------------------- keeping alive

    def covers(self, more_tokens: int) -> bool:
        """Whether the hold already pays for `more_tokens` beyond the output counted so far."""
        return self.completion_tokens + more_tokens <= self.covered_output_tokens and not self.store_lost

    async def cover(self, more_tokens: int) -> bool:
        """Make sure the hold pays for the output counted so far plus `more_tokens`
        before they are relayed; False (and `outcome` says why) when it cannot."""
        if self.covers(more_tokens):
            return True
        if self.store_lost:
            self.outcome = "store_unavailable"
            return False
        step = max(self.completion_tokens + more_tokens - self.covered_output_tokens, MIN_EXTENSION_TOKENS)
        try:
            await self._extend(metering.output_price(self.model, step))
        except InsufficientFunds:
            self.outcome = "wallet_exhausted"
            if self.service.notices is not None:
                self.service.notices.depleted(self.caller.end_user_id, "stream_cut", request_id=self.request_id,
                                              model=self.model.name)
            return False
        except SpendLimitReached:
            self.outcome = "spend_limit_reached"
            await self._tell_cap_cut()
            return False
        except BudgetExceeded:
            self.outcome = "budget_reached"
            return False
        except (*STORE_UNREACHABLE, WalletError) as exc:
            log.warning("request %s: could not extend its hold: %r", self.request_id, exc)
            self.store_lost = True
            self.outcome = "store_unavailable"
            return False
        self.covered_output_tokens += step
        observability.hold_extended()
        return True

    async def _tell_cap_cut(self) -> None:
        """Note a stream cut at a spend cap, naming the cap it hit (one read; the stream ends anyway)."""
        notices = self.service.notices
        if notices is None:
            return
        try:
            binding = await limits.binding_cap(self.service.limits, self.caller)
        except (*STORE_UNREACHABLE, WalletError) as exc:
            log.warning("request %s: could not read which spend cap it reached: %r", self.request_id, exc)
            return
        if binding is not None:
            notices.spend_cap_reached(self.caller.end_user_id, self.caller.key_id, period=binding[0],
                                      cap_micros=binding[1], request_id=self.request_id)

    def _beat_interval(self) -> float:
        return min(self.service.checkpoint_interval_seconds, self.service.wallets.hold_ttl_ms / 2000)

    def _beat(self) -> None:
        self._timer = None
        if self._closing is None:
            self.service.background.spawn(self._keep_alive())

    async def _keep_alive(self) -> None:
        """Push the hold's expiry back before the reaper could take it, and
        checkpoint what the call has consumed; then schedule the next beat."""
        try:
            await self._extend(0, only_if_stale=True)
        except (*STORE_UNREACHABLE, WalletError) as exc:
            log.warning("request %s: could not keep its hold alive: %r", self.request_id, exc)
            self.store_lost = True
        if self._closing is None and not self.store_lost:
            self._timer = asyncio.get_running_loop().call_later(self._beat_interval(), self._beat)

    def _charge(self, usage: Usage, source: str, outcome: str) -> tuple[int, dict[str, Any]]:
        """What `usage` costs and the metadata its ledger entry records."""
        charge = price_usage(self.model, usage)
        meta = metering.charge_meta(
            request_id=self.request_id, key_id=self.caller.key_id, quote=self.quote, usage=usage, charge=charge,
            usage_source=source, outcome=outcome, tier=self.caller.tier,
        )
        return charge.price_micros, meta

    def _checkpoint(self) -> Checkpoint:
        usage = self.counted_usage()
        price, meta = self._charge(usage, "counted", "proxy_lost")
        return Checkpoint(price, usage.prompt_tokens + usage.completion_tokens, meta)

    async def _extend(self, amount_micros: int, *, only_if_stale: bool = False) -> None:
        """Grow the hold by `amount_micros`, push its expiry back and checkpoint what was
        relayed; with `only_if_stale`, skip the store when neither is due."""
        assert self.hold is not None
        async with self._lock:
            checkpoint = self._checkpoint() if self.is_forwarded else None
            if only_if_stale and asyncio.get_running_loop().time() < self._refresh_at and (
                    checkpoint is None or checkpoint.price_micros == self._checkpointed):
                return
            grown = await self.service.wallets.extend(
                self.caller.end_user_id, self.hold.hold_id, amount_micros, current_micros=self.held_micros,
                checkpoint=checkpoint, spend=limits.credential_spend(self.caller, self.request_id, 0) if amount_micros else None,
                budget_period=self._budget_period_now() if amount_micros else None,
            )
            self.held_micros = grown.amount_micros
            if checkpoint is not None:
                self._checkpointed = checkpoint.price_micros
            self._refresh_at = asyncio.get_running_loop().time() + self.service.wallets.hold_ttl_ms / 2000

    def _budget_period_now(self) -> str | None:
        """The budget period a growth counts in: a stream can outlive the period it began in."""
        if self.budget is None:
            return None
        claim = self.service.budgets.claim(self.caller.tier, self.caller.budget)
        return claim.period if claim is not None else self.budget.period

    # ------------------------------------------------------------- closing

    async def close(self) -> Settlement | None:
        """Close the hold (once; later calls wait for the same close). The
        settlement, or None while the store is unreachable and the close is
        being retried in the background (the charge lands when it answers)."""
        if self._first_close is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            first = self._first_close = asyncio.get_running_loop().create_future()
            running = asyncio.current_task()
            if running is not None and self.service.background.runs(running):
                # Already in a task no handler's cancellation reaches (a whole answer's, see
                # gateway.answer_whole): close right here, and spare a second task per call.
                self._closing = running
                try:
                    return await self._close_and_record(first, hand_off=True)
                finally:
                    if first.done() and not first.cancelled():
                        first.exception()  # raised here; nobody else need retrieve it
            self._closing = self.service.background.spawn(self._close_and_record(first))
        return await asyncio.shield(self._first_close)

    async def _close_and_record(self, first: asyncio.Future[Settlement | None], *, hand_off: bool = False,
                                resume: tuple[float, float] | None = None) -> Settlement | None:
        settlement = await self._close_until_done(first, hand_off=hand_off, resume=resume)
        if self._closing is asyncio.current_task():  # not handed off: the close ends here, recorded once
            observability.call_closed(self, settlement)
        return settlement

    async def _close_until_done(self, first: asyncio.Future[Settlement | None], *, hand_off: bool = False,
                                resume: tuple[float, float] | None = None) -> Settlement | None:
        """Close until the store answers. `hand_off`: run in the caller's own task, so that an
        outage moves the retrying to a task of its own while the caller answers "pending";
        `resume`: such a task's (wait before its first try, time to give up), the handing close's."""
        loop = asyncio.get_running_loop()
        delay, give_up_at = resume if resume is not None else (0.05, loop.time() + _CLOSE_RETRY_FOR_SECONDS)
        retrying = resume is not None
        while True:
            if retrying:  # after an outage (or handed one): wait, longer each time
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            try:
                async with self._lock:  # after any keep-alive in flight
                    self.settlement = await self._close_once()
            except STORE_UNREACHABLE as exc:
                if not first.done():
                    first.set_result(None)
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Shutdown gave up on this close, but redis-py turned the cancellation into a
                    # connection error (Python 3.11's wait_for, see proxy.app.run_reaper). Retrying
                    # would outlive the process's cleanup; the reaper charges the checkpoint instead.
                    log.warning("request %s: its close was cancelled while the store was unreachable (%r); "
                                "the reaper will charge its checkpoint", self.request_id, exc)
                    raise asyncio.CancelledError from exc
                if loop.time() > give_up_at:
                    log.error("request %s: gave up closing its hold (%r); the reaper will charge its checkpoint",
                              self.request_id, exc)
                    return None
                log.warning("request %s: the store is unreachable (%r); retrying its close in %.2fs",
                            self.request_id, exc, delay)
                if hand_off:
                    self._closing = self.service.background.spawn(
                        self._close_and_record(first, resume=(delay, give_up_at)))
                    return None
                retrying = True
                continue
            except WalletError as exc:
                # Closed already: the reaper expired it while the store was
                # away (and charged its checkpoint). Nothing more is owed here.
                log.error("request %s: its hold could not be closed: %s", self.request_id, exc)
                if not first.done():
                    first.set_result(None)
                return None
            except BaseException as exc:
                if not first.done():
                    first.set_exception(exc)
                raise
            if not first.done():
                first.set_result(self.settlement)
            return self.settlement

    async def _close_once(self) -> Settlement:
        assert self.hold is not None
        wallets, caller = self.service.wallets, self.caller
        if self.usage is None and (not self.is_forwarded or self.failure is not None):
            reason = self.failure or ("client gone before forwarding" if self.client_left else "not forwarded")
            return await wallets.release(
                caller.end_user_id, self.hold.hold_id, reason=reason,
                spend=limits.credential_spend(caller, self.request_id, 0), meta=self.release_meta(),
            )
        usage = self.usage if self.usage is not None else self.counted_usage()
        source = self.usage_source if self.usage is not None else "counted"
        self.billed_usage = usage
        price, meta = self._charge(usage, source, self.outcome)
        settlement = await wallets.settle(
            caller.end_user_id, self.hold.hold_id, price, meta=meta,
            spend=limits.credential_spend(caller, self.request_id, usage.prompt_tokens + usage.completion_tokens),
        )
        if settlement.shortfall_micros:
            log.warning("request %s: wallet %s could not cover %d micros",
                        self.request_id, caller.end_user_id, settlement.shortfall_micros)
        return settlement

