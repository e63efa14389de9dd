"""The admin API for events out: webhook endpoints, the event log, deliveries, redelivery, balance alerts.

All under /admin (the admin sub-application's key check applies):
- `POST|GET /webhook-endpoints`, `GET|PATCH|DELETE /webhook-endpoints/{id}`,
  `POST /webhook-endpoints/{id}/rotate-secret` (the secret is shown only here and at creation);
- `GET /events` (newest first, paged), `GET /events/{id}` (with every endpoint's attempts),
  `POST /events/{id}/redeliver`;
- `GET|PUT /end-users/{id}/balance-alerts` (the wallet's own low-balance thresholds).
"""

from __future__ import annotations

import secrets
import time

from aiohttp import web

from proxy import schemas
from proxy.appstate import CONFIG, EVENTS, WALLETS
from proxy.config import LowBalanceAlerts
from proxy.errors import ApiError, json_model, read_model
from proxy.events.derive import WalletEventState
from proxy.events.model import EVENT_TYPES
from proxy.store.events import DeliveryState, Endpoint, EventStore, StoredEvent

routes = web.RouteTableDef()


def _check_types(types: list[str]) -> tuple[str, ...]:
    unknown = [t for t in types if t != "*" and t not in EVENT_TYPES]
    if unknown:
        raise ApiError(400, f"unknown event types {unknown}; known: {', '.join(EVENT_TYPES)} or \"*\"",
                       code="invalid_event_type", param="events")
    return tuple(dict.fromkeys(types))


async def _view(store: EventStore, endpoint: Endpoint, *, show_secret: bool = False) -> schemas.WebhookEndpointView:
    state = await store.delivery_state(endpoint.id)
    failing = state is not None and state.failing_since_ms > 0
    return schemas.WebhookEndpointView(
        id=endpoint.id, url=endpoint.url, events=list(endpoint.events), description=endpoint.description,
        enabled=endpoint.enabled, disabled_reason=endpoint.disabled_reason, created=endpoint.created,
        secret=endpoint.secret if show_secret else None, secret_hint=endpoint.secret[-4:],
        failing_since=state.failing_since_ms // 1000 if failing and state else None,
        pending_attempts=state.attempts if state else 0,
        next_attempt_at=state.next_attempt_ms // 1000 if failing and state else None,
    )


async def _endpoint_or_404(store: EventStore, endpoint_id: str) -> Endpoint:
    endpoint = await store.endpoint(endpoint_id)
    if endpoint is None:
        raise ApiError(404, f"no webhook endpoint {endpoint_id!r}", code="endpoint_not_found", param="id")
    return endpoint


def _secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


@routes.post("/webhook-endpoints")
async def create_endpoint(request: web.Request) -> web.Response:
    store = request.config_dict[EVENTS]
    body = await read_model(request, schemas.CreateWebhookEndpoint)
    endpoint = Endpoint(id="we_" + secrets.token_hex(8), url=body.url, events=_check_types(body.events),
                        enabled=body.enabled, secret=_secret(), created=int(time.time()), description=body.description)
    # It receives what happens from now on, not the log's past.
    await store.save_delivery_state(endpoint.id, DeliveryState(cursor=await store.end_position(), attempts=0,
                                                               next_attempt_ms=0, failing_since_ms=0))
    await store.save_endpoint(endpoint)
    return json_model(await _view(store, endpoint, show_secret=True), 201)


@routes.get("/webhook-endpoints")
async def list_endpoints(request: web.Request) -> web.Response:
    store = request.config_dict[EVENTS]
    return json_model(schemas.WebhookEndpointList(data=[await _view(store, e) for e in await store.endpoints()]))


@routes.get("/webhook-endpoints/{id}")
async def get_endpoint(request: web.Request) -> web.Response:
    store = request.config_dict[EVENTS]
    return json_model(await _view(store, await _endpoint_or_404(store, request.match_info["id"])))


@routes.patch("/webhook-endpoints/{id}")
async def update_endpoint(request: web.Request) -> web.Response:
    store = request.config_dict[EVENTS]
    endpoint = await _endpoint_or_404(store, request.match_info["id"])
    body = await read_model(request, schemas.UpdateWebhookEndpoint)
    changes: dict[str, object] = {}
    if body.url is not None:
        changes["url"] = body.url
    if body.events is not None:
        changes["events"] = _check_types(body.events)
    if body.description is not None:
        changes["description"] = body.description
    if body.enabled is not None:
        changes["enabled"] = body.enabled
        if body.enabled and not endpoint.enabled:
            # Back on: it resumes at the event it stopped on, retried at once.
            changes["disabled_reason"] = None
            state = await store.delivery_state(endpoint.id)
            if state is not None:
                await store.save_delivery_state(endpoint.id, DeliveryState(
                    cursor=state.cursor, attempts=0, next_attempt_ms=0, failing_since_ms=0))
    updated = Endpoint(**{**endpoint.__dict__, **changes})
    await store.save_endpoint(updated)
    return json_model(await _view(store, updated))


@routes.post("/webhook-endpoints/{id}/rotate-secret")
async def rotate_secret(request: web.Request) -> web.Response:
    store = request.config_dict[EVENTS]
    endpoint = await _endpoint_or_404(store, request.match_info["id"])
    body = await read_model(request, schemas.RotateWebhookSecret)
    rotated = Endpoint(**{**endpoint.__dict__, "secret": _secret(), "previous_secret": endpoint.secret,
                          "previous_secret_expires": int(time.time()) + body.grace_seconds})
    await store.save_endpoint(rotated)
    return json_model(await _view(store, rotated, show_secret=True))


@routes.delete("/webhook-endpoints/{id}")
async def delete_endpoint(request: web.Request) -> web.Response:
    store = request.config_dict[EVENTS]
    endpoint = await _endpoint_or_404(store, request.match_info["id"])
    await store.delete_endpoint(endpoint.id)
    return web.json_response({"id": endpoint.id, "object": "webhook_endpoint", "deleted": True})


# ------------------------------------------------------------------ the event log


def _event_view(stored: StoredEvent) -> schemas.EventView:
    e = stored.event
    return schemas.EventView(id=e.id, type=e.type, created=e.created, end_user=e.end_user, ledger_id=e.ledger_id, data=e.data)


@routes.get("/events")
async def list_events(request: web.Request) -> web.Response:
    store = request.config_dict[EVENTS]
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 500:
        raise ApiError(400, "limit must be an integer between 1 and 500", code="invalid_limit", param="limit")
    wanted_type, end_user = request.query.get("type"), request.query.get("end_user")
    cursor = request.query.get("starting_after")
    filtered = bool(wanted_type or end_user)
    scan_size = 200 if filtered else limit
    found: list[StoredEvent] = []
    exhausted = False
    # Filters are applied while paging back through the log, a bounded number of pages per request; when the
    # bound stops the scan, next_cursor is where it stopped, so walking the pages still reaches every match.
    for _ in range(20):
        page = await store.latest(scan_size, before=cursor)
        found += [s for s in page if (not wanted_type or s.event.type == wanted_type)
                  and (not end_user or s.event.end_user == end_user)]
        if len(page) < scan_size:
            exhausted = True
            break
        if len(found) >= limit:
            break
        cursor = page[-1].position
    next_cursor: str | None
    if len(found) >= limit:
        found = found[:limit]
        next_cursor = found[-1].position
    else:
        next_cursor = None if exhausted else cursor
    return json_model(schemas.EventPage(data=[_event_view(s) for s in found], next_cursor=next_cursor))


async def _event_or_404(store: EventStore, event_id: str) -> StoredEvent:
    stored = await store.get(event_id)
    if stored is None:
        raise ApiError(404, f"no event {event_id!r} (events are kept for the retention window)", code="event_not_found", param="id")
    return stored


@routes.get("/events/{id}")
async def get_event(request: web.Request) -> web.Response:
    store = request.config_dict[EVENTS]
    stored = await _event_or_404(store, request.match_info["id"])
    deliveries = [schemas.DeliveryAttemptView(endpoint=e.id, attempts=await store.attempts(e.id, stored.event.id))
                  for e in await store.endpoints()]
    view = _event_view(stored)
    return json_model(schemas.EventDetailView(**view.model_dump(), deliveries=[d for d in deliveries if d.attempts]))


@routes.post("/events/{id}/redeliver")
async def redeliver(request: web.Request) -> web.Response:
    store = request.config_dict[EVENTS]
    stored = await _event_or_404(store, request.match_info["id"])
    body = await read_model(request, schemas.Redeliver)
    if body.endpoint is not None:
        targets = [await _endpoint_or_404(store, body.endpoint)]
    else:
        targets = [e for e in await store.endpoints() if e.enabled and e.wants(stored.event.type)]
    for endpoint in targets:
        await store.request_redelivery(endpoint.id, stored.event.id)
    return web.json_response({"object": "redelivery", "event": stored.event.id, "endpoints": [e.id for e in targets]},
                             status=202)


# ------------------------------------------------------------------ balance alerts


@routes.get("/end-users/{id}/balance-alerts")
async def get_balance_alerts(request: web.Request) -> web.Response:
    return json_model(await _alerts_view(request, request.match_info["id"]))


@routes.put("/end-users/{id}/balance-alerts")
async def put_balance_alerts(request: web.Request) -> web.Response:
    wallet_id = request.match_info["id"]
    await _alerts_view(request, wallet_id)  # 404 first
    body = await read_model(request, schemas.BalanceAlerts)
    alerts = LowBalanceAlerts(absolute_micros=body.absolute_micros, percent_of_last_top_up=body.percent_of_last_top_up)
    await request.config_dict[EVENTS].save_wallet_state(wallet_id, {"alerts": alerts.model_dump_json()})
    return json_model(await _alerts_view(request, wallet_id))


async def _alerts_view(request: web.Request, wallet_id: str) -> schemas.BalanceAlertsView:
    profile = await request.config_dict[WALLETS].profile(wallet_id)
    if profile is None:
        raise ApiError(404, f"no end user {wallet_id!r}", code="end_user_not_found", param="id")
    state = WalletEventState.from_fields(await request.config_dict[EVENTS].wallet_state(wallet_id))
    alerts = state.alerts or request.config_dict[CONFIG].events.low_balance_for(str(profile.get("tier") or "default"))
    return schemas.BalanceAlertsView(end_user=wallet_id, source="wallet" if state.alerts else "tier",
                                     absolute_micros=list(alerts.absolute_micros),
                                     percent_of_last_top_up=list(alerts.percent_of_last_top_up))
