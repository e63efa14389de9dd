"""Wallets in an asset the config defines (credits): priced from a card in that asset, charged
in its micros, and never priced from a card in another one."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest

from proxy.app import create_app
from tests.conftest import ADMIN
from tests.mock_upstream import make_usage
from tests.proxy.test_gateway_failures import sdk

CREDITS_CARD = """\
id: credits
version: 1
effective_from: 2026-01-01
asset: credits
models:
  gpt-4o-mini:
    upstream: openai
    kind: chat
    max_output_tokens: 1000
    price: {input: 100, output: 400}   # credits per 1M tokens: 100 and 400 micro-credits a token
    cost: {markup: 2}
"""


@pytest.fixture
def credits_cards(tmp_path: Path, repo_root: Path) -> Path:
    target = tmp_path / "ratecards"
    shutil.copytree(repo_root / "config" / "ratecards", target)
    (target / "credits.yaml").write_text(CREDITS_CARD)
    tiers = (target / "tiers.yaml").read_text().replace("  pro: pro\n", "  pro: pro\n  credits: credits\n", 1)
    (target / "tiers.yaml").write_text(tiers)
    return target


@pytest.fixture
async def credits_gateway(aiohttp_client, gateway_config, credits_cards):
    config = type(gateway_config).model_validate({
        **gateway_config.model_dump(), "ratecards_dir": str(credits_cards), "assets": {"credits": {"usd_per_unit": "0.01"}}})
    return await aiohttp_client(create_app(config))


async def credits_user(gateway, user_id: str = "u_1") -> dict:
    resp = await gateway.post("/admin/end-users", json={"id": user_id, "tier": "credits"}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def test_a_credits_wallet_is_charged_in_credits_from_a_credits_card(credits_gateway, mock_upstream, wallets):
    created = await credits_user(credits_gateway)
    assert (created["asset"], created["wallet"]["currency"]) == ("credits", "credits")
    top_up = await credits_gateway.post("/admin/wallets/u_1/top-ups", json={"amount_micros": 1_000_000},
                                        headers={**ADMIN, "Idempotency-Key": "t1"})
    assert top_up.status == 201
    key = (await (await credits_gateway.post("/admin/end-users/u_1/keys", json={"name": "web"}, headers=ADMIN)).json())["key"]
    mock_upstream.usage_override = make_usage(10, 20)
    base_url = str(credits_gateway.make_url("/v1"))
    await sdk(base_url, key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=50)
    charge = next(e for e in await wallets.ledger("u_1") if e.type == "charge")
    assert (charge.amount_micros, charge.details["asset"], charge.details["cost_micros"]) == (-(10 * 100 + 20 * 400), "credits", 4_500)
    assert (await wallets.get("u_1")).balance_micros == 1_000_000 - 9_000
    wallet = await (await credits_gateway.get("/v1/wallet", headers={"Authorization": f"Bearer {key}"})).json()
    assert (wallet["currency"], wallet["balance_micros"]) == ("credits", 991_000)


async def test_every_ledger_entry_of_a_credits_wallet_names_its_asset(credits_gateway, wallets):
    await credits_user(credits_gateway)
    await wallets.top_up("u_1", 500, idempotency_key="t")
    assert {e.details.get("asset") for e in await wallets.ledger("u_1")} == {"credits"}


async def test_moving_a_credits_wallet_to_a_usd_tier_is_refused_and_changes_nothing(credits_gateway):
    await credits_user(credits_gateway)
    resp = await credits_gateway.patch("/admin/end-users/u_1", json={"tier": "default"}, headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "asset_mismatch"
    assert (await (await credits_gateway.get("/admin/end-users/u_1", headers=ADMIN)).json())["tier"] == "credits"


async def test_asking_for_an_asset_the_card_does_not_price_in_is_a_400(credits_gateway, wallets):
    resp = await credits_gateway.post("/admin/end-users", json={"id": "u_1", "tier": "default", "asset": "credits"}, headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "asset_mismatch"
    assert await wallets.get("u_1") is None


async def test_a_call_priced_from_a_card_in_another_asset_is_refused_before_any_hold(credits_gateway, make_end_user, wallets, mock_upstream):
    # A wallet recorded as credits whose profile points at a USD tier (an operator's edit of tiers.yaml, say).
    user = await make_end_user(tier="default", asset="credits")
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk(str(credits_gateway.make_url("/v1")), user.key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert (refused.value.status_code, refused.value.code) == (500, "asset_mismatch")
    assert mock_upstream.request_count == 0
    assert [e.type for e in await wallets.ledger(user.id)] == ["top_up", "open"]
