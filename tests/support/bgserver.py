"""Run an aiohttp application in a daemon thread with its own event loop.

Tests are synchronous; the token server and the fault proxy still need an event loop, so each
gets a private one that never touches the loop of the test (pytest-aiohttp tests included).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from aiohttp import web

S = TypeVar("S", bound="BackgroundService")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class BackgroundServer:
    def __init__(self, make_app: Callable[[], web.Application], name: str) -> None:
        self._make_app = make_app
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port: int = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, port: int = 0) -> int:
        if self.running:
            return self.port
        # Binding here, before the thread starts, avoids a free-port race.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = int(sock.getsockname()[1])
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve(sock))
            except BaseException as exc:  # reported to start() below
                failure.append(exc)
                sock.close()
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError(f"{self._name} did not start within {START_TIMEOUT}s")
        if failure:
            raise RuntimeError(f"{self._name} failed to start") from failure[0]
        return self.port

    async def _serve(self, sock: socket.socket) -> None:
        self._runner = web.AppRunner(
            self._make_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    @staticmethod
    async def _shutdown(runner: web.AppRunner) -> None:
        await runner.cleanup()
        # Handlers still running after the shutdown timeout (a stalled download, say) are
        # cancelled here rather than destroyed pending with the loop.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=2.0)

    def stop(self) -> None:
        thread, loop, runner = self._thread, self._loop, self._runner
        if thread is None or loop is None:
            return
        try:
            if runner is not None and thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._shutdown(runner), loop).result(STOP_TIMEOUT)
        finally:
            if thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
            self._thread = self._loop = self._runner = None


class BackgroundService:
    """Start/stop/context-manager plumbing for a helper built on one BackgroundServer."""

    _server: BackgroundServer

    def start(self: S) -> S:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
