"""The slots blob copies take: counted, handed on in turn, and given back early to the work of
other registries than a slow one."""
from __future__ import annotations

import asyncio

import pytest

from pydlit.slots import Slot, Slots

pytestmark = pytest.mark.asyncio


async def _waiting(slots: Slots, registries: set[str]) -> tuple[Slot, asyncio.Task[None]]:
    slot = slots.take(registries)
    task = asyncio.ensure_future(slot.acquire())
    await asyncio.sleep(0)
    return slot, task


async def test_a_slot_is_handed_to_the_waiters_in_turn() -> None:
    slots = Slots(1)
    first = slots.take({"a"})
    await first.acquire()
    second, waiting = await _waiting(slots, {"a"})
    assert not waiting.done()
    first.release()
    first.release()  # given back once, however often said
    await asyncio.wait_for(waiting, 1)
    assert second.held
    third, still = await _waiting(slots, {"a"})
    await asyncio.sleep(0.01)
    assert not still.done()
    second.release()
    await asyncio.wait_for(still, 1)
    third.release()
    async with slots.take() as again:  # free again: taken at once
        assert again.held


async def test_a_slot_given_back_by_a_slow_registry_goes_to_work_bound_elsewhere_first() -> None:
    slots = Slots(1)
    slow = slots.take({"slow"})
    await slow.acquire()
    same, for_slow = await _waiting(slots, {"slow", "b"})
    other, for_other = await _waiting(slots, {"c"})
    assert slots.wanted_beyond({"slow"}) and not slots.wanted_beyond({"slow", "c"})
    slow.release(avoid={"slow"})
    await asyncio.wait_for(for_other, 1)
    assert other.held and not for_slow.done()
    other.release()
    await asyncio.wait_for(for_slow, 1)
    assert same.held


async def test_a_waiter_cancelled_as_the_slot_reaches_it_passes_the_slot_on() -> None:
    slots = Slots(1)
    holder = slots.take()
    await holder.acquire()
    _, cancelled = await _waiting(slots, set())
    last, waiting = await _waiting(slots, set())
    holder.release()  # handed to the first waiter, which is cancelled before it runs again
    cancelled.cancel()
    await asyncio.wait_for(waiting, 1)
    assert last.held and cancelled.cancelled()
