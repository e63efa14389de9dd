"""Hot reload of rate cards: valid changes are picked up, invalid ones refused, no call priced by two sets."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import openai
import pytest
from prometheus_client import REGISTRY

from proxy.app import create_app
from proxy.appstate import RATECARDS
from tests.conftest import ADMIN
from tests.mock_upstream import make_usage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


@pytest.fixture
def cards_dir(tmp_path: Path, repo_root: Path) -> Path:
    target = tmp_path / "ratecards"
    shutil.copytree(repo_root / "config" / "ratecards", target)
    return target


def set_gpt4o_mini_input_price(cards_dir: Path, price: str, version: int = 1) -> None:
    path = cards_dir / "default.yaml"
    text = path.read_text()
    text = text.replace("      input: 0.1875\n", f"      input: {price}\n", 1) if "input: 0.1875" in text else text
    lines = [f"version: {version}" if line.startswith("version:") else line for line in text.splitlines()]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
async def reloading_gateway(aiohttp_client, gateway_config, cards_dir):
    config = gateway_config.model_copy(update={"ratecards_dir": str(cards_dir), "ratecards_watch_interval_seconds": 0.05})
    return await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})


def refused_reloads() -> float:
    return REGISTRY.get_sample_value("metergate_ratecard_reloads_total", {"outcome": "refused"}) or 0.0


async def wait_for(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def charge_for_one_call(gateway, key: str, wallets, user_id: str = "u_1") -> int:
    before = (await wallets.get(user_id)).balance_micros
    client = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=key, max_retries=0)
    await client.chat.completions.create(**CHAT)
    return before - (await wallets.get(user_id)).balance_micros


async def test_sighup_picks_up_a_valid_change(reloading_gateway, cards_dir, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1_000_000, 0)
    assert await charge_for_one_call(reloading_gateway, user.key, wallets) == 187_500
    registry = reloading_gateway.server.app[RATECARDS]
    old = registry.current
    registry.files_signature = lambda: ()  # silence the file watcher: this test is about the signal
    set_gpt4o_mini_input_price(cards_dir, "0.25", version=2)
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_for(lambda: registry.current is not old)
    assert await charge_for_one_call(reloading_gateway, user.key, wallets) == 250_000


async def test_a_changed_file_is_picked_up(reloading_gateway, cards_dir, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1_000_000, 0)
    registry = reloading_gateway.server.app[RATECARDS]
    set_gpt4o_mini_input_price(cards_dir, "0.3", version=2)
    await wait_for(lambda: registry.current.card_for("default").version == 2)
    assert await charge_for_one_call(reloading_gateway, user.key, wallets) == 300_000


async def test_an_invalid_change_is_refused_and_calls_keep_flowing(reloading_gateway, cards_dir, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1_000_000, 0)
    registry = reloading_gateway.server.app[RATECARDS]
    running = registry.current
    refused = refused_reloads()
    (cards_dir / "default.yaml").write_text((cards_dir / "default.yaml").read_text().replace("input: 0.1875", "input: -1"))
    await wait_for(lambda: refused_reloads() == refused + 1)
    assert registry.current is running
    assert "input" in str(registry.last_error) and "default.yaml:" in str(registry.last_error)
    assert await charge_for_one_call(reloading_gateway, user.key, wallets) == 187_500


async def test_admin_reload_reports_what_is_wrong(reloading_gateway, cards_dir, make_end_user):
    (cards_dir / "tiers.yaml").write_text("tiers:\n  default: no-such-card\n")
    reloading_gateway.server.app[RATECARDS].files_signature = lambda: ()
    resp = await reloading_gateway.post("/admin/ratecards/reload", headers=ADMIN)
    assert resp.status == 422
    body = await resp.json()
    assert body["error"]["code"] == "invalid_ratecard" and "tiers.yaml:2" in body["error"]["message"]


async def test_admin_reload_loads_a_valid_change(reloading_gateway, cards_dir):
    reloading_gateway.server.app[RATECARDS].files_signature = lambda: ()
    set_gpt4o_mini_input_price(cards_dir, "0.2", version=3)
    resp = await reloading_gateway.post("/admin/ratecards/reload", headers=ADMIN)
    assert resp.status == 200
    assert "default@3" in [c["ref"] for c in (await resp.json())["cards"]]


async def test_no_call_is_priced_by_two_card_sets(reloading_gateway, cards_dir, make_end_user, mock_upstream, wallets):
    """Reload between two versions while calls run: every charge matches the one version it names."""
    user = await make_end_user(funds=1_000_000_000)
    mock_upstream.usage_override = make_usage(1_000_000, 0)
    registry = reloading_gateway.server.app[RATECARDS]
    registry.files_signature = lambda: ()
    v1 = (cards_dir / "default.yaml").read_text()
    set_gpt4o_mini_input_price(cards_dir, "0.5", version=2)
    v2 = (cards_dir / "default.yaml").read_text()
    client = openai.AsyncOpenAI(base_url=str(reloading_gateway.make_url("/v1")), api_key=user.key, max_retries=0)
    stop = asyncio.Event()

    async def flip() -> None:
        for i in range(40):
            (cards_dir / "default.yaml").write_text(v1 if i % 2 else v2)
            await registry.reload()
        stop.set()

    async def call_until_stopped() -> None:
        while not stop.is_set():
            await client.chat.completions.create(**CHAT)

    await asyncio.gather(flip(), *(call_until_stopped() for _ in range(8)))
    charges = [e for e in await wallets.ledger("u_1", limit=500) if e.type == "charge"]
    by_version = {"default@1": 187_500, "default@2": 500_000}
    assert {e.details["ratecard"] for e in charges} == set(by_version)
    for e in charges:
        assert -e.amount_micros == by_version[e.details["ratecard"]]


async def test_metrics_are_exposed(reloading_gateway):
    resp = await reloading_gateway.get("/metrics")
    assert resp.status == 200
    assert "metergate_ratecard_reloads_total" in await resp.text()


async def test_a_user_pinned_to_an_old_version_keeps_its_prices(reloading_gateway, cards_dir, make_end_user, mock_upstream, wallets):
    """Publishing default@2 moves the tier; PATCHing a user to default@1 grandfathers them."""
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1_000_000, 0)
    v2 = (cards_dir / "default.yaml").read_text().replace("version: 1", "version: 2").replace("input: 0.1875", "input: 0.25")
    (cards_dir / "default-v2.yaml").write_text(v2)
    registry = reloading_gateway.server.app[RATECARDS]
    assert await registry.reload() and registry.current.card_for("default").version == 2
    assert await charge_for_one_call(reloading_gateway, user.key, wallets) == 250_000
    resp = await reloading_gateway.patch("/admin/end-users/u_1", json={"ratecard": "default@1"}, headers=ADMIN)
    assert resp.status == 200
    assert await charge_for_one_call(reloading_gateway, user.key, wallets) == 187_500
    assert (await wallets.ledger("u_1"))[0].details["ratecard"] == "default@1"
