"""The multiplexed Redis connection the request path uses: replies, errors, order, reconnects."""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.store.redis_mux import MultiplexedConnection


@pytest.fixture
async def mux(redis_server, redis):
    connection = MultiplexedConnection(redis_server.url)
    yield connection
    await connection.aclose()


async def test_replies_come_back_in_redis_types(mux):
    assert await mux.execute("SET", "k", "v") == b"OK"
    assert await mux.execute("GET", "k") == b"v"
    assert await mux.execute("GET", "missing") is None
    assert await mux.execute("HSET", "h", "a", 1, "b", 2) == 2
    assert await mux.execute("HMGET", "h", "a", "b", "c") == [b"1", b"2", None]


async def test_an_error_reply_is_raised_by_execute_and_returned_by_batch(mux):
    with pytest.raises(ResponseError):
        await mux.execute("INCR", "not", "a", "command")
    ok, failed = await mux.batch([["SET", "k", "v"], ["LPUSH", "k", "x"]])
    assert ok == b"OK" and isinstance(failed, ResponseError) and "WRONGTYPE" in str(failed)


async def test_an_unknown_script_is_a_noscript_error(mux):
    with pytest.raises(NoScriptError):
        await mux.execute("EVALSHA", "0" * 40, 0)


async def test_concurrent_callers_each_get_their_own_reply(mux):
    async def one(i: int) -> bytes:
        await mux.execute("SET", f"k{i}", i)
        return await mux.execute("GET", f"k{i}")

    replies = await asyncio.gather(*(one(i) for i in range(500)))
    assert replies == [str(i).encode() for i in range(500)]


async def _spied(mux: MultiplexedConnection) -> tuple[Any, list[bytes]]:
    """The connection's protocol, its transport's writes recorded as they are made."""
    protocol = await mux._connected()
    writes: list[bytes] = []
    write = protocol.transport.write

    def spy(data: bytes) -> None:
        writes.append(bytes(data))
        write(data)

    protocol.transport.write = spy
    return protocol, writes


async def test_a_command_sent_with_nothing_in_flight_is_written_at_once(mux):
    protocol, writes = await _spied(mux)
    reply = protocol.send(hiredis.pack_command(("SET", "k", "1")), 1)
    assert writes == [hiredis.pack_command(("SET", "k", "1"))]  # before the loop has turned
    assert await reply == [b"OK"]


async def test_commands_sent_while_one_is_in_flight_leave_together_after_it_in_order(mux):
    protocol, writes = await _spied(mux)
    first = protocol.send(hiredis.pack_command(("SET", "k", "1")), 1)
    second = protocol.send(hiredis.pack_command(("INCR", "k")), 1)
    third = protocol.send(hiredis.pack_command(("GET", "k")), 1)
    assert len(writes) == 1  # the first went at once; the others wait for the turn to end
    assert await asyncio.gather(first, second, third) == [[b"OK"], [2], [b"2"]]
    assert writes[1:] == [hiredis.pack_command(("INCR", "k")) + hiredis.pack_command(("GET", "k"))]


async def test_a_dropped_connection_is_reopened_on_the_next_command(mux, redis):
    await mux.execute("SET", "k", "v")
    await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert await mux.execute("GET", "k") == b"v"


async def test_the_database_in_the_url_is_selected(redis_server, redis):
    mux = MultiplexedConnection(redis_server.url.rsplit("/", 1)[0] + "/3")
    try:
        await mux.execute("SET", "in-db-3", "yes")
    finally:
        await mux.aclose()
    await redis.execute_command("SELECT", 3)
    assert await redis.get("in-db-3") == b"yes"
    await redis.flushall()
    await redis.execute_command("SELECT", 0)


async def test_an_unreachable_server_is_a_connection_error():
    mux = MultiplexedConnection("redis://127.0.0.1:9/0", timeout=1)
    with pytest.raises(RedisConnectionError):
        await mux.execute("PING")


async def test_a_server_that_stops_answering_times_every_waiting_call_out_and_the_next_reconnects(redis_server):
    # A proxy in front of the real Redis that, once told to, swallows what it is sent.
    silent = asyncio.Event()
    upstream_host, upstream_port = redis_server.url.removeprefix("redis://").split("/")[0].split(":")

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r_reader, r_writer = await asyncio.open_connection(upstream_host, int(upstream_port))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if not silent.is_set():
                    dst.write(data)

        await asyncio.gather(pump(reader, r_writer), pump(r_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mux = MultiplexedConnection(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    try:
        assert await mux.execute("PING") == b"PONG"
        silent.set()
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(mux.execute("PING"), mux.batch([["PING"], ["PING"]]), return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert asyncio.get_running_loop().time() - started < 2
        silent.clear()
        assert await mux.execute("PING") == b"PONG"  # a fresh connection, not the stale replies of the old one
    finally:
        await mux.aclose()
        server.close()
