"""The admin API's credit terms of a wallet: grants (`/admin/wallets/{id}/grants`) and
its credit limit (`PATCH /admin/wallets/{id}`).

A grant is credit of a kind with a priority and an optional expiry; the balance
is the sum of the grants, and calls spend them in order (proxy/store/grants.py).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field, StrictInt, StrictStr

from proxy import schemas
from proxy.appstate import WALLETS
from proxy.errors import REPLAYED, ApiError, idempotency_key, json_model, read_model
from proxy.store import MAX_AMOUNT_MICROS, Receipt, WalletNotFound, now_ms
from proxy.store.grants import Grant, GrantStore

routes = web.RouteTableDef()

# A grant may expire up to ten years ahead (a date past that is a typo).
MAX_EXPIRY_SECONDS = 10 * 366 * 86_400


class CreateGrant(BaseModel):
    model_config = {"extra": "forbid"}

    amount_micros: schemas.Micros
    kind: Annotated[StrictStr, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$", description=(
        "promotional (the default) or your own kind; purchased credit comes from top-ups"))] = "promotional"
    priority: Annotated[StrictInt, Field(ge=0, le=100, description=(
        "0 is spent first; default 25 for promotional, 50 otherwise (purchased credit is 50)"))] | None = None
    expires_at: StrictInt | None = Field(None, description="unix seconds; what is left then expires (grant_expired)")
    metadata: dict[str, Any] = {}


class GrantView(BaseModel):
    id: str
    object: Literal["grant"] = "grant"
    kind: str
    remaining_micros: int
    remaining: str
    priority: int
    expires_at: int | None = Field(description="unix seconds, or null: never")
    state: Literal["live", "expired"] = Field(description=(
        "expired: past its expiry, keeping only what calls in flight had reserved of it"))

    @classmethod
    def of(cls, grant: Grant) -> GrantView:
        return cls(id=grant.id, kind=grant.kind, remaining_micros=grant.remaining_micros,
                   remaining=schemas.usd(grant.remaining_micros), priority=grant.priority,
                   expires_at=None if grant.expires_at_ms is None else grant.expires_at_ms // 1000, state=grant.state)


class GrantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[GrantView]


class CreatedGrantView(BaseModel):
    grant: GrantView
    ledger_id: str
    wallet: schemas.WalletView


class UpdateWallet(BaseModel):
    model_config = {"extra": "forbid"}

    credit_limit_micros: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MICROS, description=(
        "how far below zero the wallet may go (postpay); not below what it already uses of it"))]
    reason: Annotated[StrictStr, Field(min_length=1, max_length=500)]


def grant_store(request: web.Request) -> GrantStore:
    wallets = request.config_dict[WALLETS]
    return GrantStore(wallets.redis, wallets.commands, idempotency_ttl_seconds=wallets.idempotency_ttl_seconds)


@routes.post("/wallets/{id}/grants")
async def create_grant(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    body = await read_model(request, CreateGrant)
    if body.kind in ("purchased", "debt"):
        raise ApiError(400, f"kind {body.kind!r} is the wallet's own: purchased credit comes from top-ups",
                       code="invalid_request", param="kind")
    expires_ms = None
    if body.expires_at is not None:
        now_s = now_ms() // 1000
        if not now_s < body.expires_at <= now_s + MAX_EXPIRY_SECONDS:
            raise ApiError(400, "expires_at must be a unix time in the future, at most ten years ahead",
                           code="invalid_request", param="expires_at")
        expires_ms = body.expires_at * 1000
    store = grant_store(request)
    wallet_id = request.match_info["id"]
    created = await store.grant(wallet_id, body.amount_micros, kind=body.kind, priority=body.priority,
                                expires_at_ms=expires_ms, idempotency_key=key, meta=body.metadata or None)
    view = CreatedGrantView(grant=await _grant_view(store, wallet_id, created.grant_id),
                            ledger_id=created.receipt.ledger_id, wallet=schemas.WalletView.of(created.receipt.wallet))
    return json_model(view, 201, REPLAYED if created.receipt.replayed else None)


async def _grant_view(store: GrantStore, wallet_id: str, grant_id: str) -> GrantView:
    """The grant as it is now; one replayed after it was spent and expired is shown at zero."""
    for grant in await store.grants(wallet_id):
        if grant.id == grant_id:
            return GrantView.of(grant)
    return GrantView(id=grant_id, kind="", remaining_micros=0, remaining=schemas.usd(0), priority=0, expires_at=None,
                     state="expired")


@routes.get("/wallets/{id}/grants")
async def list_grants(request: web.Request) -> web.Response:
    try:
        grants = await grant_store(request).grants(request.match_info["id"])
    except WalletNotFound:
        raise ApiError(404, f"no wallet {request.match_info['id']!r}", code="wallet_not_found", param="id") from None
    return json_model(GrantList(data=[GrantView.of(g) for g in grants]))


@routes.patch("/wallets/{id}")
async def update_wallet(request: web.Request) -> web.Response:
    """Change the credit limit; the change is a `credit_limit` ledger entry and is in the audit log."""
    key = request.headers.get("Idempotency-Key", "").strip() or "credit-limit:" + secrets.token_hex(12)
    body = await read_model(request, UpdateWallet)
    receipt: Receipt = await grant_store(request).set_credit_limit(
        request.match_info["id"], body.credit_limit_micros, reason=body.reason, idempotency_key=key)
    headers = REPLAYED if receipt.replayed else None
    return json_model(schemas.ReceiptView(ledger_id=receipt.ledger_id, wallet=schemas.WalletView.of(receipt.wallet)), 200, headers)
