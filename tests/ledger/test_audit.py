"""The admin audit log (proxy/admin_audit.py, proxy/ledger/audit.py) through the running app, on SQLite
and on PostgreSQL: every change is recorded with its key's name, action, target and status, with
before/after snapshots and no secret anywhere; refusals are recorded, reads are not; the listing
filters and pages; rows cannot be changed.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from proxy.admin_roles import plain_key_name
from proxy.app import create_app
from proxy.config import Config, load_config
from proxy.ledger.db import LedgerDatabase
from proxy.ledger.schema import audit_log
from proxy.store import WalletStore
from tests.conftest import ADMIN, ADMIN_KEY
from tests.redis_server import RedisServer

VIEWER_KEY, DEVELOPER_KEY = "test-viewer-key-vera", "test-developer-key-dana"
VIEWER = {"Authorization": f"Bearer {VIEWER_KEY}"}
DEVELOPER = {"Authorization": f"Bearer {DEVELOPER_KEY}"}
JWT_SECRET = "audit-test-jwt-secret-of-at-least-32-bytes"
ADMIN_NAME = plain_key_name(ADMIN_KEY)


@pytest.fixture
def audit_config(redis_server: RedisServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, database_url: str) -> Config:
    monkeypatch.setenv("MG_TEST_VIEWER_KEY", VIEWER_KEY)
    monkeypatch.setenv("MG_TEST_DEVELOPER_KEY", DEVELOPER_KEY)
    monkeypatch.setenv("MG_TEST_JWT_SECRET", JWT_SECRET)
    return load_config(
        redis_url=redis_server.url, admin_keys=[ADMIN_KEY], database_url=database_url,
        admins=[{"name": "vera", "key_env": "MG_TEST_VIEWER_KEY", "role": "viewer"},
                {"name": "dana", "key_env": "MG_TEST_DEVELOPER_KEY", "role": "developer"}],
        jwt={"hs256_secret_env": "MG_TEST_JWT_SECRET"},
    )


@pytest.fixture
async def app(aiohttp_client, audit_config: Config, ledger_db: LedgerDatabase) -> TestClient:
    return await aiohttp_client(create_app(audit_config))


async def ok(resp, status: int) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json()


async def audit(app: TestClient, **filters: Any) -> list[dict[str, Any]]:
    """Every audit row the listing gives (newest first)."""
    return (await ok(await app.get("/admin/audit", params={"limit": 500, **filters}, headers=VIEWER), 200))["data"]


def summary(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Oldest first: who did what to whom, and how it went."""
    return [(r["actor"], r["role"], r["method"], r["action"], r["target"], r["status"]) for r in reversed(rows)]


async def make_user(app: TestClient, user_id: str = "u_1") -> None:
    await ok(await app.post("/admin/end-users", json={"id": user_id}, headers=DEVELOPER), 201)


async def top_up(app: TestClient, amount: int, key: str = "t1", user_id: str = "u_1") -> dict[str, Any]:
    return await ok(await app.post(f"/admin/wallets/{user_id}/top-ups", json={"amount_micros": amount},
                                   headers={**ADMIN, "Idempotency-Key": key}), 201)


async def test_every_admin_change_is_recorded_with_its_keys_name_action_target_and_status(app, wallets: WalletStore):
    await make_user(app)
    await ok(await app.patch("/admin/end-users/u_1", json={"metadata": {"plan": "pro"}}, headers=DEVELOPER), 200)
    key = (await ok(await app.post("/admin/end-users/u_1/keys", json={"name": "web"}, headers=DEVELOPER), 201))["id"]
    await ok(await app.patch(f"/admin/end-users/u_1/keys/{key}", json={"name": "web2"}, headers=DEVELOPER), 200)
    await ok(await app.delete(f"/admin/end-users/u_1/keys/{key}", headers=DEVELOPER), 200)
    await top_up(app, 5_000_000)
    await ok(await app.post("/admin/wallets/u_1/adjustments", json={"amount_micros": -1_000_000, "reason": "fix"},
                            headers={**ADMIN, "Idempotency-Key": "a1"}), 201)
    hold = await wallets.hold("u_1", 500_000)
    charge = await wallets.settle("u_1", hold.hold_id, 400_000)
    await ok(await app.post("/admin/wallets/u_1/refunds", json={"amount_micros": 400_000, "charge_id": charge.ledger_id,
                                                               "reason": "bad"}, headers={**ADMIN, "Idempotency-Key": "r1"}), 201)
    endpoint = (await ok(await app.post("/admin/webhook-endpoints", json={"url": "http://127.0.0.1:9/h", "enabled": False},
                                        headers=DEVELOPER), 201))["id"]
    await ok(await app.post(f"/admin/webhook-endpoints/{endpoint}/rotate-secret", json={}, headers=DEVELOPER), 200)
    await ok(await app.put("/admin/end-users/u_1/balance-alerts", json={"absolute_micros": [1_000_000]}, headers=DEVELOPER), 200)
    await ok(await app.delete(f"/admin/webhook-endpoints/{endpoint}", headers=DEVELOPER), 200)
    assert summary(await audit(app)) == [
        ("dana", "developer", "POST", "POST /end-users", "u_1", 201),
        ("dana", "developer", "PATCH", "PATCH /end-users/{id}", "u_1", 200),
        ("dana", "developer", "POST", "POST /end-users/{id}/keys", "u_1", 201),
        ("dana", "developer", "PATCH", "PATCH /end-users/{id}/keys/{key_id}", key, 200),
        ("dana", "developer", "DELETE", "DELETE /end-users/{id}/keys/{key_id}", key, 200),
        (ADMIN_NAME, "admin", "POST", "POST /wallets/{id}/top-ups", "u_1", 201),
        (ADMIN_NAME, "admin", "POST", "POST /wallets/{id}/adjustments", "u_1", 201),
        (ADMIN_NAME, "admin", "POST", "POST /wallets/{id}/refunds", "u_1", 201),
        ("dana", "developer", "POST", "POST /webhook-endpoints", endpoint, 201),
        ("dana", "developer", "POST", "POST /webhook-endpoints/{id}/rotate-secret", endpoint, 200),
        ("dana", "developer", "PUT", "PUT /end-users/{id}/balance-alerts", "u_1", 200),
        ("dana", "developer", "DELETE", "DELETE /webhook-endpoints/{id}", endpoint, 200),
    ]


async def test_secrets_never_appear_in_any_audit_row(app, ledger_db):
    await make_user(app)
    created_key = await ok(await app.post("/admin/end-users/u_1/keys", json={"name": "web"}, headers=DEVELOPER), 201)
    endpoint = await ok(await app.post("/admin/webhook-endpoints", json={"url": "http://127.0.0.1:9/h", "enabled": False},
                                       headers=DEVELOPER), 201)
    rotated = await ok(await app.post(f"/admin/webhook-endpoints/{endpoint['id']}/rotate-secret", json={}, headers=DEVELOPER), 200)
    token = await ok(await app.post("/admin/end-users/u_1/tokens", json={"ttl_seconds": 60}, headers=DEVELOPER), 201)
    # Secrets an operator might paste into a body: by field name, and by what the value is.
    await ok(await app.patch("/admin/end-users/u_1", headers=DEVELOPER, json={"metadata": {
        "stripe_api_key": "sk_live_pasted", "db_password": "hunter2hunter2", "note": f"Bearer {created_key['key']}",
        "nested": [{"client_secret": "cs_pasted"}], "plan": "pro"}}), 200)
    secrets = [created_key["key"], endpoint["secret"], rotated["secret"], token["token"], ADMIN_KEY, DEVELOPER_KEY,
               JWT_SECRET, "sk_live_pasted", "hunter2hunter2", "cs_pasted"]
    async with ledger_db.engine.connect() as conn:
        rows = (await conn.execute(select(audit_log))).all()
    assert len(rows) == 6
    for row in rows:
        for column, value in zip(audit_log.columns.keys(), row, strict=True):
            for secret in secrets:
                assert secret not in str(value), f"a secret in audit_log.{column}"
    patched = (await audit(app, action="PATCH /end-users/{id}"))[0]
    assert patched["request_body"]["metadata"]["plan"] == "pro"
    assert patched["request_body"]["metadata"]["stripe_api_key"] == "[redacted]"
    assert patched["after"]["profile"]["metadata"]["plan"] == "pro"


async def test_before_and_after_show_the_change(app):
    await make_user(app)
    await top_up(app, 5_000_000)
    key = (await ok(await app.post("/admin/end-users/u_1/keys", json={"name": "web"}, headers=DEVELOPER), 201))["id"]
    await ok(await app.delete(f"/admin/end-users/u_1/keys/{key}", headers=DEVELOPER), 200)
    endpoint = (await ok(await app.post("/admin/webhook-endpoints", json={"url": "http://127.0.0.1:9/h", "enabled": False},
                                        headers=DEVELOPER), 201))["id"]
    await ok(await app.post(f"/admin/webhook-endpoints/{endpoint}/rotate-secret", json={}, headers=DEVELOPER), 200)
    await ok(await app.put("/admin/end-users/u_1/balance-alerts", json={"absolute_micros": [1_000_000]}, headers=DEVELOPER), 200)
    created, topped, _, revoked, made, rotated, alerted = reversed(await audit(app))
    assert created["before"] is None and created["after"]["wallet"]["balance_micros"] == 0
    assert topped["before"]["wallet"]["balance_micros"] == 0 and topped["after"]["wallet"]["balance_micros"] == 5_000_000
    assert topped["after"]["wallet"]["available_micros"] == 5_000_000
    assert topped["request_body"] == {"amount_micros": 5_000_000}
    assert revoked["before"]["revoked_ms"] is None and isinstance(revoked["after"]["revoked_ms"], int)
    assert revoked["before"]["name"] == revoked["after"]["name"] == "web"
    assert made["before"] is None and made["after"]["url"] == "http://127.0.0.1:9/h" and made["after"]["enabled"] is False
    assert rotated["before"]["secret_fingerprint"] != rotated["after"]["secret_fingerprint"]
    assert alerted["before"]["balance_alerts"] is None
    assert alerted["after"]["balance_alerts"] == {"absolute_micros": [1_000_000], "percent_of_last_top_up": []}


async def test_a_refused_request_is_recorded_with_403_and_nothing_changed(app):
    await make_user(app)
    resp = await app.post("/admin/wallets/u_1/top-ups", json={"amount_micros": 9_000_000},
                          headers={**VIEWER, "Idempotency-Key": "v1"})
    assert resp.status == 403
    refused = (await audit(app))[0]
    assert (refused["actor"], refused["role"], refused["action"], refused["target"], refused["status"]) == (
        "vera", "viewer", "POST /wallets/{id}/top-ups", "u_1", 403)
    assert refused["request_body"] == {"amount_micros": 9_000_000}
    assert refused["before"] == refused["after"] and refused["after"]["wallet"]["balance_micros"] == 0
    assert refused["request_id"] == resp.headers["X-Request-Id"]


async def test_a_failed_change_is_recorded_with_its_status(app):
    await make_user(app)
    resp = await app.post("/admin/wallets/u_1/adjustments", json={"amount_micros": -1, "reason": "x"},
                          headers={**ADMIN, "Idempotency-Key": "a1"})
    assert resp.status == 402
    assert (await audit(app))[0]["status"] == 402


async def test_reads_and_unknown_keys_are_not_recorded(app):
    await make_user(app)
    for path in ("/admin/end-users/u_1", "/admin/wallets/u_1", "/admin/webhook-endpoints", "/admin/audit"):
        await ok(await app.get(path, headers=ADMIN), 200)
    assert (await app.head("/admin/wallets/u_1", headers=VIEWER)).status == 200
    assert (await app.post("/admin/wallets/u_1/top-ups", json={"amount_micros": 1},
                           headers={"Authorization": "Bearer nope", "Idempotency-Key": "n"})).status == 401
    assert summary(await audit(app)) == [("dana", "developer", "POST", "POST /end-users", "u_1", 201)]


async def test_the_listing_filters_by_actor_target_action_and_time(app):
    await make_user(app, "u_1")
    await make_user(app, "u_2")
    await top_up(app, 1_000_000, "t1", "u_1")
    await top_up(app, 2_000_000, "t2", "u_2")
    rows = await audit(app)
    assert [r["target"] for r in await audit(app, actor="dana")] == ["u_2", "u_1"]
    assert [r["action"] for r in await audit(app, target="u_2")] == ["POST /wallets/{id}/top-ups", "POST /end-users"]
    assert [r["target"] for r in await audit(app, action="POST /wallets/{id}/top-ups")] == ["u_2", "u_1"]
    assert await audit(app, actor=ADMIN_NAME, target="u_1") == [rows[1]]
    newest, oldest = rows[0]["at_ms"], rows[-1]["at_ms"]
    assert await audit(app, from_ms=oldest, to_ms=newest + 1) == rows
    assert await audit(app, from_ms=newest + 1) == []
    assert await audit(app, to_ms=oldest) == []


async def test_the_listing_pages_newest_first_by_id(app):
    for n in range(5):
        await make_user(app, f"u_{n}")
    seen, cursor = [], ""
    while True:
        page = await ok(await app.get(f"/admin/audit?limit=2{cursor}", headers=VIEWER), 200)
        seen += [r["target"] for r in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = f"&starting_after={page['next_cursor']}"
    assert seen == ["u_4", "u_3", "u_2", "u_1", "u_0"]


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=x", "starting_after=abc", "from_ms=-1"])
async def test_the_listing_refuses_bad_parameters(app, query):
    resp = await app.get(f"/admin/audit?{query}", headers=VIEWER)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_request"


async def test_audit_rows_cannot_be_updated_or_deleted(app, ledger_db):
    await make_user(app)
    for statement in ("UPDATE audit_log SET status = 200", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError):
            async with ledger_db.engine.begin() as conn:
                await conn.execute(text(statement))
    assert summary(await audit(app)) == [("dana", "developer", "POST", "POST /end-users", "u_1", 201)]


def _failures() -> float:
    return REGISTRY.get_sample_value("metergate_audit_write_failures_total") or 0.0


async def test_a_failed_audit_write_is_logged_and_counted_and_the_change_stands(app, monkeypatch, caplog):
    await make_user(app)

    async def refuse(self, record):
        raise OSError("database gone")

    monkeypatch.setattr(LedgerDatabase, "append_audit", refuse)
    before = _failures()
    with caplog.at_level(logging.ERROR, logger="proxy.ledger.audit"):
        topped = await top_up(app, 3_000_000)
    assert topped["wallet"]["balance_micros"] == 3_000_000
    assert _failures() == before + 1
    [logged] = [r.getMessage() for r in caplog.records if r.name == "proxy.ledger.audit"]
    assert "database gone" in logged and "POST /wallets/{id}/top-ups" in logged and ADMIN_NAME in logged
    assert ADMIN_KEY not in logged
