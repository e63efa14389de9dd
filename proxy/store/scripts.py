"""How the store reaches Redis: the client, the `Commands` protocol, and the Lua scripts by name."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any, Literal, Protocol, overload

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from proxy import observability
from proxy.store.errors import _raise_script_error

log = logging.getLogger(__name__)

StoreRedis = aioredis.Redis | RedisCluster
"""The redis-py client the stores use beside their `Commands`: one server's, or a cluster's."""


@overload
def connect(url: str, *, max_connections: int = 64, cluster: Literal[False] = False) -> aioredis.Redis: ...
@overload
def connect(url: str, *, max_connections: int = 64, cluster: Literal[True]) -> RedisCluster: ...
@overload
def connect(url: str, *, max_connections: int = 64, cluster: bool) -> StoreRedis: ...


def connect(url: str, *, max_connections: int = 64, cluster: bool = False) -> StoreRedis:
    """A client for the store that retries on a dropped connection (every script is safe to
    retry: holds are keyed by id, settles by hold state, the rest by idempotency key).

    On one server, a bounded pool that makes callers wait rather than fail under
    bursts. On a cluster (`cluster=True`), redis-py's cluster client: it routes by
    slot, follows MOVED/ASK, runs SCRIPT LOAD and SCAN on every master, and keeps
    a pool per node (which refuses rather than waits past its size, so it is left
    unbounded: the request path does not use this client).
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    retry = Retry(ExponentialBackoff(cap=0.5, base=0.01), retries=5)
    retry_on_error: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError, ConnectionError]
    if cluster:
        return RedisCluster.from_url(url, retry=retry, retry_on_error=retry_on_error)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=10, retry=retry, retry_on_error=retry_on_error,
    )
    return aioredis.Redis(connection_pool=pool)


def fingerprint(operation: str, *parts: object) -> str:
    """What an idempotency key is bound to: the operation and its arguments."""
    return hashlib.sha256(orjson.dumps([operation, *parts])).hexdigest()


# ------------------------------------------------------------------ commands


class Commands(Protocol):
    """How the store sends commands: one at a time, or several in one round trip."""

    async def execute(self, *args: Any) -> Any: ...

    async def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Replies in order; an error reply comes back as its exception instead of being raised."""
        ...


class RedisPyCommands:
    """`Commands` over a redis-py client: the embedded store (fakeredis) and tests.

    Only commands whose raw replies redis-py passes through unchanged go
    through here (EVALSHA, GET, HMGET, ZADD, ZREM), so both implementations
    answer alike; the one exception is XRANGE, whose entries redis-py turns
    into dicts, and its one reader (`WalletStore.ledger_after`) takes both.
    """

    def __init__(self, redis: StoreRedis):
        self.redis = redis

    async def execute(self, *args: Any) -> Any:
        if isinstance(self.redis, RedisCluster) and [str(a).upper() for a in args[:2]] == ["SCRIPT", "LOAD"]:
            # A cluster's masters each keep their own script cache, and a keyless
            # SCRIPT LOAD has no slot to be routed by: load it on every master.
            return await self.redis.script_load(args[2])
        return await self.redis.execute_command(*args)

    async def batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        if len(commands) == 1:
            try:
                return [await self.redis.execute_command(*commands[0])]
            except ResponseError as exc:
                return [exc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)


# ------------------------------------------------------------------- scripts

SCRIPT_NAMES = ("open", "top_up", "adjust", "refund", "hold", "extend", "settle", "release", "expire", "key_limits",
                "card_payment", "card_refund", "dispute", "auto_top_up_rule", "auto_top_up_failed", "note", "trim",
                "capture", "meter", "grant", "expire_grants", "set_credit_limit")

_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*)", re.M)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def lua_code(text: str) -> str:
    """`text` without its Lua comments (`--` to the end of the line, outside a quoted string).
    The prelude and the scripts use no long brackets (`[[...]]`), so this is all there is."""
    out = []
    for line in text.splitlines():
        quote, i = "", 0
        while i < len(line):
            c = line[i]
            if quote:
                if c == "\\":
                    i += 1
                elif c == quote:
                    quote = ""
            elif c in "'\"":
                quote = c
            elif line.startswith("--", i):
                line = line[:i]
                break
            i += 1
        out.append(line)
    return "\n".join(out)


def lua_names(text: str) -> set[str]:
    """Every identifier the Lua code in `text` uses (comments left out)."""
    return set(_NAME.findall(lua_code(text)))


class Prelude:
    """`_prelude.lua` cut into its top-level definitions, so that each script gets only
    those it uses, directly or through another.

    Each definition costs on every run of a script, used or not: Redis runs the
    whole script, and a function defined is a closure made and later collected,
    ~800 instructions (bench/lua_cost.py). Leaving out what a script never
    calls cut hold.lua's cost by a tenth.
    """

    def __init__(self, text: str):
        starts = [m.start() for m in _DEFINITION.finditer(text)]
        self.header = text[: starts[0]] if starts else text
        self.definitions: list[tuple[str, str]] = []  # (name, text), in the prelude's order
        for start, end in zip(starts, [*starts[1:], len(text)]):
            chunk = text[start:end]
            match = _DEFINITION.match(chunk)
            assert match is not None
            self.definitions.append((match.group(1), chunk))
        self.names = {name for name, _ in self.definitions}
        self._uses = {name: (lua_names(chunk) & self.names) - {name} for name, chunk in self.definitions}

    def needed_by(self, script: str) -> set[str]:
        """The definitions `script` uses, and those they use, and so on."""
        needed: set[str] = set()
        todo = list(lua_names(script) & self.names)
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(self._uses[name])
        return needed

    def for_script(self, script: str) -> str:
        """The prelude as `script` needs it: its definitions that script uses, in their order."""
        needed = self.needed_by(script)
        return self.header + "".join(chunk for name, chunk in self.definitions if name in needed)


class _Scripts:
    """The Lua scripts by name, run as Redis Functions where the client and server allow, else
    as scripts (EVALSHA); either way loaded on first use.

    As Functions (FCALL), the whole prelude is one library loaded once: each call runs only
    its script's own code, where EVALSHA re-makes every prelude function the script uses on
    every call (~25,000-33,000 instructions of a hold's 196,000 and a settle's 446,000:
    bench/lua_cost.py). The library is named by a hash of its code, so replicas running
    different versions each call their own, and loading it again (REPLACE) changes nothing.

    Clients opt in with a `use_functions` attribute (the request path's multiplexer and
    cluster client do); redis-py's clients, fakeredis among them, keep to EVALSHA. A server
    without Functions (before Redis 7), or a user not allowed them, is found out on the
    first call, which is then sent as a script, and that client keeps to scripts.

    A Redis restart, SCRIPT FLUSH or FUNCTION FLUSH empties what was loaded; the next call
    gets NOSCRIPT or "Function not found", loads it and runs again, which is safe because
    either reply means nothing ran.
    """

    def __init__(self) -> None:
        lua = resources.files("proxy") / "lua"
        prelude_text = (lua / "_prelude.lua").read_text()
        prelude = Prelude(prelude_text)
        self.source: dict[str, str] = {}
        self.sha: dict[str, str] = {}
        bodies: dict[str, str] = {}
        for name in SCRIPT_NAMES:
            script = (lua / f"{name}.lua").read_text()
            bodies[name] = script
            body = prelude.for_script(script) + "\n" + script
            self.source[name] = body
            self.sha[name] = hashlib.sha1(body.encode()).hexdigest()
        self.library_name, self.library, self.function = _library(prelude_text, bodies)
        self._dropped_older = False

    async def run(
        self, commands: Commands, name: str, keys: Sequence[str], args: Sequence[Any],
        *, before: Sequence[Sequence[Any]] = (), after: Sequence[Sequence[Any]] = (),
    ) -> list[str]:
        """Run a script, with plain commands before and after it, in one round trip.

        Those commands must be idempotent: when the script was not loaded, the whole batch runs again.
        """
        for attempt in (0, 1, 2):
            functions = getattr(commands, "use_functions", False)
            script = (["FCALL", self.function[name], len(keys), *keys, *args] if functions
                      else ["EVALSHA", self.sha[name], len(keys), *keys, *args])
            with observability.store_round_trip(name):
                results = await commands.batch([*before, script, *after])
            outcome = results[len(before)]
            if attempt < 2 and isinstance(outcome, ResponseError):
                if isinstance(outcome, NoScriptError):
                    await commands.execute("SCRIPT", "LOAD", self.source[name])
                    continue
                if functions and _not_found(outcome):
                    await self._load_library(commands)
                    continue
                if functions and _refused(outcome):
                    _keep_to_scripts(commands, outcome)
                    continue
            if isinstance(outcome, ResponseError):
                _raise_script_error(outcome)
            if isinstance(outcome, Exception):
                raise outcome
            return _strings(outcome)
        raise AssertionError("unreachable")

    async def _load_library(self, commands: Commands) -> None:
        try:
            await commands.execute("FUNCTION", "LOAD", "REPLACE", self.library)
        except ResponseError as exc:
            if not _refused(exc):
                raise
            _keep_to_scripts(commands, exc)
            return
        if not self._dropped_older:
            self._dropped_older = True
            await self._drop_other_libraries(commands)

    async def _drop_other_libraries(self, commands: Commands) -> None:
        """Delete the libraries of other metergate versions, once per process: each is ~330 KB of
        Redis memory, and one is left behind by every upgrade. A replica of an older version still
        running loads its own again on its next call (once: it does not delete), so a rolling
        upgrade costs a load or two, and at most the two newest versions' libraries stay."""
        try:
            listed = await commands.execute("FUNCTION", "LIST", "LIBRARYNAME", "metergate_*")
            for entry in listed:
                fields = dict(zip(entry[::2], entry[1::2], strict=False))
                name = fields.get(b"library_name", b"").decode()
                if name.startswith("metergate_") and name != self.library_name:
                    with contextlib.suppress(ResponseError):  # another replica deleted it first
                        await commands.execute("FUNCTION", "DELETE", name)
        except RedisError as exc:  # ResponseError among them
            log.warning("could not delete older metergate function libraries: %s", exc)


def _library(prelude: str, bodies: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    """The Functions library of the prelude and every script: its name, its code, and each
    script's function name.

    Each script's code becomes a function's body unchanged: KEYS and ARGV are the library's
    locals, set at the start of every call (Redis runs one call at a time), so the prelude
    and the scripts read them as they do as scripts.
    """
    digest = hashlib.sha1(prelude.encode())
    for name, body in bodies.items():
        digest.update(b"\0" + name.encode() + b"\0" + body.encode())
    library = f"metergate_{digest.hexdigest()[:16]}"
    names = {name: f"{library}_{name}" for name in bodies}
    parts = [f"#!lua name={library}\n", "local KEYS, ARGV\n", prelude, "\n"]
    for name, body in bodies.items():
        parts.append(f"redis.register_function('{names[name]}', function(keys, args)\n"
                     f"KEYS, ARGV = keys, args\n{body}\nend)\n")
    return library, "".join(parts), names


def _not_found(reply: ResponseError) -> bool:
    return "function not found" in str(reply).lower()


def _refused(reply: ResponseError) -> bool:
    """A server without Functions (before Redis 7, or FUNCTION renamed away) or a user not allowed them."""
    message = str(reply).lower()
    return "unknown command" in message or message.startswith("noperm")


def _keep_to_scripts(commands: Commands, reason: ResponseError) -> None:
    log.warning("Redis refuses Functions (%s): running the wallet's Lua as scripts (EVALSHA)", reason)
    commands.use_functions = False  # type: ignore[attr-defined]


def _strings(raw: Sequence[Any]) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in raw]


_SCRIPTS: _Scripts | None = None


def _scripts() -> _Scripts:
    global _SCRIPTS
    if _SCRIPTS is None:
        _SCRIPTS = _Scripts()
    return _SCRIPTS
