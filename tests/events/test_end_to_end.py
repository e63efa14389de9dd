"""Events out, end to end: money moves through the real gateway (OpenAI SDK calls against the mock upstream,
admin API top-ups), the events are derived from the ledgers and POSTed, signed, to a real receiver that was
registered through the admin API and verifies every signature with the secret that answer showed.

In process (an aiohttp test server from `create_app`) for the thresholds, the re-arm and a receiver that is
down for a while; as `metergate serve` subprocesses on the private Redis for a SIGKILL before delivery and for
two replicas delivering once. Outcomes come in the background: they are polled for with a deadline
(`eventually`); once the log is delivered and nothing is left to derive, the receiver's record is compared
whole, so an extra or repeated event fails the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from pricing import Usage, estimate_prompt_tokens, price_usage
from proxy.app import create_app
from proxy.appstate import BACKGROUND, RATECARDS
from proxy.config import Config, EventsConfig
from proxy.events.delivery import signature_header
from proxy.events.derive import entry_id_key
from proxy.events.model import Event
from proxy.store import WalletStore
from proxy.store.events import EventStore
from tests.conftest import ADMIN, ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY_ENV, EndUser, money_ledger
from tests.events.receiver import Receiver, eventually, until
from tests.mock_upstream import MockUpstream, make_usage
from tests.proxy.test_crash_recovery import Serve, start_serve, stop

# max_tokens well under the clamping minimum, and the upstream reports exactly the estimated prompt and
# max_tokens of output: each call holds what it is charged, so a wallet funded for N calls serves exactly N.
MAX_TOKENS = 100
CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": MAX_TOKENS}
PROMPT_TOKENS = estimate_prompt_tokens(CHAT)
EVENTS = EventsConfig(poll_interval_seconds=0.05, retry_base_seconds=0.05, retry_max_seconds=0.4)


# ------------------------------------------------------------ the README's receiver check, verbatim

README_VERIFY = '''\
import hashlib, hmac, time

def verify(header: str, body: bytes, secret: str, tolerance: int = 300) -> bool:
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    t = next((v for k, v in parts if k == "t" and v.isdigit()), None)
    if t is None or abs(time.time() - int(t)) > tolerance:
        return False  # stale or missing timestamp: maybe a replay
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest().encode()
    return any(hmac.compare_digest(expected, v.encode()) for k, v in parts if k == "v1")
'''


def verify(header: str, body: bytes, secret: str, tolerance: int = 300) -> bool:
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    t = next((v for k, v in parts if k == "t" and v.isdigit()), None)
    if t is None or abs(time.time() - int(t)) > tolerance:
        return False  # stale or missing timestamp: maybe a replay
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest().encode()
    return any(hmac.compare_digest(expected, v.encode()) for k, v in parts if k == "v1")


# ------------------------------------------------------------ fixtures and helpers


@pytest.fixture
async def events_gateway(aiohttp_client, gateway_config: Config) -> TestClient:
    config = gateway_config.model_copy(update={"events": EVENTS})
    return await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})


@pytest.fixture
def store(redis: aioredis.Redis) -> EventStore:
    return EventStore(redis)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """Started (its port is then fixed); the test learns its secret from the admin API."""
    started = Receiver()
    await started.start()
    yield started
    await started.stop()


async def register(gateway: TestClient, receiver: Receiver, events: list[str] | None = None) -> str:
    """POST /admin/webhook-endpoints, as an operator does; the receiver checks with the secret shown once."""
    resp = await gateway.post("/admin/webhook-endpoints", json={"url": receiver.url, "events": events or ["*"]}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    receiver.secret = body["secret"]
    return str(body["id"])


async def admin_top_up(gateway: TestClient, user_id: str, amount: int, key: str) -> dict[str, Any]:
    resp = await gateway.post(f"/admin/wallets/{user_id}/top-ups", json={"amount_micros": amount},
                              headers={**ADMIN, "Idempotency-Key": key})
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


def app_of(gateway: TestClient) -> web.Application:
    app = gateway.app
    assert app is not None
    return app


def call_price(gateway: TestClient) -> int:
    model = app_of(gateway)[RATECARDS].current.card_for("default").model("gpt-4o-mini")
    assert model is not None
    return price_usage(model, Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=MAX_TOKENS)).price_micros


def sdk(gateway: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=key, max_retries=0)


async def call(client: openai.AsyncOpenAI) -> str | None:
    """One chat completion: its X-Request-Id when served, None when refused for funds (402)."""
    try:
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
    except openai.APIStatusError as exc:
        code = exc.body.get("code") if isinstance(exc.body, dict) else None
        assert (exc.status_code, code) == (402, "insufficient_quota"), exc
        return None
    raw.parse()
    return str(raw.headers["X-Request-Id"])


async def quiet(gateway: TestClient, store: EventStore, endpoint_id: str) -> bool:
    """Nothing left in flight: no background note to write, no wallet to derive, the endpoint at the log's end."""
    if app_of(gateway)[BACKGROUND].tasks or await store.dirty_wallets(1):
        return False
    state = await store.delivery_state(endpoint_id)
    return state is not None and state.cursor == await store.end_position() and state.attempts == 0


async def logged(store: EventStore) -> list[Event]:
    events: list[Event] = []
    position = "0"
    while page := await store.after(position, count=500):
        events += [s.event for s in page]
        position = page[-1].position
    return events


def wallet_story(receiver: Receiver, user_id: str) -> list[tuple[str, str | None]]:
    """What the receiver was told about one wallet, in arrival order: (type, threshold)."""
    return [(e["type"], e["data"].get("threshold")) for e in receiver.delivered_events() if e.get("end_user") == user_id]


THRESHOLDS_THEN_DEPLETED = [("wallet.balance_low", "pct:50"), ("wallet.balance_low", "pct:20"),
                            ("wallet.balance_low", "pct:10"), ("wallet.depleted", None)]


def assert_all_verified_once(receiver: Receiver) -> None:
    assert receiver.got and receiver.unverified() == []
    assert receiver.duplicates() == []


async def assert_refused_calls_were_free(wallets: WalletStore, user_id: str, served: list[str], price: int,
                                         funded: int) -> None:
    """The wallet's money ledger holds exactly the served calls' charges, each at the call's price (a hold
    writes no entry; a refused call's would be a release)."""
    ledger = await money_ledger(wallets, user_id)
    charges = [e for e in ledger if e.type == "charge"]
    assert sorted(e.details["request_id"] for e in charges) == sorted(served)
    assert all(-e.amount_micros == price and e.details["shortfall_micros"] == 0 for e in charges)
    assert {e.type for e in ledger} <= {"open", "top_up", "charge"}
    wallet = await wallets.get(user_id)
    assert wallet is not None
    assert (wallet.balance_micros, wallet.held_micros) == (funded - price * len(served), 0)


# ------------------------------------------------------------ thresholds through the gateway


async def drain_with_100_concurrent_calls(gateway: TestClient, store: EventStore, receiver: Receiver, make_end_user,
                                          mock_upstream: MockUpstream) -> tuple[EndUser, list[str], int]:
    """A wallet with one top-up covering 70 calls, 100 calls at once; returns once every event is delivered:
    the user, the served calls' request ids, and one call's price."""
    price = call_price(gateway)
    mock_upstream.usage_override = make_usage(PROMPT_TOKENS, MAX_TOKENS)
    mock_upstream.first_byte_delay = 0.05  # the calls overlap for real
    endpoint_id = await register(gateway, receiver)
    user = await make_end_user(funds=70 * price)  # the one top-up: the thresholds' base
    client = sdk(gateway, user.key)
    outcomes = await asyncio.gather(*(call(client) for _ in range(100)))
    await eventually(lambda: quiet(gateway, store, endpoint_id), "every event derived and delivered")
    return user, [r for r in outcomes if r is not None], price


async def test_100_concurrent_calls_fire_each_threshold_once_and_one_depleted(
    events_gateway, store, receiver, make_end_user, mock_upstream: MockUpstream, wallets
):
    user, served, price = await drain_with_100_concurrent_calls(events_gateway, store, receiver, make_end_user, mock_upstream)

    assert len(served) == 70
    assert Counter(wallet_story(receiver, user.id)) == Counter([("wallet.topped_up", None), *THRESHOLDS_THEN_DEPLETED])
    lows = [e["data"] for e in receiver.delivered_events() if e["type"] == "wallet.balance_low"]
    assert [d["threshold_micros"] for d in lows] == [35 * price, 14 * price, 7 * price]  # of the one top-up
    assert all(d["available_micros"] < d["threshold_micros"] for d in lows)
    assert_all_verified_once(receiver)
    await assert_refused_calls_were_free(wallets, user.id, served, price, 70 * price)


async def test_100_concurrent_calls_deliver_the_thresholds_in_order_before_depleted(
    events_gateway, store, receiver, make_end_user, mock_upstream: MockUpstream
):
    """The README: "a wallet's events come in ledger order (its balance_low before its depleted)"."""
    user, _, _ = await drain_with_100_concurrent_calls(events_gateway, store, receiver, make_end_user, mock_upstream)

    assert wallet_story(receiver, user.id) == [("wallet.topped_up", None), *THRESHOLDS_THEN_DEPLETED]


async def test_a_top_up_rearms_the_thresholds_and_depleted(events_gateway, store, receiver, make_end_user,
                                                           mock_upstream: MockUpstream, wallets):
    gateway = events_gateway
    price = call_price(gateway)
    mock_upstream.usage_override = make_usage(PROMPT_TOKENS, MAX_TOKENS)
    endpoint_id = await register(gateway, receiver)
    user = await make_end_user(funds=10 * price)
    client = sdk(gateway, user.key)

    async def drain() -> list[str]:
        # One at a time: this test is about re-arming, the one above about concurrency.
        outcomes = [await call(client) for _ in range(12)]
        return [r for r in outcomes if r is not None]

    first = await drain()
    await eventually(lambda: quiet(gateway, store, endpoint_id), "the first drain's events delivered")
    assert wallet_story(receiver, user.id) == [("wallet.topped_up", None), *THRESHOLDS_THEN_DEPLETED]

    receipt = await admin_top_up(gateway, user.id, 10 * price, "rearm")
    second = await drain()
    await eventually(lambda: quiet(gateway, store, endpoint_id), "the second drain's events delivered")

    assert (len(first), len(second)) == (10, 10)
    assert wallet_story(receiver, user.id) == [("wallet.topped_up", None), *THRESHOLDS_THEN_DEPLETED,
                                               ("wallet.topped_up", None), *THRESHOLDS_THEN_DEPLETED]
    topped_up = [e for e in receiver.delivered_events() if e["type"] == "wallet.topped_up"]
    assert topped_up[1]["ledger_id"] == receipt["ledger_id"]
    assert topped_up[1]["data"]["amount_micros"] == 10 * price
    # The second round's percentages are of the second top-up.
    lows = [e for e in receiver.delivered_events() if e["type"] == "wallet.balance_low"]
    assert [e["data"]["threshold_micros"] for e in lows[3:]] == [5 * price, 2 * price, price]
    assert_all_verified_once(receiver)
    await assert_refused_calls_were_free(wallets, user.id, first + second, price, 20 * price)


# ------------------------------------------------------------ a receiver down for a while


async def test_a_receiver_down_gets_every_event_once_in_ledger_order_when_back(
    events_gateway, store, receiver, make_end_user, wallets
):
    gateway = events_gateway
    endpoint_id = await register(gateway, receiver)
    users = [await make_end_user("u_a", funds=0), await make_end_user("u_b", funds=0)]
    receiver.status = 500
    moves = 0

    async def move_money(rounds: int) -> None:
        nonlocal moves
        for _ in range(rounds):
            for user in users:
                moves += 1
                await admin_top_up(gateway, user.id, 1_000_000, f"t{moves}")
                resp = await gateway.post(f"/admin/wallets/{user.id}/adjustments", headers={**ADMIN, "Idempotency-Key": f"a{moves}"},
                                          json={"amount_micros": -900_000, "reason": "usage"})
                assert resp.status == 201, await resp.text()

    await move_money(2)
    await until(lambda: len(receiver.got) >= 3, "three deliveries answered 500")
    await receiver.stop()  # now the connection is refused
    head = receiver.got[0].event_id

    async def refused_logged() -> bool:
        return any(a["status"] is None for a in await store.attempts(endpoint_id, head))

    await move_money(2)
    await eventually(refused_logged, "an attempt on a refused connection")
    receiver.status = 200
    await receiver.start()
    await eventually(lambda: quiet(gateway, store, endpoint_id), "everything delivered once back")

    log = [e for e in await logged(store) if e.end_user in {u.id for u in users}]
    assert receiver.delivered() == [e.id for e in log]  # every event, once each, in log order
    assert_all_verified_once(receiver)
    for user in users:
        mine = [e for e in receiver.delivered_events() if e["end_user"] == user.id]
        assert [entry_id_key(e["ledger_id"]) for e in mine] == sorted(entry_id_key(e["ledger_id"]) for e in mine)
        top_ups = [e.id for e in reversed(await wallets.ledger(user.id, limit=100)) if e.type == "top_up"]
        assert [e["ledger_id"] for e in mine if e["type"] == "wallet.topped_up"] == top_ups
        assert len(top_ups) == 4

    resp = await gateway.get(f"/admin/events/{head}", headers=ADMIN)
    assert resp.status == 200
    [delivery] = (await resp.json())["deliveries"]
    attempts = delivery["attempts"]
    assert delivery["endpoint"] == endpoint_id
    assert (attempts[0]["status"], attempts[0]["error"]) == (500, "HTTP 500")
    refused = [a for a in attempts if a["status"] is None]
    assert refused and all("Connect" in a["error"] for a in refused)
    assert (attempts[-1]["status"], attempts[-1]["error"]) == (200, None)
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert all(isinstance(a["latency_ms"], int) and a["latency_ms"] >= 0 for a in attempts)


# ------------------------------------------------------------ the README's verification


async def test_the_readme_verify_accepts_a_real_delivery_and_refuses_a_tampered_body_or_a_stale_t(
    events_gateway, receiver, make_end_user, repo_root: Path, monkeypatch
):
    assert README_VERIFY in (repo_root / "README.md").read_text()  # the copy below is what operators are shown
    gateway = events_gateway
    await register(gateway, receiver, ["wallet.topped_up"])
    await make_end_user(funds=0)
    await admin_top_up(gateway, "u_1", 5_000_000, "t1")
    got = (await until(lambda: [r for r in receiver.got if r.answered == 200], "the top-up delivered"))[0]

    assert verify(got.signature, got.raw, receiver.secret)
    assert not verify(got.signature, got.raw.replace(b"5000000", b"9000000"), receiver.secret)
    assert not verify(got.signature, got.raw + b" ", receiver.secret)
    assert not verify(got.signature, got.raw, "whsec_not_the_secret")
    # Signed correctly, but an hour old: refused as a possible replay.
    stale = int(time.time()) - 3600
    assert not verify(signature_header([receiver.secret], stale, got.raw), got.raw, receiver.secret)
    # The captured request itself, replayed six minutes later.
    replayed_at = time.time() + 360
    with monkeypatch.context() as later:
        later.setattr(time, "time", lambda: replayed_at)
        assert not verify(got.signature, got.raw, receiver.secret)


# ------------------------------------------------------------ `metergate serve` processes


def write_config(tmp_path: Path, repo_root: Path, redis_url: str, upstream_url: str, *, poll: float) -> Path:
    path = tmp_path / f"metergate-poll-{poll:g}.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "host": "127.0.0.1",
        "redis_url": redis_url,
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}",
        "admin_keys": [ADMIN_KEY],
        "operator_keys": [OPERATOR_KEY],
        "ratecards_dir": str(repo_root / "config" / "ratecards"),
        "upstreams": {"openai": {"base_url": upstream_url, "api_key_env": UPSTREAM_KEY_ENV}},
        # A short webhook timeout keeps an endpoint's lease (three timeouts) short, so a process
        # started after a SIGKILL takes the dead one's lease over in seconds, not 30.
        "events": {"poll_interval_seconds": poll, "retry_base_seconds": 0.05, "retry_max_seconds": 0.4,
                   "webhook_timeout_seconds": 2},
    }, indent=2))
    return path


class Processes:
    """The `metergate serve` subprocesses a test starts; all killed at its end."""

    def __init__(self, tmp_path: Path, repo_root: Path, redis_url: str, upstream_url: str):
        self.tmp_path, self.repo_root, self.redis_url, self.upstream_url = tmp_path, repo_root, redis_url, upstream_url
        self.started: list[Serve] = []
        self.http = aiohttp.ClientSession(headers=ADMIN)

    async def start(self, *, poll: float = 0.05) -> Serve:
        config = write_config(self.tmp_path, self.repo_root, self.redis_url, self.upstream_url, poll=poll)
        serve = await start_serve(config, self.repo_root, self.tmp_path / f"serve-{len(self.started)}.log")
        self.started.append(serve)
        return serve

    async def post(self, serve: Serve, path: str, body: dict[str, Any], *, key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": key} if key else {}
        async with self.http.post(serve.url + path, json=body, headers=headers) as resp:
            assert resp.status in (200, 201), f"{resp.status} {await resp.text()}\n{serve.log_tail()}"
            return dict(await resp.json())

    async def register(self, serve: Serve, receiver: Receiver) -> str:
        body = await self.post(serve, "/admin/webhook-endpoints", {"url": receiver.url, "events": ["*"]})
        receiver.secret = body["secret"]
        return str(body["id"])

    async def top_up(self, serve: Serve, user_id: str, amount: int, key: str) -> dict[str, Any]:
        return await self.post(serve, f"/admin/wallets/{user_id}/top-ups", {"amount_micros": amount}, key=key)

    def logs(self) -> str:
        return "\n".join(f"--- serve {i}:\n{s.log_tail()}" for i, s in enumerate(self.started))

    async def close(self) -> None:
        for serve in self.started:
            await stop(serve)
        await self.http.close()


@pytest.fixture
async def processes(tmp_path: Path, repo_root: Path, redis_server, redis: aioredis.Redis,
                    mock_upstream: MockUpstream) -> AsyncIterator[Processes]:
    # `redis`: the store is flushed before and audited after, like every test's.
    running = Processes(tmp_path, repo_root, redis_server.url, str(mock_upstream.base_url))
    try:
        yield running
    finally:
        await running.close()


async def kill(serve: Serve) -> None:
    os.kill(serve.process.pid, signal.SIGKILL)
    await serve.process.wait()


async def wait_delivered(receiver: Receiver, event_id: str, processes: Processes) -> None:
    try:
        await until(lambda: event_id in receiver.delivered(), f"{event_id} delivered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from None


async def topped_up_event(store: EventStore, ledger_id: str) -> Event | None:
    return next((e for e in await logged(store) if e.ledger_id == ledger_id and e.type == "wallet.topped_up"), None)


async def test_an_event_derived_but_not_delivered_before_a_sigkill_is_delivered_after_the_restart(
    processes: Processes, store,
):
    receiver = Receiver()
    await receiver.start()
    await receiver.stop()  # down: its port is known, its connections refused
    try:
        first = await processes.start()
        endpoint_id = await processes.register(first, receiver)
        await processes.post(first, "/admin/end-users", {"id": "u_1"})
        receipt = await processes.top_up(first, "u_1", 5_000_000, "t1")
        event = await eventually(lambda: topped_up_event(store, receipt["ledger_id"]), "the event derived")

        async def attempt_failed() -> bool:
            return any(a["status"] is None for a in await store.attempts(endpoint_id, event.id))

        await eventually(attempt_failed, "a delivery attempt refused")
        await kill(first)
        assert receiver.got == []

        await receiver.start()
        second = await processes.start()
        await wait_delivered(receiver, event.id, processes)
        # Anything still to come about the first event would come before a later one (log order).
        later = await processes.top_up(second, "u_1", 1_000_000, "t2")
        later_event = await eventually(lambda: topped_up_event(store, later["ledger_id"]), "the later event derived")
        await wait_delivered(receiver, later_event.id, processes)
    finally:
        await receiver.stop()

    assert receiver.delivered() == [event.id, later_event.id]
    assert_all_verified_once(receiver)
    assert receiver.delivered_events()[0]["data"]["amount_micros"] == 5_000_000


async def test_a_movement_not_yet_derived_before_a_sigkill_is_derived_and_delivered_after_the_restart(
    processes: Processes, store,
):
    receiver = Receiver()
    await receiver.start()
    await receiver.stop()
    try:
        # A poll interval far longer than the test: this process's consumer never gets to the top-up.
        first = await processes.start(poll=3600)
        await processes.register(first, receiver)
        await processes.post(first, "/admin/end-users", {"id": "u_1"})
        receipt = await processes.top_up(first, "u_1", 5_000_000, "t1")
        await kill(first)
        assert [w for w, _ in await store.dirty_wallets()] == ["u_1"]
        assert await topped_up_event(store, receipt["ledger_id"]) is None

        await receiver.start()
        second = await processes.start()
        event = await eventually(lambda: topped_up_event(store, receipt["ledger_id"]), "the event derived after the restart")
        await wait_delivered(receiver, event.id, processes)
        later = await processes.top_up(second, "u_1", 1_000_000, "t2")
        later_event = await eventually(lambda: topped_up_event(store, later["ledger_id"]), "the later event derived")
        await wait_delivered(receiver, later_event.id, processes)
    finally:
        await receiver.stop()

    assert receiver.delivered() == [event.id, later_event.id]
    assert_all_verified_once(receiver)


async def test_two_processes_on_one_redis_deliver_each_event_once(processes: Processes, store, receiver):
    replicas = [await processes.start(), await processes.start()]
    await processes.register(replicas[0], receiver)
    for user_id in ("u_a", "u_b"):
        await processes.post(replicas[1], "/admin/end-users", {"id": user_id})

    receipts = await asyncio.gather(*(
        processes.top_up(replicas[i % 2], ("u_a", "u_b")[i // 2 % 2], 1_000_000 + i, f"t{i}") for i in range(20)))
    moved = {(r["wallet"]["id"], r["ledger_id"]) for r in receipts}

    def told() -> set[tuple[str, str]]:
        return {(e["end_user"], e["ledger_id"]) for e in receiver.delivered_events()}

    try:
        await until(lambda: told() >= moved, "the 20 top-ups delivered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from None
    # A late duplicate would arrive before an event logged after all of them.
    sentinel = await processes.top_up(replicas[1], "u_a", 1, "sentinel")
    await until(lambda: ("u_a", sentinel["ledger_id"]) in told(), "the sentinel delivered")

    log = await logged(store)
    assert Counter(e.id for e in log).most_common(1)[0][1] == 1  # derived once across both
    assert receiver.delivered() == [e.id for e in log]  # delivered once each, in log order
    assert len(log) == 21 and {e.type for e in log} == {"wallet.topped_up"}
    assert_all_verified_once(receiver)
    assert len(receiver.got) == 21  # no attempt failed or was repeated

