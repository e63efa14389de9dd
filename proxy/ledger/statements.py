"""End users' monthly statements: the signed links that reach them, and the page and CSV they show.

A link names the end user, the month and an expiry, signed with HMAC-SHA256
under the statement secret (`statements.secret_env`), or, when that is unset, a
key derived from the first admin key (rotating that key then voids every
link). Checking compares in constant time and says nothing about what was
wrong: an expired, forged or altered link is the same 403.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import html
import io
import time
from importlib import resources
from string import Template
from urllib.parse import quote, urlencode

from proxy.config import Config
from proxy.ledger.reporting import MonthStatement

_TEMPLATE = Template((resources.files("proxy.ledger") / "templates" / "statement.html").read_text())


class NoStatementSecret(Exception):
    """Neither a statement secret nor an admin key to derive one from."""


def signing_key(config: Config) -> bytes:
    if config.statements.secret:
        return config.statements.secret.encode()
    admin = config.admin_keys[0] if config.admin_keys else next((a.key for a in config.admins if a.key), None)
    if not admin:
        raise NoStatementSecret("set METERGATE_STATEMENT_SECRET (statements.secret_env) to sign statement links")
    return hmac.new(admin.encode(), b"metergate statement links", hashlib.sha256).digest()


def signature(key: bytes, end_user: str, month: str, expires: int) -> str:
    message = f"{end_user}\n{month}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def link_path(key: bytes, end_user: str, month: str, expires: int, *, csv_file: bool = False) -> str:
    query = urlencode({"expires": expires, "sig": signature(key, end_user, month, expires)})
    return f"/statements/{quote(end_user, safe='')}/{month}{'.csv' if csv_file else ''}?{query}"


def link_is_valid(key: bytes, end_user: str, month: str, expires: str | None, sig: str | None,
                  now: float | None = None) -> bool:
    if not expires or not sig or not expires.isdigit():
        return False
    good = hmac.compare_digest(signature(key, end_user, month, int(expires)), sig)
    return good and int(expires) > (time.time() if now is None else now)


# ------------------------------------------------------------------ rendering


def _usd(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}${whole:,}.{frac:06d}".rstrip("0").rstrip(".") if frac else f"{sign}${whole:,}.00"


def _when(at_ms: int) -> str:
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


_LABELS = {"top_up": "Top-up", "refund": "Refund", "adjustment": "Adjustment", "card_refund": "Refund to card",
           "card_refund_reversed": "Refund to card reversed", "dispute": "Card dispute", "dispute_won": "Dispute won"}


def render_html(statement: MonthStatement, config: Config, csv_link: str) -> str:
    e = html.escape
    logo = config.statements.logo_url
    charges = "\n".join(
        f'<tr class="charge"><td>{e(c.day)}</td><td>{e(c.model)}</td><td class="n">{c.calls}</td>'
        f'<td class="n">{c.prompt_tokens:,}</td><td class="n">{c.completion_tokens:,}</td>'
        f'<td class="n" data-micros="{c.spend_micros}">{_usd(c.spend_micros)}</td></tr>'
        for c in statement.charges) or '<tr><td colspan="6">No usage this month.</td></tr>'
    money = "\n".join(
        f'<tr class="movement"><td>{e(_when(m.at_ms))}</td><td>{e(_LABELS.get(m.type, m.type))}</td>'
        f'<td>{e(m.reference or "")}</td><td class="n" data-micros="{m.amount_micros}">{_usd(m.amount_micros)}</td></tr>'
        for m in statement.money) or '<tr><td colspan="4">No top-ups or other movements this month.</td></tr>'
    return _TEMPLATE.substitute(
        operator=e(config.statements.operator_name),
        logo=f'<img class="logo" src="{e(logo)}" alt="{e(config.statements.operator_name)}">' if logo else "",
        end_user=e(statement.end_user), month=e(statement.month),
        carried_in=_usd(statement.carried_in_micros), carried_in_micros=statement.carried_in_micros,
        top_ups=_usd(statement.top_ups_micros), top_ups_micros=statement.top_ups_micros,
        spend=_usd(-statement.spend_micros), spend_micros=-statement.spend_micros,
        other=_usd(statement.other_micros), other_micros=statement.other_micros,
        carried_out=_usd(statement.carried_out_micros), carried_out_micros=statement.carried_out_micros,
        charges=charges, money=money, csv_link=e(csv_link),
    )


CSV_HEADER = ["date", "kind", "model", "calls", "prompt_tokens", "completion_tokens", "reference", "amount_micros"]


def render_csv(statement: MonthStatement) -> str:
    """One line per movement and per day and model of usage; amounts signed as in the ledger."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    writer.writerow([f"{statement.month}-01", "carried_in", "", "", "", "", "", statement.carried_in_micros])
    for m in statement.money:
        writer.writerow([_when(m.at_ms), m.type, "", "", "", "", m.reference or "", m.amount_micros])
    for c in statement.charges:
        writer.writerow([c.day, "usage", c.model, c.calls, c.prompt_tokens, c.completion_tokens, "", -c.spend_micros])
    writer.writerow(["", "carried_out", "", "", "", "", "", statement.carried_out_micros])
    return out.getvalue()
