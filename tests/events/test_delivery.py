"""Webhook delivery: signed POSTs of the event log to each endpoint, in order, retried with backoff, once across
replicas, turned off after failing too long; and the receiver's documented signature check.

The receiver is a real aiohttp server on its own port that checks every request with `verify_signature`
(answering 400 to one that fails) and records what it got; the store is a real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from proxy.config import EventsConfig
from proxy.events.delivery import Deliverer, signature_header, verify_signature
from proxy.events.model import Event, new_event_id, now_seconds
from proxy.store import connect
from proxy.store.events import DeliveryState, Endpoint, EventStore, StoredEvent
from tests.events.receiver import Receiver
from tests.redis_server import RedisServer

T = TypeVar("T")
DEADLINE_SECONDS = 15  # only so that an outcome that never comes fails the test instead of hanging it
BODY = b'{"id":"evt_1","type":"wallet.depleted"}'


async def eventually(probe: Callable[[], Awaitable[T]], what: str) -> T:
    deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
    while True:
        found = await probe()
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {DEADLINE_SECONDS} s")
        await asyncio.sleep(0.01)


async def until(predicate: Callable[[], bool], what: str) -> None:
    async def probe() -> bool:
        return predicate()

    await eventually(probe, what)


# ------------------------------------------------------------ the receiver (tests/events/receiver.py)


@pytest.fixture
async def make_receiver() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def make(secret: str | None = None) -> Receiver:
        receiver = Receiver(secret or new_secret())
        await receiver.start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        await receiver.stop()


# ------------------------------------------------------------ metergate's side


def new_secret() -> str:
    return "whsec_" + secrets.token_hex(16)


def events_config(**overrides: Any) -> EventsConfig:
    values: dict[str, Any] = {"poll_interval_seconds": 0.01, "webhook_timeout_seconds": 5.0, "retry_base_seconds": 0.05,
                              "retry_max_seconds": 0.4, "disable_after_seconds": 3600.0}
    return EventsConfig(**(values | overrides))


@pytest.fixture
def store(redis: aioredis.Redis) -> EventStore:
    return EventStore(redis)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def add_endpoint(store: EventStore, receiver: Receiver, events: Sequence[str] = ("*",), *, state: bool = True,
                       **fields: Any) -> Endpoint:
    """As the admin API creates one: it starts at the log's end (unless `state` is False: no delivery state yet)."""
    endpoint = Endpoint(id="we_" + secrets.token_hex(6), url=receiver.url, events=tuple(events), enabled=True,
                        secret=receiver.secret, created=now_seconds(), **fields)
    await store.save_endpoint(endpoint)
    if state:
        await store.save_delivery_state(endpoint.id, DeliveryState(cursor=await store.end_position(), attempts=0,
                                                                   next_attempt_ms=0, failing_since_ms=0))
    return endpoint


async def append(store: EventStore, *types: str) -> list[StoredEvent]:
    return await store.append([Event(id=new_event_id(), type=t, created=now_seconds(), data={"seq": i, "wallet": "u_1"},
                                     end_user="u_1") for i, t in enumerate(types)])


def ids(events: Sequence[StoredEvent]) -> list[str]:
    return [e.event.id for e in events]


@contextlib.asynccontextmanager
async def running(*deliverers: Deliverer) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(d.run()) for d in deliverers]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ------------------------------------------------------------ the signature


def test_signature_header_carries_the_time_and_the_documented_hmac():
    header = signature_header(["whsec_a"], 1_700_000_000, BODY)
    expected = hmac.new(b"whsec_a", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify_signature(header, BODY, "whsec_a", now=1_700_000_000)


def test_a_tampered_body_fails_verification():
    header = signature_header(["whsec_a"], 1_700_000_000, BODY)
    assert not verify_signature(header, BODY.replace(b"depleted", b"topped_up"), "whsec_a", now=1_700_000_000)


def test_a_timestamp_outside_the_tolerance_fails_verification():
    header = signature_header(["whsec_a"], 1_700_000_000, BODY)
    assert verify_signature(header, BODY, "whsec_a", now=1_700_000_300)
    assert not verify_signature(header, BODY, "whsec_a", now=1_700_000_301)  # replayed late
    assert not verify_signature(header, BODY, "whsec_a", now=1_699_999_699)  # from the future
    assert verify_signature(header, BODY, "whsec_a", tolerance_seconds=3600, now=1_700_003_600)


def test_a_wrong_secret_fails_verification():
    header = signature_header(["whsec_a"], 1_700_000_000, BODY)
    assert not verify_signature(header, BODY, "whsec_b", now=1_700_000_000)


def test_a_malformed_header_fails_verification():
    good = signature_header(["whsec_a"], 1_700_000_000, BODY)
    v1 = good.split(",")[1]
    for header in ("", v1, "t=1700000000", f"t=abc,{v1}", f"t=-1700000000,{v1}", "t=1700000000,v1=",
                   f"t=\u00b2,{v1}", "t=1700000000,v1=\u00e9" + v1[4:]):
        assert not verify_signature(header, BODY, "whsec_a", now=1_700_000_000), header


def test_a_real_timestamp_is_checked_against_the_clock():
    assert verify_signature(signature_header(["whsec_a"], int(time.time()), BODY), BODY, "whsec_a")
    assert not verify_signature(signature_header(["whsec_a"], int(time.time()) - 3600, BODY), BODY, "whsec_a")


# ------------------------------------------------------------ delivery


async def test_events_are_delivered_in_order_each_once_and_signed(store, session, make_receiver):
    receiver = await make_receiver()
    endpoint = await add_endpoint(store, receiver)
    sent = await append(store, "wallet.topped_up", "wallet.balance_low", "wallet.depleted", "charge.shortfall", "wallet.topped_up")
    deliverer = Deliverer(store, session, events_config())

    assert await deliverer.deliver_some(endpoint) == 5
    assert await deliverer.deliver_some(endpoint) == 0

    assert receiver.delivered() == ids(sent)
    assert len(receiver.got) == 5
    for got, stored in zip(receiver.got, sent):
        assert got.verified
        assert got.body == stored.event.to_dict()
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["User-Agent"] == "metergate-webhooks"
        assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", got.signature)
        log = await store.attempts(endpoint.id, stored.event.id)
        assert [(a["attempt"], a["status"], a["error"], a["redelivery"]) for a in log] == [(1, 200, None, False)]
        assert isinstance(log[0]["latency_ms"], int) and log[0]["latency_ms"] >= 0
    state = await store.delivery_state(endpoint.id)
    assert state == DeliveryState(cursor=sent[-1].position, attempts=0, next_attempt_ms=0, failing_since_ms=0)


async def test_events_before_an_endpoint_was_created_are_not_sent_to_it(store, session, make_receiver):
    receiver = await make_receiver()
    await append(store, "wallet.topped_up")
    endpoint = await add_endpoint(store, receiver)
    later = await append(store, "wallet.depleted")

    assert await Deliverer(store, session, events_config()).deliver_some(endpoint) == 1
    assert receiver.delivered() == ids(later)


async def test_an_endpoint_without_delivery_state_starts_at_the_log_start(store, session, make_receiver):
    receiver = await make_receiver()
    sent = await append(store, "wallet.topped_up", "wallet.depleted")
    endpoint = await add_endpoint(store, receiver, state=False)

    assert await Deliverer(store, session, events_config()).deliver_some(endpoint) == 2
    assert receiver.delivered() == ids(sent)


async def test_a_failed_head_event_holds_back_the_later_ones_until_its_retry(store, session, make_receiver):
    receiver = await make_receiver()
    receiver.status = 500
    endpoint = await add_endpoint(store, receiver)
    sent = await append(store, "wallet.topped_up", "wallet.depleted", "wallet.topped_up")
    deliverer = Deliverer(store, session, events_config(retry_base_seconds=600.0, retry_max_seconds=3600.0))

    before = time.time() * 1000
    assert await deliverer.deliver_some(endpoint) == 0
    receiver.status = 200
    assert await deliverer.deliver_some(endpoint) == 0  # its retry is ten minutes away

    assert [r.event_id for r in receiver.got] == [sent[0].event.id]
    state = await store.delivery_state(endpoint.id)
    assert state is not None and state.cursor != sent[0].position and state.attempts == 1
    assert state.next_attempt_ms >= before + 600_000 and state.failing_since_ms >= before
    [attempt] = await store.attempts(endpoint.id, sent[0].event.id)
    assert (attempt["attempt"], attempt["status"], attempt["error"]) == (1, 500, "HTTP 500")


async def test_a_receiver_too_slow_to_answer_is_a_failed_attempt(store, session, make_receiver):
    receiver = await make_receiver()
    receiver.hold = True
    endpoint = await add_endpoint(store, receiver)
    [sent] = await append(store, "wallet.depleted")

    assert await Deliverer(store, session, events_config(webhook_timeout_seconds=0.2)).deliver_some(endpoint) == 0

    [attempt] = await store.attempts(endpoint.id, sent.event.id)
    assert attempt["status"] is None and "no response within 0.2 s" in attempt["error"]
    assert attempt["latency_ms"] >= 200
    state = await store.delivery_state(endpoint.id)
    assert state is not None and state.attempts == 1


async def test_a_receiver_down_is_retried_with_backoff_then_everything_is_delivered_in_order_once(store, session, make_receiver):
    config = events_config()
    receiver = await make_receiver()
    receiver.status = 500
    endpoint = await add_endpoint(store, receiver)
    sent = await append(store, "wallet.balance_low", "wallet.depleted", "wallet.topped_up", "wallet.balance_low")
    head = sent[0].event.id

    async with running(Deliverer(store, session, config)):
        await until(lambda: len(receiver.got) >= 3, "three 500s")
        await receiver.stop()  # now the connection is refused

        async def refused_logged() -> bool:
            return any(a["status"] is None for a in await store.attempts(endpoint.id, head))

        await eventually(refused_logged, "an attempt on a refused connection")
        receiver.status = 200
        await receiver.start()
        await until(lambda: len(receiver.delivered()) == len(sent), "everything delivered once back")

    assert receiver.delivered() == ids(sent)
    assert all(r.verified for r in receiver.got)
    # Head-of-line: until the first event went through, nothing after it was tried.
    first_ok = next(i for i, r in enumerate(receiver.got) if r.answered == 200)
    assert {r.event_id for r in receiver.got[: first_ok + 1]} == {head}
    assert [r.event_id for r in receiver.got[first_ok + 1:]] == ids(sent[1:])

    log = await store.attempts(endpoint.id, head)
    assert [a["attempt"] for a in log] == list(range(1, len(log) + 1))
    assert log[0]["status"] == 500 and log[0]["error"] == "HTTP 500"
    refused = [a for a in log if a["status"] is None]
    assert refused and all("Connect" in a["error"] for a in refused)
    assert log[-1]["status"] == 200 and log[-1]["error"] is None
    assert all(isinstance(a["latency_ms"], int) and a["latency_ms"] >= 0 for a in log)
    for failures, (failed, retried) in enumerate(zip(log, log[1:]), start=1):
        backoff = min(config.retry_base_seconds * 2 ** (failures - 1), config.retry_max_seconds)
        assert retried["time_ms"] - failed["time_ms"] >= int(backoff * 1000), (failures, log)
    for later in sent[1:]:
        assert [a["status"] for a in await store.attempts(endpoint.id, later.event.id)] == [200]
    assert await store.delivery_state(endpoint.id) == DeliveryState(cursor=sent[-1].position, attempts=0, next_attempt_ms=0,
                                                                   failing_since_ms=0)


async def test_an_event_type_the_endpoint_does_not_want_is_not_sent(store, session, make_receiver):
    receiver = await make_receiver()
    endpoint = await add_endpoint(store, receiver, events=("wallet.depleted", "charge.shortfall"))
    sent = await append(store, "wallet.topped_up", "wallet.depleted", "wallet.balance_low", "charge.shortfall", "wallet.topped_up")

    assert await Deliverer(store, session, events_config()).deliver_some(endpoint) == 2

    assert receiver.delivered() == [sent[1].event.id, sent[3].event.id]
    assert len(receiver.got) == 2
    state = await store.delivery_state(endpoint.id)
    assert state is not None and state.cursor == sent[-1].position  # past the trailing unwanted one too


async def test_an_endpoint_subscribed_to_star_gets_every_type(store, session, make_receiver):
    receiver = await make_receiver()
    endpoint = await add_endpoint(store, receiver, events=("*",))
    sent = await append(store, "wallet.topped_up", "ratecard.reloaded", "key.spend_cap_reached", "hold.expired", "top_up.failed")

    assert await Deliverer(store, session, events_config()).deliver_some(endpoint) == 5
    assert receiver.delivered() == ids(sent)


async def test_two_replicas_deliver_each_event_exactly_once_in_order(store, session, make_receiver, redis_server: RedisServer):
    receiver = await make_receiver()
    receiver.delay = 0.01  # long enough for the other replica to try the same endpoint meanwhile
    endpoint = await add_endpoint(store, receiver)
    other_redis = connect(redis_server.url)
    try:
        async with aiohttp.ClientSession() as other_session:
            replicas = (Deliverer(store, session, events_config(poll_interval_seconds=0.002)),
                        Deliverer(EventStore(other_redis), other_session, events_config(poll_interval_seconds=0.002)))
            sent: list[StoredEvent] = []
            async with running(*replicas):
                for _ in range(8):  # appended while both run, so both keep finding work
                    sent += await append(store, "wallet.topped_up", "wallet.balance_low", "wallet.depleted")
                    await asyncio.sleep(0.01)
                await until(lambda: len(set(receiver.delivered())) == len(sent), "all delivered")

                # The receiver has the last event before its sender has read the answer and saved the cursor;
                # stopping a replica in between would (rightly: at least once) let the other send it again.
                async def cursor_at_the_end() -> bool:
                    state = await store.delivery_state(endpoint.id)
                    return state is not None and state.cursor == sent[-1].position

                await eventually(cursor_at_the_end, "the last delivery saved")
    finally:
        await other_redis.aclose()

    assert [r.event_id for r in receiver.got] == ids(sent)  # each once, in order, none failed
    assert all(r.verified for r in receiver.got)


async def test_an_endpoint_failing_longer_than_disable_after_is_disabled_and_delivery_stops(store, session, make_receiver):
    def disabled_count() -> float:
        return REGISTRY.get_sample_value("metergate_webhook_endpoints_disabled_total") or 0.0

    broken = await make_receiver()
    broken.status = 503
    endpoint = await add_endpoint(store, broken)
    sent = await append(store, "wallet.depleted")
    before = disabled_count()
    deliverer = Deliverer(store, session, events_config(disable_after_seconds=0.2, retry_max_seconds=0.1))

    async def is_disabled() -> Endpoint | None:
        found = await store.endpoint(endpoint.id)
        return found if found is not None and not found.enabled else None

    async with running(deliverer):
        off = await eventually(is_disabled, "the endpoint disabled")
        tries = len(broken.got)
        # A healthy endpoint added now is served by later passes; the disabled one is not.
        healthy = await make_receiver()
        await add_endpoint(store, healthy, state=False)
        await until(lambda: healthy.delivered() == ids(sent), "the healthy endpoint served")

    assert off.disabled_reason and "HTTP 503" in off.disabled_reason
    assert (off.url, off.secret, off.events) == (endpoint.url, endpoint.secret, endpoint.events)
    assert len(broken.got) == tries >= 2
    assert disabled_count() == before + 1
    # Nothing skipped: re-enabled, it resumes at the event it could not take, with a fresh failure clock.
    assert await store.delivery_state(endpoint.id) == DeliveryState(cursor="0", attempts=0, next_attempt_ms=0, failing_since_ms=0)
    broken.status = 200
    assert await Deliverer(store, session, events_config()).deliver_some(off) == 0
    assert len(broken.got) == tries


async def test_a_redelivery_sends_a_delivered_event_again_once_without_moving_the_cursor(store, session, make_receiver):
    receiver = await make_receiver()
    endpoint = await add_endpoint(store, receiver)
    sent = await append(store, "wallet.topped_up", "wallet.depleted", "wallet.topped_up")
    deliverer = Deliverer(store, session, events_config())
    assert await deliverer.deliver_some(endpoint) == 3

    await store.request_redelivery(endpoint.id, sent[1].event.id)
    assert await deliverer.deliver_some(endpoint) == 1
    assert await deliverer.deliver_some(endpoint) == 0

    assert receiver.delivered() == [*ids(sent), sent[1].event.id]
    assert receiver.got[-1].verified and receiver.got[-1].body == sent[1].event.to_dict()
    log = await store.attempts(endpoint.id, sent[1].event.id)
    assert [(a["attempt"], a["status"], a["redelivery"]) for a in log] == [(1, 200, False), (2, 200, True)]
    state = await store.delivery_state(endpoint.id)
    assert state is not None and state.cursor == sent[-1].position


async def test_a_rotated_secret_signs_with_both_secrets_during_the_grace(store, session, make_receiver):
    old, new = new_secret(), new_secret()
    receiver = await make_receiver(new)
    endpoint = await add_endpoint(store, receiver, previous_secret=old, previous_secret_expires=now_seconds() + 3600)
    await append(store, "wallet.depleted")

    assert await Deliverer(store, session, events_config()).deliver_some(endpoint) == 1

    [got] = receiver.got
    assert len(re.findall(r"v1=[0-9a-f]{64}", got.signature)) == 2
    assert verify_signature(got.signature, got.raw, new)
    assert verify_signature(got.signature, got.raw, old)  # a receiver not yet switched to the new secret
    assert not verify_signature(got.signature, got.raw, new_secret())


async def test_the_previous_secret_no_longer_signs_after_its_grace(store, session, make_receiver):
    old, new = new_secret(), new_secret()
    receiver = await make_receiver(new)
    endpoint = await add_endpoint(store, receiver, previous_secret=old, previous_secret_expires=now_seconds() - 1)
    await append(store, "wallet.depleted")

    assert await Deliverer(store, session, events_config()).deliver_some(endpoint) == 1

    [got] = receiver.got
    assert len(re.findall(r"v1=", got.signature)) == 1
    assert verify_signature(got.signature, got.raw, new)
    assert not verify_signature(got.signature, got.raw, old)
