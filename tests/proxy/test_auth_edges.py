"""Hostile credentials and bodies: a non-ASCII bearer, a bad bearer with a withheld body, a body that stalls.

These talk raw HTTP/1.1 over TCP: aiohttp's client would neither send a
non-UTF-8 header nor hold a body back, and the point is what the server does
before the body has arrived.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
import pytest

from proxy.config import Config
from tests.conftest import ADMIN_KEY

BODY_TIMEOUT = 0.5
DEADLINE = 5.0  # bound on every read; far above BODY_TIMEOUT so a slow CI box does not flake
CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})


@pytest.fixture
def gateway_config(gateway_config: Config) -> Config:
    return gateway_config.model_copy(update={"body_timeout_seconds": BODY_TIMEOUT})


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict:
        data = orjson.loads(self.body)
        assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}, data
        return data["error"]


class RawConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_head(self, method: str, path: str, bearer: bytes | None, content_length: int | None = None) -> None:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: metergate.test"]
        if bearer is not None:
            lines.append(b"Authorization: Bearer " + bearer)
        if content_length is not None:
            lines += [b"Content-Type: application/json", b"Content-Length: %d" % content_length]
        await self.send(b"\r\n".join(lines) + b"\r\n\r\n")

    async def response(self) -> RawResponse:
        async def read() -> RawResponse:
            status_line = await self.reader.readuntil(b"\r\n")
            headers: dict[str, str] = {}
            while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
            return RawResponse(int(status_line.split()[1]), headers, body)

        return await asyncio.wait_for(read(), DEADLINE)

    async def closed_by_server(self) -> bool:
        """Whether the server hangs up (EOF, nothing more) within the deadline."""
        try:
            return await asyncio.wait_for(self.reader.read(), DEADLINE) == b""
        except TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def connect(gateway):
    opened: list[RawConnection] = []

    async def open_connection() -> RawConnection:
        conn = RawConnection(*await asyncio.open_connection(gateway.host, gateway.port))
        opened.append(conn)
        return conn

    yield open_connection
    for conn in opened:
        conn.close()


# ---------------------------------------------------------- non-ASCII bearers

NON_ASCII_BEARERS = {
    "utf8": "sk-eu_clé".encode(),
    "latin1": b"sk-eu_cl\xe9",  # not UTF-8 at all
    "jwt-shaped": "eyJhbGciOi.é.x".encode(),
    "operator-shaped": "test-operator-kéy".encode(),
}


@pytest.mark.parametrize("bearer", NON_ASCII_BEARERS.values(), ids=NON_ASCII_BEARERS.keys())
@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/chat/completions", CHAT),
    ("GET", "/v1/models", None),
    ("GET", "/v1/wallet", None),
    ("GET", "/admin/wallets/u_1", None),
])
async def test_a_non_ascii_bearer_is_an_invalid_api_key(connect, mock_upstream, bearer, method, path, body):
    conn = await connect()
    await conn.send_head(method, path, bearer, None if body is None else len(body))
    if body is not None:
        await conn.send(body)
    resp = await conn.response()
    assert resp.status == 401
    assert resp.error()["code"] == "invalid_api_key"
    assert mock_upstream.requests == []


async def test_the_admin_key_still_opens_the_admin_api(connect):
    # The byte-wise comparison must still match the right key.
    conn = await connect()
    await conn.send_head("GET", "/admin/wallets/nobody", ADMIN_KEY.encode())
    resp = await conn.response()
    assert resp.status == 404 and resp.error()["code"] == "wallet_not_found"


# ----------------------------------------------- credentials before the body

@pytest.mark.parametrize("bearer", [None, b"sk-eu_not-a-key", b"eyJhbGciOiJIUzI1NiJ9.e30.x", b"garbage"],
                         ids=["none", "unknown-key", "bad-jwt", "garbage"])
async def test_a_bad_bearer_is_refused_before_its_body_is_sent(connect, mock_upstream, bearer):
    conn = await connect()
    await conn.send_head("POST", "/v1/chat/completions", bearer, content_length=len(CHAT))
    resp = await conn.response()  # the body was never sent: the server must answer without it
    assert resp.status == 401
    assert resp.error()["code"] in {"invalid_api_key", "invalid_token"}
    assert mock_upstream.requests == []


async def test_an_operator_key_still_names_its_end_user_in_the_body(connect, make_end_user, mock_upstream):
    await make_end_user("u_op")
    body = orjson.dumps({**orjson.loads(CHAT), "user": "u_op"})
    conn = await connect()
    await conn.send_head("POST", "/v1/chat/completions", b"test-operator-key", content_length=len(body))
    await conn.send(body)
    resp = await conn.response()
    assert resp.status == 200, resp.body
    assert len(mock_upstream.requests) == 1


async def test_a_body_that_stalls_is_a_408_and_the_connection_is_closed(connect, make_end_user, wallets, mock_upstream):
    user = await make_end_user("u_slow", funds=1_000_000)
    conn = await connect()
    await conn.send_head("POST", "/v1/chat/completions", user.key.encode(), content_length=len(CHAT))
    await conn.send(CHAT[:10])
    await asyncio.sleep(BODY_TIMEOUT / 4)  # trickle a little more, then stop
    await conn.send(CHAT[10:20])
    resp = await conn.response()
    assert resp.status == 408
    assert resp.error()["code"] == "request_timeout"
    assert await conn.closed_by_server()
    state = await wallets.get("u_slow")
    assert (state.balance_micros, state.held_micros) == (1_000_000, 0)
    assert mock_upstream.requests == []


async def test_a_whole_body_within_the_timeout_is_read(connect, make_end_user, mock_upstream):
    user = await make_end_user("u_ok")
    conn = await connect()
    await conn.send_head("POST", "/v1/chat/completions", user.key.encode(), content_length=len(CHAT))
    await conn.send(CHAT[:10])
    await conn.send(CHAT[10:])
    resp = await conn.response()
    assert resp.status == 200, resp.body
