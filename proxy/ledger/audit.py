"""The admin audit log in the ledger of record: what a record may hold, writing it, and reading it back.

Owns the secret scrubbing of request bodies (`redact`), the write that must
never fail silently (`write`), and `GET /admin/audit` (filters, id paging,
newest first). What is recorded for which request, and the snapshots of its
target, are proxy/admin_audit.py's. Rows are append-only: the migration's
triggers refuse UPDATE and DELETE.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, Field
from sqlalchemy import select

from proxy import observability
from proxy.appstate import LEDGER_DB
from proxy.errors import ApiError
from proxy.ledger.db import AuditRecord, LedgerDatabase
from proxy.ledger.schema import audit_log

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
# A field whose name says it holds a credential is dropped whatever it holds.
_SECRET_NAME = re.compile(r"key|secret|token|password", re.IGNORECASE)
# A value that is a credential wherever it sits: a bearer header, an end-user key,
# a webhook secret, a JWT (three base64url parts, the first a JSON header "eyJ...").
_SECRET_VALUE = re.compile(r"^\s*(bearer\s|sk-eu_|whsec_|eyJ[\w-]*\.[\w-]+\.)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """`value` with every secret replaced by "[redacted]" (see _SECRET_NAME and _SECRET_VALUE)."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_NAME.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and _SECRET_VALUE.match(value):
        return REDACTED
    return value


def body_for_audit(raw: bytes) -> Any:
    """What the audit keeps of a request body: its JSON, redacted. A body that is not
    JSON is described, never kept: it could be anything, a pasted key included."""
    if not raw:
        return None
    try:
        return redact(orjson.loads(raw))
    except orjson.JSONDecodeError:
        return {"unparsed_bytes": len(raw)}


async def write(database: LedgerDatabase | None, record: AuditRecord) -> bool:
    """Append `record`; a failure is logged with the whole record and counted, never raised.

    The caller's change has already happened when this runs (in Redis, which the
    SQL database cannot share a transaction with), so the admin's answer stays what
    the change was: failing it would invite a retry of something that succeeded.
    The log line keeps the record, and `metergate_audit_write_failures_total` is
    there to alert on.
    """
    try:
        if database is None:
            raise RuntimeError("the ledger of record is not open")
        await database.append_audit(record)
        return True
    except Exception as exc:
        observability.audit_write_failed()
        log.error("the audit record could not be written (%r); the record: %s",
                  exc, orjson.dumps(asdict(record), default=str).decode())
        return False


# ------------------------------------------------------------------ reading


class AuditEntryView(BaseModel):
    object: str = "audit_entry"
    id: int
    at_ms: int
    actor: str = Field(description="the admin key's name (never the key)")
    role: str
    method: str
    path: str
    action: str = Field(description="the route, e.g. 'POST /wallets/{id}/top-ups'")
    target: str | None = Field(description="the end user, key or webhook endpoint acted on")
    request_id: str
    status: int
    request_body: Any = Field(description="the JSON body, secrets replaced by '[redacted]'")
    before: Any = Field(description="the target before the request (end users, keys, webhook endpoints)")
    after: Any = Field(description="the target after it")


class AuditPage(BaseModel):
    object: str = "list"
    data: list[AuditEntryView]
    has_more: bool
    next_cursor: int | None = Field(description="pass as starting_after for the next (older) page")


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _int_param(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = int(raw) if raw.lstrip("-").isdigit() else None
    if value is None or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}", code="invalid_request", param=name)
    return value


_MAX_INT = 2**63 - 1


async def list_audit(database: LedgerDatabase, *, limit: int, starting_after: int | None = None, actor: str | None = None,
                     target: str | None = None, action: str | None = None, from_ms: int | None = None,
                     to_ms: int | None = None) -> AuditPage:
    """Audit rows newest first (by id: the order they were written), `from_ms` inclusive, `to_ms` exclusive."""
    c = audit_log.c
    query = select(audit_log).order_by(c.id.desc()).limit(limit + 1)
    for column, value in ((c.actor, actor), (c.target, target), (c.action, action)):
        if value is not None:
            query = query.where(column == value)
    if from_ms is not None:
        query = query.where(c.at_ms >= from_ms)
    if to_ms is not None:
        query = query.where(c.at_ms < to_ms)
    if starting_after is not None:
        query = query.where(c.id < starting_after)
    async with database.engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    page, has_more = rows[:limit], len(rows) > limit
    return AuditPage(
        data=[AuditEntryView(**{**row, "request_body": _loads(row["request_body"]), "before": _loads(row["before"]),
                                "after": _loads(row["after"])}) for row in page],
        has_more=has_more, next_cursor=page[-1]["id"] if has_more else None,
    )


routes = web.RouteTableDef()


@routes.get("/audit")
async def audit_listing(request: web.Request) -> web.Response:
    """Filters: actor, target, action (exact), from_ms/to_ms; limit 1..500 (50); starting_after an id."""
    limit = _int_param(request, "limit", 50, 1, 500)
    assert limit is not None
    page = await list_audit(
        request.config_dict[LEDGER_DB], limit=limit,
        starting_after=_int_param(request, "starting_after", None, 1, _MAX_INT),
        actor=request.query.get("actor"), target=request.query.get("target"), action=request.query.get("action"),
        from_ms=_int_param(request, "from_ms", None, 0, _MAX_INT), to_ms=_int_param(request, "to_ms", None, 0, _MAX_INT),
    )
    return web.Response(body=page.model_dump_json(), content_type="application/json")
