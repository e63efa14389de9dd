"""Reports group by asset: a USD wallet's and a credits wallet's amounts are never added up,
and grouped by asset the usage report gives each in USD at the asset's configured value."""

from __future__ import annotations

import pytest

from proxy.app import create_app
from proxy.config import load_config
from proxy.store import WalletStore
from tests.conftest import ADMIN, ADMIN_KEY
from tests.ledger.conftest import archive_now


@pytest.fixture
async def asset_gateway(aiohttp_client, database_url: str, redis_server, redis):
    config = load_config(redis_url=redis_server.url, admin_keys=[ADMIN_KEY], database_url=database_url,
                         assets={"credits": {"usd_per_unit": "0.01"}})
    return await aiohttp_client(create_app(config))


async def charge(wallets: WalletStore, wallet_id: str, amount: int, cost: int) -> None:
    hold = await wallets.hold(wallet_id, amount)
    await wallets.settle(wallet_id, hold.hold_id, amount, meta={"model": "m", "price_micros": amount, "cost_micros": cost})


async def test_usage_and_money_reports_keep_each_asset_apart(asset_gateway, wallets):
    await wallets.open("u_usd", profile={"tier": "default", "metadata": {}})
    await wallets.open("u_cr", profile={"tier": "credits", "metadata": {}, "asset": "credits"}, asset="credits")
    await wallets.top_up("u_usd", 1_000_000, idempotency_key="t")
    await wallets.top_up("u_cr", 50_000_000, idempotency_key="t")
    await charge(wallets, "u_usd", 300_000, 100_000)
    await charge(wallets, "u_cr", 20_000_000, 5_000_000)
    await archive_now(asset_gateway)

    usage = await (await asset_gateway.get("/admin/reports/usage?group_by=asset", headers=ADMIN)).json()
    rows = {r["asset"]: (r["spend_micros"], r["cost_micros"], r["spend_usd_micros"], r["margin_usd_micros"]) for r in usage["data"]}
    assert rows == {"USD": (300_000, 100_000, 300_000, 200_000), "credits": (20_000_000, 5_000_000, 200_000, 150_000)}
    assert usage["totals_usd"] == {"spend_usd_micros": 500_000, "cost_usd_micros": 150_000, "margin_usd_micros": 350_000}

    money = await (await asset_gateway.get("/admin/reports/money?period=month", headers=ADMIN)).json()
    assert sorted((r["asset"], r["type"], r["amount_micros"]) for r in money["data"]) == [
        ("USD", "top_up", 1_000_000), ("credits", "top_up", 50_000_000)]
