"""The application factory: `create_app(config)` wires the stores, the reaper and the routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import cors, enduser_jwt, gateway, observability, openapi, transcriptions
from proxy.admin import ADMIN_PREFIX, create_admin_app
from proxy.appstate import (
    ACCOUNTS,
    BACKGROUND,
    BILLING,
    CONFIG,
    EVENTS,
    HTTP,
    LEDGER_DB,
    LIFECYCLE,
    METERING,
    RATECARDS,
    REDIS,
    SANDBOX,
    STRIPE_EVENTS,
    WALLETS,
    Lifecycle,
)
from proxy.billing import AutoTopUps, Billing, StripeApi, StripeEvents, StripeNotConfigured
from proxy.billing import routes as billing_routes
from proxy.budgets import BudgetPolicy
from proxy.calls.lease import Background, Metering
from proxy.calls.upstream import UpstreamSessions
from proxy.config import Config
from proxy.errors import error_middleware
from proxy.events.consumer import EventConsumer, ratecard_event
from proxy.events.delivery import Deliverer
from proxy.events.notices import Notices
from proxy.ledger import report_routes
from proxy.ledger.archiver import Archiver
from proxy.ledger.db import open_database
from proxy.ratecards import RateCardRegistry
from proxy.sandbox import Sandbox, builtin_name, configured_sandbox, serve_responder
from proxy.store import AccountStore, LimitStore, RedisPyCommands, WalletStore
from proxy.store.archive import ArchiveStore
from proxy.store.cluster import StoreClients, connect_store
from proxy.store.events import EventStore
from proxy.store.grants import GrantStore
from proxy.store.payments import PaymentStore

log = logging.getLogger("metergate")


def embedded_redis() -> aioredis.Redis:
    """An in-process Redis (fakeredis with Lua): the same scripts, nothing on disk."""
    import fakeredis

    log.warning(
        "no redis_url configured: using the embedded in-memory store; balances live in memory "
        "and are lost when metergate stops. Set redis_url (or METERGATE_REDIS_URL) for production."
    )
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # The request path sends its commands over one multiplexed connection
    # (proxy/store/redis_mux.py), or one per master on a Redis Cluster
    # (proxy/store/cluster.py); everything else uses the redis-py client.
    if config.redis_url:
        clients = await connect_store(config.redis_url, timeout=config.redis_timeout_seconds)
    else:
        embedded = embedded_redis()
        clients = StoreClients(embedded, RedisPyCommands(embedded), cluster=False)
    client, commands = clients.redis, clients.commands
    app[REDIS] = client
    app[WALLETS] = WalletStore(
        client, hold_ttl_ms=config.hold_ttl_seconds * 1000, idempotency_ttl_seconds=config.idempotency_ttl_seconds,
        closed_hold_ttl_seconds=config.closed_hold_ttl_seconds, commands=commands,
    )
    app[ACCOUNTS] = AccountStore(client, commands)
    app[METERING] = Metering(
        app[WALLETS], LimitStore(client, commands), app[BACKGROUND],
        checkpoint_interval_seconds=config.checkpoint_interval_seconds, budgets=BudgetPolicy(config.budgets),
        accounts=app[ACCOUNTS],
    )
    yield
    await app[WALLETS].flush_unindexed()  # spares the reaper finding this replica's last closed holds
    await clients.aclose()


async def _events_ctx(app: web.Application) -> AsyncIterator[None]:
    """Events out: the consumer deriving events from ledgers, and the webhook deliverer, on every replica."""
    config = app[CONFIG].events
    store = EventStore(app[REDIS], app[WALLETS].commands, retention_days=config.retention_days)
    app[EVENTS] = store
    app[METERING].notices = Notices(app[WALLETS], app[BACKGROUND].spawn)
    consumer = EventConsumer(store, app[WALLETS], config)
    session = aiohttp.ClientSession(skip_auto_headers=("User-Agent",))
    deliverer = Deliverer(store, session, config)
    registry, background = app[RATECARDS], app[BACKGROUND]

    def ratecards_reloaded(loaded: bool, what: str) -> None:
        background.spawn(store.append([ratecard_event(loaded, what)]))

    registry.on_reload = ratecards_reloaded
    tasks = [asyncio.create_task(consumer.run()), asyncio.create_task(deliverer.run())]
    yield
    registry.on_reload = None
    for task in tasks:
        task.cancel()
    # Both stop at their next check; nothing they do is lost by stopping (a
    # wallet left dirty or an event not yet delivered is picked up again).
    await asyncio.wait(tasks, timeout=5)
    await session.close()


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """The ledger of record: the SQL database (migrated at start) and the archiver, on every replica."""
    config = app[CONFIG]
    database = await open_database(config.database_url, attempts=5)
    app[LEDGER_DB] = database
    task = None
    if config.archive.enabled:
        archiver = Archiver(ArchiveStore(app[REDIS], app[WALLETS].commands), app[WALLETS], database, config.archive)
        task = asyncio.create_task(archiver.run())
    yield
    if task is not None:
        task.cancel()
        # Stopping loses nothing: a wallet not yet archived stays marked and is taken up again.
        await asyncio.wait([task], timeout=5)
    await database.close()


async def _billing_ctx(app: web.Application) -> AsyncIterator[None]:
    """Stripe, when configured: the client, the services, and the store's auto top-up hook."""
    stripe_config = app[CONFIG].stripe
    if stripe_config is None:
        yield
        return
    webhook_secret = stripe_config.webhook_secret
    if not webhook_secret:
        raise StripeNotConfigured(
            f"stripe: is configured but ${stripe_config.webhook_secret_env} is empty; set it to the webhook "
            "endpoint's signing secret (whsec_...)")
    api = StripeApi.build(stripe_config)
    config, redis, wallets = app[CONFIG], app[REDIS], app[WALLETS]
    payments = PaymentStore(redis, wallets.commands, idempotency_ttl_seconds=config.idempotency_ttl_seconds)
    billing = Billing(stripe_config, api, wallets, payments)
    auto_top_ups = AutoTopUps(billing, app[BACKGROUND].spawn)
    app[BILLING] = billing
    app[STRIPE_EVENTS] = StripeEvents(billing, auto_top_ups, webhook_secret)
    wallets.auto_top_up_claimed = auto_top_ups.claimed
    yield
    wallets.auto_top_up_claimed = None
    await app[BACKGROUND].drain(timeout=10.0)
    await api.aclose()


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    sandbox = configured_sandbox(config)
    async with contextlib.AsyncExitStack() as stack:
        if sandbox is None:
            responder = serve_responder()
            stack.push_async_callback(responder.aclose)
            sandbox = Sandbox(builtin_name(config), await anext(responder))
        app[SANDBOX] = sandbox
        app[HTTP] = UpstreamSessions({**config.upstreams, sandbox.name: sandbox.upstream})
        yield
        await _close_http(app)


async def _close_http(app: web.Application) -> None:
    # Closes and answers still running finish before the store closes; one
    # stuck on an unreachable store is left to the reaper (which charges the
    # hold's checkpoint) rather than holding the shutdown forever.
    await app[BACKGROUND].drain(timeout=10.0)
    await app[HTTP].close()


async def _ratecards_ctx(app: web.Application) -> AsyncIterator[None]:
    registry = app[RATECARDS]
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()

    def on_sighup() -> None:
        task = loop.create_task(registry.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        sighup = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        sighup = False
    watcher = asyncio.create_task(registry.watch(app[CONFIG].ratecards_watch_interval_seconds))
    yield
    watcher.cancel()
    if sighup:
        loop.remove_signal_handler(signal.SIGHUP)
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def run_reaper(wallets: WalletStore, interval: float, grants: GrantStore | None = None) -> None:
    """Close holds whose TTL passed (their proxy died mid-request): charge each one's
    checkpoint of what it relayed, or release it when it has none; and expire the grants
    (`grants`) of wallets no call has touched since they came due.

    Ends when cancelled, even when a library swallowed the CancelledError:
    on Python 3.11 `asyncio.wait_for` returns the result instead when the
    awaited operation has already finished as the cancellation arrives, and
    redis-py wraps every command write in one when `socket_timeout` is set
    (the embedded store sets it). The request to stop stays counted on the
    task, so it is checked after every pass.
    """
    task = asyncio.current_task()
    while True:
        more = False
        try:
            expired = await wallets.expire_due(limit=500)
            for s in expired:
                log.info("expired hold %s: charged its checkpoint of %d micros, released %d",
                         s.hold_id, s.captured_micros, s.released_micros)
            observability.holds_expired(len(expired))
            # Grants past their expiry in wallets no call has touched since.
            swept = await grants.expire_due(limit=500) if grants is not None else 0
            more = len(expired) == 500 or swept == 500
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reaper pass failed; retrying")
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        if not more:
            await asyncio.sleep(interval)


async def _reaper_ctx(app: web.Application) -> AsyncIterator[None]:
    wallets = app[WALLETS]
    grants = GrantStore(wallets.redis, wallets.commands, idempotency_ttl_seconds=wallets.idempotency_ttl_seconds)
    task = asyncio.create_task(run_reaper(wallets, app[CONFIG].reaper_interval_seconds, grants))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _start_draining(app: web.Application) -> None:
    """SIGTERM: aiohttp has stopped accepting connections; calls in flight get
    `shutdown_grace_seconds` to finish (see `metergate serve`), and a new call on a
    kept-alive connection is refused, so no hold is opened that shutdown could strand."""
    app[LIFECYCLE].draining = True
    log.info("draining: no new calls; waiting up to %ss for calls in flight", app[CONFIG].shutdown_grace_seconds)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        return web.json_response({"status": "draining"}, status=503)
    try:
        await asyncio.wait_for(request.app[REDIS].ping(), timeout=2)
    except Exception as exc:  # any failure to reach the store means not ready
        return web.json_response({"status": "unavailable", "redis": str(exc) or type(exc).__name__}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[BACKGROUND] = Background()
    app[LIFECYCLE] = Lifecycle()
    app.on_shutdown.append(_start_draining)
    enduser_jwt.setup(app, config)
    cors.setup(app)
    app[RATECARDS] = RateCardRegistry(config.resolve(config.ratecards_dir), set(config.upstreams), config.asset_names())
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_events_ctx)
    app.cleanup_ctx.append(_ledger_ctx)
    app.cleanup_ctx.append(_billing_ctx)
    app.cleanup_ctx.append(_http_ctx)
    app.cleanup_ctx.append(_reaper_ctx)
    app.cleanup_ctx.append(_ratecards_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi.handler)
    app.router.add_get("/metrics", metrics)
    app.add_routes(gateway.routes)
    app.add_routes(transcriptions.routes)
    app.add_routes(billing_routes.routes)
    app.add_routes(report_routes.public_routes)
    app.add_subapp(ADMIN_PREFIX, create_admin_app(config))
    return app
