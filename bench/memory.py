"""Redis memory per metered call, by key family: what each call leaves behind, and for how long.

Issue 16 asks for the figure and for cutting it to what idempotency and reaping need.
`by_family` walks every key of a private Redis (SCAN, then MEMORY USAGE of each, exact:
`SAMPLES 0`) and groups keys by their shape, ids replaced by `*`; `report` prints the
families with their size per call and the TTL of one of their keys, beside the
server's own `used_memory` growth over the load. Run by `bench.run` after its loads;
never on a shared server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import redis.asyncio as aioredis

_WALLET_TAG = re.compile(r"\{w:[^}]*\}")
_IDS = re.compile(r"(?<=[:_|])[0-9a-f]{16,}|\d{6,}(-\d+)?")  # hold and request ids, key hashes, stream ids, times


def family(key: str) -> str:
    """`mg:{w:u_1}:hold:hold_3f…` -> `mg:{w:*}:hold:hold_*`."""
    return _IDS.sub("*", _WALLET_TAG.sub("{w:*}", key))


@dataclass
class Family:
    name: str
    keys: int = 0
    bytes: int = 0
    ttl_seconds: int = -1  # of one of its keys: -1 none, -2 gone meanwhile


async def by_family(url: str) -> list[Family]:
    client = aioredis.from_url(url)
    try:
        found: dict[str, Family] = {}
        async for raw in client.scan_iter(count=1000):
            name = family(raw.decode())
            entry = found.get(name)
            if entry is None:
                entry = found[name] = Family(name, ttl_seconds=int(await client.ttl(raw)))
            entry.keys += 1
            entry.bytes += int(await client.memory_usage(raw, samples=0) or 0)
        return sorted(found.values(), key=lambda f: f.bytes, reverse=True)
    finally:
        await client.aclose()


async def used_memory(url: str) -> int:
    client = aioredis.from_url(url)
    try:
        return int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()


def _ttl(seconds: int) -> str:
    if seconds == -1:
        return "none"
    if seconds < 0:
        return "-"
    if seconds >= 86_400 - 3_600:  # a day's TTL read a moment after it was set
        return f"{seconds / 86_400:.1f} d"
    return f"{seconds / 3_600:.1f} h" if seconds >= 3_600 else f"{seconds} s"


def report(families: list[Family], calls: int, used_before: int, used_after: int, top: int = 12) -> list[str]:
    """Lines to print: the families that grow with calls first (most bytes), then the total."""
    calls = max(calls, 1)
    lines = [f"redis memory per call after {calls} metered calls: used_memory grew "
             f"{(used_after - used_before) / calls:.0f} bytes/call; by key family (MEMORY USAGE):"]
    width = max((len(f.name) for f in families[:top]), default=10)
    lines.append(f"  {'family':<{width}}  {'keys':>8}  {'bytes':>11}  {'bytes/call':>10}  ttl")
    for f in families[:top]:
        lines.append(f"  {f.name:<{width}}  {f.keys:>8}  {f.bytes:>11}  {f.bytes / calls:>10.0f}  {_ttl(f.ttl_seconds)}")
    rest = families[top:]
    if rest:
        lines.append(f"  ({len(rest)} smaller families, {sum(f.bytes for f in rest)} bytes)")
    lines.append(f"  total {sum(f.bytes for f in families) / calls:.0f} bytes/call over {sum(f.keys for f in families)} keys")
    return lines
