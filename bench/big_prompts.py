"""Another caller's small-call latency while 8 clients send ~3.9 MB prompts.

    python -m bench.big_prompts                  # this tree
    python -m bench.big_prompts --tree /tmp/old  # another checkout (e.g. `git archive HEAD`), for before/after

Starts a private redis, the mock upstream (--fast) and metergate from `--tree`
(its own process, its own config/ratecards), as `bench.run` does. One funded
end user makes small gpt-4o-mini calls one after another for `--duration`
seconds, three times: alone; while 8 clients of an *empty* wallet each loop
sending a 3.9 MB prompt (refused with 402); and while 8 clients of a *funded*
wallet do the same (quoted, held, forwarded). It prints p50/p99/max of the
small calls and how many big requests were answered, by status.

What it shows: whether estimating big prompts blocks the event loop every
other call waits on. Machine: everything shares the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.loadgen import REPO_ROOT, free_port
from bench.run import Proc, admin, private_redis, start_mock_upstream, start_process, stop_process, write_metergate_config

BIG_CLIENTS = 8
BIG_PROMPT_BYTES = 3_900_000  # under the default 4 MiB body limit
SMALL = json.dumps({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello."}]}).encode()


def big_body() -> bytes:
    # Prose-like text: what tiktoken handles fastest, so this understates an adversary's cost.
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 60_000)[:BIG_PROMPT_BYTES]
    return json.dumps({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": words}]}).encode()


def end_user(base: str, user_id: str, funds: int) -> str:
    admin(base, "POST", "/end-users", {"id": user_id, "tier": "default", "metadata": {}})
    key = str(admin(base, "POST", f"/end-users/{user_id}/keys", {"name": "bench"})["key"])
    if funds:
        admin(base, "POST", f"/wallets/{user_id}/top-ups", {"amount_micros": funds, "reference": "bench"},
              headers={"Idempotency-Key": f"seed-{user_id}"})
    return key


async def _small_calls(session: aiohttp.ClientSession, url: str, key: str, until: float) -> tuple[list[float], Counter[int]]:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    while time.monotonic() < until:
        start = time.perf_counter()
        async with session.post(url, data=SMALL, headers=headers) as resp:
            await resp.read()
            statuses[resp.status] += 1
        latencies.append((time.perf_counter() - start) * 1000)
    return latencies, statuses


async def _big_calls(session: aiohttp.ClientSession, url: str, key: str, body: bytes, until: float, statuses: Counter[int]) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    while time.monotonic() < until:
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                statuses[resp.status] += 1
        except aiohttp.ClientError as exc:
            statuses[type(exc).__name__] += 1  # type: ignore[index]


async def scenario(url: str, small_key: str, big_key: str | None, duration: float) -> str:
    body = big_body()
    big_statuses: Counter[int] = Counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as small, aiohttp.ClientSession(timeout=timeout) as big:
        await _small_calls(small, url, small_key, time.monotonic() + 0.5)  # warm up
        until = time.monotonic() + duration
        loads = [asyncio.create_task(_big_calls(big, url, big_key, body, until, big_statuses))
                 for _ in range(BIG_CLIENTS)] if big_key else []
        if loads:
            await asyncio.sleep(0.5)  # let the big requests be in flight
        latencies, statuses = await _small_calls(small, url, small_key, until)
        await asyncio.gather(*loads)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    answered = ", ".join(f"{k}: {v}" for k, v in sorted(big_statuses.items(), key=str)) or "-"
    return (f"small calls {len(latencies):>5} ({dict(statuses)})  p50 {q[49]:8.1f} ms  p99 {q[98]:8.1f} ms  "
            f"max {max(latencies):8.1f} ms | big requests answered: {answered}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=REPO_ROOT, help="the metergate checkout to run (default: this one)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per scenario")
    args = parser.parse_args()
    tree = str(Path(args.tree).resolve())
    print(f"metergate from {tree}; {BIG_CLIENTS} clients x {BIG_PROMPT_BYTES / 1e6:.1f} MB prompts; "
          f"{args.duration:g} s per scenario; everything shares this machine's cores.", flush=True)
    procs: list[Proc] = []
    with private_redis("metergate-bigprompts-") as (tmpdir, redis):
        try:
            py = sys.executable
            mock, upstream = start_mock_upstream(tmpdir)
            procs.append(mock)
            port = free_port()
            cfg = tmpdir / "metergate.yaml"
            write_metergate_config(cfg, port, upstream, redis.url)
            cfg.write_text(cfg.read_text().replace(json.dumps(str(Path(REPO_ROOT) / "config" / "ratecards")),
                                                   json.dumps(str(Path(tree) / "config" / "ratecards"))))
            argv = [py, "-c", f"import sys; sys.path.insert(0, {tree!r}); from proxy.cli import main; sys.exit(main())",
                    "serve", "--config", str(cfg)]
            procs.append(start_process("metergate", argv, port, tmpdir))
            base = f"http://127.0.0.1:{port}"
            payer = end_user(base, "payer", 10**12)
            empty = end_user(base, "empty", 0)
            funded = end_user(base, "funded", 10**12)
            url = base + "/v1/chat/completions"
            for label, big_key in (("alone", None), ("8 x empty wallet", empty), ("8 x funded wallet", funded)):
                print(f"  {label:<18} {asyncio.run(scenario(url, payer, big_key, args.duration))}", flush=True)
        finally:
            for proc in reversed(procs):
                stop_process(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
