"""Who may do what on the admin API: admin keys resolved to identities, and the permission table.

An identity is a name and a role. Plain `admin_keys` are role `admin`, named
`admin-<first 8 hex of sha256(key)>` (stable across restarts, and no use to
anyone who reads it); `admins` entries bring their own name and role. The
audit log records the name, never the key.

Roles are ordered: `viewer` reads; `developer` also manages end users, their
keys and tokens, webhook endpoints and balance alerts; `admin` also moves
money (top-ups, adjustments, refunds, card refunds, checkouts, auto top-up
rules, credit limits) and reloads pricing. Every route names the least role
it needs in `REQUIRED_ROLE`; a route missing from it is open to `admin` only
(fail closed), and tests/proxy/test_admin_roles.py checks that every mounted
route has an entry.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.config import Config
from proxy.errors import ApiError

log = logging.getLogger(__name__)

Role = Literal["viewer", "developer", "admin"]
_RANK: dict[str, int] = {"viewer": 0, "developer": 1, "admin": 2}

# Methods that never change anything: open to every role, and not audited.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# "METHOD /path template" (as mounted under /admin, without the prefix) -> the least role it needs.
# GET entries cover HEAD too (aiohttp adds a HEAD route beside every GET).
REQUIRED_ROLE: dict[str, Role] = {
    # reads
    "GET /end-users/{id}": "viewer",
    "GET /end-users/{id}/keys": "viewer",
    "GET /wallets/{id}": "viewer",
    "GET /wallets/{id}/holds/{hold_id}": "viewer",
    "GET /wallets/{id}/ledger": "viewer",
    "GET /wallets/{id}/grants": "viewer",
    "GET /ratecards": "viewer",
    "GET /end-users/{id}/auto-top-up": "viewer",
    "GET /end-users/{id}/card-payments": "viewer",
    "GET /webhook-endpoints": "viewer",
    "GET /webhook-endpoints/{id}": "viewer",
    "GET /events": "viewer",
    "GET /events/{id}": "viewer",
    "GET /end-users/{id}/balance-alerts": "viewer",
    "GET /audit": "viewer",
    "GET /reports/usage": "viewer",
    "GET /reports/money": "viewer",
    "GET /end-users/{id}/rollups": "viewer",
    # end users, keys, tokens, webhooks, alerts: no money moves
    "POST /end-users": "developer",  # but a credit limit is money: see MONEY_FIELDS
    "PATCH /end-users/{id}": "developer",
    "POST /end-users/{id}/keys": "developer",
    "PATCH /end-users/{id}/keys/{key_id}": "developer",
    "DELETE /end-users/{id}/keys/{key_id}": "developer",
    "POST /end-users/{id}/tokens": "developer",
    # a link anyone holding it can open: more than reading
    "POST /end-users/{id}/statement-links": "developer",
    "POST /webhook-endpoints": "developer",
    "PATCH /webhook-endpoints/{id}": "developer",
    "DELETE /webhook-endpoints/{id}": "developer",
    "POST /webhook-endpoints/{id}/rotate-secret": "developer",
    "POST /events/{id}/redeliver": "developer",  # sends again what happened; moves nothing
    "PUT /end-users/{id}/balance-alerts": "developer",
    # money and pricing
    "POST /wallets/{id}/top-ups": "admin",
    "POST /wallets/{id}/refunds": "admin",
    "POST /wallets/{id}/adjustments": "admin",
    "POST /wallets/{id}/holds": "admin",  # job holds (proxy/admin_jobs.py): reserve, capture, release
    "POST /wallets/{id}/holds/{hold_id}/extend": "admin",
    "POST /wallets/{id}/holds/{hold_id}/captures": "admin",
    "POST /wallets/{id}/holds/{hold_id}/release": "admin",
    "POST /wallets/{id}/meter-events": "admin",  # usage of the operator's own meters (proxy/admin_meters.py)
    "POST /wallets/{id}/grants": "admin",  # credit with a kind, priority and expiry (proxy/admin_grants.py)
    "PATCH /wallets/{id}": "admin",  # the credit limit: lets a wallet spend money it does not have
    "POST /end-users/{id}/checkout-sessions": "admin",
    "PATCH /end-users/{id}/auto-top-up": "admin",
    "POST /end-users/{id}/card-refunds": "admin",
    "POST /ratecards/reload": "admin",  # changes every price in force
}

# Body fields that make an otherwise lesser route a money movement when sent with a value
# other than their default (a credit limit lets a wallet spend money it does not have).
MONEY_FIELDS: dict[str, tuple[str, ...]] = {
    "POST /end-users": ("credit_limit_micros",),
}


def action_of(method: str, route: str) -> str:
    """The table's key for a request: HEAD is checked as its GET."""
    return f"{'GET' if method == 'HEAD' else method} {route}"


def required_role(action: str, body: Any = None) -> Role:
    """The least role `action` needs; `admin` for a route the table does not know."""
    role = REQUIRED_ROLE.get(action, "admin")
    if isinstance(body, Mapping) and any(body.get(name) not in (None, 0) for name in MONEY_FIELDS.get(action, ())):
        return "admin"
    return role


@dataclass(frozen=True)
class AdminIdentity:
    name: str
    role: Role

    def may(self, role: Role) -> bool:
        return _RANK[self.role] >= _RANK[role]


def check_permission(identity: AdminIdentity, action: str, body: Any = None) -> None:
    """A 403 in OpenAI's shape unless `identity` may do `action` (with `body`)."""
    needed = required_role(action, body)
    if not identity.may(needed):
        raise ApiError(
            403, f"the {identity.role} key {identity.name!r} may not {action}: it needs the {needed} role",
            type="permission_error", code="insufficient_role",
        )


def plain_key_name(key: str) -> str:
    return "admin-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


class AdminKeyring:
    """The admin keys in force, read once when the admin app is created.

    `admins` keys come from their env vars at that moment (as every other secret
    the config names is read at start): changing one means a restart. An entry whose
    variable is unset or empty grants nothing, and says so in the log.
    """

    def __init__(self, entries: list[tuple[bytes, AdminIdentity]]):
        self._entries = entries

    @classmethod
    def from_config(cls, config: Config) -> AdminKeyring:
        entries = [(k.encode("utf-8", "surrogateescape"), AdminIdentity(plain_key_name(k), "admin"))
                   for k in config.admin_keys if k]
        for admin in config.admins:
            key = admin.key
            if key is None:
                log.warning("admin key %r: $%s is unset; that key is refused", admin.name, admin.key_env)
                continue
            entries.append((key.encode("utf-8", "surrogateescape"), AdminIdentity(admin.name, admin.role)))
        return cls(entries)

    def identify(self, presented: str) -> AdminIdentity | None:
        """The identity of `presented`, compared in constant time against every key (see `proxy.auth.key_matches`).

        Every key is compared, even after a match, so the time taken says nothing about
        which key matched. The same key listed twice is the first entry's.
        """
        candidate = presented.encode("utf-8", "surrogateescape")
        found: AdminIdentity | None = None
        for key, identity in self._entries:
            if hmac.compare_digest(candidate, key) and found is None:
                found = identity
        return found
