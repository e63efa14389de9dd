"""Ids made on the request path (request and hold ids): unique without a syscall each.

`secrets.token_hex` reads the OS's random source on every call, ~1.5% of a
billed call's CPU for its two ids. These ids are names, not secrets (a hold id
is an idempotency key, never a credential), so each process draws 48 random
bits once and counts from there: two processes share a prefix with odds of
about 2^-48 per pair, and one process never repeats. A forked child draws its
own prefix.
"""

from __future__ import annotations

import itertools
import os
import secrets


class _Ids:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.counter = itertools.count(secrets.randbelow(1 << 32))

    def new(self, kind: str) -> str:
        # 24 hex digits, as token_hex(12) gave: 12 of prefix, 12 of counter.
        return f"{kind}{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFF:012x}"


_IDS = _Ids()
os.register_at_fork(after_in_child=_IDS.reset)


def new_id(kind: str) -> str:
    """A fresh id starting with `kind` (e.g. "req_", "hold_"), unique across processes and restarts."""
    return _IDS.new(kind)
