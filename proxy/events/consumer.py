"""`EventConsumer`: turns new ledger entries into events, once, on whichever replica gets there first.

Each pass takes the wallets marked dirty (see proxy/store/events.py), and for
those it can lease, all together: reads the entries after each wallet's cursor,
derives their events (proxy/events/derive.py), appends them to the event log,
then saves the cursors, and finally drops each wallet's mark unless an entry
arrived meanwhile. Killed anywhere in between, the next pass (here or on another
replica) starts again from the saved cursor: no event is lost, and one derived
twice keeps its id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from proxy.config import EventsConfig
from proxy.events.derive import WalletEventState, derive
from proxy.events.model import Event, new_event_id, now_seconds
from proxy.store import WalletStore
from proxy.store.events import EventStore

log = logging.getLogger(__name__)

_LEASE_MS = 30_000
_BATCH = 500
_WALLETS_PER_PASS = 100


class EventConsumer:
    def __init__(self, events: EventStore, wallets: WalletStore, config: EventsConfig):
        self.events, self.wallets, self.config = events, wallets, config

    async def run(self) -> None:
        """Passes until cancelled; a failing pass is logged and retried.

        Ends when cancelled even if a library swallowed the CancelledError (see
        proxy.app.run_reaper): the request to stop is checked after every pass.
        """
        task = asyncio.current_task()
        while True:
            busy = False
            try:
                # Straight on only while wallets are waiting beyond this pass's share. A pass
                # costs some ten round trips per wallet whatever it finds, so under steady
                # traffic, passing again at once (a wallet is dirty again within
                # milliseconds) spent ~100 µs of CPU per call here and as much in Redis;
                # waiting the interval batches those calls' entries into one pass.
                busy = await self.pass_once(_WALLETS_PER_PASS) >= _WALLETS_PER_PASS
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event derivation pass failed; retrying")
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            if not busy:
                await asyncio.sleep(self.config.poll_interval_seconds)

    async def pass_once(self, limit: int = _WALLETS_PER_PASS) -> int:
        """Derive the events of up to `limit` dirty wallets; how many wallets were done.

        All of them together, each step one round trip however many wallets there are:
        done one wallet at a time, a wallet with one new entry cost ~0.8 ms of CPU per pass.
        """
        dirty = await self.events.dirty_wallets(limit)
        if not dirty:
            return 0
        tokens = await self.events.acquire_each([_lease_name(w) for w, _ in dirty], _LEASE_MS)
        held = {wallet_id: token for (wallet_id, _), token in zip(dirty, tokens) if token is not None}
        try:  # a wallet another replica is on is left to it, mark and all
            await self.derive_wallets(list(held))
            await self.events.mark_clean_each([(wallet_id, score) for wallet_id, score in dirty if wallet_id in held])
        finally:
            await self.events.release_each({_lease_name(w): token for w, token in held.items()})
        return len(held)

    async def derive_wallet(self, wallet_id: str) -> list[Event]:
        """Derive and log the events of every entry after the wallet's cursor."""
        return (await self.derive_wallets([wallet_id])).get(wallet_id, [])

    async def derive_wallets(self, wallet_ids: Sequence[str]) -> dict[str, list[Event]]:
        """`derive_wallet` for several wallets at once: the events derived, by wallet."""
        found = [w for w in await self.wallets.get_each(wallet_ids) if w is not None]
        states = dict(zip((w.wallet_id for w in found),
                          map(WalletEventState.from_fields, await self.events.wallet_states([w.wallet_id for w in found]))))
        alerts = {w: state.alerts for w, state in states.items() if state.alerts is not None}
        tiers_wanted = [w for w in states if w not in alerts]
        for wallet_id, profile in zip(tiers_wanted, await self.wallets.profiles(tiers_wanted)):
            alerts[wallet_id] = self.config.low_balance_for(str((profile or {}).get("tier") or "default"))
        credit = {w.wallet_id: w.credit_limit_micros for w in found}
        derived: dict[str, list[Event]] = {w: [] for w in states}
        pending = dict(states)
        while pending:
            read = await self.wallets.ledgers_after({w: state.cursor for w, state in pending.items()}, limit=_BATCH)
            new_events: list[Event] = []
            saved: dict[str, dict[str, str]] = {}
            for wallet_id, entries in read.items():
                if not entries:
                    continue
                events, pending[wallet_id] = derive(wallet_id, entries, pending[wallet_id], alerts[wallet_id],
                                                    credit[wallet_id])
                new_events += events
                derived[wallet_id] += events
                fields = pending[wallet_id].to_fields()
                fields.pop("alerts")  # the admin API's to change; written back here it could undo a change made meanwhile
                saved[wallet_id] = fields
            await self.events.append(new_events)  # first the events, then the cursors: a crash between repeats, never loses
            await self.events.save_wallet_states(saved)
            pending = {w: pending[w] for w, entries in read.items() if len(entries) == _BATCH}
        return derived


def _lease_name(wallet_id: str) -> str:
    return f"derive:{wallet_id}"


def ratecard_event(loaded: bool, what: str) -> Event:
    """What a rate card reload on one replica reports (not a wallet's: logged as it happens)."""
    return Event(id=new_event_id(), type="ratecard.reloaded" if loaded else "ratecard.refused", created=now_seconds(),
                 data={"cards": what} if loaded else {"error": what[:2000]})
