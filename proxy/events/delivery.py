"""Webhook delivery: signing events, the receiver's check of a signature, and the loop that posts the
event log to each endpoint -- in log order, one replica per endpoint at a time, retried with backoff.

How an endpoint's events stay in order: each endpoint has one cursor (the log
position of the last event it took or skipped). Only the event after the cursor
is ever in flight; while it fails, later events wait behind it (head-of-line),
so each wallet's events arrive in the order they happened. A success moves the
cursor; a crash between the POST and the save sends that event again
(at-least-once on the wire; the receiver drops duplicates by event id).

How one replica delivers an endpoint: the pass over an endpoint runs under the
lease `webhook:<endpoint id>` (EventStore.acquire), renewed before every POST.
The lease outlives a POST (it is a few webhook timeouts long), so the cursor is
saved before another replica can read it.

Redeliveries asked for by the admin API are sent once each, before the cursor's
events, and never move the cursor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp

from proxy.config import EventsConfig
from proxy.events.model import Event
from proxy.observability import WEBHOOK_DELIVERIES, WEBHOOK_ENDPOINTS_DISABLED
from proxy.store.events import DeliveryState, Endpoint, EventStore

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Metergate-Signature"
EVENT_ID_HEADER = "Metergate-Event-Id"
USER_AGENT = "metergate-webhooks"
# The lease on an endpoint lasts this many webhook timeouts: a POST (at most one
# timeout) and the saves after it fit inside a lease renewed just before it.
LEASE_TIMEOUTS = 3

_DELIVERED = WEBHOOK_DELIVERIES.labels("delivered")
_FAILED = WEBHOOK_DELIVERIES.labels("failed")
_REDELIVERED = WEBHOOK_DELIVERIES.labels("redelivered")


# ------------------------------------------------------------ signatures


def _sign(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """`t=<unix>,v1=<hex>[,v1=<hex>]`: one v1 per secret (the new and the previous one while a rotation's grace lasts)."""
    return ",".join([f"t={timestamp}", *(f"v1={_sign(secret, timestamp, body)}" for secret in secrets)])


def verify_signature(header: str, body: bytes, secret: str, *, tolerance_seconds: int = 300, now: int | None = None) -> bool:
    """The receiver's check: the raw body signed with `secret` at `t`, and `t` recent (a replayed request is refused)."""
    timestamp, signatures = None, []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or abs((int(time.time()) if now is None else now) - timestamp) > tolerance_seconds:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    # As bytes: compare_digest refuses str with non-ASCII characters, which a forged header may hold.
    return any(hmac.compare_digest(expected.encode(), signature.encode()) for signature in signatures)


def signing_secrets(endpoint: Endpoint, now: int) -> list[str]:
    """The secrets a delivery is signed with: the endpoint's, and its previous one until its grace ends (unix seconds)."""
    if endpoint.previous_secret and endpoint.previous_secret_expires > now:
        return [endpoint.secret, endpoint.previous_secret]
    return [endpoint.secret]


# ------------------------------------------------------------ delivery


@dataclass(frozen=True)
class DeliveryAttempt:
    """One POST of an event to an endpoint, as the delivery log keeps it (EventStore.log_attempt)."""

    time_ms: int  # unix milliseconds when the POST started
    attempt: int  # 1 for the first try of this event to this endpoint
    status: int | None  # the HTTP status; None when no response came (timeout, refused connection)
    latency_ms: int
    error: str | None  # why it failed; None on a 2xx
    redelivery: bool = False  # asked for by the admin API

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


Renew = Callable[[], Awaitable[bool]]


class Deliverer:
    def __init__(self, store: EventStore, session: aiohttp.ClientSession, config: EventsConfig):
        self.store = store
        self.session = session
        self.config = config
        self.lease_ms = int(LEASE_TIMEOUTS * config.webhook_timeout_seconds * 1000)

    async def run(self) -> None:
        """Deliver to every enabled endpoint every poll interval, until cancelled.

        Ends when cancelled even if a library swallowed the CancelledError (see
        proxy.app.run_reaper): the request to stop is checked after every pass.
        """
        task = asyncio.current_task()
        while True:
            try:
                endpoints = [e for e in await self.store.endpoints() if e.enabled]
                # Concurrently: one endpoint waiting out its timeout does not hold up the others.
                await asyncio.gather(*(self._serve(endpoint.id) for endpoint in endpoints))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook delivery pass failed; retrying")
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(self.config.poll_interval_seconds)

    async def _serve(self, endpoint_id: str) -> None:
        """One pass over one endpoint, under its lease; a busy lease means another replica is on it."""
        name = f"webhook:{endpoint_id}"
        token = await self.store.acquire(name, self.lease_ms)
        if token is None:
            return

        async def renew() -> bool:
            return await self.store.renew(name, token, self.lease_ms)

        try:
            # Read again under the lease: it may have been turned off or deleted since the list was read.
            endpoint = await self.store.endpoint(endpoint_id)
            while endpoint is not None and endpoint.enabled:
                full = 100
                if await self.deliver_some(endpoint, max_events=full, renew=renew) < full:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook endpoint %s: delivery pass failed; retrying", endpoint_id)
        finally:
            try:
                await self.store.release(name, token)
            except Exception:
                log.warning("webhook endpoint %s: could not release its lease; it ends by itself", endpoint_id)

    async def deliver_some(self, endpoint: Endpoint, *, max_events: int = 100, renew: Renew | None = None) -> int:
        """Send the endpoint's asked-for redeliveries, then its events after its cursor, in order, stopping at
        the first failure (or at the event whose retry is not due). Returns how many were delivered (2xx).

        `renew` (the caller's lease) is called before each POST; once it says the lease is lost, the pass stops.
        """
        if not endpoint.enabled:
            return 0
        delivered = 0
        # ---- redeliveries: one attempt each, the cursor untouched
        for _ in range(max_events):
            if renew is not None and not await renew():
                return delivered
            event_id = await self.store.next_redelivery(endpoint.id)
            if event_id is None:
                break
            stored = await self.store.get(event_id)
            if stored is None:
                log.warning("webhook endpoint %s: event %s to redeliver is past the retention; dropped", endpoint.id, event_id)
                continue
            number = len(await self.store.attempts(endpoint.id, event_id)) + 1
            attempt = await self._post(endpoint, stored.event, number, redelivery=True)
            await self.store.log_attempt(endpoint.id, event_id, dataclasses.asdict(attempt))
            (_REDELIVERED if attempt.ok else _FAILED).inc()
            if attempt.ok:
                delivered += 1
            else:
                log.warning("webhook endpoint %s: redelivery of %s failed: %s", endpoint.id, event_id, attempt.error)

        # ---- the log after the cursor, in order
        state = await self.store.delivery_state(endpoint.id) or DeliveryState(cursor="0", attempts=0, next_attempt_ms=0, failing_since_ms=0)
        skipped = False  # the cursor moved past events not wanted, not saved yet
        seen, waiting = 0, False
        while seen < max_events and not waiting:
            batch = await self.store.after(state.cursor, count=min(100, max_events - seen))
            if not batch:
                break
            for stored in batch:
                seen += 1
                if not endpoint.wants(stored.event.type):
                    state, skipped = dataclasses.replace(state, cursor=stored.position), True
                    continue
                if state.next_attempt_ms > _now_ms() or (renew is not None and not await renew()):
                    waiting = True  # for the head event's retry, or for a lease this replica lost
                    break
                attempt = await self._post(endpoint, stored.event, state.attempts + 1)
                await self.store.log_attempt(endpoint.id, stored.event.id, dataclasses.asdict(attempt))
                if not attempt.ok:
                    _FAILED.inc()
                    await self._failed(endpoint, state, attempt)  # saves the cursor, skips included
                    return delivered
                _DELIVERED.inc()
                delivered += 1
                state, skipped = DeliveryState(cursor=stored.position, attempts=0, next_attempt_ms=0, failing_since_ms=0), False
                await self.store.save_delivery_state(endpoint.id, state)
        if skipped:
            await self.store.save_delivery_state(endpoint.id, state)
        return delivered

    async def _failed(self, endpoint: Endpoint, state: DeliveryState, attempt: DeliveryAttempt) -> None:
        """Schedule the head event's retry, or turn the endpoint off once it has failed for too long."""
        now = _now_ms()
        attempts = state.attempts + 1
        # The exponent is capped so that days of hourly retries never overflow a float.
        backoff = min(self.config.retry_base_seconds * 2 ** min(attempts - 1, 40), self.config.retry_max_seconds)
        failing_since = state.failing_since_ms or now
        if now - failing_since <= self.config.disable_after_seconds * 1000:
            log.warning("webhook endpoint %s: attempt %d failed (%s); retrying in %.2f s", endpoint.id, attempts, attempt.error, backoff)
            await self.store.save_delivery_state(endpoint.id, DeliveryState(
                cursor=state.cursor, attempts=attempts, next_attempt_ms=now + int(backoff * 1000), failing_since_ms=failing_since))
            return
        since = dt.datetime.fromtimestamp(failing_since / 1000, dt.UTC).isoformat(timespec="seconds")
        reason = f"deliveries failing since {since} ({attempts} attempts); last: {attempt.error}"
        # Read again: an admin change since this pass began (a rotation, an edit) must not be overwritten.
        current = await self.store.endpoint(endpoint.id)
        if current is not None:
            await self.store.save_endpoint(dataclasses.replace(current, enabled=False, disabled_reason=reason))
        # Re-enabled, it starts its failure clock afresh (from its cursor, nothing lost).
        await self.store.save_delivery_state(endpoint.id, DeliveryState(cursor=state.cursor, attempts=0, next_attempt_ms=0, failing_since_ms=0))
        WEBHOOK_ENDPOINTS_DISABLED.inc()
        log.error("webhook endpoint %s (%s) disabled: %s", endpoint.id, endpoint.url, reason)

    async def _post(self, endpoint: Endpoint, event: Event, number: int, *, redelivery: bool = False) -> DeliveryAttempt:
        body = event.to_json()
        started_ms, started = _now_ms(), time.monotonic()
        timestamp = started_ms // 1000
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_ID_HEADER: event.id,
            SIGNATURE_HEADER: signature_header(signing_secrets(endpoint, timestamp), timestamp, body),
        }
        status: int | None = None
        error: str | None = None
        try:
            # A redirect is not followed (as Stripe does): it counts as a failure, with its status.
            async with self.session.post(endpoint.url, data=body, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.config.webhook_timeout_seconds)) as response:
                status = response.status
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except TimeoutError:
            error = f"no response within {self.config.webhook_timeout_seconds:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return DeliveryAttempt(time_ms=started_ms, attempt=number, status=status,
                               latency_ms=int((time.monotonic() - started) * 1000), error=error, redelivery=redelivery)


def _now_ms() -> int:
    return int(time.time() * 1000)
