"""Many streams open at once: does every one get its first byte, and what does an open stream cost in memory?

    python -m bench.many_streams                 # 1,000 streams
    python -m bench.many_streams --streams 2000

Starts a private redis, the mock upstream (--fast, one word every
`--chunk-delay` seconds, so each stream stays open for a few seconds), the
bare pass-through and metergate with its default settings, as `bench.run`
does. For each target it opens `--streams` streams at once from this process
(one aiohttp session, no connection cap), and prints how long until every stream had its first event, how many
completed, and the proxy's resident memory (VmRSS) before and while all of
them were open: the growth divided by the streams is the memory per open
stream, the figure to size a process by. A second round prints the same
growth again, which is far smaller: the allocator reuses what the first kept. For metergate it then checks the
ledger: one charge per stream, nothing left held, `balance == Σ ledger`.

Nothing here is asserted in tests; slow numbers never fail it. It exits
non-zero only when something failed: a stream with no first byte or not
completed, a process that died, a lost charge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.loadgen import free_port
from bench.run import (
    METERGATE,
    PASSTHROUGH,
    Proc,
    check_ledger,
    create_end_user,
    private_redis,
    start_mock_upstream,
    start_process,
    stop_process,
    write_metergate_config,
)

BODY = json.dumps({"model": "gpt-4o-mini", "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": "Say hello."}]}).encode()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Outcome:
    first_bytes: int
    completed: int
    all_first_byte_s: float
    rss_before: int
    rss_open: int


async def open_streams(url: str, headers: dict[str, str], n: int, pid: int) -> Outcome:
    started = time.perf_counter()
    first = 0
    all_first = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=300, sock_connect=60)
    rss_before = rss_bytes(pid)

    async def one(session: aiohttp.ClientSession) -> bool:
        nonlocal first
        async with session.post(url, data=BODY, headers={**headers, "Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                return False
            got_first = False
            tail = b""
            async for piece in resp.content.iter_any():
                if not got_first:
                    got_first = True
                    first += 1
                    if first == n:
                        all_first.set()
                tail = (tail + piece)[-64:]
            return b"data: [DONE]" in tail

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(n)]
        try:
            await asyncio.wait_for(all_first.wait(), 120)
            all_first_s = time.perf_counter() - started
        except TimeoutError:
            all_first_s = float("nan")
        rss_open = rss_bytes(pid)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    return Outcome(first, sum(1 for r in results if r is True), all_first_s, rss_before, rss_open)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.many_streams", description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--chunk-delay", type=float, default=0.2, help="seconds between the mock's words")
    args = p.parse_args(argv)
    failures: list[str] = []
    procs: list[Proc] = []
    with private_redis("metergate-streams-") as (tmpdir, redis):
        try:
            py = sys.executable
            mock, upstream = start_mock_upstream(tmpdir, "--reply-words", "16", "--chunk-delay", str(args.chunk_delay))
            procs.append(mock)
            pt_port = free_port()
            pt = start_process(PASSTHROUGH, [py, "-m", "bench.passthrough", "--port", str(pt_port), "--upstream", upstream],
                               pt_port, tmpdir)
            procs.append(pt)
            mg_port = free_port()
            cfg = tmpdir / "metergate.yaml"
            write_metergate_config(cfg, mg_port, upstream, redis.url)
            mg = start_process(METERGATE, [py, "-m", "proxy", "serve", "--config", str(cfg)], mg_port, tmpdir)
            procs.append(mg)
            base = f"http://127.0.0.1:{mg_port}"
            key = create_end_user(base)
            targets = [(PASSTHROUGH, f"http://127.0.0.1:{pt_port}/v1/chat/completions", {}, pt),
                       (METERGATE, base + "/v1/chat/completions", {"Authorization": f"Bearer {key}"}, mg)]
            print(f"{args.streams} streams at once per target; the mock sends a word every {args.chunk_delay:g} s "
                  f"(16 words: each stream stays open ~{16 * args.chunk_delay:.1f} s). Everything shares this "
                  "machine's cores.")
            print(f"{'target':<20} {'first byte':>10} {'all first bytes':>16} {'completed':>10} "
                  f"{'RSS before':>11} {'RSS open':>9} {'per open stream':>16} {'2nd round':>15}")
            for name, url, headers, proc in targets:
                # The first round grows the heap to what this many open streams take (the
                # figure to size a process by); the second reuses what the allocator kept.
                out = asyncio.run(open_streams(url, headers, args.streams, proc.popen.pid))
                again = asyncio.run(open_streams(url, headers, args.streams, proc.popen.pid))
                per_stream = (out.rss_open - out.rss_before) / max(args.streams, 1)
                per_again = (again.rss_open - again.rss_before) / max(args.streams, 1)
                print(f"{name:<20} {out.first_bytes:>10} {out.all_first_byte_s:>15.2f}s {out.completed:>10} "
                      f"{out.rss_before / 2**20:>9.1f}MB {out.rss_open / 2**20:>7.1f}MB {per_stream / 1024:>13.1f} KB"
                      f" {per_again / 1024:>12.1f} KB")
                out.first_bytes, out.completed = min(out.first_bytes, again.first_bytes), min(out.completed, again.completed)
                if out.first_bytes < args.streams or out.completed < args.streams:
                    failures.append(f"{name}: {out.first_bytes} first bytes, {out.completed} completed of {args.streams}")
                if not proc.alive():
                    failures.append(f"{name} died:\n{proc.log_tail()}")
            time.sleep(1.0)  # the last settles land
            lc = check_ledger(base)
            sent = 2 * args.streams
            print(f"ledger: {lc.charges} charges for {sent} streams, {lc.closes} holds closed, held {lc.held}, "
                  f"balance == sum of ledger: {'yes' if lc.balance == lc.ledger_sum else 'NO'}")
            if lc.charges != sent or lc.held != 0 or lc.balance != lc.ledger_sum:
                failures.append("metergate's ledger does not show one charge per stream with nothing held")
        finally:
            for proc in procs:
                stop_process(proc)
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
