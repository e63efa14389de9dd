"""The HTTP surface of the ledger of record's reports: `admin_routes` (usage and money reports,
JSON or streamed CSV; statement links) and `public_routes` (an end user's own `/v1/usage`, and
the signed statement pages)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
from typing import Any, cast

from aiohttp import web
from pydantic import BaseModel, Field

from proxy.appstate import CONFIG, LEDGER_DB, WALLETS
from proxy.auth import authenticate
from proxy.errors import ApiError, read_model
from proxy.ledger import reporting, statements
from proxy.ledger.reporting import GROUP_COLUMNS, GroupBy, UsageQuery
from proxy.schemas import usd

admin_routes = web.RouteTableDef()
public_routes = web.RouteTableDef()

_MONTH = r"{month:\d{4}-\d{2}}"


class CreateStatementLink(BaseModel):
    month: str = Field(pattern=r"^\d{4}-(0[1-9]|1[0-2])$", description="YYYY-MM (UTC)")
    ttl_seconds: int | None = Field(None, gt=0, description="at most statements.link_ttl_seconds (the default)")


class StatementLinkView(BaseModel):
    object: str = "statement_link"
    end_user: str
    month: str
    url: str
    csv_url: str
    expires_at: int


def _date(request: web.Request, name: str, default: dt.date) -> dt.date:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a date, YYYY-MM-DD (UTC)", code="invalid_parameter", param=name) from None


def _include_simulated(request: web.Request) -> bool:
    """`include_simulated=true` adds sandbox wallets' entries to a report; by default they are left out."""
    value = request.query.get("include_simulated", "false")
    if value not in ("true", "false"):
        raise ApiError(400, "include_simulated is true or false", code="invalid_parameter", param="include_simulated")
    return value == "true"


def _range(request: web.Request) -> tuple[dt.date, dt.date]:
    today = dt.datetime.now(dt.UTC).date()
    start = _date(request, "from", today.replace(day=1))
    end = _date(request, "to", today + dt.timedelta(days=1))
    if end <= start:
        raise ApiError(400, "to must be after from (to is exclusive)", code="invalid_parameter", param="to")
    return start, end


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, "format must be json or csv", code="invalid_parameter", param="format")
    return fmt


async def _csv(request: web.Request, name: str, header: list[str], rows: Any) -> web.StreamResponse:
    """Rows written as they are read: a report over a long range never sits whole in memory."""
    response = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8",
                                           "Content-Disposition": f'attachment; filename="{name}.csv"'})
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    async for row in rows:
        writer.writerow(row)
        if buffer.tell() > 64 * 1024:
            await response.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
    await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


_USAGE_FIGURES = ["calls", "prompt_tokens", "completion_tokens", "spend_micros", "price_micros", "cost_micros",
                  "margin_micros"]


@admin_routes.get("/reports/usage")
async def usage_report(request: web.Request) -> web.StreamResponse:
    start, end = _range(request)
    group_by = tuple(g for g in request.query.get("group_by", "end_user").split(",") if g)
    unknown = [g for g in group_by if g not in GROUP_COLUMNS]
    if unknown or not group_by or len(set(group_by)) != len(group_by):
        raise ApiError(400, f"group_by is a comma-separated list of {', '.join(GROUP_COLUMNS)}", code="invalid_parameter",
                       param="group_by")
    query = UsageQuery(start=start, end=end, group_by=cast(tuple[GroupBy, ...], group_by),
                       end_user=request.query.get("end_user"), model=request.query.get("model"),
                       include_simulated=_include_simulated(request))
    rows = reporting.usage(request.config_dict[LEDGER_DB], query)
    if _format(request) == "csv":
        async def lines() -> Any:
            async for r in rows:
                yield [*(r.group[g] for g in group_by), *(getattr(r, f) for f in _USAGE_FIGURES)]

        return await _csv(request, "usage", [*group_by, *_USAGE_FIGURES], lines())
    data = [{**r.group, **{f: getattr(r, f) for f in _USAGE_FIGURES}} async for r in rows]
    totals = {f: sum(d[f] for d in data) for f in _USAGE_FIGURES}
    report = {"object": "usage_report", "from": start.isoformat(), "to": end.isoformat(),
              "group_by": list(group_by), "data": data, "totals": totals}
    if "asset" in group_by:
        # Each asset's figures in USD (its configured value), so margins across assets can be added.
        config = request.config_dict[CONFIG]
        for d in data:
            rate = config.usd_per_unit(d["asset"]) if d["asset"] in config.asset_names() else None
            for f in ("spend_micros", "cost_micros", "margin_micros"):
                d[f.replace("_micros", "_usd_micros")] = int(d[f] * rate) if rate is not None else None
        report["totals_usd"] = {f: sum(d[f] or 0 for d in data) for f in ("spend_usd_micros", "cost_usd_micros", "margin_usd_micros")}
    return web.json_response(report)


@admin_routes.get("/reports/money")
async def money_report(request: web.Request) -> web.StreamResponse:
    start, end = _range(request)
    period = request.query.get("period", "month")
    if period not in ("day", "month"):
        raise ApiError(400, "period must be day or month", code="invalid_parameter", param="period")
    rows = await reporting.money(request.config_dict[LEDGER_DB], start, end, cast(Any, period),
                                 request.query.get("end_user"), include_simulated=_include_simulated(request))
    if _format(request) == "csv":
        async def lines() -> Any:
            for r in rows:
                yield [r.period, r.type, r.count, r.amount_micros, r.asset]

        return await _csv(request, "money", ["period", "type", "count", "amount_micros", "asset"], lines())
    return web.json_response({"object": "money_report", "from": start.isoformat(), "to": end.isoformat(),
                              "period": period, "data": [r.__dict__ for r in rows]})


@admin_routes.get("/end-users/{id}/rollups")
async def monthly_rollups(request: web.Request) -> web.StreamResponse:
    """The end user's months: carried in, top-ups, spend, refunds, other, carried out (exact)."""
    this_month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    months = []
    for name, default in (("from_month", this_month[:4] + "-01"), ("to_month", this_month)):
        month = request.query.get(name, default)
        try:
            reporting.month_bounds(month)
        except ValueError:
            raise ApiError(400, f"{name} must be a month, YYYY-MM", code="invalid_parameter", param=name) from None
        months.append(month)
    if months[1] < months[0]:
        raise ApiError(400, "to_month must not be before from_month", code="invalid_parameter", param="to_month")
    rows = await reporting.rollups(request.config_dict[LEDGER_DB], request.match_info["id"], months[0], months[1])
    if _format(request) == "csv":
        fields = list(reporting.MonthRollup.__dataclass_fields__)

        async def lines() -> Any:
            for r in rows:
                yield [getattr(r, f) for f in fields]

        return await _csv(request, "rollups", fields, lines())
    return web.json_response({"object": "list", "end_user": request.match_info["id"], "data": [r.__dict__ for r in rows]})


@admin_routes.post("/end-users/{id}/statement-links")
async def create_statement_link(request: web.Request) -> web.Response:
    end_user = request.match_info["id"]
    body = await read_model(request, CreateStatementLink)
    if await request.config_dict[WALLETS].get(end_user) is None:
        raise ApiError(404, f"no end user {end_user!r}", code="end_user_not_found", param="id")
    config = request.config_dict[CONFIG]
    ttl = min(body.ttl_seconds or config.statements.link_ttl_seconds, config.statements.link_ttl_seconds)
    expires = int(time.time()) + ttl
    try:
        key = statements.signing_key(config)
    except statements.NoStatementSecret as exc:
        raise ApiError(501, str(exc), type="api_error", code="statements_not_configured") from None
    base = (config.statements.public_base_url or str(request.url.origin())).rstrip("/")
    view = StatementLinkView(
        end_user=end_user, month=body.month, expires_at=expires,
        url=base + statements.link_path(key, end_user, body.month, expires),
        csv_url=base + statements.link_path(key, end_user, body.month, expires, csv_file=True),
    )
    return web.Response(status=201, body=view.model_dump_json(), content_type="application/json")


# ------------------------------------------------------------------ public: an end user's own history


@public_routes.get("/v1/usage")
async def own_usage(request: web.Request) -> web.Response:
    """The caller's calls and money movements from the ledger of record (archived within about a
    second of happening), newest first. An operator key names the end user in `?user=`."""
    caller = await authenticate(request, None)
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 500:
        raise ApiError(400, "limit must be an integer between 1 and 500", code="invalid_parameter", param="limit")
    cursor = request.query.get("starting_after")
    if cursor is not None and not re.fullmatch(r"\d{1,15}-\d{1,10}", cursor):
        raise ApiError(400, "starting_after must be an id from a previous page", code="invalid_parameter",
                       param="starting_after")
    start = _date(request, "from", dt.date.min) if "from" in request.query else None
    end = _date(request, "to", dt.date.max) if "to" in request.query else None
    rows = await reporting.history(request.config_dict[LEDGER_DB], caller.end_user_id, start=start, end=end,
                                   limit=limit, starting_after=cursor)
    data = [{"id": r.id, "object": "usage_entry", "created": r.at_ms // 1000, "type": r.type,
             "amount_micros": r.amount_micros, "amount": usd(r.amount_micros), "model": r.model,
             "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "request_id": r.request_id}
            for r in rows]
    return web.json_response({"object": "list", "data": data,
                              "next_cursor": rows[-1].id if len(rows) == limit else None})


# ------------------------------------------------------------------ public: the statement pages

# The signature is in the URL: it must not travel on in a Referer, nor sit in a shared cache.
_PRIVATE = {"Cache-Control": "private, no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex"}


async def _statement(request: web.Request) -> reporting.MonthStatement:
    config = request.config_dict[CONFIG]
    end_user, month = request.match_info["end_user"], request.match_info["month"]
    try:
        key = statements.signing_key(config)
        reporting.month_bounds(month)
    except (statements.NoStatementSecret, ValueError):
        key = b""
    if not key or not statements.link_is_valid(key, end_user, month, request.query.get("expires"), request.query.get("sig")):
        raise ApiError(403, "this statement link is not valid or has expired; ask for a new one",
                       type="permission_error", code="invalid_statement_link")
    return await reporting.month_statement(request.config_dict[LEDGER_DB], end_user, month)


@public_routes.get(f"/statements/{{end_user}}/{_MONTH}")
async def statement_page(request: web.Request) -> web.Response:
    statement = await _statement(request)
    csv_link = request.path + ".csv?" + request.query_string
    return web.Response(text=statements.render_html(statement, request.config_dict[CONFIG], csv_link),
                        content_type="text/html", headers=_PRIVATE)


@public_routes.get(f"/statements/{{end_user}}/{_MONTH}.csv")
async def statement_csv(request: web.Request) -> web.Response:
    statement = await _statement(request)
    headers = {**_PRIVATE, "Content-Disposition": f'attachment; filename="statement-{statement.month}.csv"'}
    return web.Response(text=statements.render_csv(statement), content_type="text/csv", charset="utf-8", headers=headers)
