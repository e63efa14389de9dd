"""`EventConsumer`: turns new ledger entries into events, once, on whichever replica gets there first.

Each pass takes the wallets marked dirty (see proxy/store/events.py), and for
each one it can lease: reads the entries after the wallet's cursor, derives
their events (proxy/events/derive.py), appends them to the event log, then
saves the cursor, and finally drops the wallet's mark unless an entry arrived
meanwhile. Killed anywhere in between, the next pass (here or on another
replica) starts again from the saved cursor: no event is lost, and one derived
twice keeps its id.
"""

from __future__ import annotations

import asyncio
import logging

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
        """Derive the events of up to `limit` dirty wallets; how many wallets were done."""
        done = 0
        for wallet_id, score in await self.events.dirty_wallets(limit):
            token = await self.events.acquire(f"derive:{wallet_id}", _LEASE_MS)
            if token is None:
                continue  # another replica is on it
            try:
                await self.derive_wallet(wallet_id)
                await self.events.mark_clean(wallet_id, score)
                done += 1
            finally:
                await self.events.release(f"derive:{wallet_id}", token)
        return done

    async def derive_wallet(self, wallet_id: str) -> list[Event]:
        """Derive and log the events of every entry after the wallet's cursor."""
        wallet = await self.wallets.get(wallet_id)
        if wallet is None:
            return []
        state = WalletEventState.from_fields(await self.events.wallet_state(wallet_id))
        alerts = state.alerts
        if alerts is None:
            profile = await self.wallets.profile(wallet_id) or {}
            alerts = self.config.low_balance_for(str(profile.get("tier") or "default"))
        derived: list[Event] = []
        while True:
            entries = await self.wallets.ledger_after(wallet_id, state.cursor, limit=_BATCH)
            if not entries:
                break
            events, state = derive(wallet_id, entries, state, alerts, wallet.credit_limit_micros)
            await self.events.append(events)  # first the events, then the cursor: a crash between repeats, never loses
            fields = state.to_fields()
            fields.pop("alerts")  # the admin API's to change; written back here it could undo a change made meanwhile
            await self.events.save_wallet_state(wallet_id, fields)
            derived += events
            if len(entries) < _BATCH:
                break
        return derived


def ratecard_event(loaded: bool, what: str) -> Event:
    """What a rate card reload on one replica reports (not a wallet's: logged as it happens)."""
    return Event(id=new_event_id(), type="ratecard.reloaded" if loaded else "ratecard.refused", created=now_seconds(),
                 data={"cards": what} if loaded else {"error": what[:2000]})
