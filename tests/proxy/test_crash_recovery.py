"""A `metergate serve` killed with SIGKILL mid-stream: the next process's reaper bills what was relayed (issue 8).

The call's counted usage is checkpointed onto its hold while it streams; a proxy that dies leaves the hold to
expire, and the reaper settles it for that checkpoint instead of releasing it for free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai

from pricing import Usage, count_text_tokens, estimate_prompt_tokens, load_rate_cards, price_usage
from tests.conftest import ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.proxy.calls.test_call_exits import assert_no_open_holds, charges, wait_closed
from tests.proxy.test_gateway_failures import CHAT, ledger_types, sdk
from tests.redis_server import free_port


@dataclass
class Serve:
    """One `metergate serve` subprocess, logging to a file the failure messages quote."""

    process: asyncio.subprocess.Process
    url: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def write_config(tmp_path: Path, repo_root: Path, redis_url: str, upstream_url: str) -> Path:
    path = tmp_path / "metergate.yaml"
    # JSON is YAML: no YAML writer needed.
    path.write_text(json.dumps({
        "host": "127.0.0.1",
        "redis_url": redis_url,
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}",
        "admin_keys": [ADMIN_KEY],
        "operator_keys": [OPERATOR_KEY],
        # Short enough that the dead process's hold expires within the test; the survivor's keep-alive
        # and checkpoints run well inside it.
        "hold_ttl_seconds": 2,
        "checkpoint_interval_seconds": 0.3,
        "reaper_interval_seconds": 0.2,
        "ratecards_dir": str(repo_root / "config" / "ratecards"),
        "upstreams": {"openai": {"base_url": upstream_url, "api_key_env": UPSTREAM_KEY_ENV}},
    }, indent=2))
    return path


async def start_serve(config: Path, repo_root: Path, log: Path) -> Serve:
    port = free_port()
    # Only the file configures it: no METERGATE_* of the caller's environment leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env[UPSTREAM_KEY_ENV] = UPSTREAM_KEY
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
            cwd=repo_root, env=env, stdout=out, stderr=out,
        )
    serve = Serve(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as http:
        while True:
            if process.returncode is not None:
                raise AssertionError(f"metergate exited with {process.returncode}:\n{serve.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(serve.url + "/readyz") as resp:
                    if resp.status == 200:
                        return serve
            if time.monotonic() > deadline:
                raise AssertionError(f"metergate did not become ready:\n{serve.log_tail()}")
            await asyncio.sleep(0.05)


async def stop(serve: Serve) -> None:
    if serve.process.returncode is None:
        serve.process.kill()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(serve.process.wait(), 10)


async def test_a_proxy_killed_mid_stream_is_billed_by_the_next_ones_reaper_for_what_it_relayed(
    make_end_user, mock_upstream, redis, redis_server, repo_root, tmp_path, wallets
):
    user = await make_end_user()
    config = write_config(tmp_path, repo_root, redis_server.url, mock_upstream.base_url)
    mock_upstream.reply_words, mock_upstream.chunk_delay = 400, 0.05  # a 20 s stream
    body = {**CHAT, "stream": True}
    running: list[Serve] = []
    try:
        first = await start_serve(config, repo_root, tmp_path / "first.log")
        running.append(first)
        received: list[str] = []
        stream = await sdk(first.url + "/v1", user.key).chat.completions.create(**body)

        async def read(until: float | None) -> None:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
                if until is not None and time.monotonic() >= until:
                    return

        async with asyncio.timeout(5):
            await read(until=time.monotonic() + 1.5)  # several checkpoints' worth
        first.process.kill()
        await first.process.wait()
        # Whatever the dead proxy had already sent still counts as received.
        with contextlib.suppress(openai.APIError, asyncio.TimeoutError):
            async with asyncio.timeout(5):
                await read(until=None)
        assert 0 < len(received) < 400

        running.append(await start_serve(config, repo_root, tmp_path / "second.log"))
        try:
            await wait_closed(wallets, user.id, 10, "the orphaned hold was not settled by the next process's reaper")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{running[-1].log_tail()}") from None
        [charge] = await charges(wallets, user.id)
        d = charge.details
        prompt = estimate_prompt_tokens(body)
        relayed = sum(count_text_tokens(p) for p in received)
        assert (d["outcome"], d["usage_source"], d["prompt_tokens"]) == ("proxy_lost", "counted", prompt)
        # The last checkpoint: some of what was relayed, never more than it (give or take one event).
        assert 0 < d["completion_tokens"] <= relayed + 5
        card = load_rate_cards(repo_root / "config" / "ratecards").card_for("default").model("gpt-4o-mini")
        expected = price_usage(card, Usage(prompt_tokens=prompt, completion_tokens=d["completion_tokens"])).price_micros
        assert -charge.amount_micros == d["price_micros"] == expected
        assert "release" not in await ledger_types(wallets, user.id)
        await assert_no_open_holds(redis, wallets, user.id)
    finally:
        for serve in running:
            await stop(serve)
