"""Typed application keys, shared by the app factory and the handlers."""
from __future__ import annotations

import aiohttp
from aiohttp import web

from .settings import Settings
from .store import Store
from .worker import Worker

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
SESSION = web.AppKey("session", aiohttp.ClientSession)
WORKER = web.AppKey("worker", Worker)
