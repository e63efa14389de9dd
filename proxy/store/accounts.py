"""`AccountStore`: end users' API keys, shown once, stored as a hash, looked up per request.

Each key has a stamp, written with its entry in the end user's key hash (one
HSET, so the two always agree) and replaced by every change (revocation,
scopes, expiry, name). The metered path looks keys up through a per-process
cache that keeps the stamp it saw; `hold.lua` compares that stamp with the
stored one in the same atomic step that reserves money (`STALE_CREDENTIAL`
on a mismatch), so a cached key never pays for a call after a change: the call
is admitted again from a fresh lookup. Everything else looks keys up afresh.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.store.errors import StaleCredential
from proxy.store.keyspace import _api_key_key, _response_key, _user_keys_key
from proxy.store.scripts import Commands, RedisPyCommands, StoreRedis
from proxy.store.wallets import KeyStamp, now_ms

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


# Cached lookups: how many (the cache starts over past it) and for how long. The
# hold's check makes a stale entry harmless for money; the age bounds how long a
# refusal before the hold (a model a scope no longer denies) can rest on it.
KEY_CACHE_SIZE = 50_000
KEY_CACHE_SECONDS = 60.0


def _stamp_field(key_id: str) -> str:
    return "v:" + key_id


def _is_stamp_field(field_name: bytes | str) -> bool:
    return (field_name.decode() if isinstance(field_name, bytes) else field_name).startswith("v:")


def _new_stamp() -> str:
    return secrets.token_hex(6)


def hash_api_key(plaintext: str) -> str:
    # Keys carry 256 bits of randomness, so a fast hash is enough: there is
    # nothing to brute-force, and lookups stay one Redis GET.
    return hashlib.sha256(plaintext.encode()).hexdigest()


class AccountStore:
    """End users' API keys: created shown once, stored as a hash, looked up per request."""

    def __init__(self, redis: StoreRedis, commands: Commands | None = None):
        self.redis = redis
        self.commands: Commands = commands or RedisPyCommands(redis)
        self._cached: dict[str, tuple[float, ApiKey, KeyStamp]] = {}  # digest -> (expires, key, stamp)

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
            pipe.hset(_user_keys_key(end_user_id), mapping={
                key.id: orjson.dumps({"hash": digest, "key": key.to_json()}), _stamp_field(key.id): _new_stamp()})
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
        keys = [ApiKey.from_json(orjson.loads(v)["key"]) for k, v in raw.items() if not _is_stamp_field(k)]
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
        # A new stamp with the entry, in one HSET: from here on no hold admits a call on a cached copy.
        await self.redis.hset(_user_keys_key(end_user_id), mapping={
            key_id: orjson.dumps({"hash": entry["hash"], "key": key.to_json()}), _stamp_field(key_id): _new_stamp()})
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

    async def find_key_cached(self, plaintext: str) -> tuple[ApiKey, KeyStamp | None] | None:
        """The key for `plaintext` and the stamp its holds must check, from this process's
        cache when it has it; None for an unknown key. Without a stamp (a key whose entry
        is missing from its end user's hash) the key is as fresh as `find_key`'s."""
        digest = hash_api_key(plaintext)
        now = time.monotonic()
        hit = self._cached.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        raw = await self.commands.execute("GET", _api_key_key(digest))
        if raw is None:
            return None
        found = ApiKey.from_json(orjson.loads(raw))
        # The entry and its stamp are read together from the end user's hash (written
        # together), so the stamp is that of the very version cached: never a newer one.
        entry, stamp = await self.commands.execute(
            "HMGET", _user_keys_key(found.end_user_id), found.id, _stamp_field(found.id))
        if entry is None or orjson.loads(entry)["hash"] != digest:
            return found, None
        key = ApiKey.from_json(orjson.loads(entry)["key"])
        key_stamp = KeyStamp(key.end_user_id, key.id, stamp.decode() if stamp is not None else "")
        if len(self._cached) >= KEY_CACHE_SIZE:
            self._cached.clear()
        self._cached[digest] = (now + KEY_CACHE_SECONDS, key, key_stamp)
        return key, key_stamp

    def forget_cached_key(self, plaintext: str) -> bool:
        """Drop a cached lookup (its stamp was found stale): the next one reads the store.
        Whether there was one (an unknown key is never cached)."""
        return self._cached.pop(hash_api_key(plaintext), None) is not None

    async def refuse_only_on_a_current_key(self, stamp: KeyStamp | None) -> None:
        """Before a refusal stands on a cached key (`stamp`; None: not from the cache):
        `StaleCredential` when the key changed since, so the call is judged again on it."""
        if stamp is not None and not await self.stamp_is_current(stamp):
            raise StaleCredential(f"key {stamp.key_id} changed since it was looked up")

    async def stamp_is_current(self, stamp: KeyStamp) -> bool:
        """Whether the key is still the version `stamp` names (a refusal's check: one read)."""
        raw = await self.commands.execute("HGET", _user_keys_key(stamp.end_user_id), _stamp_field(stamp.key_id))
        return (raw.decode() if raw is not None else "") == stamp.stamp
