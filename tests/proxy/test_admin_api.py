"""The admin API over HTTP: end users, keys, money movements, the ledger, and bad input."""

from __future__ import annotations

import pytest

from tests.conftest import ADMIN


async def create_user(client, user_id: str = "u_28f3a", **extra) -> dict:
    resp = await client.post("/admin/end-users", json={"id": user_id, "tier": "default", "metadata": {}, **extra}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def top_up(client, user_id: str, amount, key: str = "k1", **extra):
    return await client.post(
        f"/admin/wallets/{user_id}/top-ups", json={"amount_micros": amount, **extra},
        headers={**ADMIN, "Idempotency-Key": key},
    )


async def ledger_len(client, user_id: str) -> int:
    resp = await client.get(f"/admin/wallets/{user_id}/ledger?limit=500", headers=ADMIN)
    return len((await resp.json())["data"])


def assert_openai_error(body: dict, code: str | None = None) -> None:
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


async def test_create_end_user_returns_it_with_an_empty_wallet(client):
    user = await create_user(client, metadata={"plan": "trial"})
    assert user["id"] == "u_28f3a" and user["tier"] == "default" and user["metadata"] == {"plan": "trial"}
    assert user["wallet"]["balance_micros"] == 0 and user["wallet"]["available_micros"] == 0


async def test_get_end_user(client):
    await create_user(client)
    resp = await client.get("/admin/end-users/u_28f3a", headers=ADMIN)
    assert resp.status == 200
    assert (await resp.json())["id"] == "u_28f3a"


async def test_duplicate_end_user_is_409(client):
    await create_user(client)
    resp = await client.post("/admin/end-users", json={"id": "u_28f3a"}, headers=ADMIN)
    assert resp.status == 409
    assert_openai_error(await resp.json(), "already_exists")


async def test_unknown_end_user_is_404(client):
    resp = await client.get("/admin/end-users/nobody", headers=ADMIN)
    assert resp.status == 404
    assert_openai_error(await resp.json(), "end_user_not_found")


async def test_key_is_shown_once_and_listed_masked(client, accounts):
    await create_user(client)
    resp = await client.post("/admin/end-users/u_28f3a/keys", json={"name": "browser"}, headers=ADMIN)
    assert resp.status == 201
    created = await resp.json()
    assert created["key"].startswith("sk-eu_") and len(created["key"]) > 40
    listed = (await (await client.get("/admin/end-users/u_28f3a/keys", headers=ADMIN)).json())["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0] and created["key"] not in listed[0]["masked"]
    assert (await accounts.find_key(created["key"])).end_user_id == "u_28f3a"


async def test_key_plaintext_is_not_stored(client, redis):
    await create_user(client)
    created = await (await client.post("/admin/end-users/u_28f3a/keys", json={}, headers=ADMIN)).json()
    secret = created["key"][len("sk-eu_"):].encode()
    for key in [k async for k in redis.scan_iter()]:
        assert secret not in key
        if await redis.type(key) == b"string":
            assert secret not in await redis.get(key)
        elif await redis.type(key) == b"hash":
            assert all(secret not in v for v in (await redis.hgetall(key)).values())


async def test_revoking_a_key_marks_it_revoked(client, accounts):
    await create_user(client)
    created = await (await client.post("/admin/end-users/u_28f3a/keys", json={}, headers=ADMIN)).json()
    resp = await client.delete(f"/admin/end-users/u_28f3a/keys/{created['id']}", headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["revoked"] is True
    assert (await accounts.find_key(created["key"])).revoked


async def test_revoking_an_unknown_key_is_404(client):
    await create_user(client)
    resp = await client.delete("/admin/end-users/u_28f3a/keys/key_nope", headers=ADMIN)
    assert resp.status == 404
    assert_openai_error(await resp.json(), "key_not_found")


async def test_top_up_returns_the_new_balance(client):
    await create_user(client)
    resp = await top_up(client, "u_28f3a", 5_000_000, reference="pi_1")
    assert resp.status == 201
    body = await resp.json()
    assert body["wallet"]["balance_micros"] == 5_000_000 and body["wallet"]["balance"] == "5.000000"


async def test_top_up_replay_returns_the_first_answer(client):
    await create_user(client)
    first = await (await top_up(client, "u_28f3a", 5_000_000)).json()
    resp = await top_up(client, "u_28f3a", 5_000_000)
    assert resp.status == 201 and resp.headers["Idempotent-Replayed"] == "true"
    assert await resp.json() == first
    wallet = await (await client.get("/admin/wallets/u_28f3a", headers=ADMIN)).json()
    assert wallet["balance_micros"] == 5_000_000


async def test_top_up_same_key_other_body_is_409(client):
    await create_user(client)
    await top_up(client, "u_28f3a", 5_000_000)
    resp = await top_up(client, "u_28f3a", 7_000_000)
    assert resp.status == 409
    assert_openai_error(await resp.json(), "idempotency_conflict")


async def test_top_up_without_idempotency_key_is_400(client):
    await create_user(client)
    resp = await client.post("/admin/wallets/u_28f3a/top-ups", json={"amount_micros": 1}, headers=ADMIN)
    assert resp.status == 400
    assert_openai_error(await resp.json(), "idempotency_key_required")


async def test_get_wallet(client):
    await create_user(client, credit_limit_micros=2_000_000)
    await top_up(client, "u_28f3a", 5_000_000)
    wallet = await (await client.get("/admin/wallets/u_28f3a", headers=ADMIN)).json()
    assert {k: wallet[k] for k in ("balance_micros", "held_micros", "available_micros", "credit_limit_micros")} == {
        "balance_micros": 5_000_000, "held_micros": 0, "available_micros": 7_000_000, "credit_limit_micros": 2_000_000,
    }


async def test_adjustment_requires_a_reason(client):
    await create_user(client)
    resp = await client.post(
        "/admin/wallets/u_28f3a/adjustments", json={"amount_micros": 100}, headers={**ADMIN, "Idempotency-Key": "a"}
    )
    assert resp.status == 400
    assert_openai_error(await resp.json())
    assert await ledger_len(client, "u_28f3a") == 1


async def test_negative_adjustment_beyond_available_is_402(client):
    await create_user(client)
    await top_up(client, "u_28f3a", 1_000)
    resp = await client.post(
        "/admin/wallets/u_28f3a/adjustments", json={"amount_micros": -1_001, "reason": "oops"},
        headers={**ADMIN, "Idempotency-Key": "a"},
    )
    assert resp.status == 402
    assert_openai_error(await resp.json(), "insufficient_quota")


async def test_adjustment_credits_and_debits(client):
    await create_user(client)
    await top_up(client, "u_28f3a", 1_000_000)
    for key, amount in (("a1", 250_000), ("a2", -50_000)):
        resp = await client.post(
            "/admin/wallets/u_28f3a/adjustments", json={"amount_micros": amount, "reason": "goodwill"},
            headers={**ADMIN, "Idempotency-Key": key},
        )
        assert resp.status == 201
    assert (await resp.json())["wallet"]["balance_micros"] == 1_200_000


async def test_refund_of_a_charge(client, wallets):
    await create_user(client)
    await top_up(client, "u_28f3a", 1_000_000)
    hold = await wallets.hold("u_28f3a", 500_000)
    charge = await wallets.settle("u_28f3a", hold.hold_id, 400_000)
    resp = await client.post(
        "/admin/wallets/u_28f3a/refunds", json={"amount_micros": 400_000, "charge_id": charge.ledger_id, "reason": "bad output"},
        headers={**ADMIN, "Idempotency-Key": "r1"},
    )
    assert resp.status == 201
    assert (await resp.json())["wallet"]["balance_micros"] == 1_000_000
    again = await client.post(
        "/admin/wallets/u_28f3a/refunds", json={"amount_micros": 1, "charge_id": charge.ledger_id, "reason": "more"},
        headers={**ADMIN, "Idempotency-Key": "r2"},
    )
    assert again.status == 409
    assert_openai_error(await again.json(), "refund_exceeds_charge")


async def test_ledger_is_paginated_newest_first(client):
    await create_user(client)
    for i in range(5):
        await top_up(client, "u_28f3a", 1_000 * (i + 1), key=f"k{i}")
    seen, cursor = [], None
    while True:
        url = "/admin/wallets/u_28f3a/ledger?limit=2" + (f"&starting_after={cursor}" if cursor else "")
        page = await (await client.get(url, headers=ADMIN)).json()
        seen += [(e["type"], e["amount_micros"]) for e in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == [("top_up", 5_000), ("top_up", 4_000), ("top_up", 3_000), ("top_up", 2_000), ("top_up", 1_000), ("open", 0)]


async def test_ledger_of_unknown_wallet_is_404(client):
    resp = await client.get("/admin/wallets/nobody/ledger", headers=ADMIN)
    assert resp.status == 404
    assert_openai_error(await resp.json(), "wallet_not_found")


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=501", "starting_after=zzz"])
async def test_ledger_bad_query_is_400(client, query):
    await create_user(client)
    resp = await client.get(f"/admin/wallets/u_28f3a/ledger?{query}", headers=ADMIN)
    assert resp.status == 400
    assert_openai_error(await resp.json())


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b'{"reference": "no amount"}',
        b'{"amount_micros": -5}',
        b'{"amount_micros": 0}',
        b'{"amount_micros": 1.5}',
        b'{"amount_micros": "100"}',
        b'{"amount_micros": true}',
        b'{"amount_micros": 1000000000000000000000}',
        b'{"amount_micros": 100, "surprise": 1}',
    ],
)
async def test_bad_top_up_body_is_400_and_changes_nothing(client, body):
    await create_user(client)
    resp = await client.post(
        "/admin/wallets/u_28f3a/top-ups", data=body,
        headers={**ADMIN, "Idempotency-Key": "k", "Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert_openai_error(await resp.json())
    assert await ledger_len(client, "u_28f3a") == 1


async def test_top_up_of_unknown_wallet_is_404(client):
    resp = await top_up(client, "nobody", 1_000)
    assert resp.status == 404
    assert_openai_error(await resp.json(), "wallet_not_found")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
async def test_wrong_admin_key_is_401_and_changes_nothing(client, headers):
    await create_user(client)
    resp = await client.post(
        "/admin/wallets/u_28f3a/top-ups", json={"amount_micros": 1_000}, headers={**headers, "Idempotency-Key": "k"}
    )
    assert resp.status == 401
    assert_openai_error(await resp.json(), "invalid_api_key")
    assert await ledger_len(client, "u_28f3a") == 1


async def test_oversized_body_is_413(client):
    await create_user(client)
    big = b'{"amount_micros": 1, "reference": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    resp = await client.post(
        "/admin/wallets/u_28f3a/top-ups", data=big,
        headers={**ADMIN, "Idempotency-Key": "k", "Content-Type": "application/json"},
    )
    assert resp.status == 413
    assert_openai_error(await resp.json(), "request_too_large")
    assert await ledger_len(client, "u_28f3a") == 1


async def test_unknown_route_is_404_in_openai_shape(client):
    resp = await client.get("/admin/nothing-here", headers=ADMIN)
    assert resp.status == 404
    assert_openai_error(await resp.json())


async def test_openapi_document_describes_the_admin_api(client):
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    for path in ("/admin/end-users", "/admin/end-users/{id}/keys", "/admin/wallets/{id}/top-ups", "/admin/ratecards/reload",
                 "/admin/wallets/{id}/refunds", "/admin/wallets/{id}/adjustments", "/admin/wallets/{id}/ledger"):
        assert path in doc["paths"]
    top_up_schema = doc["components"]["schemas"]["TopUp"]
    assert top_up_schema["properties"]["amount_micros"]["type"] == "integer"


async def test_health_and_readiness(client):
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["status"] == "ready"


async def test_the_service_reaper_expires_stale_holds(client, wallets):
    import asyncio

    await create_user(client)
    await top_up(client, "u_28f3a", 1_000_000)
    await wallets.hold("u_28f3a", 600_000, ttl_ms=30)
    for _ in range(100):
        await asyncio.sleep(0.05)
        wallet = await (await client.get("/admin/wallets/u_28f3a", headers=ADMIN)).json()
        if wallet["held_micros"] == 0:
            break
    assert wallet["held_micros"] == 0 and wallet["balance_micros"] == 1_000_000
    types = [e["type"] for e in (await (await client.get("/admin/wallets/u_28f3a/ledger", headers=ADMIN)).json())["data"]]
    assert types[0] == "expire"


async def test_every_reference_in_the_openapi_document_resolves(client):
    doc = await (await client.get("/openapi.json")).json()

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = list(refs(doc))
    assert found
    for ref in found:
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]


@pytest.mark.parametrize(("extra", "param"), [({"tier": "platinum"}, "tier"), ({"ratecard": "default@99"}, "ratecard")])
async def test_create_end_user_with_a_tier_or_pin_that_prices_nothing_is_400(client, extra, param):
    resp = await client.post("/admin/end-users", json={"id": "u_x", **extra}, headers=ADMIN)
    assert resp.status == 400
    body = await resp.json()
    assert_openai_error(body, "invalid_ratecard")
    assert body["error"]["param"] == param
    assert (await client.get("/admin/end-users/u_x", headers=ADMIN)).status == 404


async def test_patch_end_user_changes_only_what_is_sent(client):
    await create_user(client, metadata={"plan": "trial"})
    resp = await client.patch("/admin/end-users/u_28f3a", json={"ratecard": "default@1"}, headers=ADMIN)
    assert resp.status == 200
    user = await resp.json()
    assert (user["ratecard"], user["tier"], user["metadata"]) == ("default@1", "default", {"plan": "trial"})
    user = await (await client.patch("/admin/end-users/u_28f3a", json={"ratecard": None, "tier": "pro"}, headers=ADMIN)).json()
    assert (user["ratecard"], user["tier"]) == (None, "pro")


@pytest.mark.parametrize(("body", "code"), [
    ({"ratecard": "nope@1"}, "invalid_ratecard"),
    ({"tier": "platinum"}, "invalid_ratecard"),
    ({"tier": None}, "invalid_request"),
    ({"balance": 5}, "invalid_request"),
])
async def test_bad_patch_of_an_end_user_is_400_and_changes_nothing(client, body, code):
    await create_user(client)
    resp = await client.patch("/admin/end-users/u_28f3a", json=body, headers=ADMIN)
    assert resp.status == 400
    assert_openai_error(await resp.json(), code)
    user = await (await client.get("/admin/end-users/u_28f3a", headers=ADMIN)).json()
    assert (user["tier"], user["ratecard"]) == ("default", None)


async def test_patch_of_an_unknown_end_user_is_404(client):
    resp = await client.patch("/admin/end-users/nobody", json={"tier": "pro"}, headers=ADMIN)
    assert resp.status == 404
    assert_openai_error(await resp.json(), "end_user_not_found")


async def test_the_openapi_document_describes_every_route_the_service_serves(client):
    doc = await (await client.get("/openapi.json")).json()
    served = {(route.method.lower(), route.resource.canonical)
              for route in client.server.app.router.routes() if route.method not in ("HEAD", "OPTIONS", "*")}
    for admin in client.server.app._subapps:  # the /admin sub-application's own routes
        served |= {(r.method.lower(), r.resource.canonical) for r in admin.router.routes()
                   if r.method not in ("HEAD", "OPTIONS", "*")}
    missing = sorted(f"{method.upper()} {path}" for method, path in served if method not in doc["paths"].get(path, {}))
    assert missing == []
