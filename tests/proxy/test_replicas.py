"""Two metergate replicas on one (non-cluster) Redis: the same guarantees as on a cluster
(tests/proxy/test_cluster_gateway.py, whose tests run here too, on these fixtures)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.config import Config
from tests.proxy.test_cluster_gateway import (  # noqa: F401  (collected here with this module's fixtures)
    test_a_key_revoked_through_one_replica_is_refused_by_the_other,
    test_concurrent_calls_through_two_replicas_never_overspend_one_wallet,
)


@pytest.fixture
def store(redis: aioredis.Redis) -> aioredis.Redis:
    return redis


@pytest.fixture
async def replicas(aiohttp_client, gateway_config: Config) -> tuple[TestClient, TestClient]:
    """Two app instances, each with its own connections, sharing one Redis."""
    first = await aiohttp_client(create_app(gateway_config), server_kwargs={"handler_cancellation": True})
    second = await aiohttp_client(create_app(gateway_config), server_kwargs={"handler_cancellation": True})
    return first, second
