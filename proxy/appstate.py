"""Typed keys for what the app factory stores on the application."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.helpers import ChainMapProxy

from proxy.config import Config
from proxy.ratecards import RateCardRegistry
from proxy.store import AccountStore, WalletStore
from proxy.store.events import EventStore
from proxy.store.scripts import StoreRedis

if TYPE_CHECKING:  # the call lifecycle imports errors, which reads CONFIG from here
    from proxy.billing.service import Billing
    from proxy.billing.webhook import StripeEvents
    from proxy.calls.lease import Background, Metering
    from proxy.calls.upstream import UpstreamSessions
    from proxy.ledger.db import LedgerDatabase
    from proxy.sandbox import Sandbox

class Lifecycle:
    """Whether the process is draining (SIGTERM received): no new calls, not ready."""

    def __init__(self) -> None:
        self.draining = False


CONFIG = web.AppKey("config", Config)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
REDIS: web.AppKey[StoreRedis] = web.AppKey("redis")  # one server's client, or a Redis Cluster's
WALLETS = web.AppKey("wallets", WalletStore)
ACCOUNTS = web.AppKey("accounts", AccountStore)
RATECARDS = web.AppKey("ratecards", RateCardRegistry)
HTTP: web.AppKey[UpstreamSessions] = web.AppKey("http")  # one pooled session per upstream
BACKGROUND: web.AppKey[Background] = web.AppKey("background")  # closes and whole answers still running
METERING: web.AppKey[Metering] = web.AppKey("metering")  # opens each call's lease
# Set only when the config has a `stripe:` block:
BILLING: web.AppKey[Billing] = web.AppKey("billing")
STRIPE_EVENTS: web.AppKey[StripeEvents] = web.AppKey("stripe_events")
EVENTS: web.AppKey[EventStore] = web.AppKey("events")  # the event log, webhook endpoints and deliveries
LEDGER_DB: web.AppKey[LedgerDatabase] = web.AppKey("ledger_db")  # the ledger of record (SQL): archive, reports, audit
SANDBOX: web.AppKey[Sandbox] = web.AppKey("sandbox")  # where test-mode calls go (proxy/sandbox.py)


def app_state(request: web.Request) -> web.Application | ChainMapProxy:
    """What `request.config_dict` gives, without building it for a route of the root app.

    `config_dict` makes a new ChainMapProxy on every read (~0.75 µs here), and a metered
    call reads it about seven times. On a route of the root app (every metered route) the
    chain is that app alone, so the app itself answers the same lookups (~0.15 µs to
    find). A sub-application's route (admin, events, ledger) gets `config_dict` itself.
    """
    match_info = request.match_info
    if match_info is not None and len(apps := match_info.apps) == 1:
        return apps[0]
    return request.config_dict
