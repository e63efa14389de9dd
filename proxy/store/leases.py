"""`Leases`: named, expiring claims in Redis that one replica at a time holds (deriving a wallet's
events, delivering to an endpoint, archiving a wallet). Mixed into the stores that need them."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.store.keyspace import PREFIX
from proxy.store.scripts import Commands

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def _lease_key(name: str) -> str:
    return f"{PREFIX}:lease:{name}"


class Leases:
    _r: Any  # the store's redis-py client
    commands: Commands  # the store's own connection, for the batched forms

    async def acquire(self, name: str, ttl_ms: int) -> str | None:
        """A lease on `name` for `ttl_ms` (one holder across replicas); its token, or None if held."""
        token = secrets.token_hex(8)
        ok = await self._r.set(_lease_key(name), token, nx=True, px=ttl_ms)
        return token if ok else None

    async def renew(self, name: str, token: str, ttl_ms: int) -> bool:
        """Extend a lease this token still holds; False once it was lost (expired, taken over)."""
        held = await self._r.get(_lease_key(name))
        if (held.decode() if isinstance(held, bytes) else held) != token:
            return False
        return bool(await self._r.pexpire(_lease_key(name), ttl_ms))

    async def release(self, name: str, token: str) -> None:
        """Give a lease up, only if this token still holds it."""
        await self._r.eval(_RELEASE, 1, _lease_key(name), token)

    # The batched forms: one round trip for a pass's worth of leases, however many.

    async def acquire_each(self, names: Sequence[str], ttl_ms: int) -> list[str | None]:
        """`acquire` for every name: each one's token, or None where it is held."""
        if not names:
            return []
        tokens = [secrets.token_hex(8) for _ in names]
        replies = _raise_first(await self.commands.batch(
            [("SET", _lease_key(name), token, "NX", "PX", ttl_ms) for name, token in zip(names, tokens)]))
        # SET NX answers nil when the name is held (redis-py's pipelines turn OK into True).
        return [token if reply not in (None, False) else None for token, reply in zip(tokens, replies)]

    async def renew_each(self, leases: Mapping[str, str], ttl_ms: int) -> set[str]:
        """Extend each lease (name: token) its token still holds; the names still held."""
        names = list(leases)
        if not names:
            return set()
        replies = _raise_first(await self.commands.batch(
            [("EVAL", _RENEW, 1, _lease_key(name), leases[name], ttl_ms) for name in names]))
        return {name for name, reply in zip(names, replies) if reply == 1}

    async def release_each(self, leases: Mapping[str, str]) -> None:
        """`release` for each lease (name: token)."""
        if leases:
            _raise_first(await self.commands.batch(
                [("EVAL", _RELEASE, 1, _lease_key(name), token) for name, token in leases.items()]))


def _raise_first(replies: Sequence[Any]) -> list[Any]:
    """The replies of a batch, unless one is an error: then the first error, raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return list(replies)
