"""Metered calls through the official openai SDK: exact micros debited, reported and recorded.

Prices come from config/ratecards/default.yaml: gpt-4o-mini is 0.1875 USD per
1M input tokens, 0.09375 cached, 0.75 output; its cost is price / 1.25.
"""

from __future__ import annotations

import asyncio

import openai

from tests.conftest import OPERATOR_KEY, UPSTREAM_KEY
from tests.mock_upstream import make_usage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def last_charge(wallets, user_id: str):
    entries = await wallets.ledger(user_id, limit=20)
    return next(e for e in entries if e.type == "charge")


async def test_non_streamed_chat_debits_the_upstream_usage_exactly(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    resp = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**CHAT)
    completion = resp.parse()
    # 1000 x 0.1875 + 500 x 0.75 = 562.5 micros, rounded up once -> 563
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 563
    assert completion.usage.model_extra["cost_micros"] == 563
    assert completion.usage.model_extra["cost"] == 0.000563
    assert resp.headers["X-Usage-Cost"] == "0.000563"
    assert resp.headers["X-Total-Tokens"] == "1500"
    assert resp.headers["X-Model"] == "gpt-4o-mini"
    assert resp.headers["X-Wallet-Balance"] == "9.999437"


async def test_charge_ledger_entry_records_tokens_price_cost_and_card(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500, cached=400, reasoning=100)
    await sdk(base_url, user.key).chat.completions.create(**CHAT)
    charge = await last_charge(wallets, "u_1")
    # 600 x 0.1875 + 400 x 0.09375 + 500 x 0.75 = 112.5 + 37.5 + 375 = 525
    assert charge.amount_micros == -525
    d = charge.details
    assert (d["prompt_tokens"], d["completion_tokens"], d["cached_tokens"], d["reasoning_tokens"]) == (1000, 500, 400, 100)
    assert (d["price_micros"], d["cost_micros"]) == (525, 420)  # cost = 525 / 1.25
    assert d["model"] == "gpt-4o-mini" and d["ratecard"] == "default@1" and d["usage_source"] == "upstream"
    assert d["request_id"].startswith("req_") and d["key_id"].startswith("key_")


async def test_streamed_chat_relays_chunks_and_settles_from_reported_usage(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.reply_words = 12
    mock_upstream.usage_override = make_usage(200, 40)
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
    pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 12
    # 200 x 0.1875 + 40 x 0.75 = 37.5 + 30 = 67.5 -> 68
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 68
    assert mock_upstream.requests[-1].json["stream_options"] == {"include_usage": True}


async def test_stream_hides_the_usage_chunk_from_clients_that_did_not_ask(base_url, make_end_user, mock_upstream):
    user = await make_end_user()
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


async def test_stream_shows_usage_with_cost_to_clients_that_asked(base_url, make_end_user, mock_upstream):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(200, 40)
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    final = chunks[-1]
    assert final.choices == [] and final.usage.prompt_tokens == 200
    assert final.usage.model_extra["cost_micros"] == 68
    assert final.usage.model_extra["cost"] == 0.000068


async def test_sync_sdk_streamed_and_not(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(100, 20)
    client = openai.OpenAI(base_url=base_url, api_key=user.key, max_retries=0)

    def use_sync_client() -> str:
        client.chat.completions.create(**CHAT)
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**CHAT, stream=True) if c.choices)

    # The sync SDK blocks, so it runs on a thread while this loop serves it.
    assert await asyncio.to_thread(use_sync_client)
    # 100 x 0.1875 + 20 x 0.75 = 33.75 -> 34, twice
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 68


async def test_legacy_completions_are_metered(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 1000)
    out = await sdk(base_url, user.key).completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon", max_tokens=50)
    assert out.choices[0].text
    # 1000 x 1.875 + 1000 x 2.5 = 4375
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 4375


async def test_embeddings_are_metered(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = {"prompt_tokens": 40_000, "total_tokens": 40_000}
    out = await sdk(base_url, user.key).embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(out.data) == 2
    # 40,000 x 0.025 = 1000
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 1000


async def test_models_lists_the_callers_card(base_url, make_end_user):
    user = await make_end_user()
    ids = {m.id async for m in sdk(base_url, user.key).models.list()}
    assert {"gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small"} <= ids


async def test_alias_is_priced_as_its_model(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    await sdk(base_url, user.key).chat.completions.create(**{**CHAT, "model": "gpt-4o-mini-2024-07-18"})
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 563
    assert mock_upstream.requests[-1].json["model"] == "gpt-4o-mini"


async def test_operator_key_with_user_bills_that_end_user(base_url, make_end_user, mock_upstream, wallets):
    await make_end_user("u_a")
    await make_end_user("u_b")
    mock_upstream.usage_override = make_usage(1000, 500)
    await sdk(base_url, OPERATOR_KEY).chat.completions.create(**CHAT, user="u_b")
    assert (await wallets.get("u_a")).balance_micros == 10_000_000
    assert (await wallets.get("u_b")).balance_micros == 10_000_000 - 563
    assert (await last_charge(wallets, "u_b")).details["key_id"] == "operator"


async def test_upstream_gets_its_own_key_and_never_the_clients(base_url, make_end_user, mock_upstream):
    user = await make_end_user()
    await sdk(base_url, user.key).chat.completions.create(**CHAT)
    seen = mock_upstream.requests[-1].headers
    assert seen["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert user.key not in str(dict(seen))


async def test_upstream_key_never_reaches_the_client(gateway, make_end_user):
    user = await make_end_user()
    resp = await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {user.key}"})
    assert UPSTREAM_KEY not in await resp.text() and UPSTREAM_KEY not in str(dict(resp.headers))


async def test_estimate_quotes_without_calling_upstream(gateway, make_end_user, mock_upstream):
    user = await make_end_user(funds=50)
    resp = await gateway.post("/v1/estimate", json=CHAT, headers={"Authorization": f"Bearer {user.key}"})
    quote = await resp.json()
    assert resp.status == 200 and mock_upstream.request_count == 0
    assert quote["max_output_tokens"] == 100 and quote["prompt_tokens"] > 0
    # prompt x 0.1875 + 100 x 0.75, rounded up
    assert quote["estimated_cost_micros"] == -(-(quote["prompt_tokens"] * 1875 + 100 * 7500) // 10_000)
    assert quote["available_micros"] == 50 and quote["affordable"] is False


async def test_wallet_endpoint_shows_the_callers_balance_and_history(base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    await sdk(base_url, user.key).chat.completions.create(**CHAT)
    body = await (await gateway.get("/v1/wallet", headers={"Authorization": f"Bearer {user.key}"})).json()
    assert (body["balance_micros"], body["held_micros"], body["available_micros"]) == (9_999_437, 0, 9_999_437)
    assert body["recent"][0]["type"] == "charge" and body["recent"][0]["amount_micros"] == -563


async def test_concurrent_calls_each_pay_exactly(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    client = sdk(base_url, user.key)
    await asyncio.gather(*(client.chat.completions.create(**CHAT) for _ in range(20)))
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 20 * 563


async def test_a_settled_calls_hold_record_is_kept_for_closed_hold_ttl_seconds_only(
        aiohttp_client, gateway_config, make_end_user, mock_upstream, redis):
    from proxy.app import create_app

    config = gateway_config.model_copy(update={"closed_hold_ttl_seconds": 7200})
    app_client = await aiohttp_client(create_app(config))
    user = await make_end_user()
    await sdk(str(app_client.make_url("/v1")), user.key).chat.completions.create(**CHAT)
    [record] = [k async for k in redis.scan_iter(match="mg:{w:u_1}:hold:*")]
    assert await redis.hget(record, "status") == b"settled"
    assert 7100 < await redis.ttl(record) <= 7200
