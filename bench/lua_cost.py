"""What the wallet's Lua scripts cost Redis, counted in instructions, not timed.

    python -m bench.lua_cost [--calls N]

Runs a private ``redis-server`` under ``valgrind --tool=callgrind`` (instrumentation
off until the measured part), opens a wallet the way the bench's end user has one,
then sends ``N`` holds and ``N`` settles shaped as a metered chat call sends them, as
scripts (EVALSHA) and as Redis Functions (FCALL, what the request path sends) (an
``sk-eu_`` key's stamp on the hold, its limits hash and a charge's metadata on the
settle), pipelined, and prints callgrind's instruction count (Ir) per call of each.
Beside them, the same for a script that returns at once and for the whole prelude
(each script gets only the part of it that it uses: ``proxy/store/scripts.py``), so a
change to a script can be told from the cost of running any script at all.

Why instructions: CPU time per call on this shared 2-core machine swings by ±20%
between identical runs, which hides the 1-5% a script change moves. Ir counts
repeat to within 0.3%. They are not microseconds (cache misses and the proxy
sharing the cores make the bench's figures larger), but they rank changes truly.

Needs valgrind and redis-server on the PATH; measured, never asserted. After the
run it checks the wallet: ``balance == Σ ledger``, nothing held.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.callgrind import Callgrind, callgrind_argv
from bench.loadgen import free_port

WALLET = "bench_user"
KEY_ID = "key_d00476ab9673d1fd"
STAMP = "9b99dd48f58b"
REQUEST_ID = "req_bb4d40c2818a00007fe1471e"
HOLD_META = '{"request_id":"req_bb4d40c2818a00007fe1471e"}'
# A charge's metadata as the gateway writes it for a small chat call.
CHARGE_META = (
    '{"request_id":"req_bb4d40c2818a00007fe1471e","key_id":"key_d00476ab9673d1fd","tier":"default",'
    '"model":"gpt-4o-mini","upstream":"openai","upstream_model":"gpt-4o-mini","ratecard":"default@1",'
    '"prompt_tokens":10,"completion_tokens":20,"cached_tokens":0,"reasoning_tokens":0,"service_tier":"default",'
    '"price_micros":17,"cost_micros":14,"usage_source":"upstream","outcome":"completed"}'
)


def _keys(hold_id: str) -> list[str]:
    w = f"mg:{{w:{WALLET}}}"
    return [f"{w}:wallet", f"{w}:holds", f"{w}:hold:{hold_id}", f"{w}:ledger"]


def _hold_args(sha: str, hold_id: str) -> list[object]:
    return ["EVALSHA", sha, 5, *_keys(hold_id), f"mg:{{w:{WALLET}}}:api-keys", hold_id, 51, 600000, HOLD_META,
            KEY_ID, REQUEST_ID, -1, -1, "", "", KEY_ID, STAMP]


def _settle_args(sha: str, hold_id: str) -> list[object]:
    return ["EVALSHA", sha, 5, *_keys(hold_id), f"mg:{{w:{WALLET}}}:limits:{KEY_ID}", hold_id, 17, CHARGE_META, 86400,
            REQUEST_ID, 30, "1"]


REPO = Path(__file__).resolve().parent.parent


async def measure(port: int, counter: Callgrind, calls: int) -> tuple[dict[str, float], bool]:
    """Ir per call of each reference script, hold and settle; and whether the wallet's ledger checks out."""
    import redis.asyncio as aioredis

    from proxy.store import WalletStore
    from proxy.store.scripts import _scripts

    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}")
    try:
        for _ in range(300):
            try:
                await redis.ping()
                break
            except Exception:
                await asyncio.sleep(0.1)
        store = WalletStore(redis)
        await store.open(WALLET, profile={"purpose": "lua cost"})
        await store.top_up(WALLET, 10**14, idempotency_key="seed")
        await redis.hset(f"mg:{{w:{WALLET}}}:api-keys", "v:" + KEY_ID, STAMP)
        scripts = _scripts()
        prelude = (REPO / "proxy" / "lua" / "_prelude.lua").read_text()
        references = {"script that returns at once": "return 1", "the whole prelude alone": prelude + "\nreturn 1"}
        shas = {name: await redis.script_load(scripts.source[name]) for name in ("hold", "settle")}
        ref_shas = {label: await redis.script_load(src) for label, src in references.items()}

        async def send(commands: list[list[object]]) -> None:
            for i in range(0, len(commands), 100):
                pipe = redis.pipeline(transaction=False)
                for command in commands[i:i + 100]:
                    pipe.execute_command(*command)
                await pipe.execute(raise_on_error=True)

        async def counted(commands: list[list[object]]) -> float:
            warm = len(commands) // 5
            await send(commands[:warm])  # uncounted
            counter.start()
            await send(commands[warm:])
            return counter.stop() / (len(commands) - warm)

        results: dict[str, float] = {}
        for label, sha in ref_shas.items():
            results[label] = await counted([["EVALSHA", sha, 0] for _ in range(calls)])
        ids = [f"hold_cost{i:07d}" for i in range(calls)]
        results["hold"] = await counted([_hold_args(shas["hold"], h) for h in ids])
        results["settle"] = await counted([_settle_args(shas["settle"], h) for h in ids])
        # The same calls as Redis Functions (FCALL), as the request path's clients send them.
        await redis.execute_command("FUNCTION", "LOAD", "REPLACE", scripts.library)
        ids = [f"hold_fcall{i:07d}" for i in range(calls)]
        results["hold (FCALL)"] = await counted(
            [["FCALL", scripts.function["hold"], *_hold_args("", h)[2:]] for h in ids])
        results["settle (FCALL)"] = await counted(
            [["FCALL", scripts.function["settle"], *_settle_args("", h)[2:]] for h in ids])
        audit = await store.audit(WALLET)
        ok = audit.wallet.balance_micros == audit.ledger_sum_micros and audit.wallet.held_micros == 0 \
            and audit.active_holds_sum_micros == 0
        return results, ok
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lua_cost", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=1000, help="holds and settles to count (default 1000)")
    args = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            print(f"bench.lua_cost: {tool} is not on the PATH", file=sys.stderr)
            return 2
    sys.path.insert(0, str(REPO))
    tmp = tempfile.mkdtemp(prefix="metergate-lua-cost-")
    port = free_port()
    out_prefix = f"{tmp}/callgrind.out"
    server = subprocess.Popen(
        [*callgrind_argv(out_prefix), "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        results, ok = asyncio.run(measure(port, Callgrind(server.pid, out_prefix), args.calls))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"redis-server instructions (callgrind Ir) per call, {args.calls} calls each, pipelined:")
    for label, ir in results.items():
        print(f"  {label:28s} {ir:10,.0f}")
    print(f"  {'hold + settle (one call)':28s} {results['hold'] + results['settle']:10,.0f}")
    print(f"  {'the same, as Functions':28s} {results['hold (FCALL)'] + results['settle (FCALL)']:10,.0f}")
    print(f"ledger check: balance == sum of ledger, nothing held: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
