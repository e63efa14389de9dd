"""The OpenAI-compatible surface: the handlers. Each reads and checks its request,
finds who pays and at what prices, and hands the call to its `Lease`
(`proxy/calls/`), which owns the money from hold to close.

The walk of a metered call: `_prepare` (body, caller, quote) -> `Lease` (admit,
hold) -> `forward_whole` / `forward_stream` (upstream, relay, report) -> the
lease's close (settle or release, exactly once).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pricing import ModelPrice, RateCard
from pricing.tokens import UnpriceableRequest, billed_choices
from proxy import limits, metering, observability
from proxy.appstate import ACCOUNTS, CONFIG, HTTP, LIFECYCLE, METERING, RATECARDS, SANDBOX, WALLETS, app_state
from proxy.auth import Caller, Credential, authenticate, identify, operator_caller, presented_bearer
from proxy.budgets import budget_view
from proxy.calls.audio import forward_speech
from proxy.calls.lease import Lease, Metering
from proxy.calls.stream import forward_stream
from proxy.calls.upstream import UpstreamCall, check_forwardable, fetch_stored, forward_whole
from proxy.config import UpstreamConfig
from proxy.errors import ApiError, read_json
from proxy.ids import new_id
from proxy.schemas import WalletView, usd
from proxy.store import AccountStore, StaleCredential
from proxy.store.budgets import BudgetStore

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# Each endpoint's model kind; the Responses API is served by chat models.
_KIND = {"/chat/completions": "chat", "/completions": "completion", "/embeddings": "embedding", "/responses": "chat",
         "/images/generations": "image", "/audio/speech": "speech"}
_REQUIRED = {"chat": "messages", "completion": "prompt", "embedding": "input"}
_REQUIRED_BY_PATH = {"/chat/completions": "messages", "/completions": "prompt", "/embeddings": "input", "/responses": "input",
                     "/images/generations": "prompt", "/audio/speech": "input"}


# ----------------------------------------------------------------- preparing


def _validate_body(body: Any, field_name: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "you must provide a model parameter", code="missing_model", param="model")
    value = body.get(field_name)
    if value is None or (field_name == "messages" and (not isinstance(value, list) or not value)):
        raise ApiError(400, f"`{field_name}` is required", code="invalid_request", param=field_name)
    if field_name == "input" and isinstance(value, list) and not value:
        raise ApiError(400, "`input` must not be empty", code="invalid_request", param="input")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ApiError(400, "`stream` must be true or false", code="invalid_request", param="stream")
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n"):
        v = body.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ApiError(400, f"`{name}` must be a non-negative integer", code="invalid_request", param=name)
    return body


def rate_card(request: web.Request, end_user_id: str, tier: str, pin: str | None, asset: str = "USD") -> RateCard:
    """The card an end user on `tier` (or pinned to `pin`) pays by; a 500 when the operator's tiers name
    none, or one that prices in another asset than the wallet holds (nothing is charged in the wrong unit)."""
    try:
        card = app_state(request)[RATECARDS].current.card_for(tier, pin)
    except KeyError as exc:
        log.error("no rate card for end user %s: %s", end_user_id, exc)
        raise ApiError(500, "no rate card applies to this end user; the operator must fix its tiers", type="server_error", code="ratecard_missing") from None
    if card.asset != asset:
        log.error("end user %s holds %s but their card %s prices in %s", end_user_id, asset, card.ref, card.asset)
        raise ApiError(500, f"this end user's wallet holds {asset} but their rate card prices in {card.asset}; "
                       "the operator must fix its tiers", type="server_error", code="asset_mismatch")
    return card


def caller_card(request: web.Request, caller: Caller) -> RateCard:
    return rate_card(request, caller.end_user_id, caller.tier, caller.ratecard_pin, caller.asset)


def caller_model(card: RateCard, caller: Caller, name: str, kind: str | None) -> ModelPrice:
    model = card.model(name)
    allowed = caller.scopes.get("models")
    if model is None or (allowed and model.name not in allowed and name not in allowed):
        raise ApiError(404, f"The model `{name}` does not exist or you do not have access to it.", code="model_not_found", param="model")
    if kind is not None and model.kind != kind:
        raise ApiError(400, f"`{name}` is a {model.kind} model and cannot be used on this endpoint", code="wrong_endpoint", param="model")
    return model


def upstream_name(request: web.Request, model: ModelPrice, caller: Caller) -> str:
    """The name of the upstream a call goes to: its model's, or the sandbox's for a test end user."""
    return model.upstream if caller.livemode else app_state(request)[SANDBOX].name


def named_upstream(request: web.Request, name: str, caller: Caller) -> tuple[aiohttp.ClientSession, UpstreamConfig] | None:
    """The session and settings of upstream `name`, if `caller` may reach it: a test end user only the
    sandbox (nothing real is called), a live one only the config's upstreams."""
    app = app_state(request)
    sandbox = app[SANDBOX]
    if not caller.livemode:
        return (app[HTTP][sandbox.name], sandbox.upstream) if name == sandbox.name else None
    upstream = app[CONFIG].upstreams.get(name)
    return (app[HTTP][name], upstream) if upstream is not None else None


def upstream_of(request: web.Request, model: ModelPrice, caller: Caller,
                ) -> tuple[aiohttp.ClientSession, UpstreamConfig, str]:
    """Where a call goes (session, settings, name): its model's upstream, or the sandbox for a
    test end user (nothing real is called)."""
    name = upstream_name(request, model, caller)
    found = named_upstream(request, name, caller)
    if found is None:  # a card naming an upstream the config lacks: refused before any hold
        raise ApiError(502, f"upstream {name!r} of model {model.name!r} is not configured", type="api_error",
                       code="upstream_not_configured")
    return (*found, name)


# Bodies above this are quoted off the event loop, after a cheap wallet read.
# Up to here the estimate costs the loop at most ~3 ms (16 KiB of "aaaa...";
# prose ~0.6 ms); above it, tokenizing (up to `TOKENIZE_BUDGET_CHARS`, ~0.25 s
# on adversarial text) runs in a thread, as tiktoken releases the GIL.
QUOTE_OFF_LOOP_BYTES = 16 * 1024


async def _prepare(request: web.Request, kind: str | None, required: str | None = None, *, cached: bool = False,
                   ) -> tuple[dict[str, Any], Caller, metering.Quote]:
    """The body, the paying caller and the quote. `cached`: the caller's key may come
    from the cache (see `_metered`); a refusal on a cached key that has changed since
    is `StaleCredential`, so that the call is judged again on the key as it is."""
    credential = await identify(request, cached=cached)
    try:
        return await _quote_for(request, credential, kind, required)
    except ApiError:
        stamp = credential.key_stamp if isinstance(credential, Caller) else None
        await app_state(request)[ACCOUNTS].refuse_only_on_a_current_key(stamp)
        raise


async def _quote_for(request: web.Request, credential: Credential, kind: str | None, required: str | None,
                     ) -> tuple[dict[str, Any], Caller, metering.Quote]:
    # The bearer is checked before any body is read: a request without a
    # credential is refused at once and cannot hold a handler by sending its
    # body slowly. Only an operator key needs the body, for its `user`.
    body = await read_json(request)
    body = _validate_body(body, required or _REQUIRED[kind or _kind_of_estimate(body)])
    caller = credential if isinstance(credential, Caller) else await operator_caller(request, body.get("user"), credential)
    card = caller_card(request, caller)
    model = caller_model(card, caller, body["model"], kind)
    check_forwardable(body)  # over-deep JSON is a 400 before anything is counted
    large = len(await request.read()) > QUOTE_OFF_LOOP_BYTES  # aiohttp kept the bytes: no second read
    try:
        if not large:
            return body, caller, metering.quote(card, model, body)
        if kind is not None:
            # Cheap checks first: an empty wallet costs one HMGET, not a tokenizer run.
            wallet = await app_state(request)[WALLETS].get(caller.end_user_id)
            if wallet is not None and wallet.available_micros <= 0:
                notices = app_state(request)[METERING].notices
                if notices is not None:
                    notices.depleted(caller.end_user_id, "refused", model=model.name)
                raise ApiError(
                    402, "You exceeded your current quota: the wallet has no funds available. Top up the wallet to continue.",
                    type="insufficient_quota", code="insufficient_quota",
                )
            try:
                await limits.refuse_spent_credential(app_state(request)[METERING].limits, caller)
            except limits.SpendCapRefusal as exc:
                notices = app_state(request)[METERING].notices
                if notices is not None:
                    notices.spend_cap_reached(caller.end_user_id, caller.key_id, period=exc.period, cap_micros=exc.cap_micros)
                raise
        return body, caller, await asyncio.to_thread(metering.quote, card, model, body)
    except UnpriceableRequest as exc:
        raise ApiError(400, exc.message, code=exc.code, param=exc.param) from None


def _kind_of_estimate(body: Any) -> str:
    if isinstance(body, dict):
        for kind, field_name in _REQUIRED.items():
            if field_name in body:
                return kind
    return "chat"


# ------------------------------------------------------------------ handlers


async def _whole(call: UpstreamCall, lease: Lease, accounts: AccountStore) -> web.StreamResponse:
    async with lease:
        if lease.client_left:
            raise asyncio.CancelledError  # gone before forwarding: the lease releases the hold
        response = await forward_whole(call, lease)
    await _remember_response(accounts, call, lease)
    return response


MAX_SPEECH_CHARACTERS = 4096  # OpenAI's limit for one speech request


# OpenAI keeps a stored response 30 days; so does the record of whose it is.
RESPONSE_OWNER_TTL_SECONDS = 30 * 86_400
_RESPONSE_ID = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


async def _remember_response(accounts: AccountStore, call: UpstreamCall, lease: Lease) -> None:
    """Record whose a stored Responses API answer is, and which upstream (the sandbox for a test
    end user) holds it, so GET /v1/responses/{id} serves it to them alone, from there."""
    rid = lease.response_id
    if rid is None or not _RESPONSE_ID.match(rid) or call.body.get("store") is False:
        return
    try:
        await accounts.remember_response(lease.caller.end_user_id, rid, call.upstream_name, RESPONSE_OWNER_TTL_SECONDS)
    except Exception as exc:  # the answer is paid and delivered; only its later retrieval is lost
        log.warning("request %s: could not record the owner of response %s: %r", lease.request_id, rid, exc)


async def _metered(request: web.Request, path: str) -> web.StreamResponse:
    """A metered call, its key looked up through the cache (one round trip fewer per call).
    The hold checks the cached key's stamp atomically, and any refusal re-checks it; when
    the key changed since, the call is admitted again, once, from a fresh lookup."""
    try:
        return await _metered_call(request, path, cached=True)
    except StaleCredential:
        app_state(request)[ACCOUNTS].forget_cached_key(presented_bearer(request))
        return await _metered_call(request, path, cached=False)


async def _metered_call(request: web.Request, path: str, *, cached: bool) -> web.StreamResponse:
    refuse_when_draining(request)
    kind = _KIND[path]
    body, caller, quote = await _prepare(request, kind, _REQUIRED_BY_PATH[path], cached=cached)
    app = app_state(request)
    if kind == "image" and body.get("stream"):
        raise ApiError(400, "streamed image generation is not supported here; leave `stream` out", code="invalid_request",
                       param="stream")
    if kind == "speech" and (not isinstance(body["input"], str) or not 0 < len(body["input"]) <= MAX_SPEECH_CHARACTERS):
        raise ApiError(400, f"`input` must be text of 1 to {MAX_SPEECH_CHARACTERS} characters", code="invalid_request",
                       param="input")
    stream = bool(body.get("stream")) and kind not in ("embedding", "speech")
    call = UpstreamCall(*upstream_of(request, quote.model, caller), path, body, stream)
    service = app[METERING]
    lease = service.lease(
        caller, quote, new_id("req_"),
        min_output_tokens=app[RATECARDS].current.min_output_tokens(caller.tier), choices=billed_choices(body),  # a clamp is per choice
    )
    observability.call_started(request, lease)
    if stream or kind == "speech":  # relayed as it comes, under the handler (a client gone cancels it)
        async with lease:
            try:
                response = await (forward_speech if kind == "speech" else forward_stream)(request, call, lease)
            except asyncio.CancelledError:
                if app[LIFECYCLE].draining:  # cut by shutdown past its grace, not by its client
                    lease.outcome = "shutdown"
                raise
        await _remember_response(app[ACCOUNTS], call, lease)
        return response
    return await answer_whole(service, lease, _whole(call, lease, app[ACCOUNTS]))


async def answer_whole(service: Metering, lease: Lease, work: Coroutine[Any, Any, web.StreamResponse]) -> web.StreamResponse:
    """A whole answer is read and billed even if the client leaves while it is generated (the
    provider bills it either way), so `work` runs in a task the handler's cancellation does not reach."""
    try:
        return await service.background.answer(work)
    except asyncio.CancelledError:
        lease.client_left = True
        if lease.outcome == "completed":
            lease.outcome = "client_disconnected"
        raise


def refuse_when_draining(request: web.Request) -> None:
    """SIGTERM: no new call is admitted, so no hold is opened that shutdown could strand."""
    if app_state(request)[LIFECYCLE].draining:
        raise ApiError(503, "metergate is shutting down; retry on another replica", type="api_error",
                       code="shutting_down", headers={"Retry-After": "1"})


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _metered(request, "/chat/completions")


@routes.post("/v1/responses")
async def responses(request: web.Request) -> web.StreamResponse:
    """OpenAI's Responses API (the SDK's `responses.create` / `responses.stream`), metered as chat is."""
    return await _metered(request, "/responses")


@routes.get("/v1/responses/{response_id}")
async def retrieve_response(request: web.Request) -> web.StreamResponse:
    """A stored response (the SDK's `responses.retrieve`), for the end user who created it only; free."""
    caller = await authenticate(request, None)
    rid = request.match_info["response_id"]
    app = app_state(request)
    name = await app[ACCOUNTS].response_upstream(caller.end_user_id, rid) if _RESPONSE_ID.match(rid) else None
    found = named_upstream(request, name, caller) if name is not None else None
    if found is None:
        raise ApiError(404, f"No response with id '{rid}' found.", code="response_not_found", param="response_id")
    return await fetch_stored(*found, f"/responses/{rid}", request.query_string)


@routes.post("/v1/images/generations")
async def image_generations(request: web.Request) -> web.StreamResponse:
    """Images (the SDK's `images.generate`): held for `n` images at the card's price for the size and quality."""
    return await _metered(request, "/images/generations")


@routes.post("/v1/audio/speech")
async def speech(request: web.Request) -> web.StreamResponse:
    """Speech (the SDK's `audio.speech.create`): billed per character of `input`; the audio relayed as it comes."""
    return await _metered(request, "/audio/speech")


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _metered(request, "/completions")


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _metered(request, "/embeddings")


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    caller = await authenticate(request, None)
    card = caller_card(request, caller)
    allowed = caller.scopes.get("models")
    data = [
        {"id": m.name, "object": "model", "created": 0, "owned_by": m.upstream}
        for m in card.models.values() if not allowed or m.name in allowed
    ]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


@routes.get("/v1/models/{model:.+}")
async def retrieve_model(request: web.Request) -> web.Response:
    """One model (the SDK's `models.retrieve`): what the caller may call under that name, else a 404."""
    caller = await authenticate(request, None)
    name = request.match_info["model"]
    found = caller_model(caller_card(request, caller), caller, name, None)
    return web.Response(content_type="application/json", body=orjson.dumps(
        {"id": name, "object": "model", "created": 0, "owned_by": found.upstream}))


@routes.post("/v1/estimate")
async def estimate(request: web.Request) -> web.Response:
    """A pre-flight quote for a request body: what would be held, and whether the wallet affords it."""
    body, caller, quote = await _prepare(request, None)
    wallet = await app_state(request)[WALLETS].get(caller.end_user_id)
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
    wallets = app_state(request)[WALLETS]
    state = await wallets.get(caller.end_user_id)
    if state is None:
        raise ApiError(404, "no wallet for this end user", code="wallet_not_found")
    recent = await wallets.ledger(caller.end_user_id, limit=10)
    view = WalletView.of(state, caller.asset).model_dump()
    budget = await budget_view(app_state(request)[METERING].budgets, BudgetStore(wallets.commands), caller.end_user_id,
                               caller.tier, caller.budget)
    view["budget"] = budget.model_dump() if budget is not None else None
    view["recent"] = [
        {"id": e.id, "type": e.type, "amount_micros": e.amount_micros, "amount": usd(e.amount_micros),
         "model": e.details.get("model"), "request_id": e.details.get("request_id")}
        for e in recent
    ]
    return web.Response(body=orjson.dumps(view), content_type="application/json")
