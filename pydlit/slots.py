"""Slots for blob copies: how many run at once, in a job and across a service.

A slot can be given back before the work it was taken for ends: a target still uploading a blob
on its own must not keep others from theirs. A read held back by a slow registry can give its
slot way: the slot goes to the first waiter bound for other registries than the slow ones, and
the read goes on beside the count, within a fixed allowance, so that what the slots bound
(memory, streams) stays bounded.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

_Waiter = tuple["asyncio.Future[None]", frozenset[str]]


class Slots:
    """A counting semaphore whose waiters say which registries their work goes to."""

    def __init__(self, count: int, spare: int = 0) -> None:
        """`spare`: how many slots' work may go on beside the count once they gave way."""
        self._free = count
        self._spare = spare
        self._waiters: deque[_Waiter] = deque()

    def take(self, registries: Iterable[str] = ()) -> Slot:
        """A slot to hold with `async with`; `registries`: where the work that waits for it goes."""
        return Slot(self, frozenset(registries))

    def wanted_beyond(self, registries: Iterable[str]) -> bool:
        """Whether work bound for none of these registries waits for a slot."""
        avoid = set(registries)
        return any(not (keys & avoid) and not fut.done() for fut, keys in self._waiters)

    async def _acquire(self, registries: frozenset[str]) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        waiter = (fut, registries)
        self._waiters.append(waiter)
        try:
            await fut
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._wake()  # a slot freed while this waiter was being cancelled is not lost
            elif fut.done() and not fut.cancelled():
                self._release(())  # handed over just as the waiter was cancelled: passed on
            raise

    def _release(self, avoid: Iterable[str]) -> None:
        """Hand the slot to the first waiter bound for none of `avoid`, else to the first one."""
        avoid = set(avoid)
        live = [w for w in self._waiters if not w[0].done()]
        chosen = next((w for w in live if not (w[1] & avoid)), live[0] if live else None)
        if chosen is None:
            self._free += 1
            return
        self._waiters.remove(chosen)
        chosen[0].set_result(None)

    def _wake(self) -> None:
        while self._free > 0 and any(not fut.done() for fut, _ in self._waiters):
            self._free -= 1
            self._release(())


class Slot:
    """One slot of a `Slots`, held from `async with` until its end or an earlier `release`."""

    def __init__(self, slots: Slots, registries: frozenset[str]) -> None:
        self._slots = slots
        self._registries = registries
        self._held = False
        self._beside = False  # it gave way: its work goes on beside the count

    @property
    def held(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        await self._slots._acquire(self._registries)
        self._held = True

    async def __aenter__(self) -> Slot:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give the slot back (once); or, once it gave way, end the work that went on beside."""
        if self._held:
            self._held = False
            self._slots._release(())
        elif self._beside:
            self._beside = False
            self._slots._spare += 1

    def give_way(self, avoid: Iterable[str]) -> bool:
        """Hand the slot to work bound for none of the `avoid` registries that waits for one,
        while this work goes on beside the count; False when none waits, or when as many as the
        `Slots` spare already go on beside it."""
        slots = self._slots
        if not self._held or slots._spare <= 0 or not slots.wanted_beyond(avoid):
            return False
        slots._spare -= 1
        self._held, self._beside = False, True
        slots._release(avoid)
        return True
