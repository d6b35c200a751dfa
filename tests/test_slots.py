"""The slots blob copies take: counted, handed on in turn, and given way to the work of other
registries than a slow one, within an allowance."""
from __future__ import annotations

import asyncio
import random

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


async def test_a_newcomer_is_not_left_waiting_beside_a_free_slot() -> None:
    # A waiter is cancelled; before its task runs again the slot is freed and a newcomer asks.
    slots = Slots(1)
    holder = slots.take({"a"})
    await holder.acquire()
    cancelled = asyncio.ensure_future(slots.take({"a"}).acquire())
    await asyncio.sleep(0)
    go = asyncio.Event()
    newcomer = slots.take({"b"})

    async def come() -> None:
        await go.wait()
        await newcomer.acquire()

    coming = asyncio.ensure_future(come())
    await asyncio.sleep(0)
    go.set()  # in one turn of the loop: the newcomer asks, then the cancelled waiter leaves
    cancelled.cancel()
    holder.release()
    await asyncio.wait_for(coming, 1)
    assert newcomer.held and cancelled.cancelled()


async def test_a_slot_gives_way_to_other_registries_within_the_spare_allowance() -> None:
    slots = Slots(1, spare=1)
    first = slots.take({"slow"})
    await first.acquire()
    assert not first.give_way({"slow"})  # nobody waits
    same, for_same = await _waiting(slots, {"slow"})
    assert not first.give_way({"slow"})  # only work for the slow registry waits
    other, for_other = await _waiting(slots, {"fast"})
    assert first.give_way({"slow"})
    await asyncio.wait_for(for_other, 1)
    assert other.held and not first.held and not for_same.done()
    assert slots.wanted_beyond({"fast"}) and not slots.wanted_beyond({"fast", "slow"})
    # The allowance is spent while the first one's work goes on beside the count.
    assert not other.give_way({"fast"})
    first.release()  # its work ended: the allowance is back
    assert other.give_way({"fast"})
    await asyncio.wait_for(for_same, 1)
    assert same.held


async def test_the_counts_hold_under_random_takes_cancels_releases_and_give_ways() -> None:
    # Whatever happens in whatever order: held + free == count, beside + allowance == spare, and
    # no live waiter waits beside a free slot.
    rng = random.Random(7)
    for _ in range(200):
        count, spare = rng.randint(1, 3), rng.randint(0, 3)
        slots = Slots(count, spare=spare)
        holding: list[Slot] = []
        beside: list[Slot] = []
        asking: list[tuple[Slot, asyncio.Task[None]]] = []

        def settle() -> None:
            for slot, task in list(asking):
                if task.done():
                    asking.remove((slot, task))
                    if not task.cancelled() and slot.held:
                        holding.append(slot)

        for _step in range(60):
            op = rng.random()
            if op < 0.35:
                slot = slots.take({rng.choice("ab")})
                asking.append((slot, asyncio.ensure_future(slot.acquire())))
            elif op < 0.5 and asking:
                rng.choice(asking)[1].cancel()
            elif op < 0.7 and holding:
                slot = holding.pop(rng.randrange(len(holding)))
                slot.release()
                slot.release()
            elif op < 0.85 and holding:
                slot = rng.choice(holding)
                if slot.give_way({rng.choice("ab")}):
                    holding.remove(slot)
                    beside.append(slot)
            elif beside:
                slot = beside.pop(rng.randrange(len(beside)))
                slot.release()
                slot.release()
            for _ in range(rng.randint(0, 2)):
                await asyncio.sleep(0)
            settle()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        settle()
        assert len(holding) + slots._free == count, (len(holding), slots._free, count)
        assert len(beside) + slots._spare == spare
        assert not (slots._free > 0 and any(not fut.done() for fut, _ in slots._waiters))
        for _, task in asking:
            task.cancel()
        await asyncio.sleep(0)
