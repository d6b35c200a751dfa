"""The bounded pipe between one source read and one upload: what the fan-out relies on."""
from __future__ import annotations

import asyncio

import pytest

from pydlit.pipe import Pipe, PipeClosed

pytestmark = pytest.mark.asyncio


async def test_a_full_pipe_refuses_a_piece_after_the_timeout_and_queues_nothing() -> None:
    pipe = Pipe(4)
    assert await pipe.put(b"abcd", timeout=0.05)
    assert pipe.held == 4
    assert not await pipe.put(b"ef", timeout=0.05)
    assert pipe.held == 4
    assert await pipe.get(10) == b"abcd"
    assert pipe.held == 0  # the writer is waiting for the reader
    assert await pipe.put(b"ef", timeout=0.05)
    await pipe.finish()
    assert await pipe.get(10) == b"ef"
    with pytest.raises(EOFError):
        await pipe.get(10)


async def test_a_put_waiting_for_room_goes_on_as_soon_as_the_writer_takes_a_piece() -> None:
    pipe = Pipe(2)
    await pipe.put(b"ab")
    waiting = asyncio.create_task(pipe.put(b"cd", timeout=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert await pipe.get(1) == b"a"
    assert await asyncio.wait_for(waiting, 1)
    assert await pipe.get(10) == b"b"
    assert await pipe.get(10) == b"cd"


async def test_a_closed_pipe_takes_every_piece_without_waiting_and_fails_its_reader() -> None:
    pipe = Pipe(1)
    await pipe.put(b"x")
    await pipe.close()
    assert await pipe.put(b"y", timeout=0.05)  # a target that left never holds the source back
    assert pipe.held == 0
    with pytest.raises(PipeClosed):
        await pipe.get(1)
