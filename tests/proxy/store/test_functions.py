"""The wallet's Lua as Redis Functions on the request path's client: loaded on first use and
again after a flush, given up for scripts when the server refuses them, one library kept."""

from __future__ import annotations

import redis.asyncio as aioredis

from proxy.store import WalletStore
from proxy.store.redis_mux import MultiplexedConnection
from proxy.store.scripts import _Scripts, _scripts

OLD_LIBRARY = "#!lua name=metergate_0ld\nredis.register_function('metergate_0ld_x', function() return 1 end)"
OTHER_LIBRARY = "#!lua name=someone_else\nredis.register_function('someone_else_x', function() return 1 end)"


async def _calls(redis: aioredis.Redis, command: str) -> int:
    return int((await redis.info("commandstats")).get(f"cmdstat_{command}", {}).get("calls", 0))


async def _libraries(redis: aioredis.Redis) -> set[str]:
    listed = await redis.execute_command("FUNCTION", "LIST")  # redis-py makes each library a dict
    return {library[b"library_name"].decode() for library in listed}


async def _open_and_spend(store: WalletStore, wallet_id: str) -> None:
    await store.open(wallet_id, profile={})
    await store.top_up(wallet_id, 1_000, idempotency_key=f"seed-{wallet_id}")
    hold = await store.hold(wallet_id, 400)
    await store.settle(wallet_id, hold.hold_id, 150)


async def test_the_multiplexer_runs_the_scripts_as_functions(redis_server, redis):
    mux = MultiplexedConnection(redis_server.url)
    try:
        await redis.config_resetstat()
        store = WalletStore(redis, commands=mux)
        await _open_and_spend(store, "u_fn")
        assert await _calls(redis, "fcall") >= 4 and await _calls(redis, "evalsha") == 0
        assert _scripts().library_name in await _libraries(redis)
        assert (await store.get("u_fn")).balance_micros == 850
    finally:
        await mux.aclose()


async def test_a_flushed_library_is_loaded_again_and_the_settle_runs_once(redis_server, redis):
    mux = MultiplexedConnection(redis_server.url)
    try:
        store = WalletStore(redis, commands=mux)
        await store.open("u_flush", profile={})
        await store.top_up("u_flush", 1_000, idempotency_key="seed")
        hold = await store.hold("u_flush", 400)
        await redis.execute_command("FUNCTION", "FLUSH")
        settled = await store.settle("u_flush", hold.hold_id, 150)
        assert (settled.captured_micros, settled.replayed) == (150, False)
        charges = [e for e in await store.ledger("u_flush") if e.type == "charge"]
        assert [e.amount_micros for e in charges] == [-150]
        assert (await store.get("u_flush")).balance_micros == 850
    finally:
        await mux.aclose()


async def test_a_user_not_allowed_functions_gets_the_scripts_instead(redis_server, redis):
    await redis.execute_command("FUNCTION", "FLUSH")
    await redis.execute_command("ACL", "SETUSER", "no_functions", "on", ">secret", "~*", "&*", "+@all",
                                "-fcall", "-fcall_ro", "-function")
    host_port = redis_server.url.split("//", 1)[1]
    mux = MultiplexedConnection(f"redis://no_functions:secret@{host_port}")
    try:
        await redis.config_resetstat()
        store = WalletStore(redis, commands=mux)
        await _open_and_spend(store, "u_nofn")
        assert mux.use_functions is False
        assert await _calls(redis, "evalsha") >= 4
        assert (await store.get("u_nofn")).balance_micros == 850
    finally:
        await mux.aclose()
        await redis.execute_command("ACL", "DELUSER", "no_functions")


async def test_the_first_load_deletes_older_metergate_libraries_and_no_one_elses(redis_server, redis):
    await redis.execute_command("FUNCTION", "FLUSH")
    await redis.execute_command("FUNCTION", "LOAD", OLD_LIBRARY)
    await redis.execute_command("FUNCTION", "LOAD", OTHER_LIBRARY)
    scripts = _Scripts()
    mux = MultiplexedConnection(redis_server.url)
    try:
        await scripts._load_library(mux)
        assert await _libraries(redis) == {scripts.library_name, "someone_else"}
        # An older replica loads its own again; this process deletes it no more (no ping-pong).
        await redis.execute_command("FUNCTION", "LOAD", OLD_LIBRARY)
        await scripts._load_library(mux)
        assert await _libraries(redis) == {scripts.library_name, "someone_else", "metergate_0ld"}
    finally:
        await mux.aclose()
        await redis.execute_command("FUNCTION", "FLUSH")
