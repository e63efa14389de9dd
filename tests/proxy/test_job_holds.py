"""Job holds through the admin API: reserve a long job's budget, capture its steps, release the rest,
or abandon it to the reaper. Exact micros and the ledger invariants (the `redis` fixture) after each."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import ADMIN

FUNDS = 10_000_000


@pytest.fixture
async def funded(client) -> str:
    resp = await client.post("/admin/end-users", json={"id": "u_job", "tier": "default"}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    resp = await client.post("/admin/wallets/u_job/top-ups", json={"amount_micros": FUNDS},
                             headers={**ADMIN, "Idempotency-Key": "seed"})
    assert resp.status == 201
    return "u_job"


async def post(client, path: str, body: dict, key: str | None = None):
    headers = {**ADMIN, **({"Idempotency-Key": key} if key else {})}
    resp = await client.post(f"/admin/wallets/u_job{path}", json=body, headers=headers)
    return resp.status, await resp.json(), resp.headers


async def open_hold(client, amount: int, key: str = "job-1", **extra) -> dict:
    status, body, _ = await post(client, "/holds", {"amount_micros": amount, **extra}, key)
    assert status == 201, body
    return body


async def wallet(wallets) -> tuple[int, int]:
    state = await wallets.get("u_job")
    return state.balance_micros, state.held_micros


async def test_a_job_hold_captured_twice_then_released_charges_exactly_the_captures(client, funded, wallets):
    hold = await open_hold(client, 3_000_000, description="crawl 40 sites")
    assert (hold["status"], hold["amount_micros"], hold["description"]) == ("active", 3_000_000, "crawl 40 sites")
    assert await wallet(wallets) == (FUNDS, 3_000_000)

    s1, first, _ = await post(client, f"/holds/{hold['id']}/captures", {"amount_micros": 1_200_000}, "step-1")
    s2, second, _ = await post(client, f"/holds/{hold['id']}/captures", {"amount_micros": 300_000, "description": "step 2"}, "step-2")
    assert (s1, s2) == (201, 201)
    assert (first["left_micros"], second["left_micros"]) == (1_800_000, 1_500_000)
    assert await wallet(wallets) == (FUNDS - 1_500_000, 1_500_000)

    status, released, _ = await post(client, f"/holds/{hold['id']}/release", {"reason": "job finished"})
    assert status == 200 and released["released_micros"] == 1_500_000
    assert await wallet(wallets) == (FUNDS - 1_500_000, 0)
    entries = [(e.type, e.amount_micros) for e in reversed(await wallets.ledger("u_job", limit=20))]
    assert entries[-3:] == [("charge", -1_200_000), ("charge", -300_000), ("release", 0)]
    got = await client.get(f"/admin/wallets/u_job/holds/{hold['id']}", headers=ADMIN)
    assert (await got.json())["status"] == "released" and (await got.json())["captured_micros"] == 1_500_000


async def test_an_open_retried_with_its_key_is_the_same_hold_and_another_amount_is_a_conflict(client, funded, wallets):
    first = await open_hold(client, 1_000_000)
    status, again, headers = await post(client, "/holds", {"amount_micros": 1_000_000}, "job-1")
    assert status == 201 and again["id"] == first["id"] and headers["Idempotent-Replayed"] == "true"
    status, body, _ = await post(client, "/holds", {"amount_micros": 2_000_000}, "job-1")
    assert status == 409 and body["error"]["code"] == "idempotency_conflict"
    assert await wallet(wallets) == (FUNDS, 1_000_000)


async def test_a_capture_retried_with_its_key_debits_once(client, funded, wallets):
    hold = await open_hold(client, 1_000_000)
    _, first, _ = await post(client, f"/holds/{hold['id']}/captures", {"amount_micros": 400_000}, "c-1")
    status, again, headers = await post(client, f"/holds/{hold['id']}/captures", {"amount_micros": 400_000}, "c-1")
    assert status == 201 and again["ledger_id"] == first["ledger_id"] and headers["Idempotent-Replayed"] == "true"
    status, body, _ = await post(client, f"/holds/{hold['id']}/captures", {"amount_micros": 500_000}, "c-1")
    assert status == 409
    assert await wallet(wallets) == (FUNDS - 400_000, 600_000)


async def test_a_capture_beyond_what_the_hold_has_left_is_refused_and_changes_nothing(client, funded, wallets):
    hold = await open_hold(client, 1_000_000)
    before = await wallets.ledger("u_job", limit=50)
    status, body, _ = await post(client, f"/holds/{hold['id']}/captures", {"amount_micros": 1_000_001}, "c-1")
    assert status == 400 and "exceeds" in body["error"]["message"]
    assert await wallets.ledger("u_job", limit=50) == before
    assert await wallet(wallets) == (FUNDS, 1_000_000)


async def test_a_job_hold_the_wallet_cannot_cover_is_a_402(client, funded, wallets):
    status, body, _ = await post(client, "/holds", {"amount_micros": FUNDS + 1}, "too-big")
    assert status == 402 and body["error"]["code"] == "insufficient_quota"
    assert await wallet(wallets) == (FUNDS, 0)


async def test_extending_grows_the_hold_to_the_amount_named_once_however_often_it_is_sent(client, funded, wallets):
    hold = await open_hold(client, 1_000_000, ttl_seconds=60)
    for _ in range(2):
        status, grown, _ = await post(client, f"/holds/{hold['id']}/extend", {"amount_micros": 2_500_000, "ttl_seconds": 7200})
        assert status == 200 and grown["amount_micros"] == 2_500_000
    assert grown["expires_ms"] > hold["expires_ms"] + 7_000_000
    assert await wallet(wallets) == (FUNDS, 2_500_000)
    status, body, _ = await post(client, f"/holds/{hold['id']}/extend", {"amount_micros": 1_000_000})
    assert status == 400 and body["error"]["param"] == "amount_micros"


async def test_an_abandoned_job_hold_expires_and_the_reaper_releases_what_is_left(client, funded, wallets):
    hold = await open_hold(client, 1_000_000, ttl_seconds=1)
    await post(client, f"/holds/{hold['id']}/captures", {"amount_micros": 250_000}, "c-1")
    for _ in range(100):  # the app's reaper, or this pass of it, whichever comes first
        await wallets.expire_due()
        got = await (await client.get(f"/admin/wallets/u_job/holds/{hold['id']}", headers=ADMIN)).json()
        if got["status"] != "active":
            break
        await asyncio.sleep(0.1)
    assert got["status"] == "expired" and got["captured_micros"] == 250_000
    assert await wallet(wallets) == (FUNDS - 250_000, 0)
    [last] = await wallets.ledger("u_job", limit=1)
    assert (last.type, last.details["hold_id"], last.details["held_delta_micros"]) == ("expire", hold["id"], -750_000)


async def test_concurrent_captures_never_take_more_than_was_held(client, funded, wallets):
    hold = await open_hold(client, 50)
    results = await asyncio.gather(*(post(client, f"/holds/{hold['id']}/captures", {"amount_micros": 1}, f"c-{i}")
                                     for i in range(100)))
    assert sorted(status for status, _, _ in results) == [201] * 50 + [400] * 50
    assert await wallet(wallets) == (FUNDS - 50, 0)


async def test_a_calls_hold_cannot_be_captured_or_released_through_the_job_api(client, funded, wallets):
    call = await wallets.hold("u_job", 1_000)
    for path, body, key in ((f"/holds/{call.hold_id}/captures", {"amount_micros": 1}, "c-1"),
                            (f"/holds/{call.hold_id}/release", {"reason": "x"}, None)):
        status, answer, _ = await post(client, path, body, key)
        assert status == 404 and answer["error"]["code"] == "hold_not_found"
    await wallets.release("u_job", call.hold_id)


@pytest.mark.parametrize("body", [{"amount_micros": 0}, {"amount_micros": "5"}, {"amount_micros": 5, "ttl_seconds": 0},
                                  {"amount_micros": 5, "surprise": True}])
async def test_a_malformed_job_hold_is_a_400_and_changes_nothing(client, funded, wallets, body):
    status, answer, _ = await post(client, "/holds", body, "bad")
    assert status == 400 and answer["error"]["message"]
    assert await wallet(wallets) == (FUNDS, 0)


async def test_a_job_hold_needs_an_idempotency_key(client, funded, wallets):
    status, answer, _ = await post(client, "/holds", {"amount_micros": 5})
    assert status == 400 and answer["error"]["code"] == "idempotency_key_required"


async def test_an_outcome_priced_on_the_card_is_captured_by_name(client, funded, wallets):
    hold = await open_hold(client, 1_000_000)
    status, captured, _ = await post(client, f"/holds/{hold['id']}/captures", {"outcome": "resolved_conversation"}, "o-1")
    assert status == 201 and captured["captured_micros"] == 400_000  # the bundled card: 0.40 USD
    [entry] = await wallets.ledger("u_job", limit=1)
    d = entry.details
    assert (entry.amount_micros, d["outcome"], d["model"], d["cost_micros"]) == (-400_000, "resolved_conversation",
                                                                              "outcome:resolved_conversation", 50_000)
    assert await wallet(wallets) == (FUNDS - 400_000, 600_000)


@pytest.mark.parametrize("body, status", [({"outcome": "booked_meeting"}, 404),
                                          ({"outcome": "resolved_conversation", "amount_micros": 5}, 400), ({}, 400)])
async def test_a_capture_needs_exactly_one_known_amount_or_outcome(client, funded, wallets, body, status):
    hold = await open_hold(client, 1_000_000)
    got, answer, _ = await post(client, f"/holds/{hold['id']}/captures", body, "o-1")
    assert got == status and answer["error"]["message"]
    assert await wallet(wallets) == (FUNDS, 1_000_000)
