"""What a cancelled copy does with the upload sessions it opened ahead of its source read.

Stand-in clients: a real registry cannot be made to fail a DELETE the way a closed ClientSession
does at shutdown, nor to hold a read for as long as a test needs."""
from __future__ import annotations

import asyncio

import pytest

from pydlit.registry.client import RetryPolicy
from pydlit.registry.manifests import Blob
from pydlit.transfer import ImageCopy, MemoryEvents, Source, Target

pytestmark = pytest.mark.asyncio

BLOB = Blob("sha256:" + "0" * 64, 10)


class HangingSource:
    name = key = "source.test"
    policy = RetryPolicy()

    def __init__(self) -> None:
        self.reading = asyncio.Event()

    async def read_blob(self, repo: str, digest: str, size: int) -> bytes:
        self.reading.set()
        await asyncio.sleep(3600)
        raise AssertionError("never read to the end")


class StandInTarget:
    name = key = "target.test"

    def __init__(self, give_back_error: Exception | None = None) -> None:
        self.opened: list[str] = []
        self.given_back: list[str] = []
        self.error = give_back_error

    async def start_upload(self, repo: str) -> str:
        self.opened.append(f"/upload/{len(self.opened)}")
        return self.opened[-1]

    async def cancel_upload(self, location: str, repo: str) -> None:
        if self.error is not None:
            raise self.error
        self.given_back.append(location)


async def _cancel_during_read(target: StandInTarget) -> asyncio.Task[None]:
    source = HangingSource()
    copy = ImageCopy(Source(source, "r", "v1"), [Target(0, target, "r", "v1")], MemoryEvents(), asyncio.Event())  # type: ignore[arg-type]
    task = asyncio.create_task(copy._copy_whole(BLOB, copy.targets))
    await source.reading.wait()
    for _ in range(3):  # the session's task runs to its end
        await asyncio.sleep(0)
    assert target.opened == ["/upload/0"]
    task.cancel()
    return task


async def test_a_cancelled_read_gives_its_opened_session_back() -> None:
    target = StandInTarget()
    task = await _cancel_during_read(target)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert target.given_back == ["/upload/0"]


async def test_a_cancelled_copy_stays_cancelled_when_giving_back_fails() -> None:
    # At shutdown the ClientSession may close under the DELETE: the job must still be cancelled
    # (and requeued), not failed as an internal error.
    task = await _cancel_during_read(StandInTarget(RuntimeError("Session is closed")))
    with pytest.raises(asyncio.CancelledError):
        await task
