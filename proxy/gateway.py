"""The OpenAI-compatible surface: authenticate, price, hold, forward, relay, settle.

A metered call holds its worst-case cost before anything is forwarded, and
settles the exact cost when it ends, however it ends. Settlement runs in a
task shielded from the handler's cancellation, so a client that vanishes
still pays for what it consumed, and no more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Mapping  # not typing's: isinstance on those is slow, and it runs per chunk
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pricing import ModelPrice, RateCard, Usage, count_text_tokens, price_usage
from proxy import limits, metering
from proxy.auth import Caller, authenticate
from proxy.errors import ApiError, read_json
from proxy.appstate import BACKGROUND, CONFIG, HTTP, RATECARDS, WALLETS
from proxy.schemas import WalletView, usd
from proxy.store import Hold, InsufficientFunds, Settlement, WalletStore

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

_KIND = {"/chat/completions": "chat", "/completions": "completion", "/embeddings": "embedding"}
_REQUIRED = {"chat": "messages", "completion": "prompt", "embedding": "input"}
_UPSTREAM_HEADERS_PASSED_ON = ("Retry-After", "X-RateLimit-Limit-Requests", "X-RateLimit-Remaining-Requests")
_CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)
_END_EVENTS = {
    outcome: b"data: " + orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}) + b"\n\n"
    for outcome, message, type_, code in (
        ("upstream_cut", "the upstream provider ended the stream before it was complete; "
         "you were charged only for the tokens received", "api_error", "upstream_stream_cut"),
        ("wallet_exhausted", "the wallet ran out of funds during this stream; it was stopped and "
         "you were charged for the tokens received", "insufficient_quota", "insufficient_quota"),
    )
}


@dataclass
class MeteredCall:
    """One call in flight: who pays, at what prices, and the hold that covers it."""

    request_id: str
    caller: Caller
    quote: metering.Quote
    hold: Hold
    body: dict[str, Any]
    held_micros: int = 0  # the hold's amount now (it grows while a stream outruns it)
    covered_output_tokens: int = 0  # output tokens the hold pays for
    refresh_at: float = 0.0  # loop time after which a long stream pushes its hold's expiry back

    def __post_init__(self) -> None:
        self.held_micros = self.hold.amount_micros
        self.covered_output_tokens = self.quote.max_output_tokens

    @property
    def model(self) -> ModelPrice:
        return self.quote.model


@dataclass
class StreamMeter:
    """What a stream has shown so far: its counted output tokens, and whether it ended properly."""

    completion_tokens: int = 0
    saw_output: bool = False
    saw_done: bool = False

    def count_choice(self, choice: Mapping[str, Any]) -> None:
        delta = choice.get("delta")
        parts: list[str] = []
        if isinstance(delta, Mapping):
            for key in ("content", "reasoning_content", "refusal"):
                if isinstance(delta.get(key), str):
                    parts.append(delta[key])
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(fn, Mapping):
                    parts.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
        text = "".join(parts)
        if text:
            self.saw_output = True
            self.completion_tokens += count_text_tokens(text)


# ----------------------------------------------------------------- preparing


def _validate_body(body: Any, kind: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "you must provide a model parameter", code="missing_model", param="model")
    field_name = _REQUIRED[kind]
    value = body.get(field_name)
    if value is None or (kind == "chat" and (not isinstance(value, list) or not value)):
        raise ApiError(400, f"`{field_name}` is required", code="invalid_request", param=field_name)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ApiError(400, "`stream` must be true or false", code="invalid_request", param="stream")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ApiError(400, f"`{name}` must be a non-negative integer", code="invalid_request", param=name)
    return body


def _card(request: web.Request, caller: Caller) -> RateCard:
    try:
        return request.config_dict[RATECARDS].current.card_for(caller.tier, caller.ratecard_pin)
    except KeyError as exc:
        log.error("no rate card for end user %s: %s", caller.end_user_id, exc)
        raise ApiError(500, "no rate card applies to this end user; the operator must fix its tiers", type="server_error", code="ratecard_missing") from None


def _model(card: RateCard, caller: Caller, name: str, kind: str | None) -> ModelPrice:
    model = card.model(name)
    allowed = caller.scopes.get("models")
    if model is None or (allowed and model.name not in allowed and name not in allowed):
        raise ApiError(404, f"The model `{name}` does not exist or you do not have access to it.", code="model_not_found", param="model")
    if kind is not None and model.kind != kind:
        raise ApiError(400, f"`{name}` is a {model.kind} model and cannot be used on this endpoint", code="wrong_endpoint", param="model")
    return model


async def _prepare(request: web.Request, kind: str | None) -> tuple[dict[str, Any], Caller, metering.Quote]:
    body = await read_json(request)
    body = _validate_body(body, kind or _kind_of_estimate(body))
    caller = await authenticate(request, body)
    card = _card(request, caller)
    model = _model(card, caller, body["model"], kind)
    return body, caller, metering.quote(card, model, body)


def _kind_of_estimate(body: Any) -> str:
    if isinstance(body, dict):
        for kind, field_name in _REQUIRED.items():
            if field_name in body:
                return kind
    return "chat"


async def _hold(request: web.Request, request_id: str, caller: Caller, quote: metering.Quote) -> Hold:
    try:
        return await request.config_dict[WALLETS].hold(
            caller.end_user_id, quote.hold.price_micros,
            meta={"request_id": request_id, "model": quote.model.name, "key_id": caller.key_id},
            spend=limits.credential_spend(caller, request_id, 0),
        )
    except InsufficientFunds as exc:
        raise ApiError(
            402, f"You exceeded your current quota: {exc.message}. Top up the wallet to continue.",
            type="insufficient_quota", code="insufficient_quota",
        ) from None


# ---------------------------------------------------------------- settling


def _finish(request: web.Request, work: Awaitable[Settlement | None]) -> asyncio.Task[Settlement | None]:
    """Run settlement in a task the handler's cancellation cannot stop."""
    task = asyncio.ensure_future(work)
    background = request.config_dict[BACKGROUND]
    background.add(task)
    task.add_done_callback(background.discard)
    return task


async def _settle(wallets: WalletStore, call: MeteredCall, usage: Usage, *, usage_source: str, outcome: str) -> Settlement:
    charge = price_usage(call.model, usage)
    meta = metering.charge_meta(
        request_id=call.request_id, key_id=call.caller.key_id, quote=call.quote, usage=usage, charge=charge,
        usage_source=usage_source, outcome=outcome,
    )
    settlement = await wallets.settle(
        call.caller.end_user_id, call.hold.hold_id, charge.price_micros, meta=meta,
        spend=limits.credential_spend(call.caller, call.request_id, usage.prompt_tokens + usage.completion_tokens),
    )
    if settlement.shortfall_micros:
        log.warning("request %s: wallet %s could not cover %d micros", call.request_id, call.caller.end_user_id, settlement.shortfall_micros)
    return settlement


async def _release(wallets: WalletStore, call: MeteredCall, reason: str) -> None:
    await wallets.release(
        call.caller.end_user_id, call.hold.hold_id, reason=reason, spend=limits.credential_spend(call.caller, call.request_id, 0)
    )


async def settle_or_release(request: web.Request, work: Awaitable[Any]) -> Any:
    return await asyncio.shield(_finish(request, work))


# --------------------------------------------------------------- forwarding


async def _open_upstream(request: web.Request, call: MeteredCall, path: str, stream: bool) -> aiohttp.ClientResponse:
    """POST to the model's upstream; on failure release the hold and raise the error to return."""
    config = request.config_dict[CONFIG]
    upstream = config.upstreams[call.model.upstream]
    payload = dict(call.body)
    payload["model"] = call.model.upstream_model
    if stream:
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json"}
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout_seconds, sock_read=upstream.read_timeout_seconds)
    wallets = request.config_dict[WALLETS]
    try:
        response = await request.config_dict[HTTP].post(
            upstream.base_url.rstrip("/") + path, data=orjson.dumps(payload), headers=headers, timeout=timeout,
        )
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        await settle_or_release(request, _release(wallets, call, f"upstream unreachable: {type(exc).__name__}"))
        raise ApiError(502, f"the upstream provider for `{call.model.name}` could not be reached", type="api_error", code="upstream_unavailable") from None
    if response.status >= 400:
        raw = await response.read()
        response.release()
        await settle_or_release(request, _release(wallets, call, f"upstream status {response.status}"))
        raise _upstream_error(response, raw, call.model.name)
    return response


def _upstream_error(response: aiohttp.ClientResponse, raw: bytes, model: str) -> ApiError:
    headers = {h: response.headers[h] for h in _UPSTREAM_HEADERS_PASSED_ON if h in response.headers}
    try:
        upstream_error = orjson.loads(raw)["error"]
        message, type_, code = upstream_error["message"], upstream_error.get("type") or "api_error", upstream_error.get("code")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message, type_, code = raw.decode(errors="replace")[:500] or response.reason or "error", "api_error", None
    if 400 <= response.status < 500:
        return ApiError(response.status, message, type=type_, code=code, headers=headers)
    return ApiError(502, f"the upstream provider for `{model}` failed with status {response.status}: {message}", type="api_error", code="upstream_error")


def _result_headers(call: MeteredCall, settlement: Settlement, usage: Usage) -> dict[str, str]:
    return {
        "X-Request-Id": call.request_id,
        "X-Model": call.model.name,
        "X-Usage-Cost": usd(settlement.captured_micros),
        "X-Total-Tokens": str(usage.prompt_tokens + usage.completion_tokens),
        "X-Wallet-Balance": usd(settlement.wallet.balance_micros),
    }


def _counted_usage(call: MeteredCall, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=call.quote.prompt_tokens, completion_tokens=completion_tokens)


def _text_of_choices(data: Mapping[str, Any]) -> str:
    parts = []
    for choice in data.get("choices") or ():
        if not isinstance(choice, Mapping):
            continue
        message = choice.get("message")
        if isinstance(message, Mapping):
            if isinstance(message.get("content"), str):
                parts.append(message["content"])
            for tc in message.get("tool_calls") or ():
                if isinstance(tc, Mapping) and isinstance(tc.get("function"), Mapping):
                    parts.append(str(tc["function"].get("arguments") or ""))
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(parts)


async def _forward_whole(request: web.Request, call: MeteredCall, path: str) -> web.Response:
    wallets = request.config_dict[WALLETS]
    upstream = await _open_upstream(request, call, path, stream=False)
    try:
        raw = await upstream.read()
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        await settle_or_release(request, _release(wallets, call, f"unreadable upstream response: {type(exc).__name__}"))
        raise ApiError(502, "the upstream provider sent an unreadable response", type="api_error", code="upstream_error") from None
    finally:
        upstream.release()
    reported = data.get("usage")
    if isinstance(reported, dict):
        usage, source = metering.usage_from_openai(reported), "upstream"
    else:
        usage, source = _counted_usage(call, count_text_tokens(_text_of_choices(data))), "counted"
        reported = data["usage"] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                    "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    settlement: Settlement = await settle_or_release(request, _settle(wallets, call, usage, usage_source=source, outcome="completed"))
    reported["cost"] = metering.usd_number(settlement.captured_micros)
    reported["cost_micros"] = settlement.captured_micros
    return web.Response(body=orjson.dumps(data), content_type="application/json", headers=_result_headers(call, settlement, usage))


# ---------------------------------------------------------------- streaming


def _meter_event(meter: StreamMeter, event: bytes) -> Mapping[str, Any] | None:
    """Count one SSE event; return its JSON when it carries the upstream's usage."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            meter.saw_done = True
            return None
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict):
            return None
        for choice in chunk.get("choices") or ():
            if isinstance(choice, Mapping):
                meter.count_choice(choice)
        if isinstance(chunk.get("usage"), dict):
            return chunk
    return None


# A stream that outruns its hold (an upstream ignoring max_tokens) extends it
# by at least this many output tokens at a time.
MIN_EXTENSION_TOKENS = 256


async def _cover(wallets: WalletStore, call: MeteredCall, counted_tokens: int) -> bool:
    """Keep the hold covering the stream: grow it to `counted_tokens` of output, and
    push its expiry back at half its TTL so the reaper never takes a live call's
    hold. False when the wallet cannot cover the output."""
    loop_time = asyncio.get_running_loop().time()
    if counted_tokens <= call.covered_output_tokens and loop_time < call.refresh_at:
        return True
    step = 0
    if counted_tokens > call.covered_output_tokens:
        step = max(counted_tokens - call.covered_output_tokens, MIN_EXTENSION_TOKENS)
    amount = metering.output_price(call.model, step) if step else 0
    try:
        grown = await wallets.extend(call.caller.end_user_id, call.hold.hold_id, amount, current_micros=call.held_micros)
    except InsufficientFunds:
        return False
    call.held_micros = grown.amount_micros
    call.covered_output_tokens += step
    call.refresh_at = loop_time + wallets.hold_ttl_ms / 2000
    return True


async def _forward_stream(request: web.Request, call: MeteredCall, path: str) -> web.StreamResponse:
    wallets = request.config_dict[WALLETS]
    client_wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    upstream = await _open_upstream(request, call, path, stream=True)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Request-Id": call.request_id, "X-Model": call.model.name,
    })
    meter = StreamMeter()
    call.refresh_at = asyncio.get_running_loop().time() + wallets.hold_ttl_ms / 2000
    settlement: asyncio.Task[Any] | None = None
    outcome = "completed"
    try:
        await response.prepare(request)
        buffer = b""
        async for piece in upstream.content.iter_any():
            buffer += piece
            # Events that arrived together leave together: one write per read.
            relay: list[bytes] = []
            while (end := buffer.find(b"\n\n")) >= 0:
                event, buffer = buffer[: end + 2], buffer[end + 2 :]
                usage_chunk = _meter_event(meter, event)
                if usage_chunk is not None and settlement is None:
                    # The usage chunk is the last before [DONE]: settle now, so
                    # the client can be shown the exact charge in it.
                    usage = metering.usage_from_openai(usage_chunk["usage"])
                    settlement = _finish(request, _settle(wallets, call, usage, usage_source="upstream", outcome="completed"))
                    settled = await asyncio.shield(settlement)
                    if not usage_chunk.get("choices") and not client_wants_usage:
                        continue
                    usage_chunk["usage"]["cost"] = metering.usd_number(settled.captured_micros)
                    usage_chunk["usage"]["cost_micros"] = settled.captured_micros
                    event = b"data: " + orjson.dumps(usage_chunk) + b"\n\n"
                relay.append(event)
            if relay:
                await response.write(b"".join(relay))
            if settlement is None and not await _cover(wallets, call, meter.completion_tokens):
                # What was relayed is paid for as far as the wallet goes; no
                # more is generated on a wallet that cannot pay for it.
                outcome = "wallet_exhausted"
                break
        else:
            if not meter.saw_done:
                outcome = "upstream_cut"
    except _CLIENT_GONE:
        outcome = "client_disconnected"
    except asyncio.CancelledError:
        outcome = "client_disconnected"
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError):
        outcome = "upstream_cut"
    finally:
        if outcome in _END_EVENTS:
            # Say so in-band: the SDKs raise on an error event, where a
            # silently ended stream would look like a complete answer.
            with contextlib.suppress(*_CLIENT_GONE, RuntimeError):
                await response.write(_END_EVENTS[outcome])
        # Closing (not releasing) drops the upstream connection, so the
        # provider stops generating what nobody will read.
        upstream.close()
        if settlement is None:
            if outcome == "upstream_cut" and not meter.saw_output:
                work = _release(wallets, call, "upstream failed before any output")
            else:
                usage = _counted_usage(call, meter.completion_tokens)
                work = _settle(wallets, call, usage, usage_source="counted", outcome=outcome)
            settlement = _finish(request, work)
        await asyncio.shield(settlement)
    return response


# ------------------------------------------------------------------ handlers


async def _metered(request: web.Request, path: str) -> web.StreamResponse:
    kind = _KIND[path]
    body, caller, quote = await _prepare(request, kind)
    request_id = "req_" + secrets.token_hex(12)
    async with limits.admission(request, caller, quote, request_id):
        hold = await _hold(request, request_id, caller, quote)
    call = MeteredCall(request_id, caller, quote, hold, body)
    if body.get("stream") and kind != "embedding":
        return await _forward_stream(request, call, path)
    return await _forward_whole(request, call, path)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _metered(request, "/chat/completions")


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _metered(request, "/completions")


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _metered(request, "/embeddings")


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    caller = await authenticate(request, None)
    card = _card(request, caller)
    allowed = caller.scopes.get("models")
    data = [
        {"id": m.name, "object": "model", "created": 0, "owned_by": m.upstream}
        for m in card.models.values() if not allowed or m.name in allowed
    ]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


@routes.post("/v1/estimate")
async def estimate(request: web.Request) -> web.Response:
    """A pre-flight quote for a request body: what would be held, and whether the wallet affords it."""
    body, caller, quote = await _prepare(request, None)
    wallet = await request.config_dict[WALLETS].get(caller.end_user_id)
    available = wallet.available_micros if wallet else 0
    return web.Response(content_type="application/json", body=orjson.dumps({
        "object": "estimate",
        "model": quote.model.name,
        "ratecard": quote.card.ref,
        "prompt_tokens": quote.prompt_tokens,
        "max_output_tokens": quote.max_output_tokens,
        "estimated_cost_micros": quote.hold.price_micros,
        "estimated_cost": usd(quote.hold.price_micros),
        "available_micros": available,
        "affordable": quote.hold.price_micros <= available,
    }))


@routes.get("/v1/wallet")
async def wallet(request: web.Request) -> web.Response:
    caller = await authenticate(request, None)
    wallets = request.config_dict[WALLETS]
    state = await wallets.get(caller.end_user_id)
    if state is None:
        raise ApiError(404, "no wallet for this end user", code="wallet_not_found")
    recent = await wallets.ledger(caller.end_user_id, limit=10)
    view = WalletView.of(state).model_dump()
    view["recent"] = [
        {"id": e.id, "type": e.type, "amount_micros": e.amount_micros, "amount": usd(e.amount_micros),
         "model": e.details.get("model"), "request_id": e.details.get("request_id")}
        for e in recent
    ]
    return web.Response(body=orjson.dumps(view), content_type="application/json")
