"""metergate on a real three-master Redis Cluster, through the app: metered calls on wallets in every
master's slots, the reaper, and two app instances (as two replicas would be) sharing one cluster —
concurrent calls on one wallet never overspend, and a key revoked through one is refused by the other."""

from __future__ import annotations

import asyncio

import openai
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from proxy.app import create_app
from proxy.appstate import WALLETS
from proxy.config import Config, load_config
from proxy.store import WalletStore
from proxy.store.cluster import ClusterConnection
from tests.conftest import ADMIN, ADMIN_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.mock_upstream import MockUpstream, make_usage
from tests.proxy.store.test_cluster import one_wallet_per_master
from tests.redis_server import RedisCluster

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}


@pytest.fixture
def store(cluster_client: RedisClusterClient) -> RedisClusterClient:
    return cluster_client


@pytest.fixture
def cluster_config(cluster: RedisCluster, store: RedisClusterClient, mock_upstream: MockUpstream, monkeypatch) -> Config:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    return load_config(
        redis_url=cluster.url, admin_keys=[ADMIN_KEY], reaper_interval_seconds=0.05,
        upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV}},
    )


@pytest.fixture
async def replicas(aiohttp_client, cluster_config: Config) -> tuple[TestClient, TestClient]:
    """Two app instances on one cluster, each with its own connections: what two replicas share is the cluster."""
    first = await aiohttp_client(create_app(cluster_config), server_kwargs={"handler_cancellation": True})
    second = await aiohttp_client(create_app(cluster_config), server_kwargs={"handler_cancellation": True})
    return first, second


def sdk(app: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(app.make_url("/v1")), api_key=key, max_retries=0)


async def end_user(app: TestClient, user_id: str, funds: int) -> tuple[str, str]:
    """An end user made through the admin API, funded: (its key id, its key)."""
    assert (await app.post("/admin/end-users", json={"id": user_id}, headers=ADMIN)).status == 201
    if funds:
        headers = {**ADMIN, "Idempotency-Key": f"seed-{user_id}"}
        assert (await app.post(f"/admin/wallets/{user_id}/top-ups", json={"amount_micros": funds}, headers=headers)).status == 201
    created = await (await app.post(f"/admin/end-users/{user_id}/keys", json={"name": "test"}, headers=ADMIN)).json()
    return created["id"], created["key"]


async def test_the_app_runs_on_cluster_clients(replicas):
    first, _ = replicas
    assert isinstance(first.app[WALLETS].commands, ClusterConnection)
    assert (await first.get("/readyz")).status == 200


async def test_calls_on_wallets_in_every_masters_slots_are_charged_exactly(cluster, replicas, mock_upstream, store):
    first, _ = replicas
    mock_upstream.usage_override = make_usage(1000, 500)  # 1000 x 0.1875 + 500 x 0.75 = 562.5 -> 563
    ids = one_wallet_per_master(cluster)
    for user_id in ids:
        _, key = await end_user(first, user_id, 10_000_000)
        await sdk(first, key).chat.completions.create(**CHAT)
    for user_id in ids:
        assert (await WalletStore(store).get(user_id)).balance_micros == 10_000_000 - 563


async def test_concurrent_calls_through_two_replicas_never_overspend_one_wallet(replicas, mock_upstream, store):
    first, second = replicas
    _, key = await end_user(first, "u_1", 0)
    quote = await (await first.post("/v1/estimate", json=CHAT, headers={"Authorization": f"Bearer {key}"})).json()
    hold = quote["estimated_cost_micros"]
    # Each call uses exactly what it holds, and the wallet covers five and a half of them.
    mock_upstream.usage_override = make_usage(quote["prompt_tokens"], 100)
    mock_upstream.first_byte_delay = 0.2  # the calls overlap: holds are taken while others are open
    funds = 5 * hold + hold // 2
    headers = {**ADMIN, "Idempotency-Key": "seed"}
    assert (await first.post("/admin/wallets/u_1/top-ups", json={"amount_micros": funds}, headers=headers)).status == 201

    async def call(app: TestClient) -> bool:
        try:
            await sdk(app, key).chat.completions.create(**CHAT)
        except openai.APIStatusError as exc:
            assert exc.status_code == 402 and exc.body["type"] == "insufficient_quota"
            return False
        return True

    outcomes = await asyncio.gather(*(call(app) for _ in range(10) for app in (first, second)))
    state = await WalletStore(store).get("u_1")
    assert outcomes.count(True) == 5
    assert (state.balance_micros, state.held_micros) == (funds - 5 * hold, 0)


async def test_a_key_revoked_through_one_replica_is_refused_by_the_other(replicas, mock_upstream, store):
    first, second = replicas
    key_id, key = await end_user(first, "u_1", 10_000_000)
    await sdk(second, key).chat.completions.create(**CHAT)
    assert (await first.delete(f"/admin/end-users/u_1/keys/{key_id}", headers=ADMIN)).status == 200
    balance = (await WalletStore(store).get("u_1")).balance_micros
    with pytest.raises(openai.AuthenticationError):
        await sdk(second, key).chat.completions.create(**CHAT)
    assert (await WalletStore(store).get("u_1")).balance_micros == balance


async def test_the_reaper_of_an_app_on_a_cluster_expires_abandoned_holds_on_every_master(cluster, replicas, store):
    ids = one_wallet_per_master(cluster)
    wallets = WalletStore(store)
    for user_id in ids:
        await wallets.open(user_id, profile={"tier": "default", "metadata": {}})
        await wallets.top_up(user_id, 10_000, idempotency_key=f"seed-{user_id}")
        await wallets.hold(user_id, 4_000, ttl_ms=1)  # as if its proxy died mid-call
    deadline = asyncio.get_running_loop().time() + 5
    while asyncio.get_running_loop().time() < deadline:
        if [(await wallets.get(u)).held_micros for u in ids] == [0] * len(ids):
            break
        await asyncio.sleep(0.02)
    for user_id in ids:
        assert (await wallets.get(user_id)).held_micros == 0
        assert (await wallets.ledger(user_id, limit=1))[0].type == "expire"
