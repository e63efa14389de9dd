"""Typed keys for what the app factory stores on the application."""

from __future__ import annotations

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from proxy.config import Config
from proxy.ratecards import RateCardRegistry
from proxy.store import AccountStore, WalletStore

CONFIG = web.AppKey("config", Config)
REDIS = web.AppKey("redis", aioredis.Redis)
WALLETS = web.AppKey("wallets", WalletStore)
ACCOUNTS = web.AppKey("accounts", AccountStore)
RATECARDS = web.AppKey("ratecards", RateCardRegistry)
HTTP = web.AppKey("http", aiohttp.ClientSession)
BACKGROUND = web.AppKey("background", set)  # settlement tasks still running
