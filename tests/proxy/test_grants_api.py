"""Grants and the credit limit through the admin API, and a promotional grant that
expires while a real stream through the proxy holds part of it."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from proxy.store import now_ms
from proxy.store.grants import GrantStore
from tests.conftest import ADMIN
from tests.proxy.test_gateway_failures import sdk


def money(key: str) -> dict[str, str]:
    return {**ADMIN, "Idempotency-Key": key}


async def grant(gateway, body: dict, key: str = "g1", user: str = "u_1"):
    return await gateway.post(f"/admin/wallets/{user}/grants", json=body, headers=money(key))


async def test_a_promotional_grant_is_listed_in_draw_order_before_purchased_credit(gateway, make_end_user):
    await make_end_user(funds=1_000_000)
    expires_at = int(time.time()) + 86_400
    resp = await grant(gateway, {"amount_micros": 500_000, "expires_at": expires_at, "metadata": {"campaign": "launch"}})
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert (created["grant"]["kind"], created["grant"]["priority"], created["grant"]["expires_at"]) == (
        "promotional", 25, expires_at)
    assert created["wallet"]["balance_micros"] == 1_500_000
    listed = await (await gateway.get("/admin/wallets/u_1/grants", headers=ADMIN)).json()
    assert [(g["id"], g["remaining_micros"]) for g in listed["data"]] == [
        (created["grant"]["id"], 500_000), ("purchased", 1_000_000)]
    entry = (await (await gateway.get("/admin/wallets/u_1/ledger?limit=1", headers=ADMIN)).json())["data"][0]
    assert (entry["type"], entry["amount_micros"], entry["details"]["grant_id"], entry["details"]["campaign"]) == (
        "grant", 500_000, created["grant"]["id"], "launch")


async def test_a_grant_replayed_with_its_idempotency_key_credits_once(gateway, make_end_user):
    await make_end_user(funds=0)
    first = await (await grant(gateway, {"amount_micros": 100})).json()
    again = await grant(gateway, {"amount_micros": 100})
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert (await again.json())["ledger_id"] == first["ledger_id"]
    assert (await (await gateway.get("/admin/wallets/u_1", headers=ADMIN)).json())["balance_micros"] == 100


@pytest.mark.parametrize("body, param", [
    ({"amount_micros": 0}, "amount_micros"),
    ({"amount_micros": 10, "kind": "purchased"}, "kind"),
    ({"amount_micros": 10, "kind": "Not A Kind"}, "kind"),
    ({"amount_micros": 10, "priority": 101}, "priority"),
    ({"amount_micros": 10, "expires_at": 1_000}, "expires_at"),
    ({"amount_micros": 10, "surprise": True}, "surprise"),
])
async def test_a_bad_grant_is_a_400_and_changes_nothing(gateway, make_end_user, body, param):
    await make_end_user(funds=0)
    resp = await grant(gateway, body)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == param
    assert (await (await gateway.get("/admin/wallets/u_1/grants", headers=ADMIN)).json())["data"] == []


async def test_a_grant_needs_an_idempotency_key(gateway, make_end_user):
    await make_end_user(funds=0)
    resp = await gateway.post("/admin/wallets/u_1/grants", json={"amount_micros": 10}, headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "idempotency_key_required"


async def test_a_grant_to_no_wallet_is_a_404(gateway):
    resp = await grant(gateway, {"amount_micros": 10}, user="nobody")
    assert resp.status == 404
    assert (await gateway.get("/admin/wallets/nobody/grants", headers=ADMIN)).status == 404


async def test_a_promotional_grant_expiring_while_a_stream_holds_part_of_it(gateway, base_url, make_end_user, mock_upstream, wallets):
    funds = 1_000_000
    user = await make_end_user(funds=funds)
    expires_ms = math.ceil((now_ms() + 1_500) / 1000) * 1000
    promo_id = (await (await grant(gateway, {"amount_micros": 30_000, "expires_at": expires_ms // 1000})).json())["grant"]["id"]
    mock_upstream.reply_words, mock_upstream.chunk_delay = 40, 0.1  # a stream of about four seconds
    stream = await sdk(base_url, user.key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=2_000, stream=True)
    chunks = 0
    async for _ in stream:
        chunks += 1
        if chunks == 5:
            await asyncio.sleep(max(expires_ms - now_ms(), 0) / 1000 + 0.05)
            assert await GrantStore(wallets.redis).expire_due() == 1  # the reaper's pass, mid-stream
            during = {g.id: g for g in await GrantStore(wallets.redis).grants(user.id)}
            assert during[promo_id].state == "expired"
            state = await wallets.get(user.id)
            # What is left of the promotion is what the stream holds; nothing else can use it.
            assert during[promo_id].remaining_micros == min(30_000, state.held_micros) > 0
            assert state.available_micros == funds - max(state.held_micros - 30_000, 0)
    ledger = list(reversed(await wallets.ledger(user.id, limit=50)))
    charge = next(e for e in ledger if e.type == "charge")
    expired = [e for e in ledger if e.type == "grant_expired"]
    drawn = dict(part.split(":") for part in charge.details["grants"].split(","))
    assert int(drawn[promo_id]) > 0
    assert int(drawn[promo_id]) - sum(e.amount_micros for e in expired) == 30_000  # spent or lapsed, nothing kept
    assert sum(int(v) for v in drawn.values()) == -charge.amount_micros
    assert expired[0].details["reserved"] != "0" and ledger.index(expired[0]) < ledger.index(charge)
    grants = {g.id: g.remaining_micros for g in await GrantStore(wallets.redis).grants(user.id)}
    assert grants == {"purchased": funds - int(drawn.get("purchased", 0))}


# ------------------------------------------------------------- credit limit


async def test_patching_the_credit_limit_lets_calls_spend_into_debt_and_is_audited(gateway, base_url, make_end_user, wallets):
    user = await make_end_user(funds=0)
    resp = await gateway.patch("/admin/wallets/u_1", json={"credit_limit_micros": 2_000_000, "reason": "net-30"}, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["wallet"]["available_micros"] == 2_000_000
    await sdk(base_url, user.key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    state = await wallets.get(user.id)
    assert state.balance_micros < 0
    grants = {g.id: g.remaining_micros for g in await GrantStore(wallets.redis).grants(user.id)}
    assert grants == {"debt": state.balance_micros}
    audit = (await (await gateway.get("/admin/audit", headers=ADMIN)).json())["data"]
    row = next(r for r in audit if r["action"] == "PATCH /wallets/{id}")
    assert (row["before"]["wallet"]["credit_limit_micros"], row["after"]["wallet"]["credit_limit_micros"], row["status"]) == (
        0, 2_000_000, 200)


async def test_the_credit_limit_cannot_be_lowered_below_what_the_wallet_owes(gateway, make_end_user, wallets):
    await make_end_user(funds=0)
    await gateway.patch("/admin/wallets/u_1", json={"credit_limit_micros": 1_000, "reason": "r"}, headers=ADMIN)
    await wallets.hold("u_1", 600)
    resp = await gateway.patch("/admin/wallets/u_1", json={"credit_limit_micros": 599, "reason": "r"}, headers=ADMIN)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "credit_limit_in_use"
    assert (await wallets.get("u_1")).credit_limit_micros == 1_000


@pytest.mark.parametrize("body", [{"credit_limit_micros": -1, "reason": "r"}, {"credit_limit_micros": 5}, {"reason": "r"}])
async def test_a_bad_credit_limit_change_is_a_400(gateway, make_end_user, wallets, body):
    await make_end_user(funds=0)
    resp = await gateway.patch("/admin/wallets/u_1", json=body, headers=ADMIN)
    assert resp.status == 400
    assert (await wallets.get("u_1")).credit_limit_micros == 0
