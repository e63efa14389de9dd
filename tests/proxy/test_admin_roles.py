"""Admin roles (proxy/admin_roles.py): a viewer reads, a developer manages end users, keys and
webhooks without moving money, an admin does everything, and every mounted route is in the table.

Through the running app on the private Redis; the audit these requests write goes to the
session's SQLite ledger (tests/ledger/test_audit.py checks the audit on both databases).
"""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.admin_roles import REQUIRED_ROLE, AdminIdentity, AdminKeyring, action_of, plain_key_name
from proxy.app import create_app
from proxy.config import Config, load_config
from proxy.store import WalletStore
from tests.conftest import ADMIN, ADMIN_KEY
from tests.redis_server import RedisServer

VIEWER_KEY, DEVELOPER_KEY = "test-viewer-key-vera", "test-developer-key-dana"
VIEWER = {"Authorization": f"Bearer {VIEWER_KEY}"}
DEVELOPER = {"Authorization": f"Bearer {DEVELOPER_KEY}"}
ADMINS = [{"name": "vera", "key_env": "MG_TEST_VIEWER_KEY", "role": "viewer"},
          {"name": "dana", "key_env": "MG_TEST_DEVELOPER_KEY", "role": "developer"}]


@pytest.fixture
def roles_config(redis_server: RedisServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("MG_TEST_VIEWER_KEY", VIEWER_KEY)
    monkeypatch.setenv("MG_TEST_DEVELOPER_KEY", DEVELOPER_KEY)
    return load_config(redis_url=redis_server.url, admin_keys=[ADMIN_KEY], admins=ADMINS)


@pytest.fixture
async def app(aiohttp_client, roles_config: Config) -> TestClient:
    return await aiohttp_client(create_app(roles_config))


async def ok(resp, status: int) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json()


@pytest.fixture
async def world(app: TestClient, wallets: WalletStore) -> dict[str, str]:
    """An end user with 5 USD, one charge of 0.4 USD, a key, and a (disabled) webhook endpoint, made by the admin."""
    await ok(await app.post("/admin/end-users", json={"id": "u_1"}, headers=ADMIN), 201)
    await ok(await app.post("/admin/wallets/u_1/top-ups", json={"amount_micros": 5_000_000},
                            headers={**ADMIN, "Idempotency-Key": "seed"}), 201)
    hold = await wallets.hold("u_1", 500_000)
    charge = await wallets.settle("u_1", hold.hold_id, 400_000)
    key = await ok(await app.post("/admin/end-users/u_1/keys", json={"name": "web"}, headers=ADMIN), 201)
    endpoint = await ok(await app.post("/admin/webhook-endpoints", json={"url": "http://127.0.0.1:9/hook", "enabled": False},
                                       headers=ADMIN), 201)
    return {"charge": charge.ledger_id, "key": key["id"], "endpoint": endpoint["id"]}


async def state(app: TestClient) -> dict[str, Any]:
    """Everything the mutating routes could change, as the admin reads it."""
    reads = {
        "end_user": "/admin/end-users/u_1", "keys": "/admin/end-users/u_1/keys", "ledger": "/admin/wallets/u_1/ledger?limit=500",
        "alerts": "/admin/end-users/u_1/balance-alerts", "endpoints": "/admin/webhook-endpoints", "cards": "/admin/ratecards",
    }
    return {name: await ok(await app.get(path, headers=ADMIN), 200) for name, path in reads.items()}


def mutations(world: dict[str, str]) -> list[tuple[str, str, dict[str, Any] | None]]:
    """One request of each mutating route family: (method, path, body)."""
    key, endpoint = world["key"], world["endpoint"]
    return [
        ("POST", "/admin/end-users", {"id": "u_2"}),
        ("PATCH", "/admin/end-users/u_1", {"tier": "default", "metadata": {"plan": "pro"}}),
        ("POST", "/admin/end-users/u_1/keys", {"name": "another"}),
        ("PATCH", f"/admin/end-users/u_1/keys/{key}", {"name": "renamed", "max_spend_micros": 1}),
        ("DELETE", f"/admin/end-users/u_1/keys/{key}", None),
        ("POST", "/admin/end-users/u_1/tokens", {"ttl_seconds": 60}),
        ("POST", "/admin/wallets/u_1/top-ups", {"amount_micros": 1_000_000}),
        ("POST", "/admin/wallets/u_1/adjustments", {"amount_micros": -1_000_000, "reason": "fix"}),
        ("POST", "/admin/wallets/u_1/refunds", {"amount_micros": 400_000, "charge_id": world["charge"], "reason": "bad"}),
        ("POST", "/admin/end-users/u_1/checkout-sessions", {"amount_micros": 20_000_000}),
        ("PATCH", "/admin/end-users/u_1/auto-top-up", {"enabled": True}),
        ("POST", "/admin/end-users/u_1/card-refunds", {"payment_intent": "pi_123"}),
        ("PUT", "/admin/end-users/u_1/balance-alerts", {"absolute_micros": [1_000_000]}),
        ("POST", "/admin/webhook-endpoints", {"url": "http://127.0.0.1:9/other", "enabled": False}),
        ("PATCH", f"/admin/webhook-endpoints/{endpoint}", {"description": "changed"}),
        ("POST", f"/admin/webhook-endpoints/{endpoint}/rotate-secret", {"grace_seconds": 0}),
        ("DELETE", f"/admin/webhook-endpoints/{endpoint}", None),
        ("POST", "/admin/events/evt_missing/redeliver", {}),
        ("POST", "/admin/ratecards/reload", None),
    ]


MUTATION_IDS = ["create-end-user", "update-end-user", "create-key", "patch-key", "revoke-key", "mint-token", "top-up",
                "adjustment", "refund", "checkout", "auto-top-up", "card-refund", "balance-alerts", "create-endpoint",
                "patch-endpoint", "rotate-secret", "delete-endpoint", "redeliver", "reload-ratecards"]


def assert_refused(body: dict[str, Any]) -> None:
    assert set(body) == {"error"}
    assert body["error"]["type"] == "permission_error" and body["error"]["code"] == "insufficient_role"


@pytest.mark.parametrize("index", range(len(MUTATION_IDS)), ids=MUTATION_IDS)
async def test_a_viewer_can_change_nothing(app, world, index):
    method, path, body = mutations(world)[index]
    before = await state(app)
    resp = await app.request(method, path, json=body, headers={**VIEWER, "Idempotency-Key": "v1"})
    assert resp.status == 403, await resp.text()
    assert_refused(await resp.json())
    assert await state(app) == before
    assert (await app.get("/admin/end-users/u_2", headers=ADMIN)).status == 404


MONEY = {"top-up", "adjustment", "refund", "checkout", "auto-top-up", "card-refund", "reload-ratecards"}


@pytest.mark.parametrize("index", [i for i, name in enumerate(MUTATION_IDS) if name in MONEY],
                         ids=[name for name in MUTATION_IDS if name in MONEY])
async def test_a_developer_cannot_move_money(app, world, index):
    method, path, body = mutations(world)[index]
    before = await state(app)
    resp = await app.request(method, path, json=body, headers={**DEVELOPER, "Idempotency-Key": "d1"})
    assert resp.status == 403, await resp.text()
    assert_refused(await resp.json())
    assert await state(app) == before


async def test_a_viewer_reads_everything(app, world):
    for path in ("/admin/end-users/u_1", "/admin/end-users/u_1/keys", "/admin/wallets/u_1", "/admin/wallets/u_1/ledger",
                 "/admin/webhook-endpoints", f"/admin/webhook-endpoints/{world['endpoint']}", "/admin/events",
                 "/admin/end-users/u_1/balance-alerts", "/admin/ratecards", "/admin/audit"):
        assert (await app.get(path, headers=VIEWER)).status == 200, path


async def test_a_developer_creates_an_end_user_and_a_key_but_cannot_top_up(app):
    user = await ok(await app.post("/admin/end-users", json={"id": "u_dev", "metadata": {"team": "a"}}, headers=DEVELOPER), 201)
    assert user["wallet"]["balance_micros"] == 0
    key = await ok(await app.post("/admin/end-users/u_dev/keys", json={"name": "cli"}, headers=DEVELOPER), 201)
    assert key["key"].startswith("sk-eu_")
    resp = await app.post("/admin/wallets/u_dev/top-ups", json={"amount_micros": 1_000_000},
                          headers={**DEVELOPER, "Idempotency-Key": "t1"})
    assert resp.status == 403
    assert_refused(await resp.json())
    wallet = await ok(await app.get("/admin/wallets/u_dev", headers=DEVELOPER), 200)
    assert wallet["balance_micros"] == 0 and wallet["available_micros"] == 0
    assert [e["type"] for e in (await ok(await app.get("/admin/wallets/u_dev/ledger", headers=ADMIN), 200))["data"]] == ["open"]


async def test_a_developer_cannot_grant_a_credit_limit(app):
    resp = await app.post("/admin/end-users", json={"id": "u_credit", "credit_limit_micros": 50_000_000}, headers=DEVELOPER)
    assert resp.status == 403
    assert_refused(await resp.json())
    assert (await app.get("/admin/end-users/u_credit", headers=ADMIN)).status == 404


async def test_an_admin_may_grant_a_credit_limit(app):
    user = await ok(await app.post("/admin/end-users", json={"id": "u_credit", "credit_limit_micros": 50_000_000}, headers=ADMIN), 201)
    assert user["wallet"]["credit_limit_micros"] == 50_000_000


async def test_a_developer_manages_webhooks_and_alerts(app, world):
    endpoint = world["endpoint"]
    await ok(await app.patch(f"/admin/webhook-endpoints/{endpoint}", json={"description": "dev"}, headers=DEVELOPER), 200)
    await ok(await app.post(f"/admin/webhook-endpoints/{endpoint}/rotate-secret", json={}, headers=DEVELOPER), 200)
    alerts = await ok(await app.put("/admin/end-users/u_1/balance-alerts", json={"absolute_micros": [1_000_000]},
                                    headers=DEVELOPER), 200)
    assert alerts["absolute_micros"] == [1_000_000] and alerts["source"] == "wallet"
    await ok(await app.delete(f"/admin/webhook-endpoints/{endpoint}", headers=DEVELOPER), 200)


async def test_an_unknown_key_is_401(app):
    for headers in ({"Authorization": "Bearer not-a-key"}, {}, {"Authorization": f"Bearer {VIEWER_KEY}x"}):
        resp = await app.get("/admin/end-users/u_1", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_a_refused_request_never_reaches_its_handler(app):
    # An unknown end user: the handler would answer 404; the role check answers first.
    resp = await app.post("/admin/wallets/nobody/top-ups", json={"amount_micros": 1}, headers={**VIEWER, "Idempotency-Key": "x"})
    assert resp.status == 403


async def test_every_admin_answer_carries_a_request_id(app):
    resp = await app.get("/admin/ratecards", headers=VIEWER)
    assert resp.headers["X-Request-Id"].startswith("req_")
    refused = await app.post("/admin/ratecards/reload", headers=VIEWER)
    assert refused.headers["X-Request-Id"].startswith("req_")


def test_every_mounted_admin_route_has_a_permission_entry(roles_config):
    app = create_app(roles_config)
    admin = next(r.get_info()["app"] for r in app.router.resources() if isinstance(r, web.PrefixedSubAppResource))
    mounted = {action_of(route.method, route.resource.canonical.removeprefix("/admin"))
               for route in admin.router.routes() if route.resource is not None}
    assert mounted - REQUIRED_ROLE.keys() == set(), "add these routes to proxy/admin_roles.py REQUIRED_ROLE"
    assert REQUIRED_ROLE.keys() - mounted == set(), "REQUIRED_ROLE names routes that are not mounted"


async def test_a_route_missing_from_the_table_is_refused_to_all_but_admins(app, monkeypatch):
    monkeypatch.delitem(REQUIRED_ROLE, "GET /ratecards")
    for headers in (VIEWER, DEVELOPER):
        resp = await app.get("/admin/ratecards", headers=headers)
        assert resp.status == 403 and resp.headers["X-Request-Id"].startswith("req_")
        assert_refused(await resp.json())
    assert (await app.get("/admin/ratecards", headers=ADMIN)).status == 200


def test_plain_admin_keys_are_admins_under_a_hash_name_and_unset_env_keys_grant_nothing(monkeypatch):
    monkeypatch.setenv("MG_TEST_DEVELOPER_KEY", DEVELOPER_KEY)
    monkeypatch.delenv("MG_TEST_VIEWER_KEY", raising=False)
    keyring = AdminKeyring.from_config(load_config(admin_keys=["k-admin"], admins=ADMINS))
    assert keyring.identify("k-admin") == AdminIdentity(plain_key_name("k-admin"), "admin")
    assert plain_key_name("k-admin").startswith("admin-") and "k-admin" not in plain_key_name("k-admin")
    assert keyring.identify(DEVELOPER_KEY) == AdminIdentity("dana", "developer")
    assert keyring.identify("") is None and keyring.identify(VIEWER_KEY) is None
    assert keyring.identify("\udcff") is None  # an undecodable header byte is no key, and no crash
