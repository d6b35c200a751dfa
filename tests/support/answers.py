"""Answers a test server gives that no real registry gives on purpose."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web


async def trickle(request: web.Request, content_type: str, until: asyncio.Event) -> web.StreamResponse:
    """A byte every 0.1 s, each far inside any stall timeout, until `until` is set."""
    resp = web.StreamResponse(headers={"Content-Type": content_type})
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):
        while not until.is_set():
            await resp.write(b" ")
            await asyncio.sleep(0.1)
    return resp
