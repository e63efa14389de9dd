"""SIGTERM: no new calls, calls in flight finish (up to a grace), every hold is closed, exit 0 (issue 10)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.proxy.calls.test_call_exits import assert_no_open_holds, charges
from tests.proxy.test_crash_recovery import start_serve, stop, write_config
from tests.proxy.test_gateway_failures import CHAT, sdk


def config_with(tmp_path: Path, repo_root: Path, redis_url: str, upstream_url: str, **fields: object) -> Path:
    path = write_config(tmp_path, repo_root, redis_url, upstream_url)
    path.write_text(json.dumps({**json.loads(path.read_text()), "hold_ttl_seconds": 600, **fields}))
    return path


async def read_all(stream) -> list[str]:
    words = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
    return words


async def test_sigterm_lets_a_stream_in_flight_finish_and_settles_it_before_exit(
    make_end_user, mock_upstream, redis, redis_server, repo_root, tmp_path, wallets
):
    user = await make_end_user()
    config = config_with(tmp_path, repo_root, redis_server.url, mock_upstream.base_url, shutdown_grace_seconds=20)
    mock_upstream.reply_words, mock_upstream.chunk_delay = 40, 0.05  # a 2 s stream
    serve = await start_serve(config, repo_root, tmp_path / "serve.log")
    try:
        stream = await sdk(serve.url + "/v1", user.key).chat.completions.create(**CHAT, stream=True)
        reading = asyncio.create_task(read_all(stream))
        await asyncio.sleep(0.3)
        serve.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # Draining: nothing new gets in (the listener is closed).
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as http, http.get(serve.url + "/readyz") as resp:
                await resp.read()
        async with asyncio.timeout(10):
            words = await reading
        assert len(words) == 40, "the stream in flight was not allowed to finish"
        async with asyncio.timeout(15):
            assert await serve.process.wait() == 0, serve.log_tail()
        [charge] = await charges(wallets, user.id)
        assert (charge.details["outcome"], charge.details["usage_source"]) == ("completed", "upstream")
        await assert_no_open_holds(redis, wallets, user.id)
    finally:
        await stop(serve)


async def test_a_stream_longer_than_the_grace_is_cut_settled_and_the_process_exits_0(
    make_end_user, mock_upstream, redis, redis_server, repo_root, tmp_path, wallets
):
    user = await make_end_user()
    config = config_with(tmp_path, repo_root, redis_server.url, mock_upstream.base_url, shutdown_grace_seconds=0.5)
    mock_upstream.reply_words, mock_upstream.chunk_delay = 400, 0.05  # a 20 s stream
    serve = await start_serve(config, repo_root, tmp_path / "serve.log")
    try:
        stream = await sdk(serve.url + "/v1", user.key).chat.completions.create(**CHAT, stream=True)
        reading = asyncio.create_task(read_all(stream))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await serve.process.wait() == 0, serve.log_tail()
        assert time.monotonic() - started < 12
        with pytest.raises((openai.APIError, aiohttp.ClientError, asyncio.TimeoutError)):
            async with asyncio.timeout(5):
                await reading
        [charge] = await charges(wallets, user.id)
        assert charge.details["outcome"] == "shutdown"
        assert 0 < charge.details["completion_tokens"] < 400 * 2
        await assert_no_open_holds(redis, wallets, user.id)
    finally:
        await stop(serve)


async def test_while_draining_a_new_call_is_refused_and_not_ready(gateway, make_end_user, mock_upstream, wallets):
    from proxy.appstate import LIFECYCLE

    user = await make_end_user()
    gateway.server.app[LIFECYCLE].draining = True  # as on_shutdown sets it; a kept-alive connection can still ask
    resp = await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {user.key}"})
    error = (await resp.json())["error"]
    assert (resp.status, error["code"], resp.headers["Retry-After"]) == (503, "shutting_down", "1")
    assert (await gateway.get("/readyz")).status == 503
    assert mock_upstream.request_count == 0
    assert [e.type for e in await wallets.ledger(user.id)] == ["top_up", "open"]
