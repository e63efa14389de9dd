"""The Responses API (`POST /v1/responses`) through the official SDK: held from the input items and
`max_output_tokens`, relayed as typed events, charged from the usage of `response.completed`."""

from __future__ import annotations

import asyncio

import openai
import pytest

from pricing import Usage, count_text_tokens, estimate_prompt_tokens, price_usage
from tests.conftest import UPSTREAM_KEY
from tests.mock_upstream import make_usage, reply_chunks

REQUEST = {"model": "gpt-4o-mini", "input": "Tell me a story", "max_output_tokens": 200}


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


def gpt4o_mini(gateway):
    from proxy.appstate import RATECARDS

    return gateway.server.app[RATECARDS].current.card_for("default").model("gpt-4o-mini")


async def settled(wallets, user_id: str = "u_1"):
    for _ in range(200):
        if (await wallets.get(user_id)).held_micros == 0:
            return next(e for e in await wallets.ledger(user_id, limit=50) if e.type == "charge")
        await asyncio.sleep(0.02)
    raise AssertionError("the hold was never closed")


async def test_a_whole_response_is_charged_its_reported_usage_exactly(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500, cached=200)
    raw = await sdk(base_url, user.key).responses.with_raw_response.create(**REQUEST)
    answer = raw.parse()
    assert answer.output_text == "".join(reply_chunks(mock_upstream.reply_words))
    # The card's gpt-4o-mini: 800 x 0.1875 + 200 cached x 0.09375 + 500 x 0.75 = 543.75 -> 544 micros
    charge = await settled(wallets)
    assert -charge.amount_micros == 544 == answer.usage.model_extra["cost_micros"]
    assert raw.headers["X-Usage-Cost"] == "0.000544" and raw.headers["X-Total-Tokens"] == "1500"
    assert charge.details["usage_source"] == "upstream" and charge.details["cached_tokens"] == 200
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 544


async def test_the_hold_covers_the_input_items_and_max_output_tokens(base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.first_byte_gate = asyncio.Event()
    body = {**REQUEST, "stream": True}
    call = asyncio.create_task(sdk(base_url, user.key).responses.create(**body))
    for _ in range(200):
        if mock_upstream.requests:
            break
        await asyncio.sleep(0.01)
    held = (await wallets.get("u_1")).held_micros
    mock_upstream.first_byte_gate.set()
    stream = await call
    async for _ in stream:
        pass
    expected = price_usage(gpt4o_mini(gateway), Usage(prompt_tokens=estimate_prompt_tokens(body), completion_tokens=200))
    assert held == expected.price_micros
    forwarded = mock_upstream.requests[-1].json
    assert "stream_options" not in forwarded and forwarded["max_output_tokens"] == 200
    await settled(wallets)


async def test_a_streamed_response_relays_every_event_and_settles_on_response_completed(
        base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(100, 20)
    async with sdk(base_url, user.key).responses.stream(**REQUEST) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert deltas == list(reply_chunks(mock_upstream.reply_words))
    # 100 x 0.1875 + 20 x 0.75 = 33.75 -> 34 micros
    assert final.usage.model_extra["cost_micros"] == 34
    charge = await settled(wallets)
    assert -charge.amount_micros == 34 and charge.details["outcome"] == "completed"


async def test_a_response_stream_cut_mid_way_pays_the_input_and_what_was_relayed(
        base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.cut_after_chunks = 5
    with pytest.raises(openai.APIError):
        async with sdk(base_url, user.key).responses.stream(**REQUEST) as stream:
            async for _ in stream:
                pass
    charge = await settled(wallets)
    relayed = sum(count_text_tokens(p) for p in reply_chunks(mock_upstream.reply_words)[:5])
    d = charge.details
    assert d["outcome"] == "upstream_cut" and d["usage_source"] == "counted"
    assert (d["prompt_tokens"], d["completion_tokens"]) == (estimate_prompt_tokens(REQUEST), relayed)
    expected = price_usage(gpt4o_mini(gateway), Usage(prompt_tokens=d["prompt_tokens"], completion_tokens=relayed))
    assert -charge.amount_micros == expected.price_micros


async def test_a_client_gone_mid_response_stream_pays_what_was_relayed(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.reply_words = 50
    mock_upstream.chunk_delay = 0.05
    seen = []
    stream = await sdk(base_url, user.key).responses.create(**REQUEST, stream=True)
    async for event in stream:
        if event.type == "response.output_text.delta":
            seen.append(event.delta)
        if len(seen) == 5:
            break
    await stream.close()
    assert await mock_upstream.wait_disconnected(timeout=5)
    charge = await settled(wallets)
    counted = sum(count_text_tokens(p) for p in seen)
    assert charge.details["outcome"] == "client_disconnected"
    assert counted <= charge.details["completion_tokens"] <= counted + 2


async def test_an_upstream_error_before_output_costs_nothing(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.fail_status = 500
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(base_url, user.key).responses.create(**REQUEST)
    assert err.value.status_code == 502
    assert (await wallets.get("u_1")).balance_micros == 10_000_000
    assert [e.type for e in await wallets.ledger("u_1", limit=10)][0] == "release"


@pytest.mark.parametrize("body, param", [
    ({"model": "gpt-4o-mini"}, "input"),
    ({"model": "gpt-4o-mini", "input": []}, "input"),
    ({"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": -1}, "max_output_tokens"),
    ({"input": "hi"}, "model"),
])
async def test_a_malformed_responses_request_is_a_400_and_changes_nothing(gateway, make_end_user, mock_upstream, wallets,
                                                                          body, param):
    user = await make_end_user()
    resp = await gateway.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {user.key}"})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
    assert mock_upstream.requests == []
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


async def test_an_embedding_model_is_refused_on_the_responses_endpoint(gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    resp = await gateway.post("/v1/responses", json={"model": "text-embedding-3-small", "input": "hi"},
                              headers={"Authorization": f"Bearer {user.key}"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "wrong_endpoint"
    assert mock_upstream.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_web_search_call_in_a_response_is_charged_once_at_the_cards_price(
        base_url, gateway, make_end_user, mock_upstream, wallets, stream):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(100, 20)
    mock_upstream.web_search_calls = 1
    body = {**REQUEST, "tools": [{"type": "web_search_preview"}]}
    client = sdk(base_url, user.key)
    if stream:
        async with client.responses.stream(**body) as events:
            final = await events.get_final_response()
    else:
        final = await client.responses.create(**body)
    assert [item.type for item in final.output] == ["web_search_call", "message"]
    charge = await settled(wallets)
    assert charge.details["tool_calls"] == {"web_search": 1}
    expected = price_usage(gpt4o_mini(gateway), Usage(prompt_tokens=100, completion_tokens=20, tool_calls={"web_search": 1}))
    assert -charge.amount_micros == expected.price_micros == 34 + 31_250


async def test_a_wallet_that_cannot_cover_max_output_tokens_gets_it_clamped(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=1_000)  # 16,000 output tokens would cost 12,000 micros
    mock_upstream.usage_override = make_usage(10, 20)
    raw = await sdk(base_url, user.key).responses.with_raw_response.create(**{**REQUEST, "max_output_tokens": 16_000})
    clamped = int(raw.headers["X-Max-Tokens-Clamped"])
    assert 256 <= clamped < 16_000
    assert mock_upstream.requests[-1].json["max_output_tokens"] == clamped
    charge = await settled(wallets)
    assert (await wallets.get("u_1")).balance_micros == 1_000 + charge.amount_micros >= 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stored_response_is_retrieved_by_the_end_user_who_made_it_for_free(
        base_url, make_end_user, mock_upstream, wallets, stream):
    user = await make_end_user()
    client = sdk(base_url, user.key)
    if stream:
        async with client.responses.stream(**REQUEST) as events:
            made = await events.get_final_response()
    else:
        made = await client.responses.create(**REQUEST)
    await settled(wallets)
    balance = (await wallets.get("u_1")).balance_micros

    fetched = await client.responses.retrieve(made.id)

    assert fetched.id == made.id and fetched.output_text == made.output_text
    [get] = [r for r in mock_upstream.requests if r.method == "GET"]
    assert get.path == f"/v1/responses/{made.id}" and get.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert (await wallets.get("u_1")).balance_micros == balance


async def test_another_end_users_response_is_not_found(base_url, make_end_user, mock_upstream, wallets):
    owner, other = await make_end_user("u_1"), await make_end_user("u_2")
    made = await sdk(base_url, owner.key).responses.create(**REQUEST)
    with pytest.raises(openai.NotFoundError) as err:
        await sdk(base_url, other.key).responses.retrieve(made.id)
    assert err.value.body["code"] == "response_not_found"
    assert not any(r.method == "GET" for r in mock_upstream.requests)  # never asked the upstream


async def test_a_response_made_with_store_false_is_not_retrievable(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    made = await sdk(base_url, user.key).responses.create(**REQUEST, store=False)
    with pytest.raises(openai.NotFoundError):
        await sdk(base_url, user.key).responses.retrieve(made.id)
