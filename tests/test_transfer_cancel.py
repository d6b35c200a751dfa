"""What a stopped or cancelled copy does with its uploads: the sessions it opened ahead of its
source read, the requests carrying bytes, and what else it waits for.

Stand-in clients: a real registry cannot be made to fail a DELETE the way a closed ClientSession
does at shutdown, nor to hold a read or a request for as long as a test needs."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from support.answers import StreamedBlob

from pydlit.inflight import InFlight
from pydlit.registry.client import RetryPolicy
from pydlit.registry.errors import RegistryError
from pydlit.registry.manifests import OCI_MANIFEST, Blob, Manifest, sha256_digest
from pydlit.transfer import ImageCopy, MemoryEvents, Source, Stopped, Target, Tuning

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
    name = key = account = "target.test"

    def __init__(self, give_back_error: Exception | None = None) -> None:
        self.opened: list[str] = []
        self.given_back: list[str] = []
        self.error = give_back_error

    def named(self, location: str) -> bool:
        return False

    def mountable(self, from_repo: str) -> bool:
        return True

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


# -- a stop ---------------------------------------------------------------------------------------

SMALL = b"small blob"
SMALL_BLOB = Blob(sha256_digest(SMALL), len(SMALL))


class OneBlobSource:
    """An image of one small blob."""

    name = key = "source.test"
    policy = RetryPolicy()
    on_retry = None

    async def get_manifest(self, repo: str, ref: str) -> Manifest:
        return Manifest(OCI_MANIFEST, b"{}", sha256_digest(b"{}"), blobs=(SMALL_BLOB,))

    async def read_blob(self, repo: str, digest: str, size: int) -> bytes:
        return SMALL


class SlowTarget(StandInTarget):
    """Its commits take `put_s`; the first one, with `busy`, is refused and tried again a minute
    later. Commits go inside `carry`, as the real client's do."""

    def __init__(self, put_s: float = 0.0, busy: bool = False) -> None:
        super().__init__()
        self.put_s, self.busy = put_s, busy
        self.puts: list[str] = []

    async def head_manifest(self, repo: str, ref: str) -> None:
        return None

    async def repository_known(self, repo: str) -> bool:
        return False

    async def upload_blob(self, repo: str, digest: str, data: bytes, location: str | None = None, carry=None) -> None:
        for _ in range(2):
            with carry() if carry else contextlib.nullcontext():
                self.puts.append("started")
                await asyncio.sleep(self.put_s)
                if not self.busy:
                    self.puts.append("done")
                    return
                self.busy = False
                self.puts.append("refused")
            await asyncio.sleep(60)  # the client's retry waits out what the registry asked for

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        return True

    async def put_manifest(self, repo: str, ref: str, manifest: Manifest) -> None:
        return None


async def _stop_once(target: SlowTarget, repos: int = 1, when: str = "started") -> tuple[asyncio.Task[None], asyncio.Event]:
    stop = asyncio.Event()
    targets = [Target(i, target, f"r{i}", "v1") for i in range(repos)]
    copy = ImageCopy(Source(OneBlobSource(), "r", "v1"), targets, MemoryEvents(), stop)  # type: ignore[arg-type]
    task = asyncio.create_task(copy.run())
    for _ in range(500):
        if when in target.puts:
            break
        await asyncio.sleep(0.01)
    stop.set()
    return task, stop


def _copy_tasks_left() -> list[str]:
    """The copy's tasks still running, but for a give-back of sessions, which goes on a moment
    beside a stop by design (ImageCopy._give_back_awhile)."""
    return [name for t in asyncio.all_tasks() if not t.done()
            for name in [t.get_coro().__qualname__] if name.startswith("ImageCopy.") and not name.startswith("ImageCopy._give_back")]


async def test_a_stop_lets_the_put_of_a_small_blob_end() -> None:
    # Cut, it would leave distribution a session it can neither commit nor delete.
    target = SlowTarget(put_s=0.3)
    task, _ = await _stop_once(target)
    with pytest.raises(Stopped):
        await asyncio.wait_for(task, 5)
    assert target.puts == ["started", "done"]


async def test_a_stop_does_not_wait_out_a_retry_of_the_target_a_registrys_others_link_from() -> None:
    # Two repositories of one registry: the second waits to mount the blob from the first, whose
    # commit the registry asked to try again in a minute.
    target = SlowTarget(busy=True)
    task, _ = await _stop_once(target, repos=2, when="refused")
    with pytest.raises(Stopped):
        await asyncio.wait_for(task, 5)
    assert target.puts == ["started", "refused"]
    assert _copy_tasks_left() == []


async def test_a_stop_before_a_small_blobs_put_gives_its_session_back() -> None:
    # The stop waits for another blob's chunk; the small blob, read meanwhile, is not sent, and
    # the session opened for it goes back to the registry.
    class GatedSource(OneBlobSource):
        def __init__(self) -> None:
            self.gate = asyncio.Event()

        async def read_blob(self, repo: str, digest: str, size: int) -> bytes:
            await self.gate.wait()
            return SMALL

    source, target, stop = GatedSource(), SlowTarget(), asyncio.Event()
    copy = ImageCopy(Source(source, "r", "v1"), [Target(0, target, "r", "v1")], MemoryEvents(), stop)  # type: ignore[arg-type]
    task = asyncio.create_task(copy.run())
    for _ in range(500):
        if target.opened:
            break
        await asyncio.sleep(0.01)
    chunk = copy._carry()  # another blob's chunk on its way
    chunk.__enter__()
    stop.set()
    source.gate.set()
    for _ in range(500):
        if target.given_back:
            break
        await asyncio.sleep(0.01)
    chunk.__exit__(None, None, None)
    with pytest.raises(Stopped):
        await asyncio.wait_for(task, 5)
    assert target.puts == [] and target.given_back == target.opened == ["/upload/0"]


async def test_a_copy_cancelled_again_while_it_stops_leaves_nothing_running() -> None:
    # What the worker does once a cancel's grace is over, while the copy still gives back a session.
    target = SlowTarget()
    target.cancel_upload = _slow_give_back  # type: ignore[method-assign]
    source = HangingSource()
    stop = asyncio.Event()
    copy = ImageCopy(Source(source, "r", "v1"), [Target(0, target, "r", "v1")], MemoryEvents(), stop)  # type: ignore[arg-type]
    copy.blobs = [BLOB]
    copy._run = lambda: copy._copy_whole(BLOB, copy.targets)  # type: ignore[method-assign]
    task = asyncio.create_task(copy.run())
    await source.reading.wait()
    stop.set()
    await asyncio.sleep(0.1)  # the read is cancelled: the copy gives its session back
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert _copy_tasks_left() == []


async def _slow_give_back(location: str, repo: str) -> None:
    await asyncio.sleep(1.0)


BIG = bytes(range(256)) * 2048  # 512 KiB: four chunks of 128 KiB
BIG_BLOB = Blob(sha256_digest(BIG), len(BIG))
CHUNKED = Tuning(chunk_size=128 * 1024, piece_size=32 * 1024, whole_blob_max=16 * 1024, buffer_size=256 * 1024)


class OneBigBlobSource(OneBlobSource):
    async def get_manifest(self, repo: str, ref: str) -> Manifest:
        return Manifest(OCI_MANIFEST, b"{}", sha256_digest(b"{}"), blobs=(BIG_BLOB,))

    async def open_blob(self, repo: str, digest: str, offset: int = 0, size: int | None = None) -> tuple[StreamedBlob, int]:
        return StreamedBlob(BIG[offset:]), offset


class SlowToCommit(SlowTarget):
    """Takes chunks at once; its commit of the whole takes `put_s`."""

    def __init__(self, put_s: float) -> None:
        super().__init__(put_s)
        self.committing = asyncio.Event()
        self.committed: list[str] = []

    async def head_blob(self, repo: str, digest: str) -> bool:
        return False

    async def patch_chunk(self, location: str, repo: str, body: AsyncIterator[bytes], start: int, length: int) -> str:
        async for _ in body:
            pass
        return f"/upload/0?at={start + length}"

    async def finish_upload(self, location: str, repo: str, digest: str, body: object = b"", length: int = 0) -> None:
        self.committing.set()
        await asyncio.sleep(self.put_s)
        self.committed.append(digest)


async def test_a_stop_lets_the_commit_of_a_chunked_blob_end_and_leaves_no_session_to_give_back() -> None:
    # Cut, the commit still took the blob at the registry, and the copy gave back its session
    # after it: distribution answered BLOB_UPLOAD_INVALID, reported as a session it kept.
    target, events, stop = SlowToCommit(put_s=0.3), MemoryEvents(), asyncio.Event()
    copy = ImageCopy(Source(OneBigBlobSource(), "r", "v1"), [Target(0, target, "r", "v1")], events, stop, CHUNKED)  # type: ignore[arg-type]
    task = asyncio.create_task(copy.run())
    await asyncio.wait_for(target.committing.wait(), 5)
    stop.set()
    with pytest.raises(Stopped):
        await asyncio.wait_for(task, 5)
    assert target.committed == [BIG_BLOB.digest]
    assert events.uploads == {}  # the checkpoint went with the commit
    assert await copy.give_back(1) == {} and target.given_back == []


class CutSessionTarget(SlowToCommit):
    """Its checkpointed session holds a cut chunk (a SIGKILL): distribution will neither go on
    with it nor delete it."""

    async def upload_offset(self, location: str, repo: str, expected: int | None = None) -> int | None:
        assert location == "/upload/cut"
        raise RegistryError(self.name, f"resume upload to {repo}", "blob upload invalid", status=404, code="BLOB_UPLOAD_INVALID")

    async def cancel_upload(self, location: str, repo: str) -> RegistryError | None:
        self.given_back.append(location)
        return RegistryError(self.name, f"cancel upload to {repo}", "blob upload invalid", status=404, code="BLOB_UPLOAD_INVALID")


async def test_a_checkpointed_session_with_a_cut_chunk_starts_over_and_is_named_as_kept() -> None:
    # It was taken for "gone", silently: the registry held its bytes until its purge, unsaid.
    target = CutSessionTarget(put_s=0)
    events = MemoryEvents({(0, BIG_BLOB.digest): ("/upload/cut", 256 * 1024)})
    copy = ImageCopy(Source(OneBigBlobSource(), "r", "v1"), [Target(0, target, "r", "v1")], events, asyncio.Event(), CHUNKED,  # type: ignore[arg-type]
                     first_attempt=False)
    await asyncio.wait_for(copy.run(), 5)
    assert target.committed == [BIG_BLOB.digest] and events.states[0] == "FINISHED"
    assert target.given_back == ["/upload/cut"]
    kept = await copy.give_back(1)
    assert list(kept) == [0] and len(kept[0]) == 1 and "BLOB_UPLOAD_INVALID" in kept[0][0]


class SlowToList(OneBigBlobSource):
    async def get_manifest(self, repo: str, ref: str) -> Manifest:
        await asyncio.sleep(0.2)
        return await super().get_manifest(repo, ref)


class HoldingTarget(SlowToCommit):
    """Holds a checkpointed session's bytes, and mounts from another repository on request."""

    def __init__(self) -> None:
        super().__init__(put_s=0)
        self.patched = 0
        self.mounted: list[str] = []

    async def repository_known(self, repo: str) -> bool:
        return True

    async def upload_offset(self, location: str, repo: str, expected: int | None = None) -> int | None:
        return expected

    async def patch_chunk(self, location: str, repo: str, body: AsyncIterator[bytes], start: int, length: int) -> str:
        self.patched += length
        return await super().patch_chunk(location, repo, body, start, length)

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        self.mounted.append(from_repo)
        return True


async def test_a_job_started_beside_one_resuming_an_upload_waits_for_it_instead_of_sending_the_blob() -> None:
    # Two jobs a stop requeued, claimed together: the one with no session used to lead the blob
    # while the other's source read was under way, and the registry got it twice.
    uploads, held = InFlight(), 256 * 1024
    resumer, fresh = HoldingTarget(), HoldingTarget()
    resuming = ImageCopy(Source(SlowToList(), "r", "v1"), [Target(0, resumer, "r1", "v1")],  # type: ignore[arg-type]
                         MemoryEvents({(0, BIG_BLOB.digest): ("/upload/old", held)}), asyncio.Event(), CHUNKED,
                         first_attempt=False, uploads=uploads)
    starting = ImageCopy(Source(OneBigBlobSource(), "r", "v1"), [Target(0, fresh, "r2", "v1")],  # type: ignore[arg-type]
                         MemoryEvents(), asyncio.Event(), CHUNKED, uploads=uploads)
    await asyncio.wait_for(asyncio.gather(resuming.run(), starting.run()), 5)
    assert (resumer.patched, resumer.committed) == (BIG_BLOB.size - held, [BIG_BLOB.digest])
    assert (fresh.patched, fresh.committed, fresh.mounted) == (0, [], ["r1"])
    assert uploads._live == {}
