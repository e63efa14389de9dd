"""How many calls can be at an upstream at once: each upstream's own `max_connections` (default 4096),
not a hidden per-host cap. Counted at the mock upstream, which answers none until the test lets it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.app import create_app
from proxy.config import Config, load_config
from tests.conftest import ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.mock_upstream import MockUpstream

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}


def config_with(redis_server, mock_upstream: MockUpstream, **upstream) -> Config:
    return load_config(
        redis_url=redis_server.url, admin_keys=[ADMIN_KEY], operator_keys=[OPERATOR_KEY],
        upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV, **upstream}},
    )


async def reaching_the_upstream_at_once(aiohttp_client, config: Config, mock_upstream: MockUpstream, key: str,
                                        calls: int, expected: int) -> None:
    """Start `calls` streams while the upstream answers none: exactly `expected` reach it; then all complete."""
    gateway = await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})
    gate = mock_upstream.first_byte_gate = asyncio.Event()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one() -> int:
            async with http.post(str(gateway.make_url("/v1/chat/completions")), json=BODY,
                                 headers={"Authorization": f"Bearer {key}"}) as response:
                await response.read()
                return response.status

        calls_running = asyncio.gather(*(one() for _ in range(calls)))
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while len(mock_upstream.requests) < expected:
                assert asyncio.get_running_loop().time() < deadline, (
                    f"only {len(mock_upstream.requests)} of {expected} calls reached the upstream")
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # any beyond the cap would have arrived by now
            assert len(mock_upstream.requests) == expected
        finally:
            gate.set()  # pass or fail, every call ends and settles before the ledger audit
            statuses = await calls_running
        assert statuses == [200] * calls


@pytest.fixture
def upstream_key(monkeypatch) -> None:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)


async def test_by_default_300_streams_reach_the_upstream_at_once(aiohttp_client, redis_server, mock_upstream,
                                                                 make_end_user, upstream_key):
    user = await make_end_user(funds=100_000_000)
    config = config_with(redis_server, mock_upstream)

    await reaching_the_upstream_at_once(aiohttp_client, config, mock_upstream, user.key, 300, expected=300)


async def test_an_upstreams_max_connections_caps_the_calls_at_it(aiohttp_client, redis_server, mock_upstream,
                                                                make_end_user, upstream_key):
    user = await make_end_user(funds=100_000_000)
    config = config_with(redis_server, mock_upstream, max_connections=3)

    await reaching_the_upstream_at_once(aiohttp_client, config, mock_upstream, user.key, 6, expected=3)


async def test_a_cookie_an_upstream_sets_is_never_sent_on_a_later_call(aiohttp_client, redis_server, mock_upstream,
                                                                       make_end_user, upstream_key):
    # One session per upstream serves every end user: a cookie jar would hand one user's
    # upstream cookie (a rate-limit or bot-check token, say) to the next user's call.
    # Reached by name: aiohttp's jar takes no cookie from an IP address, a real upstream's from its host.
    config = config_with(redis_server, mock_upstream, base_url=mock_upstream.base_url.replace("127.0.0.1", "localhost"))
    gateway = await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})
    first, second = await make_end_user("u_1"), await make_end_user("u_2")
    mock_upstream.fail_status, mock_upstream.fail_count = 429, 1
    mock_upstream.fail_headers = {"Set-Cookie": "__cf_bm=from-u_1; Path=/; HttpOnly"}
    body = {**BODY, "stream": False}
    async with aiohttp.ClientSession() as http:
        for user, status in ((first, 429), (second, 200)):
            async with http.post(str(gateway.make_url("/v1/chat/completions")), json=body,
                                 headers={"Authorization": f"Bearer {user.key}"}) as response:
                assert response.status == status, await response.text()
    assert len(mock_upstream.requests) == 2
    assert "Cookie" not in mock_upstream.requests[-1].headers
