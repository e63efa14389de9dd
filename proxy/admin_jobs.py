"""The admin API's job holds: `/admin/wallets/{id}/holds…` (see proxy/store/jobs.py).

An operator running a long job for an end user (an agent of many steps, a crawl)
reserves its budget up front, captures what each step cost, and releases the rest;
a job abandoned without a release expires with its TTL and the reaper releases
what is left. Every capture is an idempotent `charge` in the ledger.
"""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, Field, StrictInt, StrictStr

from pricing.money import ceil_micros
from proxy import schemas
from proxy.appstate import WALLETS
from proxy.errors import REPLAYED, ApiError, idempotency_key, json_model, read_model
from proxy.store import WalletState
from proxy.store.jobs import JobHold, JobHolds

routes = web.RouteTableDef()

MAX_TTL_SECONDS = 30 * 86_400  # the longest a hold may live (hold.lua's bound)
TtlSeconds = Annotated[StrictInt, Field(ge=1, le=MAX_TTL_SECONDS, description="seconds until the reaper expires it")]
Description = Annotated[StrictStr, Field(max_length=500)]


class _Body(BaseModel):
    model_config = {"extra": "forbid"}


class OpenJobHold(_Body):
    amount_micros: schemas.Micros
    ttl_seconds: TtlSeconds = 3600
    description: Description = ""
    metadata: dict[str, Any] = {}


class ExtendJobHold(_Body):
    amount_micros: schemas.Micros = Field(description="the hold's new amount: at least what it holds now (a retry changes nothing)")
    ttl_seconds: TtlSeconds = 3600


class CaptureJobHold(_Body):
    amount_micros: schemas.Micros | None = Field(None, description="at most what the hold has left")
    outcome: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = Field(
        None, description="instead of an amount: an outcome priced on the end user's card (e.g. resolved_conversation)")
    description: Description = ""
    metadata: dict[str, Any] = {}


class ReleaseJobHold(_Body):
    reason: Annotated[StrictStr, Field(min_length=1, max_length=500)] = "job done"


class JobHoldView(BaseModel):
    id: str
    object: str = "job_hold"
    status: str
    amount_micros: int = Field(description="held now")
    captured_micros: int
    expires_ms: int
    created_ms: int
    description: str
    wallet: schemas.WalletView | None = None


class CaptureView(BaseModel):
    ledger_id: str
    captured_micros: int
    left_micros: int
    wallet: schemas.WalletView


class ReleaseView(BaseModel):
    ledger_id: str
    released_micros: int
    wallet: schemas.WalletView


def _jobs(request: web.Request) -> JobHolds:
    return JobHolds(request.config_dict[WALLETS])


def _view(hold: JobHold, wallet: WalletState | None = None) -> JobHoldView:
    return JobHoldView(id=hold.hold_id, status=hold.status, amount_micros=hold.amount_micros,
                       captured_micros=hold.captured_micros, expires_ms=hold.expires_at_ms, created_ms=hold.created_ms,
                       description=hold.description, wallet=schemas.WalletView.of(wallet) if wallet else None)


@routes.post("/wallets/{id}/holds")
async def open_job_hold(request: web.Request) -> web.Response:
    key = idempotency_key(request, "job holds and captures")
    body = await read_model(request, OpenJobHold)
    wallet_id, jobs = request.match_info["id"], _jobs(request)
    hold = await jobs.open(wallet_id, body.amount_micros, ttl_seconds=body.ttl_seconds, idempotency_key=key,
                           description=body.description, meta=body.metadata or None)
    return json_model(_view(await jobs.get(wallet_id, hold.hold_id), hold.wallet), 201, REPLAYED if hold.replayed else None)


@routes.get("/wallets/{id}/holds/{hold_id}")
async def get_job_hold(request: web.Request) -> web.Response:
    return json_model(_view(await _jobs(request).get(request.match_info["id"], request.match_info["hold_id"])))


@routes.post("/wallets/{id}/holds/{hold_id}/extend")
async def extend_job_hold(request: web.Request) -> web.Response:
    body = await read_model(request, ExtendJobHold)
    wallet_id, hold_id, jobs = request.match_info["id"], request.match_info["hold_id"], _jobs(request)
    current = await jobs.get(wallet_id, hold_id)
    if body.amount_micros < current.amount_micros:
        raise ApiError(400, f"a hold only grows: it holds {current.amount_micros} micros; capture or release instead",
                       code="invalid_amount", param="amount_micros")
    grown = await jobs.extend(current, wallet_id, to_amount_micros=body.amount_micros, ttl_seconds=body.ttl_seconds)
    return json_model(_view(await jobs.get(wallet_id, hold_id), grown.wallet))


@routes.post("/wallets/{id}/holds/{hold_id}/captures")
async def capture_job_hold(request: web.Request) -> web.Response:
    key = idempotency_key(request, "job holds and captures")
    body = await read_model(request, CaptureJobHold)
    wallet_id, hold_id, jobs = request.match_info["id"], request.match_info["hold_id"], _jobs(request)
    await jobs.get(wallet_id, hold_id)  # a job hold, not a call's
    if (body.amount_micros is None) == (body.outcome is None):
        raise ApiError(400, "give either amount_micros or outcome", code="invalid_request", param="amount_micros")
    meta: dict[str, Any] = {"job": True, "model": "job", **({"description": body.description} if body.description else {})}
    amount = body.amount_micros
    if body.outcome is not None:
        from proxy.admin_meters import end_user_card  # the end user's card, as for meter events

        card = await end_user_card(request, wallet_id)
        outcome = card.outcomes.get(body.outcome)
        if outcome is None:
            raise ApiError(404, f"the rate card {card.ref} has no outcome {body.outcome!r}", code="outcome_not_found",
                           param="outcome")
        amount = ceil_micros(outcome.price)
        meta |= {"model": f"outcome:{outcome.name}", "outcome": outcome.name, "ratecard": card.ref,
                 "price_micros": amount, "cost_micros": ceil_micros(outcome.cost)}
    assert amount is not None
    capture = await jobs.capture(wallet_id, hold_id, amount, idempotency_key=key, meta={**meta, **body.metadata})
    return json_model(CaptureView(ledger_id=capture.ledger_id, captured_micros=capture.captured_micros,
                             left_micros=capture.left_micros, wallet=schemas.WalletView.of(capture.wallet)),
                 201, REPLAYED if capture.replayed else None)


@routes.post("/wallets/{id}/holds/{hold_id}/release")
async def release_job_hold(request: web.Request) -> web.Response:
    body = await read_model(request, ReleaseJobHold)
    settlement = await _jobs(request).release(request.match_info["id"], request.match_info["hold_id"], reason=body.reason)
    return json_model(ReleaseView(ledger_id=settlement.ledger_id, released_micros=settlement.released_micros,
                             wallet=schemas.WalletView.of(settlement.wallet)))
