"""The admin API of events out (proxy/events/routes.py): webhook endpoints, the event log, redelivery and
each wallet's low-balance alerts -- through the running app (the `gateway` fixture), on the private Redis.

Money moves through the admin API (top-ups, adjustments); the events are derived and delivered by the app's
own consumer and deliverer, in the background, so outcomes are polled for with a deadline. Deliveries go to
a small aiohttp receiver started by each test, which records every POST; its signatures are checked with
the documented `verify_signature` against the secret the admin API showed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.config import Config, EventsConfig, LowBalanceAlerts
from proxy.events.delivery import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature
from proxy.store import WalletStore
from proxy.store.events import EventStore
from tests.conftest import ADMIN

T = TypeVar("T")
DEADLINE_SECONDS = 20.0  # only so that an outcome that never comes fails the test instead of hanging it
GOLD_ALERTS = LowBalanceAlerts(absolute_micros=[2_000_000], percent_of_last_top_up=[25])
EVENTS = EventsConfig(poll_interval_seconds=0.05, retry_base_seconds=0.05, retry_max_seconds=0.4,
                      low_balance={"default": LowBalanceAlerts(), "gold": GOLD_ALERTS})


# ------------------------------------------------------------ waiting


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """The first truthy answer of `probe`, polled; an AssertionError naming `what` past the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_SECONDS
    while True:
        found = await probe()
        if found:
            return found
        if loop.time() > end:
            raise AssertionError(f"{what}: not within {DEADLINE_SECONDS:g} s")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------ the operator's receiver


@dataclass(frozen=True)
class Delivery:
    event_id: str  # the Metergate-Event-Id header
    raw: bytes
    signature: str
    answered: int

    @property
    def event(self) -> dict[str, Any]:
        return dict(orjson.loads(self.raw))

    def v1(self) -> list[str]:
        return [part.partition("=")[2] for part in self.signature.split(",") if part.startswith("v1=")]


class Hook:
    """A webhook endpoint: records every POST (raw body and headers) and answers `status`."""

    def __init__(self) -> None:
        self.status = 200
        self.got: list[Delivery] = []
        self.url = ""
        self.app = web.Application()
        self.app.router.add_post("/hook", self._take)

    async def _take(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.got.append(Delivery(request.headers.get(EVENT_ID_HEADER, ""), raw, request.headers.get(SIGNATURE_HEADER, ""),
                                 self.status))
        return web.Response(status=self.status)

    def ids(self, *, answered: int | None = 200) -> list[str]:
        return [d.event_id for d in self.got if answered is None or d.answered == answered]

    async def wait_for(self, event_id: str) -> Delivery:
        async def arrived() -> Delivery | None:
            return next((d for d in self.got if d.event_id == event_id and d.answered == 200), None)

        return await eventually(arrived, f"event {event_id} delivered")


@pytest.fixture
async def hook(aiohttp_server) -> Hook:
    receiver = Hook()
    server = await aiohttp_server(receiver.app)
    receiver.url = str(server.make_url("/hook"))
    return receiver


# ------------------------------------------------------------ the app, and the admin API as an operator uses it


@pytest.fixture
def gateway_config(gateway_config: Config) -> Config:
    """The conftest's config with events polled often (the `gateway` fixture is built from this one)."""
    return gateway_config.model_copy(update={"events": EVENTS})


async def gateway_with_events(aiohttp_client, gateway_config: Config, **events: Any) -> TestClient:
    """An app whose events settings differ from this module's (in place of the `gateway` fixture, not beside it)."""
    config = gateway_config.model_copy(update={"events": EVENTS.model_copy(update=events)})
    return await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})


@pytest.fixture
def store(redis: aioredis.Redis) -> EventStore:
    return EventStore(redis)


async def answer(resp: Any, status: int) -> dict[str, Any]:
    body = await resp.json()
    assert resp.status == status, body
    return dict(body)


async def register(gateway: TestClient, url: str, events: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    resp = await gateway.post("/admin/webhook-endpoints", json={"url": url, "events": events or ["*"], **fields}, headers=ADMIN)
    return await answer(resp, 201)


async def top_up(gateway: TestClient, user_id: str, amount: int, key: str) -> str:
    """An admin top-up; the ledger id of its entry."""
    resp = await gateway.post(f"/admin/wallets/{user_id}/top-ups", json={"amount_micros": amount},
                              headers={**ADMIN, "Idempotency-Key": key})
    return str((await answer(resp, 201))["ledger_id"])


async def adjust(gateway: TestClient, user_id: str, amount: int, key: str) -> str:
    resp = await gateway.post(f"/admin/wallets/{user_id}/adjustments", json={"amount_micros": amount, "reason": "test drain"},
                              headers={**ADMIN, "Idempotency-Key": key})
    return str((await answer(resp, 201))["ledger_id"])


async def list_events(gateway: TestClient, **query: Any) -> dict[str, Any]:
    resp = await gateway.get("/admin/events", params={k: str(v) for k, v in query.items()}, headers=ADMIN)
    return await answer(resp, 200)


async def event_for(gateway: TestClient, ledger_id: str, event_type: str) -> dict[str, Any]:
    """The event derived from a ledger entry, once the consumer has logged it."""
    async def probe() -> dict[str, Any] | None:
        page = await list_events(gateway, type=event_type, limit=500)
        return next((e for e in page["data"] if e["ledger_id"] == ledger_id), None)

    return await eventually(probe, f"a {event_type} event for ledger entry {ledger_id}")


async def derived(store: EventStore, wallets: WalletStore, user_id: str) -> None:
    """Until the consumer has derived every entry of the wallet's ledger."""
    async def caught_up() -> bool:
        newest = await wallets.ledger(user_id, limit=1)
        return bool(newest) and (await store.wallet_state(user_id)).get("cursor") == newest[0].id

    await eventually(caught_up, f"{user_id}'s ledger derived")


async def quiet_user(make_end_user: Callable[..., Awaitable[Any]], store: EventStore, wallets: WalletStore) -> None:
    """u_1 with 10 USD, its opening top-up already derived: an endpoint registered now never receives it."""
    await make_end_user()
    await derived(store, wallets, "u_1")


def assert_openai_error(body: dict[str, Any], code: str, param: str | None = None) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    if param is not None:
        assert error["param"] == param


# ------------------------------------------------------------ endpoints: create, show, list


async def test_a_new_endpoint_shows_its_secret_once_and_later_only_a_hint(gateway, hook):
    created = await register(gateway, hook.url, ["wallet.depleted", "wallet.balance_low"], description="billing")
    secret = created["secret"]
    assert secret.startswith("whsec_") and len(secret) > 30
    assert created["id"].startswith("we_") and created["secret_hint"] == secret[-4:]
    assert (created["url"], created["events"], created["description"], created["enabled"]) == (
        hook.url, ["wallet.depleted", "wallet.balance_low"], "billing", True)
    shown = await (await gateway.get(f"/admin/webhook-endpoints/{created['id']}", headers=ADMIN)).read()
    listed = await (await gateway.get("/admin/webhook-endpoints", headers=ADMIN)).read()
    assert secret.encode() not in shown and secret.encode() not in listed
    view, [item] = orjson.loads(shown), orjson.loads(listed)["data"]
    assert view["secret"] is None and item["secret"] is None
    assert view["secret_hint"] == item["secret_hint"] == secret[-4:]
    assert {k: v for k, v in view.items() if k not in ("secret",)} == {k: v for k, v in created.items() if k != "secret"}


async def test_an_unknown_event_type_is_a_400_in_openai_shape_and_registers_nothing(gateway, hook):
    resp = await gateway.post("/admin/webhook-endpoints", json={"url": hook.url, "events": ["wallet.depleted", "wallet.nope"]},
                              headers=ADMIN)
    body = await answer(resp, 400)
    assert_openai_error(body, "invalid_event_type", "events")
    assert "wallet.nope" in body["error"]["message"]
    assert (await answer(await gateway.get("/admin/webhook-endpoints", headers=ADMIN), 200))["data"] == []


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "example.com/hook", "http://", "https://exa mple.com/", "", 42])
async def test_a_bad_url_is_a_400_and_registers_nothing(gateway, url):
    body = await answer(await gateway.post("/admin/webhook-endpoints", json={"url": url}, headers=ADMIN), 400)
    assert_openai_error(body, "invalid_request", "url")
    assert (await answer(await gateway.get("/admin/webhook-endpoints", headers=ADMIN), 200))["data"] == []


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/admin/webhook-endpoints", {"url": "https://example.com/hook"}),
    ("GET", "/admin/webhook-endpoints", None),
    ("GET", "/admin/events", None),
    ("PUT", "/admin/end-users/u_1/balance-alerts", {"absolute_micros": [1]}),
    ("GET", "/admin/end-users/u_1/balance-alerts", None),
])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key"], ids=["no-key", "wrong-key"])
async def test_the_events_admin_api_needs_the_admin_key(gateway, make_end_user, method, path, body, auth):
    await make_end_user()
    headers = {"Authorization": auth} if auth else {}
    resp = await gateway.request(method, path, json=body, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_api_key"
    assert (await answer(await gateway.get("/admin/webhook-endpoints", headers=ADMIN), 200))["data"] == []
    alerts = await answer(await gateway.get("/admin/end-users/u_1/balance-alerts", headers=ADMIN), 200)
    assert alerts["source"] == "tier"


async def test_a_new_endpoint_receives_only_what_happens_after_it_was_created(gateway, hook, make_end_user, store, wallets):
    await make_end_user(funds=5_000_000)  # a top-up, logged before the endpoint exists
    await derived(store, wallets, "u_1")
    before = await list_events(gateway, end_user="u_1")
    assert [e["type"] for e in before["data"]] == ["wallet.topped_up"]
    created = await register(gateway, hook.url)
    after = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "after"), "wallet.topped_up")
    delivery = await hook.wait_for(after["id"])
    # Delivered in log order: the older event, had it been due, would have come first.
    assert hook.ids(answered=None) == [after["id"]]
    assert verify_signature(delivery.signature, delivery.raw, created["secret"])
    assert delivery.event == {"object": "event", **{k: v for k, v in after.items() if k != "object"}}


# ------------------------------------------------------------ PATCH


async def test_patch_changes_only_the_fields_sent(gateway, hook):
    created = await register(gateway, hook.url, ["wallet.depleted"], description="first")
    resp = await gateway.patch(f"/admin/webhook-endpoints/{created['id']}", json={"description": "second"}, headers=ADMIN)
    view = await answer(resp, 200)
    assert (view["url"], view["events"], view["description"], view["enabled"]) == (hook.url, ["wallet.depleted"], "second", True)
    changes = {"url": hook.url + "?v=2", "events": ["wallet.balance_low", "key.spend_cap_reached"], "enabled": False}
    view = await answer(await gateway.patch(f"/admin/webhook-endpoints/{created['id']}", json=changes, headers=ADMIN), 200)
    shown = await answer(await gateway.get(f"/admin/webhook-endpoints/{created['id']}", headers=ADMIN), 200)
    for got in (view, shown):
        assert (got["url"], got["events"], got["description"], got["enabled"]) == (
            changes["url"], changes["events"], "second", False)
        assert got["secret"] is None and got["secret_hint"] == created["secret"][-4:]


@pytest.mark.parametrize("body", [{"events": ["wallet.nope"]}, {"url": "ftp://example.com"}, {"enabled": "yes"}, {"secret": "whsec_x"}])
async def test_a_bad_patch_is_a_400_and_changes_nothing(gateway, hook, body):
    created = await register(gateway, hook.url, ["wallet.depleted"])
    resp = await gateway.patch(f"/admin/webhook-endpoints/{created['id']}", json=body, headers=ADMIN)
    assert resp.status == 400
    assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}
    shown = await answer(await gateway.get(f"/admin/webhook-endpoints/{created['id']}", headers=ADMIN), 200)
    assert (shown["url"], shown["events"], shown["enabled"]) == (hook.url, ["wallet.depleted"], True)


async def test_an_endpoint_the_deliverer_disabled_is_re_enabled_by_patch_and_gets_what_it_missed(
    aiohttp_client, gateway_config, hook, make_end_user, store, wallets
):
    gateway = await gateway_with_events(aiohttp_client, gateway_config, retry_base_seconds=0.02, retry_max_seconds=0.05,
                                        disable_after_seconds=0.2)
    await quiet_user(make_end_user, store, wallets)
    created = await register(gateway, hook.url)
    hook.status = 500
    stuck = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "stuck"), "wallet.topped_up")

    async def disabled() -> dict[str, Any] | None:
        view = await answer(await gateway.get(f"/admin/webhook-endpoints/{created['id']}", headers=ADMIN), 200)
        return view if not view["enabled"] else None

    view = await eventually(disabled, "the failing endpoint turned off")
    assert view["disabled_reason"] and "HTTP 500" in view["disabled_reason"]
    hook.status = 200
    view = await answer(await gateway.patch(f"/admin/webhook-endpoints/{created['id']}", json={"enabled": True}, headers=ADMIN), 200)
    assert (view["enabled"], view["disabled_reason"], view["failing_since"], view["pending_attempts"]) == (True, None, None, 0)
    delivery = await hook.wait_for(stuck["id"])
    assert verify_signature(delivery.signature, delivery.raw, created["secret"])
    assert set(hook.ids(answered=None)) == {stuck["id"]}, "only the stuck event was ever sent"


async def test_re_enabling_an_endpoint_resets_its_failing_state_and_retries_at_once(
    aiohttp_client, gateway_config, hook, make_end_user, store, wallets
):
    # The first retry would come an hour later: the event arriving within the test is the reset's doing.
    gateway = await gateway_with_events(aiohttp_client, gateway_config, retry_base_seconds=3600.0, retry_max_seconds=3600.0)
    await quiet_user(make_end_user, store, wallets)
    created = await register(gateway, hook.url)
    hook.status = 500
    stuck = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "stuck"), "wallet.topped_up")

    async def failing() -> dict[str, Any] | None:
        view = await answer(await gateway.get(f"/admin/webhook-endpoints/{created['id']}", headers=ADMIN), 200)
        return view if view["pending_attempts"] else None

    view = await eventually(failing, "a failed attempt recorded")
    assert view["pending_attempts"] == 1 and view["failing_since"] is not None
    assert view["next_attempt_at"] >= int(time.time()) + 3000
    path = f"/admin/webhook-endpoints/{created['id']}"
    off = await answer(await gateway.patch(path, json={"enabled": False}, headers=ADMIN), 200)
    assert (off["enabled"], off["pending_attempts"]) == (False, 1)
    hook.status = 200
    on = await answer(await gateway.patch(path, json={"enabled": True}, headers=ADMIN), 200)
    assert (on["enabled"], on["disabled_reason"], on["failing_since"], on["pending_attempts"], on["next_attempt_at"]) == (
        True, None, None, 0, None)
    await hook.wait_for(stuck["id"])
    assert hook.ids(answered=None) == [stuck["id"], stuck["id"]]


@pytest.mark.parametrize(("method", "suffix", "body"), [
    ("GET", "", None), ("PATCH", "", {"enabled": True}), ("DELETE", "", None), ("POST", "/rotate-secret", {}),
])
async def test_an_unknown_endpoint_is_a_404(gateway, method, suffix, body):
    resp = await gateway.request(method, f"/admin/webhook-endpoints/we_nope{suffix}", json=body, headers=ADMIN)
    assert_openai_error(await answer(resp, 404), "endpoint_not_found", "id")


# ------------------------------------------------------------ rotating the secret


async def test_rotation_shows_the_new_secret_once_and_signs_with_both_during_the_grace(gateway, hook, make_end_user, store, wallets):
    await quiet_user(make_end_user, store, wallets)
    created = await register(gateway, hook.url)
    old = created["secret"]
    started = int(time.time())
    rotated = await answer(await gateway.post(f"/admin/webhook-endpoints/{created['id']}/rotate-secret",
                                              json={"grace_seconds": 3600}, headers=ADMIN), 200)
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old and rotated["secret_hint"] == new[-4:]
    shown = await (await gateway.get(f"/admin/webhook-endpoints/{created['id']}", headers=ADMIN)).read()
    assert new.encode() not in shown and old.encode() not in shown
    stored = await store.endpoint(created["id"])
    assert stored is not None and (stored.secret, stored.previous_secret) == (new, old)
    assert started + 3600 <= stored.previous_secret_expires <= int(time.time()) + 3600
    event = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "rotated"), "wallet.topped_up")
    delivery = await hook.wait_for(event["id"])
    assert len(delivery.v1()) == 2
    assert verify_signature(delivery.signature, delivery.raw, new) and verify_signature(delivery.signature, delivery.raw, old)
    t = delivery.signature.split(",")[0].removeprefix("t=")
    assert sorted(delivery.v1()) == sorted(hmac.new(s.encode(), f"{t}.".encode() + delivery.raw, hashlib.sha256).hexdigest()
                                           for s in (new, old))


async def test_rotation_without_grace_signs_with_the_new_secret_only(gateway, hook, make_end_user, store, wallets):
    await quiet_user(make_end_user, store, wallets)
    created = await register(gateway, hook.url)
    rotated = await answer(await gateway.post(f"/admin/webhook-endpoints/{created['id']}/rotate-secret",
                                              json={"grace_seconds": 0}, headers=ADMIN), 200)
    event = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "rotated"), "wallet.topped_up")
    delivery = await hook.wait_for(event["id"])
    assert len(delivery.v1()) == 1
    assert verify_signature(delivery.signature, delivery.raw, rotated["secret"])
    assert not verify_signature(delivery.signature, delivery.raw, created["secret"])


@pytest.mark.parametrize("grace", [-1, 7 * 86_400 + 1, 1.5, "60"])
async def test_a_bad_grace_is_a_400_and_keeps_the_secret(gateway, hook, store, grace):
    created = await register(gateway, hook.url)
    resp = await gateway.post(f"/admin/webhook-endpoints/{created['id']}/rotate-secret", json={"grace_seconds": grace}, headers=ADMIN)
    assert_openai_error(await answer(resp, 400), "invalid_request", "grace_seconds")
    stored = await store.endpoint(created["id"])
    assert stored is not None and (stored.secret, stored.previous_secret) == (created["secret"], None)


# ------------------------------------------------------------ DELETE


async def test_a_deleted_endpoint_is_gone_and_gets_nothing_more(gateway, hook, make_end_user, store, wallets):
    await quiet_user(make_end_user, store, wallets)
    kept_hook_url = hook.url + "?kept"
    created = await register(gateway, hook.url)
    kept = await register(gateway, kept_hook_url)
    resp = await gateway.delete(f"/admin/webhook-endpoints/{created['id']}", headers=ADMIN)
    assert await answer(resp, 200) == {"id": created["id"], "object": "webhook_endpoint", "deleted": True}
    assert (await gateway.get(f"/admin/webhook-endpoints/{created['id']}", headers=ADMIN)).status == 404
    assert (await gateway.delete(f"/admin/webhook-endpoints/{created['id']}", headers=ADMIN)).status == 404
    listed = await answer(await gateway.get("/admin/webhook-endpoints", headers=ADMIN), 200)
    assert [e["id"] for e in listed["data"]] == [kept["id"]]
    assert await store.delivery_state(created["id"]) is None
    # The kept endpoint (same receiver, another query) gets the next event; the deleted one never does.
    event = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "after-delete"), "wallet.topped_up")
    await hook.wait_for(event["id"])
    assert hook.ids(answered=None) == [event["id"]]


# ------------------------------------------------------------ the event log


async def three_events(gateway: TestClient, store: EventStore, wallets: WalletStore, make_end_user) -> list[dict[str, Any]]:
    """u_1 topped up, then u_2 topped up, then u_1 drained below half its top-up: their events, newest first."""
    await make_end_user("u_1")
    await derived(store, wallets, "u_1")
    await make_end_user("u_2")
    await derived(store, wallets, "u_2")
    await adjust(gateway, "u_1", -6_000_000, "drain-u_1")
    await derived(store, wallets, "u_1")
    page = await list_events(gateway)
    wallet_events = [e for e in page["data"] if e["end_user"]]
    assert [(e["type"], e["end_user"]) for e in wallet_events] == [
        ("wallet.balance_low", "u_1"), ("wallet.topped_up", "u_2"), ("wallet.topped_up", "u_1")]
    return wallet_events


async def test_events_are_listed_newest_first(gateway, make_end_user, store, wallets):
    events = await three_events(gateway, store, wallets, make_end_user)
    [low, topped_u2, topped_u1] = events
    assert low["data"]["threshold"] == "pct:50" and low["data"]["available_micros"] == 4_000_000
    assert topped_u2["data"]["amount_micros"] == topped_u1["data"]["amount_micros"] == 10_000_000
    assert topped_u1["created"] <= topped_u2["created"] <= low["created"]


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_paging_with_next_cursor_walks_the_whole_log_once(gateway, make_end_user, store, wallets, limit):
    await three_events(gateway, store, wallets, make_end_user)
    whole = [e["id"] for e in (await list_events(gateway, limit=500))["data"]]
    walked: list[str] = []
    cursor: str | None = None
    for _ in range(len(whole) + 2):
        page = await list_events(gateway, limit=limit, **({"starting_after": cursor} if cursor else {}))
        assert len(page["data"]) <= limit
        walked += [e["id"] for e in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert cursor is None, "paging never ended"
    assert walked == whole


async def test_the_type_and_end_user_filters_narrow_the_list(gateway, make_end_user, store, wallets):
    [low, topped_u2, topped_u1] = await three_events(gateway, store, wallets, make_end_user)

    async def ids(**query: Any) -> list[str]:
        return [e["id"] for e in (await list_events(gateway, **query))["data"]]

    assert await ids(type="wallet.topped_up") == [topped_u2["id"], topped_u1["id"]]
    assert await ids(end_user="u_1") == [low["id"], topped_u1["id"]]
    assert await ids(type="wallet.topped_up", end_user="u_2") == [topped_u2["id"]]
    assert await ids(type="wallet.depleted") == []
    assert await ids(end_user="u_nobody") == []
    # A filtered page is full and says where to go on.
    page = await list_events(gateway, type="wallet.topped_up", limit=1)
    assert [e["id"] for e in page["data"]] == [topped_u2["id"]] and page["next_cursor"]
    page = await list_events(gateway, type="wallet.topped_up", limit=1, starting_after=page["next_cursor"])
    assert [e["id"] for e in page["data"]] == [topped_u1["id"]]


async def test_a_filtered_listing_reaches_a_match_behind_many_newer_events(gateway, make_end_user, store, wallets):
    """Walking the pages by next_cursor must find every match, however many other events are newer."""
    await make_end_user("u_1")
    await derived(store, wallets, "u_1")
    await make_end_user("u_2")
    for n in range(30):
        await top_up(gateway, "u_2", 1_000, f"noise-{n}")
    await derived(store, wallets, "u_2")
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(40):
        page = await list_events(gateway, end_user="u_1", limit=1, **({"starting_after": cursor} if cursor else {}))
        found += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [(e["type"], e["end_user"]) for e in found] == [("wallet.topped_up", "u_1")], (
        "the listing ended (next_cursor null) before reaching u_1's event, 31 events back")


@pytest.mark.parametrize("limit", ["0", "501", "-1", "ten", "1.5", ""])
async def test_a_limit_outside_1_to_500_is_a_400(gateway, limit):
    resp = await gateway.get("/admin/events", params={"limit": limit}, headers=ADMIN)
    assert_openai_error(await answer(resp, 400), "invalid_limit", "limit")


async def test_limits_1_and_500_are_accepted(gateway):
    for limit in (1, 500):
        assert (await list_events(gateway, limit=limit))["data"] == []


async def test_an_event_shows_every_delivery_attempt(gateway, hook, make_end_user, store, wallets):
    await quiet_user(make_end_user, store, wallets)
    created = await register(gateway, hook.url)
    hook.status = 503
    event = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "shown"), "wallet.topped_up")

    async def failed_once() -> bool:
        return bool(hook.ids(answered=503))

    await eventually(failed_once, "a failed attempt")
    hook.status = 200
    await hook.wait_for(event["id"])

    async def logged() -> dict[str, Any] | None:
        shown = await answer(await gateway.get(f"/admin/events/{event['id']}", headers=ADMIN), 200)
        attempts = shown["deliveries"][0]["attempts"] if shown["deliveries"] else []
        return shown if attempts and attempts[-1]["status"] == 200 else None

    shown = await eventually(logged, "the successful attempt logged")
    assert {k: shown[k] for k in ("id", "type", "end_user", "ledger_id", "data")} == {
        k: event[k] for k in ("id", "type", "end_user", "ledger_id", "data")}
    [delivery] = shown["deliveries"]
    assert delivery["endpoint"] == created["id"]
    attempts = delivery["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert [a["status"] for a in attempts] == [503] * (len(attempts) - 1) + [200]
    assert all(a["error"] == "HTTP 503" for a in attempts[:-1]) and attempts[-1]["error"] is None
    assert all(a["latency_ms"] >= 0 and a["redelivery"] is False for a in attempts)
    assert len(hook.ids(answered=None)) == len(attempts)


async def test_an_unknown_event_is_a_404(gateway):
    assert_openai_error(await answer(await gateway.get("/admin/events/evt_nope", headers=ADMIN), 404), "event_not_found", "id")
    resp = await gateway.post("/admin/events/evt_nope/redeliver", json={}, headers=ADMIN)
    assert_openai_error(await answer(resp, 404), "event_not_found", "id")


# ------------------------------------------------------------ redelivery


async def test_redeliver_sends_the_event_again_once(gateway, hook, make_end_user, store, wallets):
    await quiet_user(make_end_user, store, wallets)
    created = await register(gateway, hook.url)
    event = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "first"), "wallet.topped_up")
    await hook.wait_for(event["id"])
    resp = await gateway.post(f"/admin/events/{event['id']}/redeliver", json={}, headers=ADMIN)
    assert await answer(resp, 202) == {"object": "redelivery", "event": event["id"], "endpoints": [created["id"]]}
    # A later event comes after any redelivery asked for before it: once it is in, nothing else is due.
    marker = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "marker"), "wallet.topped_up")
    await hook.wait_for(marker["id"])
    assert hook.ids(answered=None) == [event["id"], event["id"], marker["id"]]
    again = hook.got[1]
    assert again.raw == hook.got[0].raw and verify_signature(again.signature, again.raw, created["secret"])
    shown = await answer(await gateway.get(f"/admin/events/{event['id']}", headers=ADMIN), 200)
    [attempts] = [d["attempts"] for d in shown["deliveries"]]
    assert [(a["attempt"], a["status"], a["redelivery"]) for a in attempts] == [(1, 200, False), (2, 200, True)]


async def test_redeliver_goes_only_to_endpoints_that_want_the_type(gateway, hook, make_end_user, store, wallets):
    await quiet_user(make_end_user, store, wallets)
    wants = await register(gateway, hook.url + "?wants", ["wallet.topped_up"])
    await register(gateway, hook.url + "?other", ["wallet.depleted"])
    off = await register(gateway, hook.url + "?off", ["*"], enabled=False)
    event = await event_for(gateway, await top_up(gateway, "u_1", 1_000_000, "first"), "wallet.topped_up")
    await hook.wait_for(event["id"])
    resp = await gateway.post(f"/admin/events/{event['id']}/redeliver", json={}, headers=ADMIN)
    assert (await answer(resp, 202))["endpoints"] == [wants["id"]]
    # Named, an endpoint gets it whatever it subscribes to; an unknown one is a 404.
    resp = await gateway.post(f"/admin/events/{event['id']}/redeliver", json={"endpoint": off["id"]}, headers=ADMIN)
    assert (await answer(resp, 202))["endpoints"] == [off["id"]]
    resp = await gateway.post(f"/admin/events/{event['id']}/redeliver", json={"endpoint": "we_nope"}, headers=ADMIN)
    assert_openai_error(await answer(resp, 404), "endpoint_not_found", "id")


# ------------------------------------------------------------ balance alerts


async def alerts(gateway: TestClient, user_id: str = "u_1") -> dict[str, Any]:
    return await answer(await gateway.get(f"/admin/end-users/{user_id}/balance-alerts", headers=ADMIN), 200)


async def test_balance_alerts_show_the_tier_default_until_the_wallet_has_its_own(gateway, make_end_user):
    await make_end_user("u_1")
    await make_end_user("u_gold", tier="gold")
    assert await alerts(gateway, "u_1") == {"object": "balance_alerts", "end_user": "u_1", "source": "tier",
                                            "absolute_micros": [], "percent_of_last_top_up": [50, 20, 10]}
    assert await alerts(gateway, "u_gold") == {"object": "balance_alerts", "end_user": "u_gold", "source": "tier",
                                               "absolute_micros": [2_000_000], "percent_of_last_top_up": [25]}


async def test_put_sets_the_wallets_own_balance_alerts(gateway, make_end_user):
    await make_end_user("u_1")
    await make_end_user("u_2")
    own = {"absolute_micros": [3_000_000, 0], "percent_of_last_top_up": [1, 99]}
    resp = await gateway.put("/admin/end-users/u_1/balance-alerts", json=own, headers=ADMIN)
    expected = {"object": "balance_alerts", "end_user": "u_1", "source": "wallet", **own}
    assert await answer(resp, 200) == expected
    assert await alerts(gateway, "u_1") == expected
    assert (await alerts(gateway, "u_2"))["source"] == "tier", "another wallet on the tier keeps the tier's"


@pytest.mark.parametrize("body", [
    {"percent_of_last_top_up": [0]}, {"percent_of_last_top_up": [100]}, {"percent_of_last_top_up": [-5]},
    {"percent_of_last_top_up": [1.5]}, {"percent_of_last_top_up": ["10"]}, {"absolute_micros": [-1]},
    {"absolute_micros": [1.0]}, {"absolute_micros": 5}, {"thresholds": [1]},
])
async def test_bad_balance_alerts_are_a_400_and_change_nothing(gateway, make_end_user, body):
    await make_end_user()
    resp = await gateway.put("/admin/end-users/u_1/balance-alerts", json=body, headers=ADMIN)
    assert_openai_error(await answer(resp, 400), "invalid_request")
    assert (await alerts(gateway))["source"] == "tier"


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_balance_alerts_of_an_unknown_end_user_are_a_404(gateway, store, method):
    resp = await gateway.request(method, "/admin/end-users/u_ghost/balance-alerts", json={"absolute_micros": [1]}, headers=ADMIN)
    assert_openai_error(await answer(resp, 404), "end_user_not_found", "id")
    assert await store.wallet_state("u_ghost") == {}


async def test_the_consumer_fires_the_wallets_own_threshold_once(gateway, make_end_user, store, wallets):
    await make_end_user(funds=10_000_000)
    await derived(store, wallets, "u_1")
    resp = await gateway.put("/admin/end-users/u_1/balance-alerts", json={"absolute_micros": [3_000_000], "percent_of_last_top_up": []},
                             headers=ADMIN)
    await answer(resp, 200)
    # Down through the tier's 50 % (which no longer applies), across 3 USD, then further below it.
    for n, amount in enumerate((-5_000_000, -3_000_000, -1_000_000, -500_000)):
        await adjust(gateway, "u_1", amount, f"drain-{n}")
    await derived(store, wallets, "u_1")
    [low] = (await list_events(gateway, type="wallet.balance_low", end_user="u_1"))["data"]
    crossing = [e for e in await wallets.ledger("u_1", limit=20) if e.type == "adjustment" and e.balance_micros == 2_000_000]
    assert low["ledger_id"] == crossing[0].id
    assert low["data"] == {"threshold": "abs:3000000", "threshold_micros": 3_000_000, "available_micros": 2_000_000,
                           "balance_micros": 2_000_000, "held_micros": 0}
    assert (await wallets.get("u_1")).balance_micros == 500_000


async def test_new_alerts_apply_to_the_entries_after_the_put(gateway, make_end_user, store, wallets):
    """A drain already derived under the tier's alerts is not derived again under the wallet's."""
    await make_end_user(funds=10_000_000)
    await adjust(gateway, "u_1", -6_000_000, "drain-1")
    await derived(store, wallets, "u_1")
    before = (await list_events(gateway, type="wallet.balance_low", end_user="u_1"))["data"]
    assert [e["data"]["threshold"] for e in before] == ["pct:50"]
    await answer(await gateway.put("/admin/end-users/u_1/balance-alerts", json={"absolute_micros": [1_000_000]}, headers=ADMIN), 200)
    await adjust(gateway, "u_1", -3_500_000, "drain-2")
    await derived(store, wallets, "u_1")
    after = (await list_events(gateway, type="wallet.balance_low", end_user="u_1"))["data"]
    assert [e["data"]["threshold"] for e in after] == ["abs:1000000", "pct:50"]


# ------------------------------------------------------------ OpenAPI


async def test_openapi_lists_the_events_admin_paths(gateway):
    spec = await answer(await gateway.get("/openapi.json"), 200)
    expected = {
        "/admin/webhook-endpoints": {"get", "post"},
        "/admin/webhook-endpoints/{id}": {"get", "patch", "delete"},
        "/admin/webhook-endpoints/{id}/rotate-secret": {"post"},
        "/admin/events": {"get"},
        "/admin/events/{id}": {"get"},
        "/admin/events/{id}/redeliver": {"post"},
        "/admin/end-users/{id}/balance-alerts": {"get", "put"},
    }
    for path, methods in expected.items():
        assert path in spec["paths"], path
        assert methods <= set(spec["paths"][path]), (path, set(spec["paths"][path]))
    assert "201" in spec["paths"]["/admin/webhook-endpoints"]["post"]["responses"]
    assert "202" in spec["paths"]["/admin/events/{id}/redeliver"]["post"]["responses"]

