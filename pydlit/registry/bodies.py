"""Reading a response body whole, up to a bound: what comes from a registry or a token server is
read into memory only as far as it could be what was asked for."""
from __future__ import annotations

import aiohttp


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or its first limit + 1 bytes when it is longer. (`content.read(n)` gives
    what has arrived so far, which over TLS may be one 16 KiB record.)"""
    data = bytearray()
    while len(data) <= limit:
        piece = await resp.content.read(limit + 1 - len(data))
        if not piece:
            break
        data += piece
    return bytes(data)
