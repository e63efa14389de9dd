"""The admin API's usage events for the operator's own meters: `POST /admin/wallets/{id}/meter-events`.

A meter is priced on the end user's rate card (`meters:` — USD per unit, and units
included free per day or month); an event is charged at once (proxy/store/meters.py)
or refused whole with a 402, under the operator's idempotency key.
"""

from __future__ import annotations

import datetime as dt
import time
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, Field, StrictInt, StrictStr, field_validator

from pricing import RateCard, price_meter
from proxy import schemas
from proxy.appstate import WALLETS
from proxy.errors import REPLAYED, ApiError, idempotency_key, json_model, read_model
from proxy.gateway import rate_card
from proxy.store.meters import UNITS, MeterStore, period_of

routes = web.RouteTableDef()

MAX_QUANTITY = Decimal(1_000_000_000)
PAST_LIMIT_SECONDS = 35 * 86_400  # an event may be reported this late (its period's count is still kept)
FUTURE_SLACK_SECONDS = 300


class MeterEvent(BaseModel):
    model_config = {"extra": "forbid"}

    meter: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    quantity: Any = Field(description="units of the meter (a number or decimal string; up to 6 decimals)")
    timestamp: StrictInt | None = Field(None, description="when it happened (unix seconds); picks the period. Default: now")
    description: Annotated[StrictStr, Field(max_length=500)] = ""
    metadata: dict[str, Any] = {}

    @field_validator("quantity")
    @classmethod
    def _exact_quantity(cls, value: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError("must be a number")
        try:
            quantity = Decimal(str(value))
        except InvalidOperation:
            raise ValueError("must be a number") from None
        if not quantity.is_finite() or quantity <= 0 or quantity > MAX_QUANTITY:
            raise ValueError(f"must be more than 0 and at most {MAX_QUANTITY}")
        if (quantity * UNITS) != (quantity * UNITS).to_integral_value():
            raise ValueError("must have at most 6 decimals")
        return quantity


class MeterChargeView(BaseModel):
    ledger_id: str
    meter: str
    period: str
    charged_micros: int
    used_in_period: str = Field(description="units of this meter used this period, this event included")
    wallet: schemas.WalletView


async def end_user_card(request: web.Request, wallet_id: str) -> RateCard:
    """The card of an end user named in an admin route (its tier or pin, as their calls are priced); 404 if none."""
    profile = await request.config_dict[WALLETS].profile(wallet_id)
    if profile is None:
        raise ApiError(404, f"no end user {wallet_id!r}", code="wallet_not_found", param="id")
    return rate_card(request, wallet_id, str(profile.get("tier") or "default"), profile.get("ratecard"),
                     profile.get("asset") or "USD")


@routes.post("/wallets/{id}/meter-events")
async def record_meter_event(request: web.Request) -> web.Response:
    key = idempotency_key(request, "meter events")
    body = await read_model(request, MeterEvent)
    wallet_id = request.match_info["id"]
    card = await end_user_card(request, wallet_id)
    meter = card.meters.get(body.meter)
    if meter is None:
        raise ApiError(404, f"the rate card {card.ref} has no meter {body.meter!r}", code="meter_not_found", param="meter")
    now = time.time()
    at = body.timestamp if body.timestamp is not None else int(now)
    if not now - PAST_LIMIT_SECONDS <= at <= now + FUTURE_SLACK_SECONDS:
        raise ApiError(400, "timestamp must be within the last 35 days", code="invalid_request", param="timestamp")
    period, counter_ttl = period_of(meter.included_per, dt.datetime.fromtimestamp(at, dt.UTC))
    quantity = int(body.quantity * UNITS)
    included = int(meter.included_quantity * UNITS)

    def price(used: int) -> tuple[int, dict[str, Any]]:
        free = min(quantity, max(included - used, 0))
        charge = price_meter(meter, Decimal(quantity - free) / UNITS)
        return charge.price_micros, {
            "model": f"meter:{meter.name}", "meter": meter.name, "unit": meter.unit, "quantity": str(body.quantity), "free_quantity": str(Decimal(free) / UNITS),
            "period": period, "ratecard": card.ref, "price_micros": charge.price_micros, "cost_micros": charge.cost_micros,
            "timestamp": at, **({"description": body.description} if body.description else {}), **body.metadata,
        }

    event = {"meter": meter.name, "quantity": quantity, "period": period, "timestamp": body.timestamp,
             "description": body.description, "metadata": body.metadata}
    charged = await MeterStore(request.config_dict[WALLETS]).charge(
        wallet_id, meter.name, period, quantity, counter_ttl_seconds=counter_ttl, idempotency_key=key, price=price,
        event=event)
    view = MeterChargeView(ledger_id=charged.ledger_id, meter=meter.name, period=period, charged_micros=charged.charged_micros,
                           used_in_period=str(Decimal(charged.used_micro_units) / UNITS),
                           wallet=schemas.WalletView.of(charged.wallet))
    return json_model(view, 201, REPLAYED if charged.replayed else None)
