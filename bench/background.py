"""What the background readers of the ledger cost per wallet: the archiver and the events consumer.

    python -m bench.background                  # 1,000 wallets, 3 rounds
    python -m bench.background --wallets 5000 --rounds 5

Every ledger entry is read twice after the call that wrote it: the events
consumer derives its events, the archiver copies it to the ledger of record.
Both work per dirty wallet, so their cost follows how many wallets moved since
the last pass, not how many calls: the load bench (`bench.run`) has one end
user and hides it. This opens `--wallets` wallets on a private redis-server,
then per round gives each one metered call (a hold and its settle: one charge
entry) and drains both readers, as a replica does between two polls, with the
app's own parts (the multiplexed connection, a SQLite ledger of record).

It prints CPU per wallet per round, of this process (the SQLite driver's thread
included) and of redis-server, utime+stime from /proc. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time

from bench.run import private_redis


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(redis_url: str, redis_pid: int, database_url: str, wallets_count: int, rounds: int) -> int:
    from proxy.config import ArchiveConfig, EventsConfig
    from proxy.events.consumer import EventConsumer
    from proxy.ledger.archiver import Archiver
    from proxy.ledger.db import LedgerDatabase
    from proxy.store import WalletStore, connect
    from proxy.store.archive import ArchiveStore
    from proxy.store.events import EventStore
    from proxy.store.redis_mux import MultiplexedConnection

    client = connect(redis_url)
    commands = MultiplexedConnection(redis_url)
    wallets = WalletStore(client, hold_ttl_ms=60_000, commands=commands)
    database = await LedgerDatabase.open(database_url)
    archiver = Archiver(ArchiveStore(client, commands), wallets, database, ArchiveConfig())
    consumer = EventConsumer(EventStore(client, commands), wallets, EventsConfig())

    async def derive_all() -> None:
        while await consumer.pass_once():
            pass

    ids = [f"u_{n}" for n in range(wallets_count)]
    for wallet_id in ids:
        await wallets.open(wallet_id, profile={"tier": "default", "metadata": {}})
        await wallets.top_up(wallet_id, 10**12, idempotency_key=f"{wallet_id}-top-up")
    await derive_all()
    await archiver.drain()

    print(f"{wallets_count} wallets, one metered call each per round; CPU per wallet per round (µs):")
    print(f"{'round':>5}  {'archiver':>9} {'+ redis':>8}  {'events':>9} {'+ redis':>8}")
    for n in range(1, rounds + 1):
        for wallet_id in ids:
            hold = await wallets.hold(wallet_id, 5_000, meta={"request_id": f"req_{n}"})
            await wallets.settle(wallet_id, hold.hold_id, 1_234, meta={"model": "gpt-4o-mini", "price_micros": 1_234})
        figures = []
        for work in (archiver.drain, derive_all):
            own, redis = _own_cpu_seconds(), _proc_cpu_seconds(redis_pid)
            await work()
            figures += [(_own_cpu_seconds() - own) * 1e6 / wallets_count,
                        (_proc_cpu_seconds(redis_pid) - redis) * 1e6 / wallets_count]
        print(f"{n:>5}  {figures[0]:>9.0f} {figures[1]:>8.0f}  {figures[2]:>9.0f} {figures[3]:>8.0f}", flush=True)

    audit = [await wallets.audit(w) for w in ids[:10]]
    broken = [a.wallet.wallet_id for a in audit if a.ledger_sum_micros != a.wallet.balance_micros]
    await database.close()
    await commands.aclose()
    await client.aclose()
    if broken:
        print(f"ledger invariant broken for {broken}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--wallets", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with private_redis("metergate-background-") as (tmpdir, redis):
        assert redis.process is not None
        url = f"sqlite+aiosqlite:///{tmpdir / 'ledger.sqlite3'}"
        status = asyncio.run(measure(redis.url, redis.process.pid, url, args.wallets, args.rounds))
    print(f"({time.monotonic() - started:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
