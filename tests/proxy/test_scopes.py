"""Scoped sk-eu_ keys: models, expiry, rate and spend limits, PATCH and revocation.

Every refusal is checked for its status, its OpenAI-shaped body, that nothing
reached the upstream, and that the wallet's balance, holds and ledger did not
change. CHAT holds 77 micros (prompt + 100 output tokens at gpt-4o-mini's
prices); the mock's usage is set to 200 + 40 tokens, which costs 68 micros.
"""

from __future__ import annotations

import time

import pytest

from proxy.app import create_app
from proxy.store import LimitStore
from tests.conftest import ADMIN, OPERATOR_KEY, money_ledger
from tests.mock_upstream import make_usage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}
HOLD = 77  # what CHAT holds: see test_chat_holds_what_these_tests_assume
COST = 68  # 200 x 0.1875 + 40 x 0.75 = 67.5, rounded up


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def scoped_key(gateway, user_id: str = "u_1", **scopes) -> dict:
    resp = await gateway.post(f"/admin/end-users/{user_id}/keys", json={"name": "web", **scopes}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def snapshot(wallets, user_id: str = "u_1"):
    state = await wallets.get(user_id)
    return state.balance_micros, state.held_micros, [e.id for e in await money_ledger(wallets, user_id)]


async def chat(gateway, key: str, body: dict = CHAT):
    return await gateway.post("/v1/chat/completions", json=body, headers=bearer(key))


async def assert_refused(resp, status: int, code: str, type_: str | None = None) -> dict:
    body = await resp.json()
    assert resp.status == status, body
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    if type_ is not None:
        assert body["error"]["type"] == type_
    return body


@pytest.fixture(autouse=True)
def priced_usage(mock_upstream):
    mock_upstream.usage_override = make_usage(200, 40)


async def test_chat_holds_what_these_tests_assume(gateway, make_end_user):
    user = await make_end_user()
    resp = await gateway.post("/v1/estimate", json=CHAT, headers=bearer(user.key))
    assert (await resp.json())["estimated_cost_micros"] == HOLD


# ------------------------------------------------------------------ admin API


async def test_create_key_with_limits_shows_them(gateway, make_end_user):
    await make_end_user()
    key = await scoped_key(
        gateway, models=["gpt-4o-mini"], max_spend_micros=5_000_000, max_daily_spend_micros=1_000_000,
        requests_per_minute=60, tokens_per_minute=10_000, expires_ms=4_102_444_800_000,
    )
    assert key["key"].startswith("sk-eu_")
    assert (key["models"], key["max_spend_micros"], key["max_daily_spend_micros"]) == (["gpt-4o-mini"], 5_000_000, 1_000_000)
    assert (key["requests_per_minute"], key["tokens_per_minute"], key["expires_ms"]) == (60, 10_000, 4_102_444_800_000)
    assert (key["spent_micros"], key["spent_today_micros"], key["expired"]) == (0, 0, False)


async def test_patch_changes_only_the_fields_sent(gateway, make_end_user):
    await make_end_user()
    key = await scoped_key(gateway, requests_per_minute=60, max_spend_micros=1000)
    resp = await gateway.patch(f"/admin/end-users/u_1/keys/{key['id']}", json={"name": "mobile", "max_spend_micros": 2000}, headers=ADMIN)
    view = await resp.json()
    assert resp.status == 200, view
    assert (view["name"], view["max_spend_micros"], view["requests_per_minute"]) == ("mobile", 2000, 60)


async def test_patch_with_null_removes_a_limit(gateway, make_end_user):
    await make_end_user()
    key = await scoped_key(gateway, requests_per_minute=60, max_spend_micros=1000)
    resp = await gateway.patch(f"/admin/end-users/u_1/keys/{key['id']}", json={"requests_per_minute": None}, headers=ADMIN)
    view = await resp.json()
    assert view["requests_per_minute"] is None and view["max_spend_micros"] == 1000


@pytest.mark.parametrize("body", [
    {"requests_per_minute": 0}, {"max_spend_micros": -1}, {"max_spend_micros": 1.5}, {"models": []},
    {"tokens_per_minute": "10"}, {"rpm": 5},
])
async def test_patch_rejects_bad_limits(gateway, make_end_user, body):
    await make_end_user()
    key = await scoped_key(gateway)
    resp = await gateway.patch(f"/admin/end-users/u_1/keys/{key['id']}", json=body, headers=ADMIN)
    await assert_refused(resp, 400, "invalid_request")


async def test_patch_of_an_unknown_key_is_404(gateway, make_end_user):
    await make_end_user()
    resp = await gateway.patch("/admin/end-users/u_1/keys/key_nope", json={"name": "x"}, headers=ADMIN)
    await assert_refused(resp, 404, "key_not_found")


async def test_patch_takes_effect_on_the_next_request(gateway, make_end_user, wallets):
    await make_end_user()
    key = await scoped_key(gateway)
    assert (await chat(gateway, key["key"])).status == 200
    await gateway.patch(f"/admin/end-users/u_1/keys/{key['id']}", json={"models": ["gpt-4o"]}, headers=ADMIN)
    before = await snapshot(wallets)
    await assert_refused(await chat(gateway, key["key"]), 404, "model_not_found")
    assert await snapshot(wallets) == before


# ------------------------------------------------------------ authentication


async def test_model_outside_the_key_scope_is_404_and_free(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway, models=["gpt-4o"])
    before = await snapshot(wallets)
    await assert_refused(await chat(gateway, key["key"]), 404, "model_not_found")
    assert await snapshot(wallets) == before and mock_upstream.request_count == 0


async def test_models_list_shows_only_the_key_scope(gateway, make_end_user):
    await make_end_user()
    key = await scoped_key(gateway, models=["gpt-4o"])
    resp = await gateway.get("/v1/models", headers=bearer(key["key"]))
    assert [m["id"] for m in (await resp.json())["data"]] == ["gpt-4o"]


async def test_expired_key_is_401_and_free(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway, expires_ms=int(time.time() * 1000) - 1)
    before = await snapshot(wallets)
    await assert_refused(await chat(gateway, key["key"]), 401, "invalid_api_key")
    assert await snapshot(wallets) == before and mock_upstream.request_count == 0


async def test_key_before_its_expiry_works(gateway, make_end_user):
    await make_end_user()
    key = await scoped_key(gateway, expires_ms=int(time.time() * 1000) + 60_000)
    assert (await chat(gateway, key["key"])).status == 200


async def test_revoked_key_is_401_and_free(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway)
    await gateway.delete(f"/admin/end-users/u_1/keys/{key['id']}", headers=ADMIN)
    before = await snapshot(wallets)
    await assert_refused(await chat(gateway, key["key"]), 401, "invalid_api_key")
    assert await snapshot(wallets) == before and mock_upstream.request_count == 0


async def test_revocation_reaches_every_replica_on_the_next_request(aiohttp_client, gateway, gateway_config, make_end_user, wallets):
    other_replica = await aiohttp_client(create_app(gateway_config))
    await make_end_user()
    key = await scoped_key(gateway)
    assert (await chat(other_replica, key["key"])).status == 200
    await gateway.delete(f"/admin/end-users/u_1/keys/{key['id']}", headers=ADMIN)
    before = await snapshot(wallets)
    await assert_refused(await chat(other_replica, key["key"]), 401, "invalid_api_key")
    assert await snapshot(wallets) == before


# --------------------------------------------------------------- rate limits


async def test_requests_over_the_per_minute_limit_are_429_and_free(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway, requests_per_minute=2)
    assert (await chat(gateway, key["key"])).status == 200
    assert (await chat(gateway, key["key"])).status == 200
    before = await snapshot(wallets)
    resp = await chat(gateway, key["key"])
    await assert_refused(resp, 429, "rate_limit_exceeded", "requests")
    assert 1 <= int(resp.headers["Retry-After"]) <= 120
    assert resp.headers["X-RateLimit-Limit-Requests"] == "2"
    assert await snapshot(wallets) == before and mock_upstream.request_count == 2


async def test_request_limit_is_per_key(gateway, make_end_user):
    await make_end_user()
    first = await scoped_key(gateway, requests_per_minute=1)
    second = await scoped_key(gateway, requests_per_minute=1)
    assert (await chat(gateway, first["key"])).status == 200
    assert (await chat(gateway, second["key"])).status == 200


async def test_request_limit_counts_across_replicas(aiohttp_client, gateway, gateway_config, make_end_user):
    other_replica = await aiohttp_client(create_app(gateway_config))
    await make_end_user()
    key = await scoped_key(gateway, requests_per_minute=1)
    assert (await chat(gateway, key["key"])).status == 200
    await assert_refused(await chat(other_replica, key["key"]), 429, "rate_limit_exceeded")


async def test_call_whose_token_bound_exceeds_the_per_minute_limit_is_429_and_free(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway, tokens_per_minute=50)  # CHAT may use prompt + 100 tokens
    before = await snapshot(wallets)
    await assert_refused(await chat(gateway, key["key"]), 429, "rate_limit_exceeded", "tokens")
    assert await snapshot(wallets) == before and mock_upstream.request_count == 0


async def test_tokens_per_minute_are_corrected_to_real_usage_at_settlement(gateway, make_end_user, mock_upstream):
    mock_upstream.usage_override = make_usage(5, 5)
    await make_end_user()
    # Each CHAT is admitted at ~110 tokens and settles at 10: two fit in 150
    # only because the first was corrected down.
    key = await scoped_key(gateway, tokens_per_minute=150)
    assert (await chat(gateway, key["key"])).status == 200
    assert (await chat(gateway, key["key"])).status == 200
    await assert_refused(await chat(gateway, key["key"], {**CHAT, "max_tokens": 140}), 429, "rate_limit_exceeded", "tokens")


# --------------------------------------------------------------- spend limits


async def test_call_whose_hold_exceeds_the_lifetime_cap_is_402_and_free(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway, max_spend_micros=HOLD - 1)
    before = await snapshot(wallets)
    await assert_refused(await chat(gateway, key["key"]), 402, "spend_limit_exceeded", "insufficient_quota")
    assert await snapshot(wallets) == before and mock_upstream.request_count == 0


async def test_lifetime_cap_counts_what_was_captured(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway, max_spend_micros=COST + HOLD - 1)
    assert (await chat(gateway, key["key"])).status == 200
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - COST
    before = await snapshot(wallets)
    await assert_refused(await chat(gateway, key["key"]), 402, "spend_limit_exceeded")
    assert await snapshot(wallets) == before and mock_upstream.request_count == 1


async def test_key_view_shows_spend_to_the_micro(gateway, make_end_user):
    await make_end_user()
    key = await scoped_key(gateway, max_spend_micros=1_000_000)
    await chat(gateway, key["key"])
    await chat(gateway, key["key"])
    listed = await (await gateway.get("/admin/end-users/u_1/keys", headers=ADMIN)).json()
    view = next(k for k in listed["data"] if k["id"] == key["id"])
    assert (view["spent_micros"], view["spent_today_micros"]) == (2 * COST, 2 * COST)


async def test_a_cap_set_later_counts_what_the_key_spent_without_limits(gateway, make_end_user, wallets, mock_upstream):
    # A key with no limits settles by its spend alone (no token window): that spend is what a
    # cap set afterwards starts from.
    await make_end_user()
    key = await scoped_key(gateway)
    for _ in range(2):
        assert (await chat(gateway, key["key"])).status == 200
    listed = await (await gateway.get("/admin/end-users/u_1/keys", headers=ADMIN)).json()
    view = next(k for k in listed["data"] if k["id"] == key["id"])
    assert (view["spent_micros"], view["spent_today_micros"]) == (2 * COST, 2 * COST)
    resp = await gateway.patch(f"/admin/end-users/u_1/keys/{key['id']}", json={"max_spend_micros": 2 * COST + HOLD - 1},
                               headers=ADMIN)
    assert resp.status == 200, await resp.text()
    before = await snapshot(wallets)
    await assert_refused(await chat(gateway, key["key"]), 402, "spend_limit_exceeded")
    assert await snapshot(wallets) == before and mock_upstream.request_count == 2


async def test_lifetime_cap_raised_by_patch_admits_again(gateway, make_end_user):
    await make_end_user()
    key = await scoped_key(gateway, max_spend_micros=COST + HOLD - 1)
    await chat(gateway, key["key"])
    await gateway.patch(f"/admin/end-users/u_1/keys/{key['id']}", json={"max_spend_micros": COST + HOLD}, headers=ADMIN)
    assert (await chat(gateway, key["key"])).status == 200


async def test_call_over_the_daily_cap_is_402_and_free(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway, max_daily_spend_micros=COST + HOLD - 1, max_spend_micros=1_000_000)
    assert (await chat(gateway, key["key"])).status == 200
    before = await snapshot(wallets)
    body = await assert_refused(await chat(gateway, key["key"]), 402, "spend_limit_exceeded", "insufficient_quota")
    assert "daily" in body["error"]["message"]
    assert await snapshot(wallets) == before and mock_upstream.request_count == 1


async def test_spend_cap_sees_calls_still_in_flight(gateway, make_end_user, wallets, mock_upstream):
    """Two concurrent calls cannot both pass a cap that fits one hold."""
    import asyncio

    await make_end_user()
    mock_upstream.first_byte_delay = 0.3
    key = await scoped_key(gateway, max_spend_micros=HOLD + HOLD // 2)
    first, second = await asyncio.gather(chat(gateway, key["key"]), chat(gateway, key["key"]))
    assert sorted([first.status, second.status]) == [200, 402]
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - COST


async def test_wallet_refusal_leaves_the_key_spend_untouched(gateway, make_end_user, wallets):
    await make_end_user(funds=HOLD - 1)
    key = await scoped_key(gateway, max_spend_micros=1_000_000, requests_per_minute=100)
    await assert_refused(await chat(gateway, key["key"]), 402, "insufficient_quota")
    assert (await LimitStore(wallets.redis).spend("u_1", key["id"])).spent_micros == 0
    assert (await wallets.get("u_1")).held_micros == 0


async def test_upstream_failure_leaves_the_key_spend_untouched(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    mock_upstream.fail_status = 500
    key = await scoped_key(gateway, max_spend_micros=1_000_000)
    assert (await chat(gateway, key["key"])).status == 502
    assert (await LimitStore(wallets.redis).spend("u_1", key["id"])).spent_micros == 0


async def test_streamed_call_counts_its_capture_against_the_cap(gateway, make_end_user, wallets):
    await make_end_user()
    key = await scoped_key(gateway, max_spend_micros=1_000_000)
    resp = await chat(gateway, key["key"], {**CHAT, "stream": True})
    await resp.read()
    assert (await LimitStore(wallets.redis).spend("u_1", key["id"])).spent_micros == COST


async def test_operator_calls_are_not_limited_by_any_key(gateway, make_end_user):
    await make_end_user()
    await scoped_key(gateway, requests_per_minute=1, max_spend_micros=0)
    for _ in range(2):
        resp = await gateway.post("/v1/chat/completions", json={**CHAT, "user": "u_1"}, headers=bearer(OPERATOR_KEY))
        assert resp.status == 200


async def test_openapi_describes_key_limits_and_patch(gateway):
    doc = await (await gateway.get("/openapi.json")).json()
    patch = doc["paths"]["/admin/end-users/{id}/keys/{key_id}"]["patch"]
    assert patch["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/UpdateKey")
    for name in ("models", "max_spend_micros", "max_daily_spend_micros", "requests_per_minute", "tokens_per_minute", "expires_ms"):
        assert name in doc["components"]["schemas"]["CreateKey"]["properties"]
        assert name in doc["components"]["schemas"]["KeyView"]["properties"]
