"""End users' budgets: spend caps per calendar period ("$500 a month"), set per end
user or as a default per tier, and the claim each call is held under.

A period is named from the wall clock in the budget's time zone ('2026-12' for a
month, '2026-12-03' for a day); the wallet scripts start a new count whenever a
call arrives under a name they have not seen (see "Budgets" in
`proxy/lua/_prelude.lua`), so budgets reset by themselves at the boundary.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from proxy.store.budgets import BudgetStore, CallBudget
from proxy.store.keyspace import MAX_AMOUNT_MICROS


class BudgetTerms(BaseModel):
    """A budget: at most `limit_micros` captured (and held by calls in flight) per period."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit_micros: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MICROS, description="integer micros per period")]
    period: Literal["day", "month"] = "month"
    timezone: Annotated[StrictStr, Field(description="IANA time zone of the period's boundaries")] = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    def period_at(self, unix_seconds: float) -> BudgetPeriod:
        zone = ZoneInfo(self.timezone)
        local = dt.datetime.fromtimestamp(unix_seconds, zone)
        if self.period == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = start + dt.timedelta(days=1)  # wall-clock arithmetic: a DST day is 23 or 25 hours
            name = start.strftime("%Y-%m-%d")
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            nxt = (start.replace(tzinfo=None) + dt.timedelta(days=32)).replace(day=1)
            end = nxt.replace(tzinfo=zone)
            name = start.strftime("%Y-%m")
        return BudgetPeriod(name=name, starts_at=int(start.timestamp()), resets_at=int(end.timestamp()))


@dataclass(frozen=True)
class BudgetPeriod:
    name: str
    starts_at: int  # unix seconds
    resets_at: int


class BudgetPolicy:
    """Which budget applies to an end user, and in which period a call counts.

    `clock` (unix seconds) is injectable so tests can cross a period boundary.
    """

    def __init__(self, tier_defaults: Mapping[str, BudgetTerms], clock: Callable[[], float] = time.time):
        self.tier_defaults = dict(tier_defaults)
        self.clock = clock

    def terms_for(self, tier: str, own: Mapping[str, Any] | None) -> BudgetTerms | None:
        """The end user's own budget (from their profile) wins over their tier's default."""
        if own is not None:
            return BudgetTerms.model_validate(own)
        return self.tier_defaults.get(tier)

    def period_now(self, terms: BudgetTerms) -> BudgetPeriod:
        return terms.period_at(self.clock())

    def claim(self, tier: str, own: Mapping[str, Any] | None) -> CallBudget | None:
        terms = self.terms_for(tier, own)
        if terms is None:
            return None
        return CallBudget(limit_micros=terms.limit_micros, period=self.period_now(terms).name)


class BudgetView(BaseModel):
    """A budget and what its current period has used (GET /v1/wallet, the admin end-user view)."""

    limit_micros: int
    period: Literal["day", "month"]
    timezone: str
    source: Literal["end_user", "tier"] = Field(description="the end user's own budget, or their tier's default")
    current_period: str = Field(description="'2026-12' or '2026-12-03'")
    spent_micros: int = Field(description="captured this period")
    held_micros: int = Field(description="reserved by calls in flight")
    remaining_micros: int
    resets_at: int = Field(description="unix seconds")


async def budget_view(policy: BudgetPolicy, store: BudgetStore, wallet_id: str, tier: str,
                      own: Mapping[str, Any] | None) -> BudgetView | None:
    terms = policy.terms_for(tier, own)
    if terms is None:
        return None
    period = policy.period_now(terms)
    used = await store.usage(wallet_id, period.name)
    return BudgetView(
        limit_micros=terms.limit_micros, period=terms.period, timezone=terms.timezone,
        source="end_user" if own is not None else "tier", current_period=period.name,
        spent_micros=used.spent_micros, held_micros=used.held_micros,
        remaining_micros=max(terms.limit_micros - used.spent_micros - used.held_micros, 0), resets_at=period.resets_at,
    )
