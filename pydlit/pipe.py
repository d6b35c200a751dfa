"""A bounded in-memory byte pipe: how one source read feeds several uploads at once."""
from __future__ import annotations

import asyncio
from collections import deque


class PipeClosed(Exception):
    """The writer side gave up on this pipe; whatever it was reading stops."""


class Pipe:
    """Pieces flow from one reader task to one writer task.

    The reader blocks while `limit` bytes are waiting, so a slow target holds back the source by
    at most that much, and a closed pipe (a failed target) never blocks the reader at all. Pieces
    are shared, not copied, between the pipes of one blob.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit  # may be lowered while in use: the reader then waits for the writer sooner
        self._items: deque[bytes] = deque()
        self._held = 0
        self._cond = asyncio.Condition()
        self._eof = False
        self._error: BaseException | None = None
        self.closed = False
        self._starved = 0.0
        self._starving_since: float | None = None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def held(self) -> int:
        """Bytes put and not yet taken: 0 means the writer is waiting for the reader."""
        return self._held

    @property
    def full(self) -> bool:
        """The reader must wait for this pipe's writer before it puts more."""
        return self._held >= self.limit and not self.closed

    def starved(self) -> float:
        """Seconds the writer has waited for the reader so far, a wait still going on included."""
        since = self._starving_since
        return self._starved + (0.0 if since is None else asyncio.get_running_loop().time() - since)

    async def put(self, piece: bytes, timeout: float | None = None) -> bool:
        """Queue the piece once there is room; False if `timeout` passed first (nothing queued)."""
        async with self._cond:
            if self.full:
                try:
                    await asyncio.wait_for(self._cond.wait_for(lambda: not self.full), timeout)
                except asyncio.TimeoutError:
                    return False
            if not self.closed:
                self._items.append(piece)
                self._held += len(piece)
                self._cond.notify_all()
            return True

    async def finish(self, error: BaseException | None = None) -> None:
        """No more pieces will come: the end of the blob, or the reader's failure."""
        async with self._cond:
            self._eof = True
            self._error = error
            self._cond.notify_all()

    async def close(self) -> None:
        """The writer side leaves: drop what is buffered and let the reader run past it."""
        async with self._cond:
            self.closed = True
            self._items.clear()
            self._held = 0
            self._cond.notify_all()

    async def get(self, most: int) -> bytes:
        """Up to `most` bytes; raises the reader's error, or EOFError at a premature end."""
        async with self._cond:
            if not (self._items or self._eof or self.closed):
                loop = asyncio.get_running_loop()
                self._starving_since = loop.time()
                try:
                    await self._cond.wait_for(lambda: self._items or self._eof or self.closed)
                finally:
                    self._starved += loop.time() - self._starving_since
                    self._starving_since = None
            if self.closed:
                raise PipeClosed()
            if not self._items:
                raise self._error or EOFError("the source stream ended early")
            piece = self._items.popleft()
            if len(piece) > most:
                self._items.appendleft(piece[most:])
                piece = piece[:most]
            self._held -= len(piece)
            self._cond.notify_all()
            return piece
