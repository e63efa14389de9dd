"""The wallet under concurrency, a flushed script cache and a restarted Redis."""

from __future__ import annotations

import asyncio

import pytest

from proxy.store import InsufficientFunds, WalletStore, connect
from proxy.store.redis_mux import MultiplexedConnection
from tests.conftest import assert_ledger_invariants
from tests.redis_server import RedisServer


@pytest.fixture
def wallets(wallets_on_each_client: WalletStore) -> WalletStore:
    return wallets_on_each_client


async def test_200_concurrent_holds_against_50_units_grant_exactly_50(wallets):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 50_000_000, idempotency_key="seed")
    lowest_available = []

    async def one() -> bool:
        try:
            hold = await wallets.hold("u_1", 1_000_000)
        except InsufficientFunds:
            return False
        lowest_available.append(hold.wallet.available_micros)
        return True

    results = await asyncio.gather(*(one() for _ in range(200)))
    assert results.count(True) == 50
    assert min(lowest_available) == 0
    state = await wallets.get("u_1")
    assert (state.balance_micros, state.held_micros, state.available_micros) == (50_000_000, 50_000_000, 0)


async def test_operations_survive_a_script_flush(wallets, redis):
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 1_000_000, idempotency_key="k1")
    await redis.script_flush()
    hold = await wallets.hold("u_1", 400_000)
    await redis.script_flush()
    settled = await wallets.settle("u_1", hold.hold_id, 300_000)
    assert settled.wallet.balance_micros == 700_000


@pytest.mark.parametrize("multiplexed", [False, True], ids=["redis-py", "multiplexed"])
async def test_operations_survive_a_redis_restart(tmp_path, multiplexed):
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    client = connect(server.url)
    commands = MultiplexedConnection(server.url) if multiplexed else None
    try:
        wallets = WalletStore(client, commands=commands)
        await wallets.open("u_1", profile={})
        await wallets.top_up("u_1", 1_000_000, idempotency_key="k1")
        hold = await wallets.hold("u_1", 400_000)
        server.restart()  # same port, data kept (AOF), script cache empty
        settled = await wallets.settle("u_1", hold.hold_id, 250_000)
        assert settled.wallet.balance_micros == 750_000
        await assert_ledger_invariants(wallets)
    finally:
        if commands is not None:
            await commands.aclose()
        await client.aclose()
        server.stop()
