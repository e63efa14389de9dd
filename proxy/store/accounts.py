"""`AccountStore`: end users' API keys, shown once, stored as a hash, looked up per request."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.store.keyspace import _api_key_key, _response_key, _user_keys_key
from proxy.store.scripts import Commands, RedisPyCommands, StoreRedis
from proxy.store.wallets import now_ms

API_KEY_PREFIX = "sk-eu_"
TEST_KEY_PREFIX = "sk-eu_test_"  # a test end user's keys (test mode: the sandbox, simulated money)


@dataclass(frozen=True)
class ApiKey:
    """An end user's key as stored: never the key itself, only its hash and a masked form."""

    id: str
    end_user_id: str
    masked: str
    created_ms: int
    name: str = ""
    revoked_ms: int | None = None
    scopes: dict[str, Any] = field(default_factory=dict)

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "end_user_id": self.end_user_id, "masked": self.masked, "name": self.name,
            "created_ms": self.created_ms, "revoked_ms": self.revoked_ms, "scopes": self.scopes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ApiKey:
        return cls(
            id=data["id"], end_user_id=data["end_user_id"], masked=data["masked"], name=data.get("name", ""),
            created_ms=data["created_ms"], revoked_ms=data.get("revoked_ms"), scopes=data.get("scopes") or {},
        )


def hash_api_key(plaintext: str) -> str:
    # Keys carry 256 bits of randomness, so a fast hash is enough: there is
    # nothing to brute-force, and lookups stay one Redis GET.
    return hashlib.sha256(plaintext.encode()).hexdigest()


class AccountStore:
    """End users' API keys: created shown once, stored as a hash, looked up per request."""

    def __init__(self, redis: StoreRedis, commands: Commands | None = None):
        self.redis = redis
        self.commands: Commands = commands or RedisPyCommands(redis)

    async def create_key(
        self, end_user_id: str, *, name: str = "", scopes: Mapping[str, Any] | None = None, test: bool = False,
    ) -> tuple[ApiKey, str]:
        """A new key, shown once; a `test` end user's starts `sk-eu_test_`."""
        plaintext = (TEST_KEY_PREFIX if test else API_KEY_PREFIX) + secrets.token_urlsafe(32)
        if not test and plaintext.startswith(TEST_KEY_PREFIX):  # a live key that happens to read "test_"
            return await self.create_key(end_user_id, name=name, scopes=scopes)
        key = ApiKey(
            id="key_" + secrets.token_hex(8), end_user_id=end_user_id,
            masked=f"{plaintext[:10]}…{plaintext[-4:]}", created_ms=now_ms(), name=name, scopes=dict(scopes or {}),
        )
        digest = hash_api_key(plaintext)
        record = orjson.dumps(key.to_json())
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(_api_key_key(digest), record)
            pipe.hset(_user_keys_key(end_user_id), key.id, orjson.dumps({"hash": digest, "key": key.to_json()}))
            await pipe.execute()
        return key, plaintext

    async def remember_response(self, end_user_id: str, response_id: str, upstream: str, ttl_seconds: int) -> None:
        """Record that `end_user_id` created the Responses API response `response_id` on `upstream`."""
        await self.commands.execute("SET", _response_key(end_user_id, response_id), upstream, "EX", ttl_seconds)

    async def response_upstream(self, end_user_id: str, response_id: str) -> str | None:
        """The upstream of a response this end user created, or None (another's, unknown, or expired)."""
        raw = await self.commands.execute("GET", _response_key(end_user_id, response_id))
        return raw.decode() if isinstance(raw, bytes) else raw

    async def list_keys(self, end_user_id: str) -> list[ApiKey]:
        raw = await self.redis.hgetall(_user_keys_key(end_user_id))
        keys = [ApiKey.from_json(orjson.loads(v)["key"]) for v in raw.values()]
        return sorted(keys, key=lambda k: k.created_ms)

    async def update_key(self, end_user_id: str, key_id: str, **changes: Any) -> ApiKey | None:
        """Change a key's fields (`name`, `scopes`, `revoked_ms`); in force for the next request on every replica."""
        raw = await self.redis.hget(_user_keys_key(end_user_id), key_id)
        if raw is None:
            return None
        entry = orjson.loads(raw)
        key = ApiKey.from_json({**entry["key"], **changes})
        # The lookup record is what requests read, so it changes first: a
        # revocation is in force before this call returns, on every replica.
        await self.redis.set(_api_key_key(entry["hash"]), orjson.dumps(key.to_json()))
        await self.redis.hset(_user_keys_key(end_user_id), key_id, orjson.dumps({"hash": entry["hash"], "key": key.to_json()}))
        return key

    async def revoke_key(self, end_user_id: str, key_id: str) -> ApiKey | None:
        current = await self.redis.hget(_user_keys_key(end_user_id), key_id)
        if current is None:
            return None
        revoked_ms = orjson.loads(current)["key"].get("revoked_ms") or now_ms()
        return await self.update_key(end_user_id, key_id, revoked_ms=revoked_ms)

    async def find_key(self, plaintext: str) -> ApiKey | None:
        """The key record for a presented `sk-eu_` key (revoked ones included), or None."""
        raw = await self.commands.execute("GET", _api_key_key(hash_api_key(plaintext)))
        return ApiKey.from_json(orjson.loads(raw)) if raw is not None else None
