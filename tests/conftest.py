"""Shared fixtures: a private Redis, the wallet store on it, and the ledger audit after every test."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from proxy.app import create_app
from proxy.config import Config, load_config
from proxy.store import AccountStore, Commands, WalletStore, connect
from proxy.store.redis_mux import MultiplexedConnection
from tests import loop_guard
from tests.mock_upstream import MockUpstream, running_mock_upstream
from tests.redis_server import RedisCluster, RedisServer


class RecordingCommands:
    """A store's commands with every round trip kept, in order (an `execute` is a batch of one)."""

    def __init__(self, inner: Commands):
        self.inner = inner
        self.round_trips: list[list[tuple[Any, ...]]] = []

    async def execute(self, *args: Any) -> Any:
        self.round_trips.append([tuple(args)])
        return await self.inner.execute(*args)

    async def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        self.round_trips.append([tuple(c) for c in commands])
        return await self.inner.batch(commands)

    @property
    def sent(self) -> list[tuple[Any, ...]]:
        """Every command, round trips flattened."""
        return [command for trip in self.round_trips for command in trip]

loop_guard.install()


def pytest_terminal_summary(terminalreporter) -> None:
    loop_guard.report(terminalreporter)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def migrated_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite ledger of record at the newest schema, made once and copied for each test (migrating costs ~60 ms)."""
    from proxy.ledger.db import LedgerDatabase

    path = tmp_path_factory.mktemp("ledger") / "template.sqlite3"

    async def migrate() -> None:
        database = await LedgerDatabase.open(f"sqlite+aiosqlite:///{path}")
        await database.close()

    asyncio.run(migrate())
    return path


@pytest.fixture(autouse=True)
def ledger_database(migrated_ledger: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every app (and `metergate serve`) a test starts archives to a SQLite file of that test's own, never
    to metergate-ledger.sqlite3 in the working directory, nor to another test's: a write lock one test
    left behind (a process killed mid-transaction) cannot stall the next. tests/ledger sets its own URLs."""
    path = tmp_path / "ledger-of-record.sqlite3"
    shutil.copyfile(migrated_ledger, path)
    url = f"sqlite+aiosqlite:///{path}"
    monkeypatch.setenv("METERGATE_DATABASE_URL", url)
    return url


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A private three-master Redis Cluster, started once for the tests that need one."""
    servers = RedisCluster(tmp_path_factory.mktemp("cluster"))
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture
async def cluster_client(cluster: RedisCluster) -> AsyncIterator[RedisClusterClient]:
    """A redis-py cluster client on a flushed cluster; the ledger is audited after the test."""
    client = connect(cluster.url, cluster=True)
    await client.flushall()
    yield client
    await assert_ledger_invariants(WalletStore(client))
    await client.aclose()


async def assert_ledger_invariants(store: WalletStore) -> None:
    """balance == Σ ledger amounts == Σ grants and held == Σ active holds, for every wallet in the store."""
    for wallet_id in await store.wallet_ids():
        audit = await store.audit(wallet_id)
        assert audit.wallet.balance_micros == audit.ledger_sum_micros, f"{wallet_id}: balance != Σ ledger"
        assert audit.wallet.balance_micros == audit.grants_sum_micros, f"{wallet_id}: balance != Σ grants"
        assert audit.wallet.held_micros == audit.active_holds_sum_micros, f"{wallet_id}: held != Σ holds"
        assert audit.wallet.balance_micros >= -audit.wallet.credit_limit_micros, f"{wallet_id}: below -credit_limit"


# Ledger notes: entries of amount 0 that record what moved no money (a refusal for
# funds, a key at its cap...) so that it becomes an event in ledger order.
NOTE_TYPES = frozenset({"depleted", "spend_cap_reached", "top_up_failed", "auto_top_up_failed", "auto_top_up_disabled"})


async def money_ledger(store: WalletStore, wallet_id: str, limit: int = 500) -> list:
    """The wallet's ledger (newest first) without its notes: what a refused call must leave unchanged."""
    return [e for e in await store.ledger(wallet_id, limit=limit) if e.type not in NOTE_TYPES]


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


# ------------------------------------------------------------ gateway fixtures

OPERATOR_KEY = "test-operator-key"
UPSTREAM_KEY_ENV = "METERGATE_TEST_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-upstream-secret-never-shown"


@pytest.fixture
async def mock_upstream() -> AsyncIterator[MockUpstream]:
    async with running_mock_upstream() as mock:
        yield mock


@pytest.fixture
def gateway_config(redis_server: RedisServer, redis: aioredis.Redis, mock_upstream: MockUpstream, monkeypatch) -> Config:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    return load_config(
        redis_url=redis_server.url, admin_keys=[ADMIN_KEY], operator_keys=[OPERATOR_KEY],
        upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV}},
    )


@pytest.fixture
async def gateway(aiohttp_client, gateway_config: Config) -> TestClient:
    # handler_cancellation as in production (`metergate serve`): a client that
    # goes away cancels its handler at once.
    return await aiohttp_client(create_app(gateway_config), server_kwargs={"handler_cancellation": True})


@pytest.fixture
def base_url(gateway: TestClient) -> str:
    return str(gateway.make_url("/v1"))


@dataclass
class EndUser:
    id: str
    key: str


@pytest.fixture
def make_end_user(wallets: WalletStore, accounts: AccountStore):
    async def make(user_id: str = "u_1", funds: int = 10_000_000, tier: str = "default", **profile) -> EndUser:
        await wallets.open(user_id, profile={"tier": tier, "metadata": {}, **profile})
        if funds:
            await wallets.top_up(user_id, funds, idempotency_key=f"seed-{user_id}")
        _, key = await accounts.create_key(user_id, test=profile.get("livemode", True) is False)
        return EndUser(user_id, key)

    return make


@pytest.fixture(params=["redis-py", "multiplexed"])
async def wallets_on_each_client(request, redis: aioredis.Redis, redis_server: RedisServer) -> AsyncIterator[WalletStore]:
    """The wallet store over each way it can send commands: the scripts must behave the same."""
    commands = MultiplexedConnection(redis_server.url) if request.param == "multiplexed" else None
    yield WalletStore(redis, hold_ttl_ms=60_000, commands=commands)
    if commands is not None:
        await commands.aclose()
