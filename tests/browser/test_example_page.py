"""A real headless Chromium runs examples/browser/ against metergate and the mock upstream.

The page is served from one local origin that is in `cors_origins` and from
another that is not (same files, another port). Selenium drives Debian's
`chromium` through `chromium-driver`; the blocking driver calls run in a
thread so the servers on this event loop keep serving.

Without chromium this module is skipped locally, and fails under CI (CI=true),
where `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest

from proxy.app import create_app
from proxy.config import load_config
from tests.conftest import ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.mock_upstream import make_usage

SECRET_ENV, SECRET = "METERGATE_TEST_BROWSER_JWT_SECRET", "browser-test-secret-" + "s" * 40
WORDS = 8
EXPECTED = [f"word{i}" if i == 0 else f" word{i}" for i in range(WORDS)]  # the mock's chunks
COST = 68  # 200 x 0.1875 + 40 x 0.75 = 67.5 micros, rounded up


@pytest.fixture
async def metergate(aiohttp_server, pages, redis_server, redis, mock_upstream, monkeypatch):
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    mock_upstream.reply_words = WORDS
    mock_upstream.chunk_delay = 0.12
    mock_upstream.usage_override = make_usage(200, 40)
    config = load_config(
        redis_url=redis_server.url, admin_keys=[ADMIN_KEY], operator_keys=[OPERATOR_KEY], cors_origins=[pages[0]],
        upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV}},
        jwt={"hs256_secret_env": SECRET_ENV, "algorithms": ["HS256"]},
    )
    server = await aiohttp_server(create_app(config), host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}/v1"


async def run_page(browser, origin: str, base: str, credential: str) -> dict:
    """Load the page with autostart and wait until its stream ended and the balance was read again."""
    url = f"{origin}/index.html#base={base}&key={credential}&prompt=Tell%20me%20a%20story&autostart=1"
    await asyncio.to_thread(browser.get, url)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = await asyncio.to_thread(browser.execute_script, "return window.metergateDemo || null;")
        if state and state["done"] and (state["balanceReads"] >= 2 or state["error"] or state.get("balanceError")):
            state["output"] = await asyncio.to_thread(browser.execute_script, "return document.getElementById('output').textContent;")
            state["shown_balance"] = await asyncio.to_thread(browser.execute_script, "return document.getElementById('balance').textContent;")
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"the page did not finish: {state}")


def assert_streamed_chunk_by_chunk(state: dict) -> None:
    chunks = state["chunks"]
    assert state["error"] is None, state["error"]
    assert [c["text"] for c in chunks] == EXPECTED
    assert state["output"] == "".join(EXPECTED)
    # Each chunk was read on its own, as the upstream sent it ~120 ms apart:
    # the page saw the text grow, not one buffered body at the end.
    gaps = [b["t"] - a["t"] for a, b in zip(chunks, chunks[1:])]
    assert all(gap > 40 for gap in gaps), gaps
    assert chunks[-1]["t"] - chunks[0]["t"] > 0.5 * 120 * (WORDS - 1)


async def test_page_streams_with_a_key_and_shows_the_exact_debit(browser, pages, metergate, make_end_user, wallets):
    user = await make_end_user()
    state = await run_page(browser, pages[0], metergate, user.key)
    assert_streamed_chunk_by_chunk(state)
    assert state["requestId"].startswith("req_")  # an exposed header, readable cross-origin
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - COST
    assert state["balances"] == ["10.000000", "9.999932"] and state["shown_balance"] == "9.999932"


async def test_page_streams_with_a_token(browser, pages, metergate, make_end_user, wallets):
    await make_end_user()
    token = jwt.encode({"sub": "u_1", "exp": int(time.time()) + 300, "jti": "browser-1"}, SECRET, algorithm="HS256")
    state = await run_page(browser, pages[0], metergate, token)
    assert_streamed_chunk_by_chunk(state)
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - COST
    assert state["balances"][-1] == "9.999932"
    charge = next(e for e in await wallets.ledger("u_1") if e.type == "charge")
    assert charge.details["key_id"] == "jwt:browser-1"


async def test_page_from_an_unlisted_origin_cannot_read_and_pays_nothing(browser, pages, metergate, make_end_user, wallets, mock_upstream):
    user = await make_end_user()
    ledger_before = await wallets.ledger("u_1")
    state = await run_page(browser, pages[1], metergate, user.key)
    assert state["error"] and state["chunks"] == []
    assert "word0" not in state["output"] and state["requestId"] is None
    assert state["balanceReads"] == 0 and state["shown_balance"] == "unavailable"
    assert (await wallets.get("u_1")).balance_micros == 10_000_000
    assert await wallets.ledger("u_1") == ledger_before
    assert mock_upstream.request_count == 0
