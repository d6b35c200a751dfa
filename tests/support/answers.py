"""Answers a test server gives that no real registry gives on purpose, and a stand-in client's
streamed blob."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

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


class StreamedBlob:
    """What a stand-in source's open_blob answers: the bytes in pieces, `pace` seconds apart, as
    the response of RegistryClient.open_blob gives them."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.content = self
        self.pace = 0.0

    async def __aenter__(self) -> StreamedBlob:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        for at in range(0, len(self.data), n):
            await asyncio.sleep(self.pace)
            yield self.data[at:at + n]
