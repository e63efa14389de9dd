"""A wallet that cannot cover a call's worst case but can cover a useful answer gets the call, clamped (issue 9)."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest

from pricing import Usage, estimate_prompt_tokens, price_usage
from proxy.app import create_app
from proxy.appstate import RATECARDS
from tests.conftest import money_ledger
from tests.mock_upstream import make_usage
from tests.proxy.test_gateway_failures import sdk

ASK = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Name three rivers"}]}  # no max_tokens
WALLET = 10_000  # 0.01 USD; gpt-4o's worst case (16,384 output tokens) holds ~0.2 USD


def gpt4o(gateway):
    return gateway.server.app[RATECARDS].current.card_for("default").model("gpt-4o")


def affordable(model, prompt: int, budget: int) -> int:
    """The most output tokens whose worst case fits `budget`, by plain search."""
    tokens = 0
    while price_usage(model, Usage(prompt_tokens=prompt, completion_tokens=tokens + 1)).price_micros <= budget:
        tokens += 1
    return tokens


async def test_a_small_wallet_gets_a_clamped_answer_instead_of_a_402(base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=WALLET)
    mock_upstream.usage_override = make_usage(12, 40)
    raw = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**ASK)
    expected = affordable(gpt4o(gateway), estimate_prompt_tokens(ASK), WALLET)
    assert 256 <= expected < 16_384
    assert raw.headers["X-Max-Tokens-Clamped"] == str(expected)
    assert mock_upstream.requests[-1].json["max_completion_tokens"] == expected
    charge = next(e for e in await wallets.ledger(user.id) if e.type == "charge")
    price = price_usage(gpt4o(gateway), Usage(prompt_tokens=12, completion_tokens=40)).price_micros
    assert (-charge.amount_micros, charge.details["shortfall_micros"]) == (price, 0)
    assert (await wallets.get(user.id)).balance_micros == WALLET - price >= 0


async def test_a_clamped_stream_says_so_and_keeps_the_clients_field(base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=WALLET)
    body = {**ASK, "max_tokens": 16_000}
    raw = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**body, stream=True)
    async for _ in raw.parse():
        pass
    expected = affordable(gpt4o(gateway), estimate_prompt_tokens(body), WALLET)
    assert raw.headers["X-Max-Tokens-Clamped"] == str(expected)
    forwarded = mock_upstream.requests[-1].json
    assert forwarded["max_tokens"] == expected and "max_completion_tokens" not in forwarded
    assert (await wallets.get(user.id)).balance_micros >= 0


async def test_a_call_that_fits_is_not_clamped(base_url, make_end_user, mock_upstream):
    user = await make_end_user()
    raw = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**ASK)
    assert "X-Max-Tokens-Clamped" not in raw.headers
    assert "max_completion_tokens" not in mock_upstream.requests[-1].json


async def test_a_wallet_that_cannot_cover_the_minimum_output_gets_a_402(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=2_000)  # the prompt plus 256 output tokens cost ~3,300 micros on gpt-4o
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(base_url, user.key).chat.completions.create(**ASK)
    assert (err.value.status_code, err.value.body["code"]) == (402, "insufficient_quota")
    assert mock_upstream.request_count == 0
    assert [e.type for e in await money_ledger(wallets, user.id)] == ["top_up", "open"]


async def test_clamping_is_per_choice(base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user(funds=WALLET)
    raw = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**ASK, n=2)
    both = affordable(gpt4o(gateway), estimate_prompt_tokens(ASK), WALLET)
    per_choice = int(raw.headers["X-Max-Tokens-Clamped"])
    assert per_choice == both // 2 and mock_upstream.requests[-1].json["max_completion_tokens"] == per_choice


async def test_a_keys_spend_cap_clamps_like_a_wallet(base_url, gateway, make_end_user, mock_upstream):
    from tests.proxy.test_scopes import scoped_key

    await make_end_user()  # a rich wallet
    key = await scoped_key(gateway, max_spend_micros=WALLET)
    raw = await sdk(base_url, key["key"]).chat.completions.with_raw_response.create(**ASK)
    expected = affordable(gpt4o(gateway), estimate_prompt_tokens(ASK), WALLET)
    assert raw.headers["X-Max-Tokens-Clamped"] == str(expected)


@pytest.fixture
def ratecards_without_clamping(tmp_path: Path, repo_root: Path) -> Path:
    cards = tmp_path / "ratecards"
    shutil.copytree(repo_root / "config" / "ratecards", cards)
    tiers = (cards / "tiers.yaml").read_text().replace("  default: 256\n", "  default: 0\n")
    assert "default: 0" in tiers
    (cards / "tiers.yaml").write_text(tiers)
    return cards


async def test_a_tier_with_clamping_off_gets_a_402(aiohttp_client, gateway_config, ratecards_without_clamping, make_end_user, mock_upstream, wallets):
    app_client = await aiohttp_client(create_app(gateway_config.model_copy(update={"ratecards_dir": str(ratecards_without_clamping)})))
    user = await make_end_user(funds=WALLET)
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(str(app_client.make_url("/v1")), user.key).chat.completions.create(**ASK)
    assert (err.value.status_code, err.value.body["code"]) == (402, "insufficient_quota")
    assert mock_upstream.request_count == 0
    assert (await wallets.get(user.id)).balance_micros == WALLET
