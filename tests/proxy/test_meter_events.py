"""Usage events of the operator's own meters through the admin API: the card's price after the free
units of the period, exactly once per idempotency key, refused whole when the wallet cannot pay.
The bundled default card: crawler_hour 0.50 USD per hour; page 0.01 USD after 100 free a month."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import ADMIN


async def make_user(client, funds: int) -> None:
    resp = await client.post("/admin/end-users", json={"id": "u_m", "tier": "default"}, headers=ADMIN)
    assert resp.status == 201
    if funds:
        resp = await client.post("/admin/wallets/u_m/top-ups", json={"amount_micros": funds},
                                 headers={**ADMIN, "Idempotency-Key": "seed"})
        assert resp.status == 201


async def event(client, key: str, **body):
    resp = await client.post("/admin/wallets/u_m/meter-events", json=body, headers={**ADMIN, "Idempotency-Key": key})
    return resp.status, await resp.json(), resp.headers


async def balance(wallets) -> int:
    return (await wallets.get("u_m")).balance_micros


async def test_an_event_is_charged_the_cards_price_per_unit_with_its_ledger_entry(client, wallets):
    await make_user(client, 10_000_000)
    status, charged, _ = await event(client, "e1", meter="crawler_hour", quantity="2.5", description="site audit")
    assert status == 201 and charged["charged_micros"] == 1_250_000
    assert await balance(wallets) == 10_000_000 - 1_250_000
    [entry] = await wallets.ledger("u_m", limit=1)
    assert entry.type == "charge" and entry.amount_micros == -1_250_000
    d = entry.details
    assert (d["meter"], d["quantity"], d["price_micros"], d["cost_micros"]) == ("crawler_hour", "2.5", 1_250_000, 750_000)
    assert d["model"] == "meter:crawler_hour"  # how reports and statements group it


async def test_included_units_are_free_then_the_rest_is_charged(client, wallets):
    await make_user(client, 10_000_000)
    status, first, _ = await event(client, "p1", meter="page", quantity=80)
    assert status == 201 and first["charged_micros"] == 0 and first["used_in_period"] == "80"
    status, second, _ = await event(client, "p2", meter="page", quantity=30)  # 20 free, 10 at 0.01
    assert status == 201 and second["charged_micros"] == 100_000 and second["used_in_period"] == "110"
    assert await balance(wallets) == 10_000_000 - 100_000


async def test_100_concurrent_events_with_20_duplicate_keys_charge_exactly_80(client, wallets):
    await make_user(client, 100_000_000)
    keys = [f"k{i}" for i in range(80)] + [f"k{i}" for i in range(20)]
    results = await asyncio.gather(*(event(client, key, meter="crawler_hour", quantity=1) for key in keys))
    assert [(s, b) for s, b, _ in results if s != 201] == []
    assert sum(1 for _, _, headers in results if headers.get("Idempotent-Replayed")) == 20
    assert await balance(wallets) == 100_000_000 - 80 * 500_000
    charges = [e for e in await wallets.ledger("u_m", limit=200) if e.type == "charge"]
    assert len(charges) == 80


async def test_concurrent_events_never_share_a_free_unit(client, wallets):
    await make_user(client, 10_000_000)
    results = await asyncio.gather(*(event(client, f"p{i}", meter="page", quantity=7) for i in range(30)))  # 210 pages
    assert all(status == 201 for status, _, _ in results)
    assert sum(charged["charged_micros"] for _, charged, _ in results) == (210 - 100) * 10_000
    assert await balance(wallets) == 10_000_000 - 110 * 10_000


async def test_an_event_the_wallet_cannot_pay_is_a_402_and_counts_nothing(client, wallets):
    await make_user(client, 400_000)
    status, body, _ = await event(client, "e1", meter="crawler_hour", quantity=1)
    assert status == 402 and body["error"]["code"] == "insufficient_quota"
    assert await balance(wallets) == 400_000
    status, body, _ = await event(client, "p1", meter="page", quantity=100)  # free: still fits
    assert status == 201 and body["charged_micros"] == 0 and body["used_in_period"] == "100"


async def test_an_event_never_spends_what_a_hold_reserved(client, wallets):
    await make_user(client, 1_000_000)
    hold = await wallets.hold("u_m", 800_000)
    status, _, _ = await event(client, "e1", meter="crawler_hour", quantity=1)
    assert status == 402
    await wallets.release("u_m", hold.hold_id)


async def test_a_key_replayed_with_another_event_is_a_conflict(client, wallets):
    await make_user(client, 10_000_000)
    await event(client, "e1", meter="crawler_hour", quantity=1)
    status, body, _ = await event(client, "e1", meter="crawler_hour", quantity=2)
    assert status == 409
    assert await balance(wallets) == 10_000_000 - 500_000


@pytest.mark.parametrize("body, param", [
    ({"meter": "crawler_hour", "quantity": 0}, "quantity"),
    ({"meter": "crawler_hour", "quantity": "1.0000001"}, "quantity"),
    ({"meter": "crawler_hour", "quantity": "lots"}, "quantity"),
    ({"meter": "crawler_hour", "quantity": True}, "quantity"),
    ({"meter": "crawler_hour", "quantity": 1, "timestamp": int(time.time()) + 86_400}, "timestamp"),
    ({"meter": "crawler_hour"}, "quantity"),
])
async def test_a_malformed_event_is_a_400_and_changes_nothing(client, wallets, body, param):
    await make_user(client, 10_000_000)
    status, answer, _ = await event(client, "bad", **body)
    assert status == 400 and answer["error"]["message"]
    assert param in (answer["error"].get("param") or "") or param in answer["error"]["message"]
    assert await balance(wallets) == 10_000_000


async def test_a_meter_the_card_does_not_price_is_a_404(client, wallets):
    await make_user(client, 10_000_000)
    status, answer, _ = await event(client, "e1", meter="gpu_second", quantity=1)
    assert status == 404 and answer["error"]["code"] == "meter_not_found"
    assert await balance(wallets) == 10_000_000


async def test_an_event_for_an_unknown_end_user_is_a_404(client, wallets):
    status, answer, _ = await event(client, "e1", meter="crawler_hour", quantity=1)
    assert status == 404
