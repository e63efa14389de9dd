"""Metrics and logs of metered calls (issue 10, items 4 and 5), through the running app and the openai SDK.

prometheus-client's metrics are process-global, so every check reads a delta:
a scrape of /metrics before the behaviour and one after.

Prices (config/ratecards/default.yaml): gpt-4o-mini is 0.1875 USD per 1M input
tokens and 0.75 output, so 1000 in + 500 out = 562.5 micros, charged as 563.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable

import openai
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import run_reaper
from proxy.config import Config
from proxy.observability import TEXT_FORMAT, JsonFormatter, TextFormatter, configure_logging
from proxy.store import WalletStore
from proxy.store.scripts import _scripts
from tests.conftest import ADMIN
from tests.mock_upstream import make_usage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}
ROUTE = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
CALL_FIELDS = {"request_id", "end_user", "model", "status", "prompt_tokens", "completion_tokens", "cost_micros",
               "duration_ms", "outcome", "clamped"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def scrape(gateway: TestClient) -> Samples:
    response = await gateway.get("/metrics")
    assert response.status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(await response.text())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def delta_of(gateway: TestClient, before: Samples, name: str, **labels: str) -> float:
    return value(await scrape(gateway), name, **labels) - value(before, name, **labels)


async def eventually(check: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Poll `check` (sync or async) until it is truthy, or fail after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


def call_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "metergate.calls"]


# ------------------------------------------------------------------ metrics


async def test_a_call_is_counted_by_route_model_and_status_and_timed(base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user()
    before = await scrape(gateway)
    await sdk(base_url, user.key).chat.completions.create(**CHAT)
    after = await scrape(gateway)
    assert value(after, "metergate_requests_total", route=ROUTE, model=MODEL, status="200") \
        - value(before, "metergate_requests_total", route=ROUTE, model=MODEL, status="200") == 1
    assert value(after, "metergate_request_duration_seconds_count", route=ROUTE) \
        - value(before, "metergate_request_duration_seconds_count", route=ROUTE) == 1


async def test_an_admin_request_is_counted_once_under_its_route_template(gateway, make_end_user):
    await make_end_user()
    before = await scrape(gateway)
    response = await gateway.get("/admin/wallets/u_1", headers=ADMIN)
    assert response.status == 200
    # The admin sub-application runs the error middleware too: still one count, and no raw path.
    assert await delta_of(gateway, before, "metergate_requests_total", route="/admin/wallets/{id}", model="", status="200") == 1


async def test_a_settled_call_counts_its_tokens_and_charged_micros_by_model_and_tier(
        base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    before = await scrape(gateway)
    await sdk(base_url, user.key).chat.completions.create(**CHAT)
    after = await scrape(gateway)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("metergate_tokens_total", model=MODEL, direction="prompt") == 1000
    assert grew("metergate_tokens_total", model=MODEL, direction="completion") == 500
    assert grew("metergate_charged_micros_total", model=MODEL, tier="default") == 563
    assert grew("metergate_calls_total", model=MODEL, outcome="completed") == 1
    assert (grew("metergate_holds_total", event="opened"), grew("metergate_holds_total", event="settled")) == (1, 1)


async def test_a_refused_call_counts_a_402(base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user(funds=0)
    before = await scrape(gateway)
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk(base_url, user.key).chat.completions.create(**CHAT)
    assert refused.value.status_code == 402
    assert await delta_of(gateway, before, "metergate_payment_required_total", route=ROUTE, model=MODEL) == 1
    assert await delta_of(gateway, before, "metergate_holds_total", event="opened") == 0


async def test_a_stream_observes_its_time_to_first_byte_once(base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user()
    mock_upstream.reply_words = 12
    before = await scrape(gateway)
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
    assert len([c async for c in stream]) >= 12
    assert await delta_of(gateway, before, "metergate_stream_first_byte_seconds_count", model=MODEL) == 1


async def test_the_active_streams_gauge_counts_a_stream_while_it_runs(base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user()
    mock_upstream.reply_words = 30
    mock_upstream.chunk_delay = 0.05
    before = value(await scrape(gateway), "metergate_active_streams")
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
    chunks = aiter(stream)
    await anext(chunks)

    async def active() -> float:
        return value(await scrape(gateway), "metergate_active_streams") - before

    async def idle() -> bool:
        return await active() == 0

    assert await active() == 1
    async for _ in chunks:
        pass
    await eventually(idle, "the stream left the gauge")


async def test_a_stream_past_its_hold_counts_each_extension(base_url, gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.reply_words = 300  # the mock ignores max_tokens, as some upstreams do
    before = await scrape(gateway)
    stream = await sdk(base_url, user.key).chat.completions.create(**{**CHAT, "max_tokens": 5}, stream=True)
    async for _ in stream:
        pass
    extensions = [e for e in await wallets.ledger(user.id, limit=100) if e.type == "hold_extend"]  # only growth is written
    assert extensions
    assert await delta_of(gateway, before, "metergate_holds_total", event="extended") == len(extensions)


async def test_a_clamped_call_counts_a_clamped_hold(base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user(funds=10_000)  # gpt-4o's worst case holds ~0.2 USD: this wallet gets a clamp
    before = await scrape(gateway)
    raw = await sdk(base_url, user.key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Name three rivers"}])
    assert "X-Max-Tokens-Clamped" in raw.headers
    assert await delta_of(gateway, before, "metergate_holds_total", event="clamped") == 1


async def test_the_reaper_counts_the_holds_it_expires(redis, make_end_user):
    await make_end_user("u_gone")
    store = WalletStore(redis, hold_ttl_ms=1)
    before = REGISTRY.get_sample_value("metergate_holds_total", {"event": "expired"}) or 0.0
    await store.hold("u_gone", 1_000, meta={"request_id": "req_dead", "model": MODEL, "key_id": "k"})
    reaper = asyncio.create_task(run_reaper(store, interval=0.01))
    try:
        await eventually(lambda: (REGISTRY.get_sample_value("metergate_holds_total", {"event": "expired"}) or 0.0)
                         - before == 1, "the reaper expired the hold")
    finally:
        reaper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reaper


async def test_store_round_trips_are_timed_by_script(base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user()
    before = await scrape(gateway)
    await sdk(base_url, user.key).chat.completions.create(**CHAT)
    after = await scrape(gateway)
    for script in ("hold", "settle"):
        assert value(after, "metergate_store_round_trip_seconds_count", script=script) \
            - value(before, "metergate_store_round_trip_seconds_count", script=script) == 1, script


async def test_a_store_that_does_not_answer_counts_a_store_error():
    class Unreachable:
        async def execute(self, *args: object) -> object:
            raise ConnectionError("connection refused")

        async def batch(self, commands: object) -> list[object]:
            raise ConnectionError("connection refused")

    labels = {"script": "hold", "kind": "connection"}
    before = REGISTRY.get_sample_value("metergate_store_errors_total", labels) or 0.0
    with pytest.raises(ConnectionError):
        await _scripts().run(Unreachable(), "hold", ["k"], [])
    assert (REGISTRY.get_sample_value("metergate_store_errors_total", labels) or 0.0) - before == 1


async def test_an_upstream_failure_is_counted_by_kind(base_url, gateway, make_end_user, mock_upstream):
    user = await make_end_user()
    mock_upstream.fail_status = 500
    before = await scrape(gateway)
    with pytest.raises(openai.APIStatusError):
        await sdk(base_url, user.key).chat.completions.create(**CHAT)
    assert await delta_of(gateway, before, "metergate_upstream_errors_total", model=MODEL, kind="server_error") == 1


async def test_no_metric_label_carries_an_end_user_or_request_id(base_url, gateway, make_end_user, mock_upstream):
    rich = await make_end_user("u_canary_rich")
    broke = await make_end_user("u_canary_broke", funds=0)
    await sdk(base_url, rich.key).chat.completions.create(**CHAT)
    async for _ in await sdk(base_url, rich.key).chat.completions.create(**CHAT, stream=True):
        pass
    with pytest.raises(openai.APIStatusError):
        await sdk(base_url, broke.key).chat.completions.create(**CHAT)
    await gateway.get("/v1/wallet/u_canary_rich")  # a raw path that names the user
    labels = {v for (_, pairs) in (await scrape(gateway)) for _, v in pairs}
    assert not [v for v in labels if "canary" in v or v.startswith("req_")]


# --------------------------------------------------------------------- logs


async def test_each_call_logs_one_line_with_its_fields(base_url, gateway, make_end_user, mock_upstream, caplog):
    caplog.set_level(logging.INFO, logger="metergate.calls")
    user = await make_end_user()
    mock_upstream.usage_override = make_usage(1000, 500)
    raw = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**CHAT)
    [record] = call_records(caplog)
    fields = record.fields  # type: ignore[attr-defined]
    assert set(fields) == CALL_FIELDS
    assert {k: v for k, v in fields.items() if k != "duration_ms"} == {
        "request_id": raw.headers["X-Request-Id"], "end_user": "u_1", "model": MODEL, "status": 200,
        "prompt_tokens": 1000, "completion_tokens": 500, "cost_micros": 563, "outcome": "completed", "clamped": None,
    }
    assert fields["duration_ms"] >= 0
    assert record.levelno == logging.INFO
    assert f"request_id={raw.headers['X-Request-Id']} end_user=u_1 model={MODEL} status=200" in record.getMessage()


async def test_a_call_line_says_every_field_in_order(base_url, gateway, make_end_user, mock_upstream, caplog):
    # The text line is written apart from the fields (for speed): both must say the same.
    caplog.set_level(logging.INFO, logger="metergate.calls")
    user = await make_end_user()
    await sdk(base_url, user.key).chat.completions.create(**CHAT)
    [record] = call_records(caplog)
    fields = record.fields  # type: ignore[attr-defined]
    assert record.getMessage() == " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())
    assert record.getMessage().endswith(" outcome=completed clamped=-")


async def test_an_upstream_failure_is_logged_with_its_request_id(base_url, gateway, make_end_user, mock_upstream, caplog):
    caplog.set_level(logging.INFO)
    user = await make_end_user()
    mock_upstream.fail_status = 503
    with pytest.raises(openai.APIStatusError):
        await sdk(base_url, user.key).chat.completions.create(**CHAT)
    [failure] = [r for r in caplog.records if r.name == "metergate.upstream"]
    [call] = call_records(caplog)
    request_id = call.fields["request_id"]  # type: ignore[attr-defined]
    assert failure.levelno == logging.WARNING and request_id in failure.getMessage()
    assert failure.fields == {"request_id": request_id, "model": MODEL, "kind": "server_error"}  # type: ignore[attr-defined]
    assert {k: call.fields[k] for k in ("status", "outcome", "cost_micros")} == {  # type: ignore[attr-defined]
        "status": 502, "outcome": "upstream_error", "cost_micros": 0}


async def test_a_cut_stream_is_logged_with_its_request_id(base_url, gateway, make_end_user, mock_upstream, caplog):
    caplog.set_level(logging.INFO)
    user = await make_end_user()
    mock_upstream.reply_words = 20
    mock_upstream.cut_after_chunks = 3
    before = await scrape(gateway)
    raw = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**CHAT, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in raw.parse():
            pass
    request_id = raw.headers["X-Request-Id"]
    cut = [r for r in caplog.records if r.name == "metergate.upstream" and request_id in r.getMessage()]
    assert [r.fields["outcome"] for r in cut] == ["upstream_cut"]  # type: ignore[attr-defined]
    assert await delta_of(gateway, before, "metergate_upstream_errors_total", model=MODEL, kind="stream_cut") == 1


async def test_json_log_format_writes_one_parseable_object_per_line(
        base_url, gateway, gateway_config: Config, make_end_user, mock_upstream, capsys):
    user = await make_end_user()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging(gateway_config.model_copy(update={"log_format": "json"}))
    try:
        raw = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**CHAT)
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    objects = [json.loads(line) for line in lines]  # every line is JSON
    [call] = [o for o in objects if o["logger"] == "metergate.calls"]
    assert {"time", "level", "logger", "message"} | CALL_FIELDS <= set(call)
    assert (call["level"], call["request_id"], call["end_user"]) == ("INFO", raw.headers["X-Request-Id"], "u_1")


def test_the_json_formatter_keeps_an_exception_and_its_message():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("metergate").makeRecord(
            "metergate", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info=sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed here" and "ValueError: boom" in entry["exception"]


def test_the_text_formatter_writes_what_the_stdlib_formatter_writes_across_seconds():
    plain, cached = logging.Formatter(TEXT_FORMAT), TextFormatter()
    for created in (1_700_000_000.123, 1_700_000_000.987, 1_700_000_001.004, 1_700_000_000.5, 1_700_086_400.0):
        record = logging.getLogger("metergate.calls").makeRecord(
            "metergate.calls", logging.INFO, __file__, 1, "request_id=%s", ("r_1",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert cached.format(record) == plain.format(record)


def test_the_text_formatter_writes_an_exception_and_a_stack_as_the_stdlib_formatter_does():
    plain, cached = logging.Formatter(TEXT_FORMAT), TextFormatter()
    logger = logging.getLogger("metergate.upstream")
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logger.makeRecord("metergate.upstream", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    stacked = logger.makeRecord("metergate.upstream", logging.WARNING, __file__, 1, "look", (), None, sinfo="Stack (most recent call last):\n  here")
    for record in (failed, stacked):
        expected = plain.format(record)
        record.exc_text = None  # the stdlib caches the traceback's text on the record
        assert cached.format(record) == expected
    assert "ValueError: boom" in cached.format(failed)
