"""Who is calling and whose wallet pays: an `sk-eu_` key, an end-user JWT, or an operator key plus `user`."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pricing.values import value
from proxy.appstate import ACCOUNTS, CONFIG, WALLETS, app_state
from proxy.enduser_jwt import TOKENS, looks_like_jwt
from proxy.errors import ApiError
from proxy.store import API_KEY_PREFIX, TEST_KEY_PREFIX, KeyStamp


@value
class Caller:
    """The end user a request is billed to, and the credential that proved it."""

    end_user_id: str
    key_id: str  # the sk-eu_ key id, or "operator"
    tier: str
    ratecard_pin: str | None
    scopes: Mapping[str, Any] = field(default_factory=dict)
    # The end user's own budget terms (proxy/budgets.py), when the operator set one.
    budget: Mapping[str, Any] | None = None
    asset: str = "USD"  # what the wallet holds (its card must price in it)
    livemode: bool = True  # False: a test end user, whose calls go to the sandbox (proxy/sandbox.py)
    # The version of the key a cached lookup saw (metered calls only): the hold checks it.
    key_stamp: KeyStamp | None = None


def presented_bearer(request: web.Request) -> str:
    """The token of an `Authorization: Bearer ...` header, or "" when there is none."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def bearer_token(request: web.Request) -> str:
    token = presented_bearer(request)
    if not token:
        raise ApiError(
            401, "no API key provided: send Authorization: Bearer sk-eu_... (or an operator key with `user`)",
            code="invalid_api_key",
        )
    return token


def _invalid_key() -> ApiError:
    return ApiError(401, "incorrect API key provided", code="invalid_api_key")


async def _profile_caller(request: web.Request, end_user_id: str, key_id: str, scopes: Mapping[str, Any],
                          key_stamp: KeyStamp | None = None) -> Caller | None:
    state = app_state(request)
    profile = await state[WALLETS].profile(end_user_id, max_age_seconds=state[CONFIG].profile_cache_seconds)
    if profile is None:
        return None
    return Caller(end_user_id, key_id, profile.get("tier") or "default", profile.get("ratecard"), scopes,
                  budget=profile.get("budget"), asset=profile.get("asset") or "USD",
                  livemode=profile.get("livemode", True) is not False, key_stamp=key_stamp)


@dataclass(frozen=True)
class OperatorKey:
    """A recognised operator key: the paying end user is named by the request's `user`."""

    livemode: bool = True  # an operator test key acts on test end users only


Credential = Caller | OperatorKey


def key_matches(presented: str, keys: Iterable[str]) -> bool:
    """Whether `presented` is one of `keys`, compared in constant time.

    As bytes: `hmac.compare_digest` raises on a non-ASCII str, and a hostile
    header must be a 401, never a 500. `surrogateescape` because aiohttp
    decodes header bytes that are not UTF-8 that way.
    """
    candidate = presented.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(candidate, k.encode("utf-8", "surrogateescape")) for k in keys)


async def _key_caller(request: web.Request, token: str, *, cached: bool) -> Caller:
    accounts = app_state(request)[ACCOUNTS]
    if cached:
        found = await accounts.find_key_cached(token)
        key, stamp = found if found is not None else (None, None)
    else:
        key, stamp = await accounts.find_key(token), None
    if key is None or key.revoked:
        raise _invalid_key()
    expires_ms = key.scopes.get("expires_ms")
    if expires_ms is not None and expires_ms <= time.time() * 1000:
        raise ApiError(401, "this API key has expired", code="invalid_api_key")
    caller = await _profile_caller(request, key.end_user_id, key.id, key.scopes, stamp)
    if caller is None:
        raise _invalid_key()
    if token.startswith(TEST_KEY_PREFIX) == caller.livemode:
        # Minted to match its end user's mode, so this is a forgery or a bug: never let it cross.
        raise ApiError(401, "this key's mode (test or live) is not its end user's", code="invalid_api_key")
    return caller


async def identify(request: web.Request, *, cached: bool = False) -> Credential:
    """What the bearer proves, from the header alone, or a 401 in OpenAI's shape.

    Never reads the body: a request without a valid credential is refused
    before its body is read, so it cannot hold a handler open by sending one slowly.
    `cached`: an `sk-eu_` key may come from this process's cache, with the stamp
    its hold checks (the metered path, which retries on `StaleCredential`).
    """
    token = bearer_token(request)
    # `sk-eu_` keys and JWTs are ASCII by construction; anything else can only
    # be an operator key (compared as bytes below) and must not reach the
    # key hashing or the JWT parser, which choke on undecodable text.
    if token.isascii() and token.startswith(API_KEY_PREFIX):
        if cached:
            try:
                return await _key_caller(request, token, cached=True)
            except ApiError:
                # A cached copy only ever says yes: a refusal is made on the key as stored now.
                # A key the cache never held (unknown: a guess) was just read fresh; read it once.
                if not app_state(request)[ACCOUNTS].forget_cached_key(token):
                    raise
        return await _key_caller(request, token, cached=False)
    if key_matches(token, app_state(request)[CONFIG].operator_keys):
        return OperatorKey()
    if key_matches(token, app_state(request)[CONFIG].operator_test_keys):
        return OperatorKey(livemode=False)
    if token.isascii() and looks_like_jwt(token):
        authority = app_state(request).get(TOKENS)
        if authority is None:
            raise _invalid_key()
        verified = authority.verify(token)
        caller = await _profile_caller(request, verified.end_user_id, verified.key_id, verified.scopes)
        if caller is None:
            raise ApiError(401, "invalid token: its end user does not exist", code="invalid_token")
        return caller
    raise _invalid_key()


async def operator_caller(request: web.Request, user: Any, operator: OperatorKey) -> Caller:
    """The end user an operator key names in `user`, or a 400 saying what is wrong with it
    (a 403 when a test key names a live end user, or a live key a test one)."""
    if not isinstance(user, str) or not user:
        raise ApiError(400, "an operator key must name the paying end user in `user`", code="missing_user", param="user")
    caller = await _profile_caller(request, user, "operator", {})
    if caller is None:
        raise ApiError(400, f"no end user {user!r}", code="unknown_end_user", param="user")
    # `operator` is required, not defaulted: a route that forgot it would take a test key for a live one.
    livemode = operator.livemode
    if caller.livemode != livemode:
        mode = "a test" if not livemode else "a live"
        raise ApiError(403, f"{mode} operator key can only act on {'test' if not livemode else 'live'} end users",
                       type="invalid_request_error", code="livemode_mismatch", param="user")
    return caller


async def authenticate(request: web.Request, body: Mapping[str, Any] | None) -> Caller:
    """The paying end user, or a 401/400 in OpenAI's shape. `body` (else the query) carries `user` for operator calls."""
    credential = await identify(request)
    if isinstance(credential, Caller):
        return credential
    return await operator_caller(request, body.get("user") if body is not None else request.query.get("user"), credential)
