"""What the admin API records of each request that may change something, and the checks around it.

`audited` runs one non-read admin request: it reads the body (bounded, as the
handlers do), names the target from the route (or, for a create, from the body
or the answer), snapshots the target, checks the caller's role (a refusal is a
403 before the handler runs), runs the handler, snapshots the target again and
appends the record through proxy/ledger/audit.py. Snapshots: an end user is
their profile (scrubbed), wallet, own balance alerts and auto top-up rule; a key is its
stored, masked form; a webhook endpoint is everything but its secret (a
fingerprint shows a rotation).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from proxy import schemas
from proxy.admin_roles import AdminIdentity, check_permission
from proxy.appstate import ACCOUNTS, BACKGROUND, BILLING, EVENTS, LEDGER_DB, WALLETS
from proxy.errors import answer, read_body
from proxy.events.derive import WalletEventState
from proxy.ledger import audit
from proxy.ledger.db import AuditRecord

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CLIENT_CLOSED = 499  # the client went away mid-request: the change may or may not have happened

# Creates name their target only in the body (end users) or the answer (endpoints: the id is made there).
_CREATES = {"POST /end-users": "end_user", "POST /webhook-endpoints": "webhook_endpoint"}


@dataclass
class _Entry:
    """One request's record, filled in as it runs."""

    identity: AdminIdentity
    method: str
    path: str
    action: str
    request_id: str
    at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    kind: str | None = None  # what the target is: end_user, key, webhook_endpoint (None: not snapshotted)
    target: str | None = None
    owner: str | None = None  # a key's end user
    body: Any = None
    before: Any = None


def _locate(entry: _Entry, route: str | None, match: dict[str, str]) -> None:
    """The target named by the route's path, before the handler runs."""
    if route is None:
        return
    if "key_id" in match:
        entry.kind, entry.target, entry.owner = "key", match["key_id"], match.get("id")
    elif route.startswith(("/end-users/{id}", "/wallets/{id}")):
        entry.kind, entry.target = "end_user", match["id"]
    elif route.startswith("/webhook-endpoints/{id}"):
        entry.kind, entry.target = "webhook_endpoint", match["id"]
    elif "id" in match:
        entry.target = match["id"]  # an event: nothing of it changes
    elif entry.action in _CREATES:
        entry.kind = _CREATES[entry.action]


def _created_id(entry: _Entry, response: web.StreamResponse) -> str | None:
    """The id a create made: read from its answer (never kept whole: an endpoint's answer holds its secret)."""
    if not 200 <= response.status < 300 or not isinstance(response, web.Response):
        return entry.target
    try:
        made = orjson.loads(response.text or "")
    except (orjson.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return entry.target
    return made.get("id") if isinstance(made, dict) and isinstance(made.get("id"), str) else entry.target


async def _end_user(request: web.Request, end_user_id: str) -> dict[str, Any] | None:
    wallets = request.config_dict[WALLETS]
    profile, state = await wallets.profile(end_user_id), await wallets.get(end_user_id)
    if profile is None and state is None:
        return None
    # The profile's metadata is the operator's free text: scrubbed as request bodies are.
    snapshot: dict[str, Any] = {"profile": audit.redact(profile), "wallet": schemas.WalletView.of(state).model_dump() if state else None}
    events = request.config_dict.get(EVENTS)
    if events is not None:
        alerts = WalletEventState.from_fields(await events.wallet_state(end_user_id)).alerts
        snapshot["balance_alerts"] = alerts.model_dump() if alerts is not None else None
    billing = request.config_dict.get(BILLING)
    if billing is not None:
        rule = await billing.payments.rule(end_user_id)
        snapshot["auto_top_up"] = {"enabled": rule.enabled, "threshold_micros": rule.threshold_micros,
                                   "amount_micros": rule.amount_micros, "configured": rule.configured, "card": rule.card,
                                   "disabled_reason": rule.disabled_reason}
    return snapshot


async def _key(request: web.Request, end_user_id: str | None, key_id: str) -> dict[str, Any] | None:
    if end_user_id is None:
        return None
    key = next((k for k in await request.config_dict[ACCOUNTS].list_keys(end_user_id) if k.id == key_id), None)
    if key is None:
        return None
    return {"id": key.id, "end_user_id": key.end_user_id, "name": key.name, "masked": key.masked,
            "created_ms": key.created_ms, "revoked_ms": key.revoked_ms, "scopes": key.scopes}


async def _endpoint(request: web.Request, endpoint_id: str) -> dict[str, Any] | None:
    events = request.config_dict.get(EVENTS)
    endpoint = await events.endpoint(endpoint_id) if events is not None else None
    if endpoint is None:
        return None
    return {"id": endpoint.id, "url": endpoint.url, "events": list(endpoint.events), "description": endpoint.description,
            "enabled": endpoint.enabled, "disabled_reason": endpoint.disabled_reason, "created": endpoint.created,
            # Not the secret: a short hash of it, so that a rotation shows as a change.
            "secret_fingerprint": hashlib.sha256(endpoint.secret.encode()).hexdigest()[:12],
            "previous_secret_expires": endpoint.previous_secret_expires if endpoint.previous_secret else None}


async def _snapshot(request: web.Request, entry: _Entry) -> Any:
    """The target as it stands now; a store that fails is noted in the record rather than losing it."""
    if entry.target is None or entry.kind is None:
        return None
    try:
        if entry.kind == "end_user":
            return await _end_user(request, entry.target)
        if entry.kind == "key":
            return await _key(request, entry.owner, entry.target)
        return await _endpoint(request, entry.target)
    except Exception as exc:
        log.warning("audit: could not read %s %s: %r", entry.kind, entry.target, exc)
        return {"unreadable": repr(exc)}


async def _finish(request: web.Request, entry: _Entry, status: int) -> None:
    after = await _snapshot(request, entry)
    await audit.write(request.config_dict.get(LEDGER_DB), AuditRecord(
        at_ms=entry.at_ms, actor=entry.identity.name, role=entry.identity.role, method=entry.method, path=entry.path,
        action=entry.action, target=entry.target, request_id=entry.request_id, status=status,
        request_body=entry.body, before=entry.before, after=after,
    ))


async def audited(request: web.Request, handler: Handler, *, identity: AdminIdentity, action: str,
                  route: str | None, request_id: str) -> web.StreamResponse:
    """Run a non-read admin request under the role check, and record it whatever its outcome."""
    entry = _Entry(identity, request.method, request.path, action, request_id)
    _locate(entry, route, dict(request.match_info))

    async def checked(req: web.Request) -> web.StreamResponse:
        raw = await read_body(req)  # kept by aiohttp: the handler reads the same bytes
        entry.body = audit.body_for_audit(raw)
        if entry.action == "POST /end-users" and isinstance(entry.body, dict) and isinstance(entry.body.get("id"), str):
            entry.target = entry.body["id"]
        entry.before = await _snapshot(req, entry)
        if route is not None:  # no route: the handler is aiohttp's 404/405, which changes nothing
            check_permission(identity, action, _json_or_none(raw))
        return await handler(req)

    # The record is written by a task of the app's (awaited here, shielded): a client that
    # hangs up must not take the record of what its request did with it.
    background = request.config_dict[BACKGROUND]
    try:
        response = await answer(request, checked)
    except asyncio.CancelledError:
        background.spawn(_finish(request, entry, _CLIENT_CLOSED))
        raise
    if entry.kind is not None and entry.action in _CREATES:
        entry.target = _created_id(entry, response)
    await asyncio.shield(background.spawn(_finish(request, entry, response.status)))
    return response


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
