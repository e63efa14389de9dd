"""CORS on /v1/*: listed origins get preflights answered and readable responses; others get nothing and pay nothing."""

from __future__ import annotations

import pytest

from proxy.app import create_app
from proxy.config import load_config
from tests.conftest import ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.mock_upstream import make_usage

ALLOWED = "https://app.example.com"
OTHER = "https://evil.example.net"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}


@pytest.fixture
def make_gateway(aiohttp_client, redis_server, redis, mock_upstream, monkeypatch):
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    mock_upstream.usage_override = make_usage(200, 40)

    async def make(origins):
        config = load_config(
            redis_url=redis_server.url, admin_keys=[ADMIN_KEY], operator_keys=[OPERATOR_KEY], cors_origins=origins,
            upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV}},
        )
        return await aiohttp_client(create_app(config))

    return make


@pytest.fixture
async def client(make_gateway):
    return await make_gateway([ALLOWED])


def preflight(origin: str, method: str = "POST", headers: str = "authorization, content-type") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers}


def auth(key: str, origin: str | None = ALLOWED) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **({"Origin": origin} if origin else {})}


async def test_preflight_from_a_listed_origin_is_answered(client):
    resp = await client.options("/v1/chat/completions", headers=preflight(ALLOWED))
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    allowed_headers = resp.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert "Origin" in resp.headers["Vary"]


async def test_preflight_from_an_unlisted_origin_gets_no_cors_headers(client):
    resp = await client.options("/v1/chat/completions", headers=preflight(OTHER))
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert (await resp.json())["error"]["code"] == "origin_not_allowed"


async def test_response_to_a_listed_origin_is_readable_with_its_headers(client, make_end_user):
    user = await make_end_user()
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=auth(user.key))
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
    exposed = {h.strip().lower() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-usage-cost", "x-wallet-balance", "x-request-id", "x-total-tokens", "x-model", "retry-after"} <= exposed


async def test_streamed_response_to_a_listed_origin_is_readable(client, make_end_user, wallets):
    user = await make_end_user()
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(user.key))
    assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "x-request-id" in resp.headers["Access-Control-Expose-Headers"].lower()
    assert b"data: [DONE]" in await resp.read()
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 68


async def test_errors_to_a_listed_origin_are_readable(client):
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=auth("sk-eu_wrong"))
    assert resp.status == 401
    assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_wallet_is_readable_from_a_listed_origin(client, make_end_user):
    user = await make_end_user()
    resp = await client.get("/v1/wallet", headers=auth(user.key))
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_request_from_an_unlisted_origin_is_refused_and_free(client, make_end_user, wallets, mock_upstream):
    user = await make_end_user()
    before = await wallets.get("u_1"), len(await wallets.ledger("u_1"))
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=auth(user.key, OTHER))
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert (await wallets.get("u_1"), len(await wallets.ledger("u_1"))) == before
    assert mock_upstream.request_count == 0


async def test_requests_without_an_origin_are_not_affected(client, make_end_user):
    user = await make_end_user()
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=auth(user.key, None))
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_no_origin_is_served_when_none_is_configured(make_gateway, make_end_user, mock_upstream):
    client = await make_gateway([])
    user = await make_end_user()
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=auth(user.key))
    assert resp.status == 403 and mock_upstream.request_count == 0


async def test_star_allows_any_origin(make_gateway, make_end_user):
    client = await make_gateway(["*"])
    user = await make_end_user()
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=auth(user.key, OTHER))
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == OTHER


async def test_admin_api_is_never_cors_enabled(client):
    resp = await client.options("/admin/end-users", headers=preflight(ALLOWED))
    assert "Access-Control-Allow-Origin" not in resp.headers
