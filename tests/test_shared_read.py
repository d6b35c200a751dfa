"""When a target leaves the shared read of a blob: one that holds the others to its pace, however
smoothly it takes its pieces, goes on with a read of its own; targets close in speed stay on one
read.

Stand-in clients: a real registry's pace on this machine moves with everything else running, and
these tests need two paces that stay what they were set to."""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from pydlit.registry.client import RetryPolicy
from pydlit.registry.manifests import Blob
from pydlit.transfer import ImageCopy, MemoryEvents, Source, Target, Tuning

pytestmark = pytest.mark.asyncio

KiB = 1024
DATA = bytes(range(256)) * (2 * KiB)  # 512 KiB: 64 pieces of 8 KiB
BLOB = Blob("sha256:" + hashlib.sha256(DATA).hexdigest(), len(DATA))
# Small pieces and buffers, so that paces of tens of milliseconds a piece make a read of seconds.
TUNING = Tuning(chunk_size=1024 * KiB, piece_size=8 * KiB, whole_blob_max=16 * KiB, buffer_size=32 * KiB, detach_after_s=0.3)


class _Answer:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.content = self

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        for at in range(0, len(self.data), n):
            await asyncio.sleep(0)
            yield self.data[at:at + n]


class StandInSource:
    name = key = "source.test"
    policy = RetryPolicy()

    def __init__(self) -> None:
        self.reads_from: list[int] = []

    async def open_blob(self, repo: str, digest: str, offset: int = 0, size: int | None = None) -> tuple[_Answer, int]:
        self.reads_from.append(offset)
        return _Answer(DATA[offset:]), offset


class PacedTarget:
    """Takes one piece every `pace` seconds, evenly: never a long wait, one after another."""

    def __init__(self, name: str, pace: float) -> None:
        self.name = self.key = name
        self.pace = pace
        self.received: bytes | None = None
        self.done_at = 0.0

    async def head_blob(self, repo: str, digest: str) -> bool:
        return False

    async def start_upload(self, repo: str) -> str:
        return f"/{self.name}/upload"

    async def cancel_upload(self, location: str, repo: str) -> None:
        return None

    async def finish_upload(self, location: str, repo: str, digest: str, body: AsyncIterator[bytes], length: int = 0) -> None:
        got = bytearray()
        async for piece in body:
            if self.pace:
                await asyncio.sleep(self.pace)
            got += piece
        self.received = bytes(got)
        self.done_at = asyncio.get_running_loop().time()


async def _copy(*targets: PacedTarget) -> tuple[StandInSource, float]:
    source = StandInSource()
    copy = ImageCopy(
        Source(source, "r", "v1"), [Target(i, t, "r", "v1") for i, t in enumerate(targets)],  # type: ignore[arg-type]
        MemoryEvents(), asyncio.Event(), TUNING,
    )
    for t in copy.targets:
        copy._lacking[t.idx] = {BLOB.digest}
        copy._complete[t.idx] = asyncio.Event()
    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(copy._copy_blob(BLOB, copy.targets), 30)
    assert all(t.received == DATA for t in targets)
    return source, began


async def test_a_target_that_takes_its_pieces_smoothly_but_slowly_reads_on_its_own() -> None:
    fast, slow = PacedTarget("fast", 0.0), PacedTarget("slow", 0.03)  # ~2 s for the blob

    source, began = await _copy(fast, slow)

    assert len(source.reads_from) == 2 and source.reads_from[0] == 0, source.reads_from
    assert fast.done_at - began < (slow.done_at - began) / 2, (fast.done_at - began, slow.done_at - began)


async def test_targets_close_in_speed_stay_on_one_read() -> None:
    # One could go 2.5 times as fast on its own: not worth a second read of the source.
    source, _ = await _copy(PacedTarget("a", 0.012), PacedTarget("b", 0.03))

    assert source.reads_from == [0]
