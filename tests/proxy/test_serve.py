"""`metergate serve` as a newcomer runs it: the bundled config, the embedded store, a real metered call."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import aiohttp
import openai

from tests.mock_upstream import make_usage
from tests.redis_server import free_port

BUNDLED_ADMIN = {"Authorization": "Bearer mg-admin-dev-only-change-me"}


async def wait_until_up(url: str, process: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            if process.returncode is not None:
                raise AssertionError(f"metergate exited: {(await process.stderr.read()).decode()}")
            try:
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("metergate did not start")


async def test_serve_on_the_embedded_store_meters_a_call(mock_upstream, repo_root):
    port = free_port()
    env = {**os.environ, "METERGATE_UPSTREAM_OPENAI_BASE_URL": mock_upstream.base_url, "OPENAI_API_KEY": "sk-up"}
    env.pop("METERGATE_REDIS_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--port", str(port), cwd=repo_root, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_up(url, process)
        async with aiohttp.ClientSession(headers=BUNDLED_ADMIN) as http:
            await http.post(url + "/admin/end-users", json={"id": "u_new"})
            key = (await (await http.post(url + "/admin/end-users/u_new/keys", json={})).json())["key"]
            await http.post(url + "/admin/wallets/u_new/top-ups", json={"amount_micros": 5_000_000}, headers={"Idempotency-Key": "t1"})
            mock_upstream.usage_override = make_usage(1000, 500)
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
            wallet = await (await http.get(url + "/admin/wallets/u_new")).json()
        # 1000 x 0.1875 + 500 x 0.75 = 562.5 -> 563
        assert wallet["balance_micros"] == 5_000_000 - 563
        assert mock_upstream.requests[-1].headers["Authorization"] == "Bearer sk-up"
    finally:
        process.terminate()
        _, stderr = await process.communicate()
    assert b"embedded in-memory store" in stderr and b"balances live in memory" in stderr


async def test_serve_with_a_bad_config_says_where(tmp_path, repo_root):
    bad = tmp_path / "metergate.yaml"
    bad.write_text("port: 8080\nupstreams:\n  openai: {base_url: 5, surprise: true}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(bad), cwd=repo_root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert f"{bad}:3: upstreams.openai.surprise: unknown field" in stderr.decode()


async def test_serve_freezes_its_startup_objects_out_of_the_garbage_collector(mock_upstream, repo_root):
    port = free_port()
    env = {**os.environ, "METERGATE_UPSTREAM_OPENAI_BASE_URL": mock_upstream.base_url}
    env.pop("METERGATE_REDIS_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--port", str(port), cwd=repo_root, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        # The line is written by the app's last startup hook, before the port answers /readyz.
        await wait_until_up(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        _, stderr = await process.communicate()
    frozen = re.search(rb"garbage collector: (\d+) startup objects frozen, young threshold 7000", stderr)
    assert frozen is not None, stderr.decode()[-2000:]
    assert int(frozen.group(1)) > 10_000  # what the app's imports and startup leave
