"""The app factory shared by the server and the tests: routes, the error middleware, and the
resources (DB, HTTP session, worker) in cleanup_ctx, torn down in reverse."""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .api import ApiError, routes
from .credentials import CredentialStore
from .keys import SESSION, SETTINGS, STORE, WORKER
from .nodelock import NodeLock
from .settings import Settings
from .store import Store
from .worker import Worker

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024


# Words for the errors aiohttp raises itself, before a handler runs.
_FRAMEWORK_MESSAGES = {
    404: "no such resource",
    405: "method not allowed",
    413: f"request body too large: at most {MAX_BODY} bytes",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error, whoever raised it, leaves as {"status": "error", "msg": ...}."""
    try:
        return await handler(request)
    except ApiError as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="pydlit"'} if exc.status == 401 else None
        return web.json_response({"status": "error", "msg": exc.msg}, status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        msg = _FRAMEWORK_MESSAGES.get(exc.status, exc.reason)
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"status": "error", "msg": msg}, status=exc.status, headers=allow)
    except RequestPayloadError as exc:
        # A body that is not what its headers say (Content-Encoding: gzip that is not gzip). The
        # connection ends with the answer, as its parser can read nothing more; and the rest of
        # the body is not read first (aiohttp would, and log the same error again).
        reason = exc.__cause__.message if isinstance(exc.__cause__, HttpProcessingError) else str(exc)
        request.content.feed_eof()
        resp = web.json_response({"status": "error", "msg": f"the request body cannot be read: {reason}"}, status=400)
        resp.force_close()
        return resp
    except ConnectionResetError:
        # Nobody reads this answer; it only keeps a client's hang-up out of the error log.
        log.info("%s %s: the client went away before its request was read", request.method, request.path)
        return web.json_response({"status": "error", "msg": "connection lost"}, status=400)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return web.json_response({"status": "error", "msg": "internal error"}, status=500)


OPEN_PATHS = frozenset({"/healthz"})


def token_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """With PYDLIT_API_TOKEN set, every call but the health check needs `Bearer <token>`."""
    # Header values arrive decoded as UTF-8 with surrogate escapes: the same escapes give back
    # the bytes sent, so a byte that is not UTF-8 compares unequal instead of failing to encode.
    expected = token.encode("utf-8", "surrogateescape")

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # The scheme is case-insensitive (RFC 9110); the token is not.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
                raise ApiError(401, "missing or wrong API token: send Authorization: Bearer <PYDLIT_API_TOKEN>")
        return await handler(request)

    return check


def create_app(settings: Settings) -> web.Application:
    middlewares = [error_middleware]
    if settings.api_token:
        middlewares.append(token_middleware(settings.api_token))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app.add_routes(routes)
    app.cleanup_ctx.append(_resources_ctx)
    return app


async def _resources_ctx(app: web.Application) -> AsyncIterator[None]:
    """Each resource up in turn, down in reverse. One context enters them all, so that a start
    that fails part way closes what it opened: aiohttp's run_app exits no context when one fails
    to start, and the job DB's thread, left open, would keep the process alive for ever. (Each
    closes in a finally: a failed start is thrown into those already up.)"""
    async with contextlib.AsyncExitStack() as stack:
        for ctx in (_node_ctx, _store_ctx, _session_ctx, _worker_ctx):
            await stack.enter_async_context(contextlib.asynccontextmanager(ctx)(app))
        yield


async def _node_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    lock = NodeLock(settings.db, settings.node)
    lock.acquire()  # NodeBusy: the start stops here, before any job is touched
    try:
        yield
    finally:
        lock.release()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[STORE] = await Store.open(settings.db, secret_key=settings.secret_key)
    try:
        yield
    finally:
        await app[STORE].close()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=settings.connections_per_host, ttl_dns_cache=300)
    app[SESSION] = aiohttp.ClientSession(
        connector=connector, json_serialize=json.dumps, headers={"User-Agent": "pydlit/2"}, auto_decompress=False
    )
    try:
        yield
    finally:
        await app[SESSION].close()


async def _worker_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    credentials = CredentialStore.load(settings.credentials) if settings.credentials else None
    if credentials:
        log.info("server-side credentials for %s", ", ".join(credentials.hosts) or "no registry")
    worker = Worker(app[STORE], app[SESSION], settings, credentials)
    app[WORKER] = worker
    await worker.start()
    try:
        yield
    finally:
        await worker.stop()
