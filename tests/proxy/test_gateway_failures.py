"""How metered calls end when something goes wrong: each pays for what it consumed, no more."""

from __future__ import annotations

import asyncio

import openai
import orjson
import pytest

from pricing import Usage, count_text_tokens, estimate_prompt_tokens, price_usage
from tests.mock_upstream import make_usage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 200}


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def wait_settled(wallets, user_id: str) -> None:
    for _ in range(200):
        if (await wallets.get(user_id)).held_micros == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the hold was never settled or released")


def gpt4o_mini(gateway):
    from proxy.appstate import RATECARDS

    return gateway.server.app[RATECARDS].current.card_for("default").model("gpt-4o-mini")


async def ledger_types(wallets, user_id: str) -> list[str]:
    return [e.type for e in reversed(await wallets.ledger(user_id, limit=100))]


async def test_client_disconnect_mid_stream_pays_for_what_it_consumed(base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.reply_words = 50
    mock_upstream.chunk_delay = 0.05
    received = []
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received.append(chunk.choices[0].delta.content)
        if len(received) == 5:
            break
    await stream.close()
    assert await mock_upstream.wait_disconnected(timeout=5), "the upstream connection was not closed"
    await wait_settled(wallets, "u_1")

    charge = next(e for e in await wallets.ledger("u_1") if e.type == "charge")
    d = charge.details
    seen = sum(count_text_tokens(p) for p in received)
    full = sum(count_text_tokens(f"word{i} ") for i in range(50))
    assert d["outcome"] == "client_disconnected" and d["usage_source"] == "counted"
    assert d["prompt_tokens"] == estimate_prompt_tokens(CHAT)
    # What the proxy relayed: at least what the client read, at most one chunk
    # in flight beyond it, and far from the whole reply.
    assert seen <= d["completion_tokens"] <= seen + 2 < full
    expected = price_usage(gpt4o_mini(gateway), Usage(prompt_tokens=d["prompt_tokens"], completion_tokens=d["completion_tokens"]))
    assert -charge.amount_micros == expected.price_micros == d["price_micros"]
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - expected.price_micros
    assert mock_upstream.streams_completed == 0


async def test_upstream_500_before_first_byte_releases_the_hold_and_answers_502(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.fail_status = 500
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(base_url, user.key).chat.completions.create(**CHAT)
    assert err.value.status_code == 502
    assert err.value.body["code"] == "upstream_error" and err.value.body["message"]
    assert (await wallets.get("u_1")).balance_micros == 10_000_000
    assert await ledger_types(wallets, "u_1") == ["open", "top_up", "release"]


async def test_upstream_500_on_a_stream_releases_the_hold(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.fail_status = 500
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
    assert err.value.status_code == 502
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


async def test_upstream_429_is_passed_through_with_retry_after_and_no_charge(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.fail_status = 429
    with pytest.raises(openai.RateLimitError) as err:
        await sdk(base_url, user.key).chat.completions.create(**CHAT)
    assert err.value.response.headers["Retry-After"] == "1"
    assert (await wallets.get("u_1")).balance_micros == 10_000_000
    assert await ledger_types(wallets, "u_1") == ["open", "top_up", "release"]


async def test_unreachable_upstream_is_502_and_no_charge(gateway, make_end_user, mock_upstream, wallets):
    from proxy.appstate import CONFIG

    user = await make_end_user()
    config = gateway.server.app[CONFIG]
    dead = config.upstreams["openai"].model_copy(update={"base_url": "http://127.0.0.1:9/v1"})
    object.__setattr__(config, "upstreams", {"openai": dead})
    resp = await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {user.key}"})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


async def test_stream_cut_without_usage_settles_from_counted_tokens(base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.cut_after_chunks = 6
    received = []
    with pytest.raises(openai.APIError) as err:
        stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert err.value.body["code"] == "upstream_stream_cut"
    await wait_settled(wallets, "u_1")
    assert len(received) == 6
    charge = next(e for e in await wallets.ledger("u_1") if e.type == "charge")
    completion = sum(count_text_tokens(p) for p in received)
    expected = price_usage(gpt4o_mini(gateway), Usage(prompt_tokens=estimate_prompt_tokens(CHAT), completion_tokens=completion))
    assert (charge.details["outcome"], charge.details["completion_tokens"]) == ("upstream_cut", completion)
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - expected.price_micros


async def test_stream_cut_before_any_output_pays_nothing(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.cut_after_chunks = 0
    with pytest.raises(openai.APIError) as err:
        stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
        async for _ in stream:
            pass
    assert err.value.body["code"] == "upstream_stream_cut"
    await wait_settled(wallets, "u_1")
    assert (await wallets.get("u_1")).balance_micros == 10_000_000
    assert (await ledger_types(wallets, "u_1"))[-1] == "release"


async def test_stream_without_usage_chunk_settles_from_counted_tokens(base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.omit_usage = True
    mock_upstream.reply_words = 10
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
    received = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    await wait_settled(wallets, "u_1")
    completion = sum(count_text_tokens(p) for p in received)
    expected = price_usage(gpt4o_mini(gateway), Usage(prompt_tokens=estimate_prompt_tokens(CHAT), completion_tokens=completion))
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - expected.price_micros


async def test_usage_that_differs_from_tiktoken_is_what_is_charged(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.reply_words = 10  # ~20 tokens by tiktoken
    mock_upstream.usage_override = make_usage(5000, 3000)
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
    async for _ in stream:
        pass
    # 5000 x 0.1875 + 3000 x 0.75 = 937.5 + 2250 = 3187.5 -> 3188
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 3188


async def test_usage_above_the_hold_is_charged_as_far_as_the_wallet_allows(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=1_000)
    mock_upstream.usage_override = make_usage(10_000, 10_000)  # 9,375 micros, far above the hold
    await sdk(base_url, user.key).chat.completions.create(**CHAT)
    charge = next(e for e in await wallets.ledger("u_1") if e.type == "charge")
    assert (charge.amount_micros, charge.details["shortfall_micros"]) == (-1_000, 8_375)
    assert (await wallets.get("u_1")).balance_micros == 0


async def test_100_concurrent_streams_against_a_wallet_for_10_holds(base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=0)
    headers = {"Authorization": f"Bearer {user.key}"}
    quote = await (await gateway.post("/v1/estimate", json={**CHAT, "stream": True}, headers=headers)).json()
    hold = quote["estimated_cost_micros"]
    await wallets.top_up("u_1", 11 * hold - 1, idempotency_key="ten-holds")
    mock_upstream.chunk_delay = 0.1  # streams outlive the burst of holds
    mock_upstream.usage_override = make_usage(100, 20)  # 18.75 + 15 = 33.75 -> 34 micros each
    client = sdk(base_url, user.key)

    async def one() -> str:
        try:
            stream = await client.chat.completions.create(**CHAT, stream=True)
        except openai.APIStatusError as exc:
            assert exc.body["type"] == "insufficient_quota"
            return str(exc.status_code)
        async for _ in stream:
            pass
        return "ok"

    outcomes = await asyncio.gather(*(one() for _ in range(100)))
    assert outcomes.count("ok") == 10 and outcomes.count("402") == 90
    await wait_settled(wallets, "u_1")
    assert (await wallets.get("u_1")).balance_micros == 11 * hold - 1 - 10 * 34
    assert mock_upstream.request_count == 10


# ----------------------------------------------------------------- bad input


async def assert_rejected(gateway, wallets, resp, status: int, code: str | None = None) -> None:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and body["error"]["message"] and body["error"]["type"]
    if code:
        assert body["error"]["code"] == code
    assert (await wallets.get("u_1")).balance_micros == 10_000_000
    assert await ledger_types(wallets, "u_1") == ["open", "top_up"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[]", "invalid_request"),
        (orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}), "missing_model"),
        (orjson.dumps({"model": "gpt-4o-mini"}), "invalid_request"),
        (orjson.dumps({"model": "gpt-4o-mini", "messages": "hi"}), "invalid_request"),
        (orjson.dumps({**CHAT, "max_tokens": -1}), "invalid_request"),
        (orjson.dumps({**CHAT, "stream": "yes"}), "invalid_request"),
        (orjson.dumps({**CHAT, "model": "text-embedding-3-small"}), "wrong_endpoint"),
    ],
)
async def test_malformed_request_is_400_and_changes_nothing(gateway, make_end_user, mock_upstream, wallets, body, code):
    user = await make_end_user()
    resp = await gateway.post("/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {user.key}", "Content-Type": "application/json"})
    await assert_rejected(gateway, wallets, resp, 400, code)
    assert mock_upstream.request_count == 0


async def test_unknown_model_is_404_and_changes_nothing(gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    resp = await gateway.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}, headers={"Authorization": f"Bearer {user.key}"})
    await assert_rejected(gateway, wallets, resp, 404, "model_not_found")


@pytest.mark.parametrize("auth", [None, "Bearer sk-eu_not-a-real-key", "Bearer something-else", "Basic dXNlcg=="])
async def test_wrong_key_is_401_and_changes_nothing(gateway, make_end_user, mock_upstream, wallets, auth):
    await make_end_user()
    headers = {"Authorization": auth} if auth else {}
    resp = await gateway.post("/v1/chat/completions", json=CHAT, headers=headers)
    await assert_rejected(gateway, wallets, resp, 401, "invalid_api_key")


async def test_revoked_key_is_401_on_the_next_request(gateway, make_end_user, accounts, mock_upstream, wallets):
    user = await make_end_user()
    [key] = await accounts.list_keys("u_1")
    await accounts.revoke_key("u_1", key.id)
    resp = await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {user.key}"})
    await assert_rejected(gateway, wallets, resp, 401, "invalid_api_key")


async def test_oversized_body_is_413_and_changes_nothing(gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    resp = await gateway.post("/v1/chat/completions", data=orjson.dumps(big), headers={"Authorization": f"Bearer {user.key}", "Content-Type": "application/json"})
    await assert_rejected(gateway, wallets, resp, 413, "request_too_large")


async def test_operator_key_without_user_is_400(gateway, make_end_user, mock_upstream, wallets):
    from tests.conftest import OPERATOR_KEY

    await make_end_user()
    resp = await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    await assert_rejected(gateway, wallets, resp, 400, "missing_user")


async def test_insufficient_funds_is_402_and_nothing_is_forwarded(gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=10)
    resp = await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {user.key}"})
    assert resp.status == 402
    body = await resp.json()
    assert body["error"]["type"] == "insufficient_quota" and body["error"]["code"] == "insufficient_quota"
    assert mock_upstream.request_count == 0
    assert (await wallets.get("u_1")).balance_micros == 10


# ------------------------------------------------------- streams that outrun their hold


async def test_stream_past_its_hold_extends_it_and_pays_the_reported_usage(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.reply_words = 300  # the mock ignores max_tokens, as some upstreams do
    mock_upstream.usage_override = make_usage(50, 900)
    stream = await sdk(base_url, user.key).chat.completions.create(**{**CHAT, "max_tokens": 5}, stream=True)
    pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 300
    await wait_settled(wallets, "u_1")
    # 50 x 0.1875 + 900 x 0.75 = 9.375 + 675 = 684.375 -> 685
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 685
    assert "hold_extend" in await ledger_types(wallets, "u_1")


async def test_stream_past_its_hold_on_an_empty_wallet_is_cut_and_pays_what_it_got(base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=100)  # the hold for 5 tokens fits; 256 more (192 micros) do not
    mock_upstream.reply_words = 300
    mock_upstream.chunk_delay = 0.01
    received = []
    with pytest.raises(openai.APIError) as err:
        stream = await sdk(base_url, user.key).chat.completions.create(**{**CHAT, "max_tokens": 5}, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert err.value.body["code"] == "insufficient_quota"
    assert await mock_upstream.wait_disconnected(timeout=5)
    await wait_settled(wallets, "u_1")
    charge = next(e for e in await wallets.ledger("u_1") if e.type == "charge")
    counted = charge.details["completion_tokens"]
    assert charge.details["outcome"] == "wallet_exhausted"
    # Cover before relay: nothing past what the hold paid for left the proxy.
    assert counted == sum(count_text_tokens(p) for p in received) and 0 < counted <= 5
    expected = price_usage(gpt4o_mini(gateway), Usage(prompt_tokens=estimate_prompt_tokens(CHAT), completion_tokens=counted))
    assert -charge.amount_micros == expected.price_micros and charge.details["shortfall_micros"] == 0
    assert (await wallets.get("u_1")).balance_micros == 100 + charge.amount_micros >= 0


async def test_a_stream_longer_than_the_hold_ttl_keeps_its_hold_alive(aiohttp_client, gateway_config, make_end_user, mock_upstream, wallets):
    from proxy.app import create_app

    config = gateway_config.model_copy(update={"hold_ttl_seconds": 1, "reaper_interval_seconds": 0.05})
    app_client = await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})
    user = await make_end_user()
    mock_upstream.reply_words = 25
    mock_upstream.chunk_delay = 0.1  # 2.5 s of stream against a 1 s hold TTL and a busy reaper
    mock_upstream.usage_override = make_usage(100, 20)
    stream = await sdk(str(app_client.make_url("/v1")), user.key).chat.completions.create(**CHAT, stream=True)
    pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 25
    await wait_settled(wallets, "u_1")
    # 100 x 0.1875 + 20 x 0.75 = 33.75 -> 34
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 34
    assert "expire" not in await ledger_types(wallets, "u_1")


async def test_an_unreachable_store_is_a_503_in_openai_shape(aiohttp_client, gateway_config, tmp_path):
    from proxy.app import create_app
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        app_client = await aiohttp_client(create_app(gateway_config.model_copy(update={"redis_url": server.url})))
        server.stop()
        resp = await app_client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-eu_anything"})
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        body = await resp.json()
        assert body["error"]["code"] == "store_unavailable" and body["error"]["type"] == "api_error"
        assert (await app_client.get("/readyz")).status == 503
    finally:
        server.stop()
