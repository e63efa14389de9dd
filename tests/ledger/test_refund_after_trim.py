"""A charge older than Redis's retention is refunded from the ledger of record, with the same limits as a recent one."""

from __future__ import annotations

import redis.asyncio as aioredis

from proxy.appstate import LEDGER_DB, REDIS, WALLETS
from proxy.config import ArchiveConfig, EventsConfig
from proxy.events.consumer import EventConsumer
from proxy.ledger.archiver import Archiver
from proxy.store import WalletStore
from proxy.store.archive import ArchiveStore
from proxy.store.events import EventStore
from proxy.store.grants import GrantStore
from tests.conftest import ADMIN

USD = 1_000_000


async def trimmed_charges(client, wallet_id: str, captures: list[int], promotional: int = 0) -> list[str]:
    """Charges on a new wallet (with `promotional` credit, drawn first), then archived and trimmed
    from Redis; their ledger ids."""
    app = client.server.app
    wallets: WalletStore = app[WALLETS]
    redis: aioredis.Redis = app[REDIS]
    assert (await client.post("/admin/end-users", json={"id": wallet_id}, headers=ADMIN)).status == 201
    await wallets.top_up(wallet_id, 10 * USD, idempotency_key=f"{wallet_id}-seed")
    if promotional:
        await GrantStore(redis).grant(wallet_id, promotional, kind="promotional", idempotency_key=f"{wallet_id}-promo")
    ids = []
    for n, captured in enumerate(captures):
        hold = await wallets.hold(wallet_id, captured, meta={"request_id": f"req_{n}"})
        ids.append((await wallets.settle(wallet_id, hold.hold_id, captured)).ledger_id)
    consumer = EventConsumer(EventStore(redis), wallets, EventsConfig())
    while await consumer.pass_once():
        pass
    archiver = Archiver(ArchiveStore(redis), wallets, app[LEDGER_DB], ArchiveConfig(redis_retention_days=1e-12))
    await archiver.drain()
    assert await wallets.ledger_after(wallet_id, "0") == []  # every entry left Redis
    return ids


async def refund(client, wallet_id: str, charge_id: str, amount: int, key: str):
    return await client.post(f"/admin/wallets/{wallet_id}/refunds", headers={**ADMIN, "Idempotency-Key": key},
                             json={"amount_micros": amount, "charge_id": charge_id, "reason": "late complaint"})


async def test_a_trimmed_charge_is_refunded_from_the_ledger_of_record(client):
    [charge] = await trimmed_charges(client, "u_1", [300_000])
    before = (await client.server.app[WALLETS].get("u_1")).balance_micros

    response = await refund(client, "u_1", charge, 200_000, "r1")

    assert response.status == 201, await response.text()
    assert (await response.json())["wallet"]["balance_micros"] == before + 200_000
    replay = await refund(client, "u_1", charge, 200_000, "r1")
    assert replay.status == 201 and replay.headers.get("Idempotent-Replayed") == "true"
    assert (await client.server.app[WALLETS].get("u_1")).balance_micros == before + 200_000


async def test_refunds_of_a_trimmed_charge_never_exceed_what_it_captured(client):
    [charge] = await trimmed_charges(client, "u_1", [300_000])
    assert (await refund(client, "u_1", charge, 250_000, "r1")).status == 201

    too_much = await refund(client, "u_1", charge, 50_001, "r2")

    assert too_much.status == 409 and (await too_much.json())["error"]["code"] == "refund_exceeds_charge"
    assert (await refund(client, "u_1", charge, 50_000, "r3")).status == 201


async def test_another_wallets_trimmed_charge_is_not_found(client):
    [charge] = await trimmed_charges(client, "u_1", [300_000])
    await trimmed_charges(client, "u_2", [1_000])

    response = await refund(client, "u_2", charge, 1_000, "r1")

    assert response.status == 404 and (await response.json())["error"]["code"] == "charge_not_found"


async def test_a_trimmed_charge_is_refunded_to_the_grants_it_drew_from(client):
    [charge] = await trimmed_charges(client, "u_1", [300_000], promotional=100_000)  # promo 100,000, purchased 200,000
    assert (await refund(client, "u_1", charge, 250_000, "r1")).status == 201
    grants = {g.id: g.remaining_micros for g in await GrantStore(client.server.app[REDIS]).grants("u_1")}
    assert grants["purchased"] == 10 * USD and sum(grants.values()) == 10 * USD + 50_000
