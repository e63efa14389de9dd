"""metergate vs a bare aiohttp pass-through, on loopback, in one run.

    python -m bench.run [--duration S] [--warmup S] [--quick]

Starts, each in its own process on 127.0.0.1 free ports:

* a private ``redis-server`` (temp dir, no persistence),
* the mock OpenAI upstream (``python -m tests.mock_upstream --fast``),
* the bare pass-through (``python -m bench.passthrough``: no auth, no billing),
* metergate on that redis (``python -m proxy serve --config <temp yaml>``),
* metergate on the embedded in-memory store (no ``redis_url``; an extra line).

Through each metergate's admin API it creates an end user with a huge balance
and an ``sk-eu_`` key, then loads every target with ``bench.loadgen`` in a
separate process: non-streamed chat at concurrency 1, 16 and 64, 16
concurrent streams of 20 words (23 events), and 16 of 100 words (103 events,
the stream issue 16's goal names; ``max_tokens`` 1024 there, so the hold covers
the ~200-token reply).  The body is the same for every target (a small chat
request with ``max_tokens``); metergate gets the key as Bearer, the
pass-through no auth.  Each (scenario, target) gets its own warmup run first
(counted in the charge check, not in the numbers).  Scenarios are run
target after target so drift affects all targets alike.

Afterwards it checks every wallet: ``balance == Σ ledger amounts``, no hold
left open, and one ``charge`` ledger entry per successful request sent
(warmups included).

Exit status is non-zero only when something failed to run: a request error, a
process that died, a broken ledger invariant or a lost charge.  Speed is
measured, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.loadgen import REPO_ROOT, LoadResult, free_port, run_load_in_subprocess, wait_for_port
from bench.memory import by_family, used_memory
from bench.memory import report as memory_report

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

ADMIN_KEY = "bench-admin-key"
OPERATOR_KEY = "bench-operator-key"
END_USER = "bench_user"
FUNDS_MICROS = 10**14  # 100 million USD: never the limit
MODEL = "gpt-4o-mini"
MAX_TOKENS = 64

LONG_STREAM_WORDS = 100  # issue 16's stream goal is stated for a 100-event stream
LONG_STREAM_MAX_TOKENS = 1024  # room for the ~200-token reply: a hold that covers it, as a client sizes it


@dataclass(frozen=True)
class Scenario:
    label: str
    concurrency: int
    stream: bool
    reply_words: int | None = None  # None: the mock's default (20 words, 23 events streamed)
    max_tokens: int = MAX_TOKENS

    def body(self) -> bytes:
        return chat_body(self.stream, max_tokens=self.max_tokens, reply_words=self.reply_words)


SCENARIOS = (
    Scenario("chat c=1", 1, False),
    Scenario("chat c=16", 16, False),
    Scenario("chat c=64", 64, False),
    Scenario("stream c=16", 16, True),
    Scenario("stream100 c=16", 16, True, reply_words=LONG_STREAM_WORDS, max_tokens=LONG_STREAM_MAX_TOKENS),
)

PASSTHROUGH = "pass-through"
METERGATE = "metergate (redis)"
EMBEDDED = "metergate (embedded store)"


def chat_body(stream: bool, *, max_tokens: int = MAX_TOKENS, reply_words: int | None = None) -> bytes:
    """The bench's request; `reply_words` asks the mock upstream for a reply of that many words
    (its `mock_reply_words` field, which every target forwards unchanged)."""
    body: dict = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if reply_words is not None:
        body["mock_reply_words"] = reply_words
    return json.dumps(body).encode()


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def _child_env() -> dict[str, str]:
    # Nothing from the caller's METERGATE_* may redirect the benchmark (e.g. to a shared redis).
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_process(name: str, argv: list[str], port: int, logdir: Path, timeout: float = 20.0) -> Proc:
    log_path = logdir / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.log"
    log = open(log_path, "wb")
    popen = subprocess.Popen(
        argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_child_env(),
        start_new_session=True,  # a Ctrl-C in the terminal reaches only us; we stop the children
    )
    log.close()
    proc = Proc(name, popen, log_path)
    try:
        wait_for_port(port, timeout=timeout, proc=popen)
    except Exception as exc:
        stop_process(proc)
        raise RuntimeError(f"{name} did not start: {exc}\n{proc.log_tail()}") from None
    return proc


def stop_process(proc: Proc) -> None:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGINT)
        try:
            proc.popen.wait(5)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()


@contextlib.contextmanager
def private_redis(prefix: str) -> Iterator[tuple[Path, RedisServer]]:
    """A temp dir and a private redis-server running in it (never a shared one); both gone after."""
    sys.path.insert(0, REPO_ROOT)
    from tests.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "redis").mkdir()
        redis = RedisServer(tmpdir / "redis")
        redis.start()
        try:
            yield tmpdir, redis
        finally:
            redis.stop()


def start_mock_upstream(tmpdir: Path, *options: str) -> tuple[Proc, str]:
    """The mock OpenAI upstream in bench mode (`--fast`, plus `options`), and its /v1 base URL."""
    port = free_port()
    proc = start_process("mock upstream", [sys.executable, "-m", "tests.mock_upstream", "--port", str(port), "--fast",
                                           *options], port, tmpdir)
    return proc, f"http://127.0.0.1:{port}/v1"


def write_metergate_config(path: Path, port: int, upstream_base_url: str, redis_url: str | None, *,
                           extra_lines: tuple[str, ...] = ()) -> None:
    ratecards = Path(REPO_ROOT) / "config" / "ratecards"
    lines = [
        "host: 127.0.0.1",
        f"port: {port}",
        *([f"redis_url: {json.dumps(redis_url)}"] if redis_url else []),
        # The ledger of record (archived in the background while the load runs) in the temp dir.
        f"database_url: {json.dumps('sqlite+aiosqlite:///' + str(path.parent / f'ledger-{port}.sqlite3'))}",
        *extra_lines,
        f"admin_keys: [{json.dumps(ADMIN_KEY)}]",
        f"operator_keys: [{json.dumps(OPERATOR_KEY)}]",
        f"ratecards_dir: {json.dumps(str(ratecards))}",
        "upstreams:",
        "  openai:",
        f"    base_url: {json.dumps(upstream_base_url)}",
    ]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- admin API


def admin(base: str, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        base + "/admin" + path, data=data, method=method,
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} /admin{path}: {exc.code} {exc.read().decode(errors='replace')}") from None


def create_end_user(base: str) -> str:
    """An end user with a huge balance; returns its sk-eu_ key."""
    admin(base, "POST", "/end-users", {"id": END_USER, "tier": "default", "metadata": {"purpose": "bench"}})
    key = admin(base, "POST", f"/end-users/{END_USER}/keys", {"name": "bench"})["key"]
    admin(base, "POST", f"/wallets/{END_USER}/top-ups", {"amount_micros": FUNDS_MICROS, "reference": "bench"},
          headers={"Idempotency-Key": "bench-seed"})
    if not key.startswith("sk-eu_"):
        raise RuntimeError(f"unexpected key shape: {key[:10]}…")
    return key


@dataclass
class LedgerCheck:
    balance: int
    held: int
    ledger_sum: int
    entries: int
    charges: int
    closes: int  # entries that closed a hold (charge, release, expire): one per call that was held
    charged_micros: int
    outcomes: dict[str, int] = field(default_factory=dict)


def check_ledger(base: str) -> LedgerCheck:
    """Read the wallet and its whole ledger through the admin API."""
    wallet = admin(base, "GET", f"/wallets/{END_USER}")
    total = entries = charges = closes = charged = 0
    outcomes: dict[str, int] = {}
    cursor = None
    while True:
        q = "?limit=500" + (f"&starting_after={cursor}" if cursor else "")
        page = admin(base, "GET", f"/wallets/{END_USER}/ledger{q}")
        for e in page["data"]:
            entries += 1
            total += e["amount_micros"]
            if e["type"] == "charge":
                charges += 1
                charged -= e["amount_micros"]
                outcome = _outcome(e)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if "hold_id" in (e.get("details") or {}) and e["type"] in ("charge", "release", "expire"):
                closes += 1
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    return LedgerCheck(wallet["balance_micros"], wallet["held_micros"], total, entries, charges, closes, charged, outcomes)


def _outcome(entry: dict) -> str:
    """The charge's `outcome` (completed, client_disconnected, ...), from its ledger details."""
    return str((entry.get("details") or {}).get("outcome", "?"))


async def _redis_audit(redis_url: str) -> tuple[int, int, int, int]:
    from proxy.store import WalletStore, connect

    client = connect(redis_url)
    try:
        audit = await WalletStore(client).audit(END_USER)
        return audit.wallet.balance_micros, audit.ledger_sum_micros, audit.wallet.held_micros, audit.active_holds_sum_micros
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- run


@dataclass
class Target:
    name: str
    url: str
    headers: dict
    proc: Proc
    admin_base: str | None = None  # metergate only
    sent_ok: int = 0  # successful requests sent, warmups included
    sent_err: int = 0


def cpu_seconds(pid: int, *, main_thread_only: bool = False) -> float:
    """utime + stime of a process so far (/proc/PID/stat; its threads', ended ones too): steadier
    than requests/s on a shared machine. `main_thread_only`: of its main thread alone (the event
    loop), so what runs in other threads (the ledger of record's SQLite driver) can be told apart."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fmt_row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, help="measured seconds per scenario and target (default 8, --quick 2)")
    p.add_argument("--warmup", type=float, help="warmup seconds before each measurement (default 1.5, --quick 0.5)")
    p.add_argument("--quick", action="store_true", help="short run (~40 s) for a smoke check")
    p.add_argument("--no-embedded", action="store_true", help="skip metergate on the embedded store")
    p.add_argument("--scenario", action="append", choices=[sc.label for sc in SCENARIOS], metavar="LABEL",
                   help="run only this scenario (repeatable; default: all of "
                        + ", ".join(repr(sc.label) for sc in SCENARIOS) + ")")
    args = p.parse_args(argv)
    scenarios = [sc for sc in SCENARIOS if not args.scenario or sc.label in args.scenario]
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 8.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.5)

    cores = os.cpu_count() or 0
    print(f"metergate bench: {cores} CPU core(s) on this machine; redis, the mock upstream, the proxy under test "
          f"and the load generator (its own process) all share them, so absolute numbers understate a dedicated box.")
    print(f"{duration:g} s measured per scenario and target, after {warmup:g} s of warmup; "
          f"body: {MODEL}, max_tokens={MAX_TOKENS} (stream100: {LONG_STREAM_WORDS} words, {LONG_STREAM_WORDS + 3} events, "
          f"max_tokens={LONG_STREAM_MAX_TOKENS}); mock upstream in --fast mode.", flush=True)

    failures: list[str] = []
    procs: list[Proc] = []
    started = time.monotonic()
    with private_redis("metergate-bench-") as (tmpdir, redis):
        try:
            py = sys.executable
            mock, upstream = start_mock_upstream(tmpdir)
            procs.append(mock)

            pt_port = free_port()
            pt = start_process(PASSTHROUGH, [py, "-m", "bench.passthrough", "--port", str(pt_port), "--upstream", upstream],
                               pt_port, tmpdir)
            procs.append(pt)
            targets = [Target(PASSTHROUGH, f"http://127.0.0.1:{pt_port}/v1/chat/completions", {}, pt)]

            variants = [(METERGATE, redis.url)] + ([] if args.no_embedded else [(EMBEDDED, None)])
            for name, redis_url in variants:
                port = free_port()
                cfg = tmpdir / f"metergate-{port}.yaml"
                write_metergate_config(cfg, port, upstream, redis_url)
                proc = start_process(name, [py, "-m", "proxy", "serve", "--config", str(cfg)], port, tmpdir)
                procs.append(proc)
                base = f"http://127.0.0.1:{port}"
                key = create_end_user(base)
                targets.append(Target(name, base + "/v1/chat/completions", {"Authorization": f"Bearer {key}"}, proc, base))

            redis_used_before = asyncio.run(used_memory(redis.url))
            results: dict[tuple[str, str], LoadResult] = {}
            cpu: dict[tuple[str, str], tuple[float, float, float]] = {}  # (proxy, its threads, redis) CPU µs per call
            for scenario in scenarios:
                label, concurrency, stream, body = scenario.label, scenario.concurrency, scenario.stream, scenario.body()
                for t in targets:
                    if warmup > 0:
                        w = run_load_in_subprocess(t.url, body, t.headers, concurrency, duration=warmup, stream=stream,
                                                   timeout=warmup + 120)
                        t.sent_ok += w.requests
                        t.sent_err += w.errors
                        if w.errors:
                            failures.append(f"{label} / {t.name} (warmup): {w.errors} errors, e.g. {w.error_samples[:2]}")
                    redis_pid = redis.process.pid if t.name == METERGATE and redis.process else None
                    pid = t.proc.popen.pid
                    cpu_before = (cpu_seconds(pid), cpu_seconds(pid, main_thread_only=True),
                                  cpu_seconds(redis_pid) if redis_pid else 0.0)
                    r = run_load_in_subprocess(t.url, body, t.headers, concurrency, duration=duration, stream=stream,
                                               timeout=duration + 120)
                    calls = max(r.requests, 1)
                    proxy_cpu = (cpu_seconds(pid) - cpu_before[0]) * 1e6 / calls
                    main_cpu = (cpu_seconds(pid, main_thread_only=True) - cpu_before[1]) * 1e6 / calls
                    cpu[(label, t.name)] = (
                        proxy_cpu, max(proxy_cpu - main_cpu, 0.0),
                        (cpu_seconds(redis_pid) - cpu_before[2]) * 1e6 / calls if redis_pid else 0.0,
                    )
                    t.sent_ok += r.requests
                    t.sent_err += r.errors
                    results[(label, t.name)] = r
                    if r.errors:
                        failures.append(f"{label} / {t.name}: {r.errors} errors, e.g. {r.error_samples[:2]}")
                    for proc in procs:
                        if not proc.alive():
                            raise RuntimeError(f"{proc.name} died (rc={proc.popen.returncode}):\n{proc.log_tail()}")
                    print(f"  {label:<12} {t.name:<27} {r.line()}", flush=True)

            # ---------------------------------------------------------------- table
            print()
            # CPU per call is the figure to quote: requests/s swings with whatever
            # else the shared machine runs, a process's CPU time per call does not.
            # "off the event loop": the proxy's other threads, chiefly the ledger of record's SQLite
            # driver (aiosqlite), whose work a PostgreSQL ledger moves into the database's processes.
            header = ["scenario", "target", "rps", "p50 ms", "p99 ms", "errors", "proxy CPU µs/call",
                      "of it off the event loop", "redis CPU µs/call"]
            rows = [
                [label, t.name, f"{r.rps:.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", str(r.errors),
                 f"{cpu[(label, t.name)][0]:.0f}", f"{cpu[(label, t.name)][1]:.0f}",
                 f"{cpu[(label, t.name)][2]:.0f}" if t.name == METERGATE else "-"]
                for label in (sc.label for sc in scenarios) for t in targets for r in [results[(label, t.name)]]
            ]
            widths = [max(len(x) for x in col) for col in zip(header, *rows)]
            print(fmt_row(header, widths))
            print(fmt_row(["-" * w for w in widths], widths))
            for i, row in enumerate(rows):
                if i and i % len(targets) == 0:
                    print()
                print(fmt_row(row, widths))

            print()
            print("metergate / pass-through (goal: >= 80% of the throughput, at most +1 ms p50):")
            header = ["scenario", "target", "rps ratio", "p50 diff ms", "p99 diff ms", "goal"]
            rows = []
            for label in (sc.label for sc in scenarios):
                base_r = results[(label, PASSTHROUGH)]
                for t in targets[1:]:
                    r = results[(label, t.name)]
                    ratio = r.rps / base_r.rps if base_r.rps else 0.0
                    d50 = r.p50_ms - base_r.p50_ms
                    d99 = r.p99_ms - base_r.p99_ms
                    goal = "met" if ratio >= 0.8 and d50 <= 1.0 else "missed"
                    rows.append([label, t.name, f"{ratio:.2f}", f"{d50:+.2f}", f"{d99:+.2f}", goal])
            widths = [max(len(x) for x in col) for col in zip(header, *rows)]
            print(fmt_row(header, widths))
            print(fmt_row(["-" * w for w in widths], widths))
            for row in rows:
                print(fmt_row(row, widths))
            print("(the goal column is information, not a pass/fail of this script)")

            print()
            metergate_calls = next(t.sent_ok + t.sent_err for t in targets if t.name == METERGATE)
            for line in memory_report(asyncio.run(by_family(redis.url)), metergate_calls, redis_used_before,
                                      asyncio.run(used_memory(redis.url))):
                print(line)

            # ---------------------------------------------------------------- ledger
            print()
            print("ledger check (balance == sum of ledger amounts, no open hold, one charge per successful request):")
            for t in targets[1:]:
                lc = check_ledger(t.admin_base)
                ok_invariant = lc.balance == lc.ledger_sum
                ok_held = lc.held == 0
                ok_charges = lc.charges == t.sent_ok and lc.closes == t.sent_ok + t.sent_err
                print(f"  {t.name}: requests sent {t.sent_ok + t.sent_err} (ok {t.sent_ok}, errors {t.sent_err}), "
                      f"charges recorded {lc.charges}, holds closed {lc.closes}, outcomes {lc.outcomes}")
                print(f"    balance {lc.balance} == sum of {lc.entries} ledger amounts {lc.ledger_sum}: "
                      f"{'yes' if ok_invariant else 'NO'}; held {lc.held}; charged {lc.charged_micros} micros "
                      f"(= FUNDS - balance: {'yes' if FUNDS_MICROS - lc.balance == lc.charged_micros else 'NO'})")
                if not ok_invariant:
                    failures.append(f"{t.name}: balance {lc.balance} != sum of ledger {lc.ledger_sum}")
                if not ok_held:
                    failures.append(f"{t.name}: {lc.held} micros still held after the run")
                if not ok_charges:
                    failures.append(f"{t.name}: {lc.charges} charges / {lc.closes} holds closed for "
                                    f"{t.sent_ok} successful of {t.sent_ok + t.sent_err} requests sent: CHARGES LOST OR EXTRA")
                if FUNDS_MICROS - lc.balance != lc.charged_micros:
                    failures.append(f"{t.name}: balance moved by {FUNDS_MICROS - lc.balance}, charges sum {lc.charged_micros}")
                if t.name == METERGATE:
                    bal, ledger_sum, held, holds_sum = asyncio.run(_redis_audit(redis.url))
                    same = bal == ledger_sum and held == holds_sum
                    print(f"    WalletStore.audit on the private redis: balance {bal}, ledger sum {ledger_sum}, "
                          f"held {held}, active holds {holds_sum}: {'consistent' if same else 'INCONSISTENT'}")
                    if not same:
                        failures.append(f"{t.name}: WalletStore.audit inconsistent")

            for proc in procs:
                if not proc.alive():
                    failures.append(f"{proc.name} died (rc={proc.popen.returncode}):\n{proc.log_tail()}")
        except Exception as exc:  # a failure to run, not a slow result
            failures.append(f"{type(exc).__name__}: {exc}")
        except KeyboardInterrupt:
            failures.append("interrupted")
        finally:
            for proc in reversed(procs):
                stop_process(proc)

    print()
    print(f"total wall time {time.monotonic() - started:.0f} s")
    if failures:
        print("FAILED:", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    print("OK: every request succeeded, every process stayed up, every charge is in the ledger.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
