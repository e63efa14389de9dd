"""Reports read from the ledger of record: usage (spend, cost, margin, tokens, calls) grouped as
asked, money movements by period, and one end user's month for a statement.

Written once with SQLAlchemy Core for PostgreSQL and SQLite: periods group by the
archived `day` / `month` text columns (UTC), never by a dialect's date functions.
Spend is what charges captured (minus their amounts), so every total is a sum of
ledger amounts and equals what Redis's ledgers sum to, to the micro.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import sqlalchemy as sa

from proxy.ledger.db import LedgerDatabase
from proxy.ledger.schema import ledger_entries as le

GroupBy = Literal["end_user", "model", "key", "tier", "day", "month", "asset"]
GROUP_COLUMNS: dict[str, sa.ColumnElement[str]] = {
    "end_user": le.c.wallet_id, "model": le.c.model, "key": le.c.key_id, "tier": le.c.tier, "day": le.c.day,
    "month": le.c.month, "asset": le.c.asset,  # amounts of different assets never add up: group by it to mix them
}
# Entries that move money other than charges, as the money report lists them.
MONEY_TYPES = ("top_up", "refund", "adjustment", "card_refund", "card_refund_reversed", "dispute", "dispute_won", "grant",
               "grant_expired")


@dataclass(frozen=True)
class UsageQuery:
    start: dt.date  # inclusive (UTC day)
    end: dt.date  # exclusive
    group_by: tuple[GroupBy, ...] = ("end_user",)
    end_user: str | None = None
    model: str | None = None
    include_simulated: bool = False  # sandbox wallets' entries are left out unless asked for


@dataclass(frozen=True)
class UsageRow:
    group: dict[str, str | None]
    calls: int
    prompt_tokens: int
    completion_tokens: int
    spend_micros: int  # what the charges captured
    price_micros: int  # what the usage was priced at (spend + any shortfall)
    cost_micros: int  # what the provider charges for it
    margin_micros: int  # spend - cost


@dataclass(frozen=True)
class MoneyRow:
    period: str
    type: str
    count: int
    amount_micros: int
    asset: str = "USD"  # what amount_micros are micros of


def _between(query_start: dt.date, query_end: dt.date) -> list[sa.ColumnElement[bool]]:
    return [le.c.day >= query_start.isoformat(), le.c.day < query_end.isoformat()]


def usage_statement(query: UsageQuery) -> sa.Select[*tuple[Any, ...]]:
    groups = [GROUP_COLUMNS[g].label(g) for g in query.group_by]
    conditions = [le.c.type == "charge", *_between(query.start, query.end)]
    if not query.include_simulated:
        conditions.append(le.c.is_simulated.is_(sa.false()))
    if query.end_user is not None:
        conditions.append(le.c.wallet_id == query.end_user)
    if query.model is not None:
        conditions.append(le.c.model == query.model)
    return (
        sa.select(*groups, sa.func.count().label("calls"),
                  sa.func.coalesce(sa.func.sum(le.c.prompt_tokens), 0).label("prompt_tokens"),
                  sa.func.coalesce(sa.func.sum(le.c.completion_tokens), 0).label("completion_tokens"),
                  sa.func.coalesce(sa.func.sum(-le.c.amount_micros), 0).label("spend"),
                  sa.func.coalesce(sa.func.sum(le.c.price_micros), 0).label("price"),
                  sa.func.coalesce(sa.func.sum(le.c.cost_micros), 0).label("cost"))
        .where(*conditions).group_by(*groups).order_by(*groups)
    )


async def usage(db: LedgerDatabase, query: UsageQuery) -> AsyncIterator[UsageRow]:
    """The usage rows, streamed from the database (a large range is never built in memory)."""
    async with db.engine.connect() as conn:
        result = await conn.stream(usage_statement(query))
        async for r in result:
            m = r._mapping
            spend, cost = int(m["spend"]), int(m["cost"])
            yield UsageRow(group={g: m[g] for g in query.group_by}, calls=int(m["calls"]),
                           prompt_tokens=int(m["prompt_tokens"]), completion_tokens=int(m["completion_tokens"]),
                           spend_micros=spend, price_micros=int(m["price"]), cost_micros=cost, margin_micros=spend - cost)


async def money(db: LedgerDatabase, start: dt.date, end: dt.date, period: Literal["day", "month"],
                end_user: str | None = None, include_simulated: bool = False) -> list[MoneyRow]:
    """Top-ups, refunds, adjustments, card refunds and disputes: count and sum per period, asset and
    type (sandbox wallets' left out unless `include_simulated`)."""
    column = GROUP_COLUMNS[period].label("period")
    conditions = [le.c.type.in_(MONEY_TYPES), *_between(start, end)]
    if not include_simulated:
        conditions.append(le.c.is_simulated.is_(sa.false()))
    if end_user is not None:
        conditions.append(le.c.wallet_id == end_user)
    statement = (sa.select(column, le.c.asset, le.c.type, sa.func.count().label("n"),
                           sa.func.sum(le.c.amount_micros).label("amount"))
                 .where(*conditions).group_by(column, le.c.asset, le.c.type).order_by(column, le.c.asset, le.c.type))
    async with db.engine.connect() as conn:
        rows = (await conn.execute(statement)).all()
    return [MoneyRow(period=r.period, type=r.type, count=int(r.n), amount_micros=int(r.amount), asset=r.asset) for r in rows]


# ------------------------------------------------------------------ one end user's month


@dataclass(frozen=True)
class ChargeLine:
    day: str
    model: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    spend_micros: int


@dataclass(frozen=True)
class MoneyLine:
    at_ms: int
    type: str
    amount_micros: int
    reference: str | None


@dataclass(frozen=True)
class MonthStatement:
    end_user: str
    month: str  # "YYYY-MM"
    carried_in_micros: int  # the balance when the month began
    carried_out_micros: int  # when it ended (or now, for the current month)
    charges: Sequence[ChargeLine]  # by day, then model
    money: Sequence[MoneyLine]  # top-ups, refunds, adjustments... in time order
    spend_micros: int

    @property
    def top_ups_micros(self) -> int:
        return sum(m.amount_micros for m in self.money if m.type == "top_up")

    @property
    def other_micros(self) -> int:
        return sum(m.amount_micros for m in self.money if m.type != "top_up")


def month_bounds(month: str) -> tuple[int, int]:
    """The month's first and next month's first millisecond (UTC); ValueError for a bad "YYYY-MM"."""
    start = dt.datetime.strptime(month + "-01", "%Y-%m-%d").replace(tzinfo=dt.UTC)
    following = (start + dt.timedelta(days=32)).replace(day=1)
    return int(start.timestamp() * 1000), int(following.timestamp() * 1000)


async def month_statement(db: LedgerDatabase, end_user: str, month: str) -> MonthStatement:
    start_ms, end_ms = month_bounds(month)
    mine = le.c.wallet_id == end_user
    async with db.engine.connect() as conn:
        carried_in = (await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(le.c.amount_micros), 0))
                                         .where(mine, le.c.at_ms < start_ms))).scalar_one()
        moved = (await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(le.c.amount_micros), 0))
                                    .where(mine, le.c.at_ms >= start_ms, le.c.at_ms < end_ms))).scalar_one()
        model = sa.func.coalesce(le.c.model, "?").label("model")
        charges = (await conn.execute(
            sa.select(le.c.day, model, sa.func.count().label("calls"),
                      sa.func.coalesce(sa.func.sum(le.c.prompt_tokens), 0).label("p"),
                      sa.func.coalesce(sa.func.sum(le.c.completion_tokens), 0).label("c"),
                      sa.func.sum(-le.c.amount_micros).label("spend"))
            .where(mine, le.c.type == "charge", le.c.at_ms >= start_ms, le.c.at_ms < end_ms)
            .group_by(le.c.day, model).order_by(le.c.day, model))).all()
        money_rows = (await conn.execute(
            sa.select(le.c.at_ms, le.c.type, le.c.amount_micros, le.c.details)
            .where(mine, le.c.type.in_(MONEY_TYPES), le.c.at_ms >= start_ms, le.c.at_ms < end_ms)
            .order_by(le.c.at_ms, le.c.entry_id))).all()
    lines = [ChargeLine(day=r.day, model=r.model, calls=int(r.calls), prompt_tokens=int(r.p), completion_tokens=int(r.c),
                        spend_micros=int(r.spend)) for r in charges]
    money_lines = [MoneyLine(at_ms=int(r.at_ms), type=r.type, amount_micros=int(r.amount_micros),
                             reference=(orjson.loads(r.details).get("reference") or None)) for r in money_rows]
    return MonthStatement(end_user=end_user, month=month, carried_in_micros=int(carried_in),
                          carried_out_micros=int(carried_in) + int(moved), charges=lines, money=money_lines,
                          spend_micros=sum(c.spend_micros for c in lines))


# ------------------------------------------------------------------ an end user's own history


@dataclass(frozen=True)
class HistoryEntry:
    id: str
    at_ms: int
    type: str
    amount_micros: int
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    request_id: str | None


async def history(db: LedgerDatabase, end_user: str, *, start: dt.date | None, end: dt.date | None, limit: int,
                  starting_after: str | None) -> list[HistoryEntry]:
    """The end user's charges and money movements, newest first; `starting_after` is the last id of the previous page.

    Ordered by time, then by entry id as text: any total order works for paging, as long as
    the cursor condition uses the same one.
    """
    conditions = [le.c.wallet_id == end_user, le.c.type.in_(("charge", *MONEY_TYPES))]
    if start is not None:
        conditions.append(le.c.day >= start.isoformat())
    if end is not None:
        conditions.append(le.c.day < end.isoformat())
    if starting_after is not None:
        at_ms = int(starting_after.partition("-")[0])
        conditions.append(sa.or_(le.c.at_ms < at_ms, sa.and_(le.c.at_ms == at_ms, le.c.entry_id < starting_after)))
    statement = (sa.select(le.c.entry_id, le.c.at_ms, le.c.type, le.c.amount_micros, le.c.model, le.c.prompt_tokens,
                           le.c.completion_tokens, le.c.request_id)
                 .where(*conditions).order_by(le.c.at_ms.desc(), le.c.entry_id.desc()).limit(limit))
    async with db.engine.connect() as conn:
        rows = (await conn.execute(statement)).all()
    return [HistoryEntry(id=r.entry_id, at_ms=int(r.at_ms), type=r.type, amount_micros=int(r.amount_micros),
                         model=r.model, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                         request_id=r.request_id) for r in rows]


# ------------------------------------------------------------------ an end user's months


@dataclass(frozen=True)
class MonthRollup:
    month: str
    carried_in_micros: int
    top_ups_micros: int
    spend_micros: int  # what charges captured (positive)
    refunds_micros: int  # refunds of charges
    other_micros: int  # adjustments, card refunds, disputes
    carried_out_micros: int  # carried in + top-ups - spend + refunds + other, exactly


async def rollups(db: LedgerDatabase, end_user: str, start_month: str, end_month: str) -> list[MonthRollup]:
    """One line per month in [start_month, end_month] with any entry, balances carried exactly."""
    start_ms, _ = month_bounds(start_month)
    _, end_ms = month_bounds(end_month)
    mine = le.c.wallet_id == end_user
    async with db.engine.connect() as conn:
        carried = int((await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(le.c.amount_micros), 0))
                                          .where(mine, le.c.at_ms < start_ms))).scalar_one())
        rows = (await conn.execute(
            sa.select(le.c.month, le.c.type, sa.func.sum(le.c.amount_micros).label("amount"))
            .where(mine, le.c.at_ms >= start_ms, le.c.at_ms < end_ms, le.c.amount_micros != 0)
            .group_by(le.c.month, le.c.type).order_by(le.c.month))).all()
    by_month: dict[str, dict[str, int]] = {}
    for r in rows:
        by_month.setdefault(r.month, {})[r.type] = int(r.amount)
    out = []
    for month, amounts in by_month.items():
        top_ups, charges, refunds = amounts.get("top_up", 0), amounts.get("charge", 0), amounts.get("refund", 0)
        other = sum(amounts.values()) - top_ups - charges - refunds
        carried_out = carried + sum(amounts.values())
        out.append(MonthRollup(month=month, carried_in_micros=carried, top_ups_micros=top_ups, spend_micros=-charges,
                               refunds_micros=refunds, other_micros=other, carried_out_micros=carried_out))
        carried = carried_out
    return out
