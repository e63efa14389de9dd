"""Talking to the model's upstream: what may be forwarded, the HTTP call and its
error mapping, and the whole (non-streamed) answer.

Nothing here decides how a hold closes: what happened is reported to the call's `Lease`, which
decides what the call costs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pricing import Usage, count_text_tokens
from pricing.values import value
from proxy import metering, observability
from proxy.calls.lease import Lease
from proxy.config import UpstreamConfig
from proxy.errors import ApiError
from proxy.schemas import usd
from proxy.store import Settlement

UPSTREAM_HEADERS_PASSED_ON = ("Retry-After", "X-RateLimit-Limit-Requests", "X-RateLimit-Remaining-Requests")
# Deeper JSON is refused before anything is held: nobody's tool schema is this
# deep, and orjson cannot re-encode past 255 levels for the upstream.
MAX_JSON_DEPTH = 64


def _too_deep(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    return False


def check_forwardable(body: Mapping[str, Any]) -> None:
    """Refuse, before any hold, a body that could not be forwarded as asked."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object", code="invalid_request", param="stream_options")
    if options is not None and not body.get("stream"):
        raise ApiError(400, "`stream_options` is only allowed when `stream` is true", code="invalid_request",
                       param="stream_options")
    if _too_deep(body, MAX_JSON_DEPTH):
        raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_request")


class UpstreamSessions:
    """One pooled HTTP session per upstream, each capped at its own `max_connections`:
    keep-alive connections are most of the latency budget a proxy has, and one busy
    upstream must not take the connections another needs. No cookie jar: a session serves
    every end user, and a cookie one user's call got back must not ride on the next user's."""

    def __init__(self, upstreams: Mapping[str, UpstreamConfig]):
        self._sessions = {
            name: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=upstream.max_connections, limit_per_host=0, ttl_dns_cache=300),
                auto_decompress=True, skip_auto_headers=("User-Agent",), cookie_jar=aiohttp.DummyCookieJar())
            for name, upstream in upstreams.items()
        }

    def __getitem__(self, upstream: str) -> aiohttp.ClientSession:
        return self._sessions[upstream]

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()


@value
class UpstreamCall:
    """Where and how one call is forwarded."""

    http: aiohttp.ClientSession
    upstream: UpstreamConfig
    upstream_name: str  # its name in the config (the sandbox's for a test end user)
    path: str  # e.g. "/chat/completions"
    body: Mapping[str, Any]
    stream: bool
    # A multipart upload (transcriptions): builds the form to send instead of `body` as JSON.
    form: Callable[[], aiohttp.FormData] | None = None

    @property
    def responses_api(self) -> bool:
        """OpenAI's Responses API: `input`/`output` items, `max_output_tokens`, typed stream events."""
        return self.path == "/responses"


async def open_upstream(call: UpstreamCall, lease: Lease) -> aiohttp.ClientResponse:
    """POST to the model's upstream; a failure is reported to the lease and raised as the error to answer."""
    if call.form is not None:
        return await _post(call, lease, call.form(), {"Accept": "application/json"})
    payload = dict(call.body)
    payload["model"] = lease.model.upstream_model
    if call.stream and not call.responses_api:  # a Responses stream always ends with its usage
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    if lease.clamped_to is not None:
        # The wallet can pay for this much output and no more (see Lease.open).
        if call.responses_api:
            payload["max_output_tokens"] = lease.clamped_to
        else:
            named = [f for f in ("max_completion_tokens", "max_tokens") if payload.get(f) is not None]
            for name in named or ["max_completion_tokens" if lease.model.kind == "chat" else "max_tokens"]:
                payload[name] = lease.clamped_to
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if call.stream else "application/json"}
    return await _post(call, lease, orjson.dumps(payload), headers)


def _signed(upstream: UpstreamConfig, headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the upstream's API key (which never leaves the server)."""
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    return headers


def _timeout(upstream: UpstreamConfig) -> aiohttp.ClientTimeout:
    return _client_timeout(upstream.connect_timeout_seconds, upstream.read_timeout_seconds)


@functools.lru_cache(maxsize=64)
def _client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    # Immutable, and ~1 µs to build: one per upstream's settings, not one per call.
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)


async def _post(call: UpstreamCall, lease: Lease, data: bytes | aiohttp.FormData, headers: dict[str, str]) -> aiohttp.ClientResponse:
    headers, timeout = _signed(call.upstream, headers), _timeout(call.upstream)
    lease.forwarded()
    started = time.perf_counter()
    try:
        response = await call.http.post(
            call.upstream.base_url.rstrip("/") + call.path, data=data, headers=headers, timeout=timeout,
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        observability.upstream_failed(lease, "timeout" if isinstance(exc, TimeoutError) else "unreachable", repr(exc))
        lease.upstream_failed(f"upstream unreachable: {type(exc).__name__}")
        raise ApiError(502, f"the upstream provider for `{lease.model.name}` could not be reached",
                       type="api_error", code="upstream_unavailable") from None
    observability.upstream_responded(lease, time.perf_counter() - started, response.status)
    if response.status >= 400:
        try:
            raw = await response.read()
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        finally:
            response.release()
        lease.upstream_failed(f"upstream status {response.status}")
        raise upstream_error(response, raw, lease.model.name)
    return response


def upstream_error(response: aiohttp.ClientResponse, raw: bytes, model: str) -> ApiError:
    headers = {h: response.headers[h] for h in UPSTREAM_HEADERS_PASSED_ON if h in response.headers}
    try:
        upstream_error = orjson.loads(raw)["error"]
        message, type_, code = upstream_error["message"], upstream_error.get("type") or "api_error", upstream_error.get("code")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message, type_, code = raw.decode(errors="replace")[:500] or response.reason or "error", "api_error", None
    if 400 <= response.status < 500:
        return ApiError(response.status, message, type=type_, code=code, headers=headers)
    return ApiError(502, f"the upstream provider for `{model}` failed with status {response.status}: {message}",
                    type="api_error", code="upstream_error")


def clamp_header(lease: Lease) -> dict[str, str]:
    """`X-Max-Tokens-Clamped: N` when the call was forwarded with max_tokens lowered to N."""
    return {"X-Max-Tokens-Clamped": str(lease.clamped_to)} if lease.clamped_to is not None else {}


async def settle_and_show(lease: Lease, usage: Usage, source: str, shown: dict[str, Any]) -> tuple[Settlement | None, int]:
    """Settle the call on `usage` and write what it cost into `shown` (the answer's usage
    object): the capture, or, while the store is away, the price, marked pending."""
    lease.report_usage(usage, source)
    settlement = await lease.close()
    cost = settlement.captured_micros if settlement is not None else metering.price_of(lease.model, usage)
    shown["cost"] = metering.usd_number(cost)
    shown["cost_micros"] = cost
    if settlement is None:
        shown["settlement"] = "pending"
    return settlement, cost


def result_headers(lease: Lease, settlement: Settlement | None, usage: Usage, cost_micros: int) -> dict[str, str]:
    """What a non-streamed answer reports; `X-Settlement: pending` while the store is away."""
    headers = {
        "X-Request-Id": lease.request_id,
        "X-Model": lease.model.name,
        "X-Total-Tokens": str(usage.prompt_tokens + usage.completion_tokens),
        "X-Usage-Cost": usd(cost_micros),
        **clamp_header(lease),
    }
    if settlement is None:
        headers["X-Settlement"] = "pending"
    else:
        headers["X-Wallet-Balance"] = usd(settlement.wallet.balance_micros)
    return headers


async def forward_whole(call: UpstreamCall, lease: Lease) -> web.Response:
    """Forward, read the whole answer, settle it, and build the response (even
    when the client has gone: the provider bills the answer either way)."""
    upstream = await open_upstream(call, lease)
    try:
        raw = await upstream.read()
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        observability.upstream_failed(lease, "timeout" if isinstance(exc, TimeoutError) else "unreadable", repr(exc))
        lease.upstream_failed(f"unreadable upstream response: {type(exc).__name__}")
        raise ApiError(502, "the upstream provider sent an unreadable response", type="api_error", code="upstream_error") from None
    finally:
        upstream.release()
    reported = data.get("usage")
    if lease.model.kind == "image":
        # Billed per image returned (at the quote's size and quality), plus the prompt at the card's input price.
        images = data.get("data")
        shown = reported if isinstance(reported, dict) else {}
        prompt = shown.get("input_tokens")
        usage = Usage(prompt_tokens=prompt if isinstance(prompt, int) and prompt >= 0 else lease.quote.prompt_tokens,
                      images=len(images) if isinstance(images, list) else 0)
        source = "upstream"
        reported = data["usage"] = {**shown, "images": usage.images}
    elif isinstance(reported, dict):
        usage, source = metering.usage_from_openai(reported), "upstream"
    else:
        usage = Usage(prompt_tokens=lease.quote.prompt_tokens, completion_tokens=count_text_tokens(metering.text_of_choices(data)))
        source = "counted"
        names = ("input_tokens", "output_tokens") if call.responses_api else ("prompt_tokens", "completion_tokens")
        reported = data["usage"] = {names[0]: usage.prompt_tokens, names[1]: usage.completion_tokens,
                                    "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    if call.responses_api and isinstance(data.get("id"), str):
        lease.response_id = data["id"]
    # OpenAI's usage object has no count of built-in tool calls: read them off the answer.
    usage = metering.with_tool_calls(usage, metering.tool_calls_of_answer(lease.quote, data))
    settlement, cost = await settle_and_show(lease, usage, source, reported)
    return web.Response(body=orjson.dumps(data), content_type="application/json",
                        headers=result_headers(lease, settlement, usage, cost))


async def fetch_stored(http: aiohttp.ClientSession, upstream: UpstreamConfig, path: str, query: str = "") -> web.Response:
    """GET something the upstream stores (a Responses API response): no money moves; its answer is passed on."""
    url = upstream.base_url.rstrip("/") + path + (f"?{query}" if query else "")
    try:
        async with http.get(url, headers=_signed(upstream, {"Accept": "application/json"}), timeout=_timeout(upstream)) as response:
            raw = await response.read()
            if response.status >= 400:
                raise upstream_error(response, raw, path)
            return web.Response(body=raw, status=response.status, content_type="application/json")
    except (TimeoutError, aiohttp.ClientError):
        raise ApiError(502, "the upstream provider could not be reached", type="api_error", code="upstream_unavailable") from None
