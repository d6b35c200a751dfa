"""Reading a response body whole, up to a bound: what comes from a registry or a token server is
read into memory only as far as it could be what was asked for, and only for so long."""
from __future__ import annotations

import asyncio

import aiohttp

# A manifest, a listing page, a ping's or a token server's answer is at most a few MiB. The stall
# timeout cuts a peer that goes silent, not one that trickles a byte just before it fires: only a
# bound on reading the whole body ends that (4 MiB in this long is still 35 KiB/s). It starts once
# the headers are in, not with the request: a request may first wait for a pooled connection
# while blob streams hold every one to that host, for as long as those take. Blob streams take
# as long as their size needs and are bounded by the stall timeout alone.
ANSWER_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 30.0
# The session does not decompress (a blob's bytes must arrive as the registry holds them), so a
# compressed answer, which a proxy in front of a registry or token server may give to anyone who
# accepts one, could not be read: accept none.
NO_COMPRESSION = {"Accept-Encoding": "identity"}


def connection_problem(exc: BaseException) -> str:
    """A failed connection in words, without its URL: a token url's query may hold a secret."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return "no byte arrived within the stall timeout (PYDLIT_STALL_TIMEOUT_S)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer broke off"
    if isinstance(exc, aiohttp.ClientResponseError):  # what came back is not HTTP as it should be
        first_line = exc.message.split("\n", 1)[0].rstrip(":")
        return f"the answer could not be read: {first_line}"
    if isinstance(exc, OSError):  # aiohttp's ClientOSError: a reset, a broken pipe
        return f"the connection failed: {exc.strerror or exc}"
    return type(exc).__name__


def request_timeout(stall_timeout: float) -> aiohttp.ClientTimeout:
    """A request's timeout: no total (see ANSWER_TIMEOUT_S), a stall cuts it."""
    return aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=stall_timeout)


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or its first limit + 1 bytes when it is longer; asyncio.TimeoutError when
    reading it takes longer than ANSWER_TIMEOUT_S."""
    return await asyncio.wait_for(_read(resp, limit), ANSWER_TIMEOUT_S)


async def _read(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    # `content.read(n)` gives what has arrived so far, which over TLS may be one 16 KiB record.
    data = bytearray()
    while len(data) <= limit:
        piece = await resp.content.read(limit + 1 - len(data))
        if not piece:
            break
        data += piece
    return bytes(data)
