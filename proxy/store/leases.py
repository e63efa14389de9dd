"""`Leases`: named, expiring claims in Redis that one replica at a time holds (deriving a wallet's
events, delivering to an endpoint, archiving a wallet). Mixed into the stores that need them."""

from __future__ import annotations

import secrets
from typing import Any

from proxy.store.keyspace import PREFIX

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _lease_key(name: str) -> str:
    return f"{PREFIX}:lease:{name}"


class Leases:
    _r: Any  # the store's redis-py client

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
