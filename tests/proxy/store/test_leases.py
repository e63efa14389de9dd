"""Leases: one holder per name across replicas; the batched forms a pass uses act as one call per name would.

Over both ways the store sends commands (redis-py, and the multiplexer the app uses).
"""

from __future__ import annotations

import pytest

from proxy.store.archive import ArchiveStore
from proxy.store.redis_mux import MultiplexedConnection


@pytest.fixture(params=["redis-py", "multiplexed"])
async def store(request, redis, redis_server):
    commands = MultiplexedConnection(redis_server.url) if request.param == "multiplexed" else None
    yield ArchiveStore(redis, commands)
    if commands is not None:
        await commands.aclose()


async def test_acquire_each_gives_a_token_only_where_the_name_is_free(store):
    held = await store.acquire("archive:u_1", 60_000)

    tokens = await store.acquire_each(["archive:u_1", "archive:u_2", "archive:u_3"], 60_000)

    assert held is not None and tokens[0] is None
    assert tokens[1] is not None and tokens[2] is not None and tokens[1] != tokens[2]
    assert await store.acquire("archive:u_2", 60_000) is None  # now held


async def test_renew_each_extends_only_the_leases_its_tokens_still_hold(store, redis):
    mine = await store.acquire_each(["archive:u_1", "archive:u_2"], 1_000)
    await redis.set("mg:lease:archive:u_2", "someone-else", px=60_000)  # lapsed and taken over

    still = await store.renew_each({"archive:u_1": mine[0], "archive:u_2": mine[1]}, 60_000)

    assert still == {"archive:u_1"}
    assert 1_000 < await redis.pttl("mg:lease:archive:u_1") <= 60_000
    assert await redis.get("mg:lease:archive:u_2") == b"someone-else"


async def test_release_each_frees_only_the_leases_its_tokens_hold(store, redis):
    mine = await store.acquire_each(["archive:u_1", "archive:u_2"], 60_000)
    await redis.set("mg:lease:archive:u_2", "someone-else", px=60_000)

    await store.release_each({"archive:u_1": mine[0], "archive:u_2": mine[1]})

    assert await store.acquire("archive:u_1", 60_000) is not None
    assert await redis.get("mg:lease:archive:u_2") == b"someone-else"


async def test_the_batched_forms_of_no_leases_send_nothing(store):
    assert await store.acquire_each([], 1_000) == []
    assert await store.renew_each({}, 1_000) == set()
    await store.release_each({})
