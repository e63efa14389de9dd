"""The operator's admin API under /admin: end users, their keys, and wallet money movements.

Handlers are thin: parse and validate the body, call the store, shape the
answer. The sub-application's middleware, `admin_access`, resolves the key to
an identity and role (proxy/admin_roles.py) and has every request that may
change something checked and recorded in the audit log (proxy/admin_audit.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy import admin_grants, admin_jobs, admin_meters, schemas
from proxy.admin_audit import audited
from proxy.admin_roles import READ_METHODS, AdminKeyring, action_of, check_permission
from proxy.appstate import ACCOUNTS, LEDGER_DB, METERING, RATECARDS, WALLETS
from proxy.auth import presented_bearer
from proxy.billing import routes as billing_routes
from proxy.budgets import budget_view
from proxy.config import Config
from proxy.enduser_jwt import TOKENS
from proxy.errors import REPLAYED, ApiError, answer, error_middleware, idempotency_key, json_model, read_model
from proxy.events import routes as event_routes
from proxy.ledger import audit, report_routes
from proxy.ledger.history import archived_charge
from proxy.ratecards import RateCardRegistry
from proxy.store import ApiKey, ChargeNotFound, LedgerEntry, LimitStore, Receipt, now_ms
from proxy.store.budgets import BudgetStore

routes = web.RouteTableDef()


ADMIN_PREFIX = "/admin"
KEYRING = web.AppKey("admin_keyring", AdminKeyring)
REQUEST_ID_HEADER = "X-Request-Id"


def admin_route(request: web.Request) -> str | None:
    """The matched route's template without the /admin prefix ("/end-users/{id}"); None for a 404 or 405."""
    resource = request.match_info.route.resource
    return resource.canonical.removeprefix(ADMIN_PREFIX) if resource is not None else None


@web.middleware
async def admin_access(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Who calls (a 401 for no admin key), may they (a 403 before the handler), and the audit of any change."""
    token = presented_bearer(request)
    identity = request.config_dict[KEYRING].identify(token) if token else None
    if identity is None:
        raise ApiError(401, "missing or wrong admin key (Authorization: Bearer <admin key>)", code="invalid_api_key")
    request_id = "req_" + secrets.token_hex(12)
    route = admin_route(request)
    action = action_of(request.method, route if route is not None else "(no route)")
    if request.method in READ_METHODS:
        async def read(req: web.Request) -> web.StreamResponse:
            if route is not None:  # no route: aiohttp's 404/405
                check_permission(identity, action)
            return await handler(req)

        response = await answer(request, read)
    else:
        response = await audited(request, handler, identity=identity, action=action, route=route, request_id=request_id)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _key_not_found() -> ApiError:
    return ApiError(404, "no such key for this end user", code="key_not_found", param="key_id")


def _receipt(receipt: Receipt) -> web.Response:
    headers = REPLAYED if receipt.replayed else None
    return json_model(schemas.ReceiptView(ledger_id=receipt.ledger_id, wallet=schemas.WalletView.of(receipt.wallet)), 201, headers)


async def _wallet_or_404(request: web.Request, wallet_id: str, asset: str | None = None) -> schemas.WalletView:
    """The wallet; its asset read from the end user's profile unless given."""
    wallets = request.config_dict[WALLETS]
    state = await wallets.get(wallet_id)
    if state is None:
        raise ApiError(404, f"no wallet {wallet_id!r}", code="wallet_not_found", param="id")
    if asset is None:
        profile = await wallets.profile(wallet_id)
        asset = (profile or {}).get("asset") or "USD"
    return schemas.WalletView.of(state, asset)


async def _end_user_view(request: web.Request, end_user_id: str) -> schemas.EndUserView:
    profile = await request.config_dict[WALLETS].profile(end_user_id)
    if profile is None:
        raise ApiError(404, f"no end user {end_user_id!r}", code="end_user_not_found", param="id")
    wallets = request.config_dict[WALLETS]
    budget = await budget_view(request.config_dict[METERING].budgets, BudgetStore(wallets.commands), end_user_id,
                               profile["tier"], profile.get("budget"))
    asset = profile.get("asset") or "USD"
    return schemas.EndUserView(
        id=end_user_id, tier=profile["tier"], ratecard=profile.get("ratecard"), metadata=profile["metadata"],
        created_ms=profile["created_ms"], wallet=await _wallet_or_404(request, end_user_id, asset), budget=budget,
        asset=asset, livemode=profile.get("livemode", True) is not False,
    )


# ---------------------------------------------------------------- end users


def _check_pricing(request: web.Request, tier: str, pin: str | None, asset: str | None = None) -> str:
    """A tier and pin must name a card in force now, or calls would fail later with a 500; and,
    for an existing wallet (`asset`), one that prices in what the wallet holds. The card's asset."""
    param = "ratecard" if pin else "tier"
    try:
        card = request.config_dict[RATECARDS].current.card_for(tier, pin)
    except KeyError as exc:
        raise ApiError(400, f"no rate card for this end user: {exc.args[0]}", code="invalid_ratecard", param=param) from None
    if asset is not None and card.asset != asset:
        raise ApiError(400, f"the wallet holds {asset} and card {card.ref} prices in {card.asset}: a wallet's asset "
                       "never changes", code="asset_mismatch", param=param)
    return card.asset


@routes.post("/end-users")
async def create_end_user(request: web.Request) -> web.Response:
    body = await read_model(request, schemas.CreateEndUser)
    asset = _check_pricing(request, body.tier, body.ratecard, body.asset)
    profile = {"tier": body.tier, "metadata": body.metadata, "ratecard": body.ratecard, "asset": asset,
               "budget": body.budget.model_dump() if body.budget is not None else None, "livemode": body.livemode}
    await request.config_dict[WALLETS].open(body.id, credit_limit_micros=body.credit_limit_micros, profile=profile,
                                            asset=asset, simulated=not body.livemode)
    return json_model(await _end_user_view(request, body.id), 201)


@routes.patch("/end-users/{id}")
async def update_end_user(request: web.Request) -> web.Response:
    end_user_id = request.match_info["id"]
    body = await read_model(request, schemas.UpdateEndUser)
    changes = body.model_dump(include=body.model_fields_set)
    for name in ("tier", "metadata"):
        if name in changes and changes[name] is None:
            raise ApiError(400, f"{name} cannot be null", code="invalid_request", param=name)
    current = await _end_user_view(request, end_user_id)
    _check_pricing(request, changes.get("tier", current.tier), changes.get("ratecard", current.ratecard), current.asset)
    await request.config_dict[WALLETS].update_profile(end_user_id, changes)
    return json_model(await _end_user_view(request, end_user_id))


@routes.get("/end-users/{id}")
async def get_end_user(request: web.Request) -> web.Response:
    return json_model(await _end_user_view(request, request.match_info["id"]))


async def _key_view(request: web.Request, key: ApiKey) -> schemas.KeyView:
    wallets = request.config_dict[WALLETS]
    spend = await LimitStore(wallets.redis, wallets.commands).spend(key.end_user_id, key.id)
    expires_ms = key.scopes.get("expires_ms")
    return schemas.KeyView(
        id=key.id, end_user_id=key.end_user_id, name=key.name, masked=key.masked,
        created_ms=key.created_ms, revoked=key.revoked, revoked_ms=key.revoked_ms,
        expired=expires_ms is not None and expires_ms <= now_ms(),
        **{name: key.scopes.get(name) for name in schemas.SCOPE_FIELDS},
        spent_micros=spend.spent_micros, spent_today_micros=spend.spent_today_micros,
    )


@routes.post("/end-users/{id}/keys")
async def create_key(request: web.Request) -> web.Response:
    end_user_id = request.match_info["id"]
    body = await read_model(request, schemas.CreateKey)
    end_user = await _end_user_view(request, end_user_id)
    key, plaintext = await request.config_dict[ACCOUNTS].create_key(end_user_id, name=body.name, scopes=body.scopes(),
                                                                   test=not end_user.livemode)
    return json_model(schemas.CreatedKeyView(**(await _key_view(request, key)).model_dump(), key=plaintext), 201)


@routes.get("/end-users/{id}/keys")
async def list_keys(request: web.Request) -> web.Response:
    end_user_id = request.match_info["id"]
    await _end_user_view(request, end_user_id)
    keys = await request.config_dict[ACCOUNTS].list_keys(end_user_id)
    return json_model(schemas.KeyList(data=[await _key_view(request, k) for k in keys]))


@routes.patch("/end-users/{id}/keys/{key_id}")
async def update_key(request: web.Request) -> web.Response:
    """Change a key's name or limits; the next request through it, on any replica, sees them."""
    end_user_id, key_id = request.match_info["id"], request.match_info["key_id"]
    body = await read_model(request, schemas.UpdateKey)
    accounts = request.config_dict[ACCOUNTS]
    current = next((k for k in await accounts.list_keys(end_user_id) if k.id == key_id), None)
    if current is None:
        raise _key_not_found()
    changes: dict = {"scopes": body.apply(current.scopes)}
    if body.name is not None:
        changes["name"] = body.name
    key = await accounts.update_key(end_user_id, key_id, **changes)
    if key is None:
        raise _key_not_found()
    return json_model(await _key_view(request, key))


@routes.delete("/end-users/{id}/keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    key = await request.config_dict[ACCOUNTS].revoke_key(request.match_info["id"], request.match_info["key_id"])
    if key is None:
        raise _key_not_found()
    return json_model(await _key_view(request, key))


@routes.post("/end-users/{id}/tokens")
async def mint_token(request: web.Request) -> web.Response:
    """A short-lived end-user token, for operators who prefer metergate to hold the signing key."""
    end_user_id = request.match_info["id"]
    body = await read_model(request, schemas.MintToken)
    await _end_user_view(request, end_user_id)
    authority = request.config_dict[TOKENS]
    if body.ttl_seconds > authority.cfg.max_ttl_seconds:
        raise ApiError(400, f"ttl_seconds may be at most {authority.cfg.max_ttl_seconds}", code="invalid_request", param="ttl_seconds")
    minted = authority.mint(end_user_id, body.ttl_seconds, body.scopes())
    return json_model(schemas.TokenView(
        token=minted.token, end_user_id=end_user_id, jti=minted.jti, algorithm=minted.algorithm,
        expires_at=minted.expires_at, expires_in=minted.expires_in,
    ), 201)


# ------------------------------------------------------------------- wallets


@routes.get("/wallets/{id}")
async def get_wallet(request: web.Request) -> web.Response:
    return json_model(await _wallet_or_404(request, request.match_info["id"]))


@routes.post("/wallets/{id}/top-ups")
async def top_up(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    body = await read_model(request, schemas.TopUp)
    receipt = await request.config_dict[WALLETS].top_up(
        request.match_info["id"], body.amount_micros, idempotency_key=key, reference=body.reference,
        meta=body.metadata or None,
    )
    return _receipt(receipt)


@routes.post("/wallets/{id}/refunds")
async def refund(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    body = await read_model(request, schemas.Refund)
    wallet_id, wallets = request.match_info["id"], request.config_dict[WALLETS]
    try:
        receipt = await wallets.refund(wallet_id, body.amount_micros, charge_id=body.charge_id, reason=body.reason,
                                       idempotency_key=key, meta=body.metadata or None)
    except ChargeNotFound:
        # Past Redis's retention the charge lives only in the ledger of record.
        archived = await archived_charge(request.config_dict[LEDGER_DB], wallet_id, body.charge_id)
        if archived is None:
            raise
        receipt = await wallets.refund(wallet_id, body.amount_micros, charge_id=body.charge_id, reason=body.reason,
                                       idempotency_key=key, meta=body.metadata or None,
                                       archived_charge_micros=archived.captured_micros, archived_charge_grants=archived.grants)
    return _receipt(receipt)


@routes.post("/wallets/{id}/adjustments")
async def adjust(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    body = await read_model(request, schemas.Adjustment)
    receipt = await request.config_dict[WALLETS].adjust(
        request.match_info["id"], body.amount_micros, reason=body.reason, idempotency_key=key,
        meta=body.metadata or None,
    )
    return _receipt(receipt)


def _entry_view(entry: LedgerEntry) -> schemas.LedgerEntryView:
    return schemas.LedgerEntryView(
        id=entry.id, type=entry.type, amount_micros=entry.amount_micros, amount=schemas.usd(entry.amount_micros),
        balance_micros=entry.balance_micros, held_micros=entry.held_micros,
        created_ms=int(entry.id.split("-")[0]), details=entry.details,
    )


@routes.get("/wallets/{id}/ledger")
async def ledger(request: web.Request) -> web.Response:
    wallet_id = request.match_info["id"]
    await _wallet_or_404(request, wallet_id)
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 500:
        raise ApiError(400, "limit must be an integer from 1 to 500", code="invalid_request", param="limit")
    cursor = request.query.get("starting_after")
    if cursor is not None and not _is_stream_id(cursor):
        raise ApiError(400, "starting_after must be a ledger entry id", code="invalid_request", param="starting_after")
    entries = await request.config_dict[WALLETS].ledger(wallet_id, before=cursor, limit=limit + 1)
    page, has_more = entries[:limit], len(entries) > limit
    return json_model(schemas.LedgerPage(
        data=[_entry_view(e) for e in page], has_more=has_more, next_cursor=page[-1].id if has_more else None,
    ))


def _is_stream_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and seq.isdigit()


# ----------------------------------------------------------------- rate cards


def _ratecards_view(registry: RateCardRegistry) -> schemas.RateCardsView:
    return schemas.RateCardsView(
        cards=[schemas.RateCardSummary(id=c.id, version=c.version, ref=c.ref, effective_from=c.effective_from.isoformat(),
                                       models=sorted(c.models)) for c in registry.current.all_cards()],
        tiers=registry.current.tiers,
    )


@routes.get("/ratecards")
async def list_ratecards(request: web.Request) -> web.Response:
    return json_model(_ratecards_view(request.config_dict[RATECARDS]))


@routes.post("/ratecards/reload")
async def reload_ratecards(request: web.Request) -> web.Response:
    registry = request.config_dict[RATECARDS]
    if not await registry.reload():
        raise ApiError(422, "rate cards refused; the running cards stay in force: " + str(registry.last_error), code="invalid_ratecard")
    return json_model(_ratecards_view(registry))


def create_admin_app(config: Config) -> web.Application:
    """The /admin sub-application; its keys (and `admins`' env vars) are read now."""
    admin = web.Application(middlewares=[error_middleware, admin_access])
    admin[KEYRING] = AdminKeyring.from_config(config)
    admin.add_routes(routes)
    admin.add_routes(audit.routes)
    admin.add_routes(report_routes.admin_routes)
    admin.add_routes(billing_routes.admin_routes)
    admin.add_routes(event_routes.routes)
    admin.add_routes(admin_jobs.routes)
    admin.add_routes(admin_meters.routes)
    admin.add_routes(admin_grants.routes)
    return admin
