"""What `metergate serve` checks before it starts serving: the traps of a first hour.

A config can be valid and still unable to serve: its Redis is down or its URL
is malformed, its rate card folder is missing or a card is wrong. Each of
these is one clear line and a non-zero exit here, before anything has been
started, rather than a traceback from deep inside the app's start-up.
Other problems do not stop the service but must be seen: an upstream whose
key variable is unset, or the bundled development keys on a reachable address.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pricing import RateCardError, load_rate_cards
from proxy.config import DEV_ADMIN_KEY, DEV_OPERATOR_KEY, Config

REDIS_PING_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class StartupCheck:
    """`error`: why the service cannot start (None: it can); `warnings`: what it should say as it starts."""

    error: str | None = None
    warnings: list[str] = field(default_factory=list)


def redacted(url: str) -> str:
    """The URL without its password, fit for an error message or a log."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return urlunsplit(parts._replace(netloc=user + netloc))
    except ValueError:
        return url


def check_redis(url: str, timeout: float = REDIS_PING_TIMEOUT_SECONDS) -> str | None:
    """Why `url` cannot serve as the store (malformed, unreachable, refusing us), or None after a PING answers."""
    import redis
    from redis.exceptions import RedisError

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError as exc:
        return f"bad redis_url {redacted(url)!r}: {exc}"
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        return f"cannot reach Redis at {redacted(url)}: {exc}"
    finally:
        client.close()
    return None


def check_ratecards(config: Config) -> str | None:
    directory = config.resolve(config.ratecards_dir)
    if not directory.is_dir():
        relative = "" if Path(config.ratecards_dir).is_absolute() else f", relative to {config.base_dir}"
        return f"no rate card folder at {directory} (ratecards_dir: {config.ratecards_dir!r}{relative})"
    try:
        load_rate_cards(directory, upstreams=set(config.upstreams))
    except RateCardError as exc:
        issues = str(exc).splitlines()
        if len(issues) == 1:
            return f"bad rate card: {issues[0]}"
        return "bad rate cards:\n" + "\n".join(issues)
    return None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (every address it resolves to is loopback)."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def warnings_for(config: Config) -> list[str]:
    warnings = []
    for name, upstream in config.upstreams.items():
        if upstream.api_key_env and not upstream.api_key:
            warnings.append(
                f"upstream {name!r}: the environment variable {upstream.api_key_env} is not set, "
                "so calls to it go without an API key (set it, e.g. `export "
                f"{upstream.api_key_env}=...`, and restart)"
            )
    dev_keys = [f"{what} key {key!r}" for what, key, keys in (
        ("admin", DEV_ADMIN_KEY, config.admin_keys), ("operator", DEV_OPERATOR_KEY, config.operator_keys),
    ) if key in keys]
    if dev_keys and not is_loopback(config.host):
        warnings.append(
            f"!!! INSECURE: serving on {config.host or '*'}, reachable from other machines, with the bundled development "
            f"{' and '.join(dev_keys)}, which anyone who has read the README knows: they can create keys and move money. "
            "Set METERGATE_ADMIN_KEY and METERGATE_OPERATOR_KEY (or admin_keys/operator_keys) to secrets of your own. !!!"
        )
    return warnings


def check_stripe(config: Config) -> str | None:
    """A `stripe:` block needs both of its secrets: without them money could not come in, or be verified."""
    stripe = config.stripe
    if stripe is None:
        return None
    missing = [env for env, value in ((stripe.secret_key_env, stripe.secret_key), (stripe.webhook_secret_env, stripe.webhook_secret))
               if not value]
    if missing:
        return (f"stripe: is configured but {' and '.join('$' + m for m in missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set (the secret key sk_..., the webhook signing secret whsec_...); "
                "set them, or remove the stripe: block")
    return None


DURABLE_REDIS = "appendonly yes with appendfsync everysec (or always), and a replica"


def redis_durability(url: str, timeout: float = REDIS_PING_TIMEOUT_SECONDS) -> str | None:
    """A warning when the Redis at `url` would lose money in a crash (what it keeps on disk), else None."""
    import redis
    from redis.exceptions import RedisError

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout, decode_responses=True)
    try:
        settings: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save"):
            settings.update(client.config_get(name))  # type: ignore[arg-type]
    except (RedisError, OSError) as exc:
        # Managed services often refuse CONFIG: say we could not tell rather than nothing.
        return (f"could not read how Redis at {redacted(url)} persists ({exc}); for balances to survive a crash it "
                f"must run with {DURABLE_REDIS}")
    finally:
        client.close()
    if settings.get("appendonly") == "yes":
        if settings.get("appendfsync") in ("everysec", "always"):
            return None
        return (f"Redis at {redacted(url)} has appendfsync {settings.get('appendfsync')!r}: a crash of its machine can "
                f"lose recent top-ups and charges; run it with {DURABLE_REDIS}")
    kept = "keeps nothing on disk" if not settings.get("save") else f"keeps only RDB snapshots (save {settings['save']!r})"
    return (f"Redis at {redacted(url)} {kept}: a Redis restart loses every balance and hold since "
            f"{'its start' if not settings.get('save') else 'the last snapshot'}; run it with {DURABLE_REDIS}")


def check_database(url: str | None) -> str | None:
    """Why the ledger of record's database cannot be used (unreachable, refusing us, a failed migration), or None."""
    import asyncio

    from proxy.ledger.db import LedgerDatabase, database_url
    from proxy.ledger.db import redacted as redacted_db

    async def probe() -> None:
        database = await LedgerDatabase.open(url)
        await database.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        try:
            where = redacted_db(database_url(url))
        except Exception:
            where = "the configured database_url"
        return f"cannot use the ledger database at {where}: {type(exc).__name__}: {exc}"
    return None


def check(config: Config) -> StartupCheck:
    """Everything `metergate serve` verifies before it listens; the first fatal problem wins."""
    warnings = warnings_for(config)
    error = check_stripe(config) or check_ratecards(config)
    if error is None and config.redis_url:
        error = check_redis(config.redis_url)
        if error is None and (durability := redis_durability(config.redis_url)):
            warnings.append(durability)
    if error is None:
        error = check_database(config.database_url)
    return StartupCheck(error=error, warnings=warnings)
