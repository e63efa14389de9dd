"""Nothing billable goes upstream unpriced, black-box through the app with the openai SDK:
a `service_tier` the card prices is held and charged at its multiplier, one it does not
is a 400 before any hold; web search calls are held for and charged at the card's price.

The card (written below): gpt-4o-mini is 0.15 / 0.60 USD per 1M tokens, cost = price / 1.25,
tiers flex 0.5x and priority 2x, web_search 0.025 USD (25,000 micros) per call; gpt-4o has
neither tiers nor a web search price.
"""

from __future__ import annotations

import math
import textwrap
from decimal import Decimal
from pathlib import Path

import openai
import orjson
import pytest

from pricing import load_rate_card
from proxy import metering
from proxy.app import create_app
from proxy.calls.stream import read_event
from tests.mock_upstream import make_usage

CARD = """
id: default
version: 1
effective_from: 2026-01-01
models:
  gpt-4o-mini:
    upstream: openai
    max_output_tokens: 1000
    price: {input: 0.15, output: 0.60, tools: {web_search: 0.025}}
    cost: {markup: 1.25}
    service_tiers: {flex: 0.5, priority: 2}
  gpt-4o:
    upstream: openai
    max_output_tokens: 1000
    price: {input: 2.5, output: 10}
    cost: {markup: 1.25}
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}
WEB_SEARCH = 25_000


@pytest.fixture
async def gateway(aiohttp_client, gateway_config, tmp_path: Path):
    cards = tmp_path / "ratecards"
    cards.mkdir()
    (cards / "default.yaml").write_text(textwrap.dedent(CARD).lstrip())
    (cards / "tiers.yaml").write_text("tiers: {default: default}\n")
    config = gateway_config.model_copy(update={"ratecards_dir": str(cards)})
    return await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def entries(wallets, user_id: str, kind: str):
    return [e for e in await wallets.ledger(user_id, limit=50) if e.type == kind]


async def held_amounts(wallets, user_id: str) -> list[int]:
    """What each closed hold reserved, oldest first: its close entry's held_delta is minus the hold."""
    return [-e.details["held_delta_micros"] for e in reversed(await wallets.ledger(user_id, limit=50))
            if "held_delta_micros" in e.details]


async def the_charge(wallets, user_id: str = "u_1"):
    [charge] = await entries(wallets, user_id, "charge")
    assert charge.details["shortfall_micros"] == 0
    return charge


# ------------------------------------------------------------- service tier


async def test_priority_is_charged_at_twice_the_token_prices(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    await sdk(base_url, user.key).chat.completions.create(**CHAT, service_tier="priority")
    charge = await the_charge(wallets)
    # (1000 x 0.15 + 500 x 0.60) x 2 = 900 micros; cost 900 / 1.25 = 720
    assert charge.amount_micros == -900
    assert (charge.details["price_micros"], charge.details["cost_micros"]) == (900, 720)
    assert charge.details["service_tier"] == "priority"
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 900
    assert mock_upstream.requests[-1].json["service_tier"] == "priority"


async def test_priority_holds_the_worst_case_at_twice_the_prices(gateway, base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    body = {**CHAT, "service_tier": "priority"}
    estimate = await (await gateway.post("/v1/estimate", json=body, headers={"Authorization": f"Bearer {user.key}"})).json()
    await sdk(base_url, user.key).chat.completions.create(**body)
    [held] = await held_amounts(wallets, "u_1")
    # (prompt x 0.15 + 100 x 0.60) x 2, rounded up once
    assert held == math.ceil(Decimal(estimate["prompt_tokens"]) * Decimal("0.3") + 120)
    assert estimate["estimated_cost_micros"] == held


async def test_flex_stream_is_charged_at_half_the_token_prices(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, service_tier="flex", stream=True)
    assert [c async for c in stream]
    charge = await the_charge(wallets)
    # (1000 x 0.15 + 500 x 0.60) x 0.5 = 225 micros; cost 180
    assert (charge.amount_micros, charge.details["cost_micros"]) == (-225, 180)
    assert charge.details["service_tier"] == "flex"


@pytest.mark.parametrize("asked", [None, "auto", "default"])
async def test_default_and_auto_are_charged_at_the_card_prices(base_url, make_end_user, mock_upstream, wallets, asked):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    extra = {} if asked is None else {"service_tier": asked}
    await sdk(base_url, user.key).chat.completions.create(**CHAT, **extra)
    charge = await the_charge(wallets)
    assert (charge.amount_micros, charge.details["service_tier"]) == (-450, "default")


async def test_a_tier_the_card_does_not_price_is_refused_before_any_hold(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(base_url, user.key).chat.completions.create(**{**CHAT, "model": "gpt-4o"}, service_tier="priority")
    assert caught.value.code == "unsupported_service_tier"
    assert caught.value.param == "service_tier"
    assert mock_upstream.request_count == 0
    assert await held_amounts(wallets, "u_1") == []
    state = await wallets.get("u_1")
    assert (state.balance_micros, state.held_micros) == (10_000_000, 0)


async def test_a_tier_not_on_the_models_list_is_refused(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(base_url, user.key).chat.completions.create(**CHAT, service_tier="scale")
    assert caught.value.code == "unsupported_service_tier"
    assert mock_upstream.request_count == 0


# --------------------------------------------------------------- web search


async def test_a_web_search_call_is_charged_at_the_cards_price(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    resp = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**CHAT, web_search_options={})
    charge = await the_charge(wallets)
    # 450 micros of tokens + one search at 25,000; cost (450 + 25,000) / 1.25 = 20,360
    assert charge.amount_micros == -(450 + WEB_SEARCH)
    assert charge.details["cost_micros"] == 20_360
    assert charge.details["tool_calls"] == {"web_search": 1}
    assert resp.parse().usage.model_extra["cost_micros"] == 25_450
    assert resp.headers["X-Usage-Cost"] == "0.025450"


async def test_web_search_is_charged_once_per_choice(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.honor_n = True
    mock_upstream.usage_override = make_usage(1000, 500)
    completion = await sdk(base_url, user.key).chat.completions.create(**CHAT, n=2, web_search_options={})
    assert len(completion.choices) == 2
    charge = await the_charge(wallets)
    assert charge.amount_micros == -(450 + 2 * WEB_SEARCH)


async def test_a_streamed_web_search_is_charged_at_the_cards_price(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, web_search_options={}, stream=True)
    assert [c async for c in stream]
    charge = await the_charge(wallets)
    assert charge.amount_micros == -(450 + WEB_SEARCH)
    assert charge.details["tool_calls"] == {"web_search": 1}


async def test_a_stream_cut_after_output_still_pays_its_search(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.cut_after_chunks = 3
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, web_search_options={}, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    charge = await the_charge(wallets)
    d = charge.details
    assert (d["usage_source"], d["tool_calls"]) == ("counted", {"web_search": 1})
    assert d["completion_tokens"] > 0
    # the prompt and the relayed tokens as counted, plus the search the provider already ran
    tokens = Decimal(d["prompt_tokens"]) * Decimal("0.15") + Decimal(d["completion_tokens"]) * Decimal("0.60")
    assert -charge.amount_micros == math.ceil(tokens) + WEB_SEARCH


async def test_the_hold_covers_one_search_per_choice(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    client = sdk(base_url, user.key)
    await client.chat.completions.create(**CHAT, n=3)
    await client.chat.completions.create(**CHAT, n=3, web_search_options={})
    without, with_search = await held_amounts(wallets, "u_1")
    assert with_search - without == 3 * WEB_SEARCH


async def test_a_wallet_that_cannot_cover_the_search_is_refused(base_url, make_end_user, mock_upstream, wallets):
    # Enough for the tokens of a small call, not for the search: 402, nothing forwarded.
    user = await make_end_user(funds=WEB_SEARCH - 1)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(base_url, user.key).chat.completions.create(**{**CHAT, "max_tokens": 5}, web_search_options={})
    assert caught.value.status_code == 402
    assert mock_upstream.request_count == 0


async def test_web_search_the_card_does_not_price_is_refused_before_any_hold(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(base_url, user.key).chat.completions.create(**{**CHAT, "model": "gpt-4o"}, web_search_options={})
    assert (caught.value.code, caught.value.param) == ("unsupported_tool", "web_search_options")
    assert mock_upstream.request_count == 0
    assert await held_amounts(wallets, "u_1") == []


async def test_an_unpriced_built_in_tool_is_refused_before_any_hold(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(base_url, user.key).chat.completions.create(**CHAT, tools=[{"type": "code_interpreter"}])  # type: ignore[list-item]
    assert (caught.value.code, caught.value.param) == ("unsupported_tool", "tools")
    assert mock_upstream.request_count == 0


# ----------------------------------------- Responses-style answers (the readers)


@pytest.fixture
def card(tmp_path: Path):
    path = tmp_path / "card.yaml"
    path.write_text(textwrap.dedent(CARD).lstrip())
    return load_rate_card(path)


def test_each_web_search_item_of_a_whole_output_is_counted(card) -> None:
    quote = metering.quote(card, card.models["gpt-4o-mini"], {**CHAT, "tools": [{"type": "web_search"}]})
    answer = {"output": [{"type": "web_search_call"}, {"type": "message"}, {"type": "web_search_call"}]}
    assert metering.tool_calls_of_answer(quote, answer) == {"web_search": 2}


def test_each_streamed_web_search_item_done_is_counted_once(card) -> None:
    quote = metering.quote(card, card.models["gpt-4o-mini"], {**CHAT, "tools": [{"type": "web_search_preview"}]})
    counter = metering.ToolCallCounter.for_quote(quote)
    assert counter is not None
    for kind in ("response.output_item.added", "response.output_item.done"):
        read_event(orjson.dumps({"type": kind, "item": {"type": "web_search_call", "status": "completed"}}), counter)
    read_event(orjson.dumps({"type": "response.output_item.done", "item": {"type": "message"}}), counter)
    assert counter.calls() == {"web_search": 1}


def test_a_request_without_built_in_tools_counts_nothing(card) -> None:
    quote = metering.quote(card, card.models["gpt-4o-mini"], CHAT)
    assert metering.ToolCallCounter.for_quote(quote) is None
    assert metering.tool_calls_of_answer(quote, {"choices": [{"index": 0}], "output": []}) == {}
