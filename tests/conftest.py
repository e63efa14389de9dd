"""Shared fixtures: a private Redis, the wallet store on it, and the ledger audit after every test."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.config import Config, load_config
from proxy.store import AccountStore, WalletStore, connect
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


async def assert_ledger_invariants(store: WalletStore) -> None:
    """balance == Σ ledger amounts and held == Σ active holds, for every wallet in the store."""
    for wallet_id in await store.wallet_ids():
        audit = await store.audit(wallet_id)
        assert audit.wallet.balance_micros == audit.ledger_sum_micros, f"{wallet_id}: balance != Σ ledger"
        assert audit.wallet.held_micros == audit.active_holds_sum_micros, f"{wallet_id}: held != Σ holds"
        assert audit.wallet.balance_micros >= -audit.wallet.credit_limit_micros, f"{wallet_id}: below -credit_limit"


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_server.url)
    await client.flushall()
    yield client
    await assert_ledger_invariants(WalletStore(client))
    await client.aclose()


@pytest.fixture
def wallets(redis: aioredis.Redis) -> WalletStore:
    return WalletStore(redis, hold_ttl_ms=60_000)


@pytest.fixture
def accounts(redis: aioredis.Redis) -> AccountStore:
    return AccountStore(redis)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


ADMIN_KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def config(redis_server: RedisServer, redis: aioredis.Redis) -> Config:
    # Depends on `redis` so the store is flushed before, and audited after, the test.
    return load_config(redis_url=redis_server.url, admin_keys=[ADMIN_KEY], reaper_interval_seconds=0.05)


@pytest.fixture
async def client(aiohttp_client, config: Config) -> TestClient:
    return await aiohttp_client(create_app(config))
