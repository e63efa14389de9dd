"""Every error the service returns, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Handlers raise `ApiError` (or let a `WalletError` escape); the middleware here
turns both, and aiohttp's own HTTP errors, into that body with the right status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from proxy import observability, store
from proxy.appstate import CONFIG, app_state

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
        param: str | None = None, headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(self.status, self.message, type=self.type, code=self.code, param=self.param, headers=self.headers)


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
    param: str | None = None, headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(error_body(message, type=type, code=code, param=param)),
        content_type="application/json", headers=headers,
    )


_WALLET_STATUS: dict[type[store.WalletError], tuple[int, str, str]] = {
    store.WalletNotFound: (404, "invalid_request_error", "wallet_not_found"),
    store.WalletExists: (409, "invalid_request_error", "already_exists"),
    store.InsufficientFunds: (402, "insufficient_quota", "insufficient_quota"),
    store.SpendLimitReached: (402, "insufficient_quota", "spend_limit_exceeded"),
    store.BudgetExceeded: (402, "insufficient_quota", "budget_exceeded"),
    store.CreditLimitInUse: (409, "invalid_request_error", "credit_limit_in_use"),
    store.IdempotencyConflict: (409, "invalid_request_error", "idempotency_conflict"),
    store.HoldNotFound: (404, "invalid_request_error", "hold_not_found"),
    store.HoldClosed: (409, "invalid_request_error", "hold_closed"),
    store.ChargeNotFound: (404, "invalid_request_error", "charge_not_found"),
    store.RefundExceedsCharge: (409, "invalid_request_error", "refund_exceeds_charge"),
    store.InvalidAmount: (400, "invalid_request_error", "invalid_amount"),
    store.BalanceLimit: (400, "invalid_request_error", "balance_limit"),
    store.InvalidWalletRequest: (400, "invalid_request_error", "invalid_request"),
    store.PaymentNotFound: (404, "invalid_request_error", "payment_not_found"),
    store.RefundExceedsPayment: (409, "invalid_request_error", "refund_exceeds_payment"),
    store.NoPaymentMethod: (400, "invalid_request_error", "no_payment_method"),
}


def from_wallet_error(exc: store.WalletError) -> ApiError:
    status, type_, code = _WALLET_STATUS.get(type(exc), (400, "invalid_request_error", exc.code.lower()))
    return ApiError(status, exc.message, type=type_, code=code)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every answer in OpenAI's error shape, and every answer counted (proxy/observability.py)."""
    started = observability.request_arrived(request)
    try:
        response = await answer(request, handler)
    except web.HTTPException as exc:  # a redirect, raised on as it came
        observability.request_answered(request, exc.status, started)
        raise
    except BaseException:  # cancelled: the client went away before its answer
        observability.request_answered(request, 499, started)
        raise
    observability.request_answered(request, response.status, started)
    return response


async def answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The handler's response, or the error it raised as a response (the admin audit needs the status)."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except store.WalletError as exc:
        return from_wallet_error(exc).response()
    except web.HTTPRequestEntityTooLarge:
        limit = app_state(request)[CONFIG].max_body_bytes
        return error_response(413, f"request body too large (limit {limit} bytes)", code="request_too_large")
    except web.HTTPNotFound:
        return error_response(404, f"no route {request.method} {request.path}", code="not_found")
    except web.HTTPMethodNotAllowed as exc:
        return error_response(405, f"{request.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}", code="method_not_allowed")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason or "error", code=None)
    except RedisError as exc:
        # Nothing was charged: every wallet change is a script that ran whole
        # or not at all. Before the hold nothing was forwarded; a hold whose
        # settle failed is released by the reaper once the store is back.
        log.error("%s %s: the wallet store is unreachable: %s", request.method, request.path, exc)
        return error_response(
            503, "the wallet store is unavailable; nothing was charged, try again shortly",
            type="api_error", code="store_unavailable", headers={"Retry-After": "1"},
        )
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error; it has been logged", type="server_error", code="internal_error")


def _hang_up_after_response(request: web.Request) -> None:
    """Close the connection once this request's response is written.

    Without it aiohttp would "linger" after answering, reading the unread rest
    of the body for up to 10 s; a client that stalled its body gets no more time.
    aiohttp runs each request in its own task, which ends after the response
    is written.
    """
    transport = request.transport
    task = asyncio.current_task()
    if transport is not None and task is not None:
        task.add_done_callback(lambda _: transport.close())


async def read_body(request: web.Request) -> bytes:
    """The request body (aiohttp keeps it: reading it again is free).

    A body that has not fully arrived within `body_timeout_seconds` is a 408,
    and the connection is closed after it.
    """
    if request.content.is_eof():
        # The whole body is already buffered (almost every call): nothing can be
        # late, so it needs no timer (an asyncio.timeout is ~1.5% of a call's CPU).
        return await request.read()
    timeout = app_state(request)[CONFIG].body_timeout_seconds
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation of the handler (a client that went away).
        async with asyncio.timeout(timeout):
            body = await request.read()
    except TimeoutError:
        _hang_up_after_response(request)
        raise ApiError(
            408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    return body


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 400 that says what is wrong with it (a 408 when it is late)."""
    body = await read_body(request)
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def validate_model(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        messages = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise ApiError(400, messages, code="invalid_request", param=param) from None


async def read_model(request: web.Request, model: type[M]) -> M:
    return validate_model(model, await read_json(request))


def idempotency_key(request: web.Request, required_on: str = "money movements") -> str:
    """The request's Idempotency-Key header, or a 400 saying what requires one."""
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key or len(key) > 255:
        raise ApiError(400, f"an Idempotency-Key header (1-255 characters) is required on {required_on}",
                       code="idempotency_key_required", param="Idempotency-Key")
    return key


def json_model(model: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A pydantic model as the JSON response."""
    return web.Response(status=status, body=model.model_dump_json(), content_type="application/json", headers=headers)


# The header of an answer replayed for its Idempotency-Key.
REPLAYED: Mapping[str, str] = MappingProxyType({"Idempotent-Replayed": "true"})
