"""When a target leaves the shared read of a blob: one that holds the others to its pace, however
smoothly it takes its pieces, goes on with a read of its own, and so does it for the later blobs,
while the others go on to theirs; targets close in speed stay on one read. Then the edges of that
machinery: a cancel while targets are waited for, a failure that is not a registry's, a long
upload that fails once, the progress of a layer left to its URLs. Across jobs: a read held back
by a slow registry gives its stream slot to another registry's blob, and a job waits for another
job's upload of a blob to its registry instead of sending it again.

Stand-in clients: a real registry's pace on this machine moves with everything else running, and
these tests need two paces that stay what they were set to."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator

import pytest
from support.answers import StreamedBlob

from pydlit.registry.client import RetryPolicy
from pydlit.registry.errors import RegistryError
from pydlit.registry.manifests import OCI_MANIFEST, Blob, Manifest, Tree, sha256_digest
import pydlit.transfer as transfer
from pydlit.inflight import InFlight
from pydlit.pipe import Pipe
from pydlit.slots import Slots
from pydlit.transfer import ImageCopy, MemoryEvents, Source, Target, Tuning

pytestmark = pytest.mark.asyncio

KiB = 1024
DATA = bytes(range(256)) * (2 * KiB)  # 512 KiB: 64 pieces of 8 KiB
BLOB = Blob("sha256:" + hashlib.sha256(DATA).hexdigest(), len(DATA))
# Three more blobs of that size, each its own bytes.
MORE = {Blob("sha256:" + hashlib.sha256(d).hexdigest(), len(d)): d for d in (bytes([n]) + DATA[1:] for n in (1, 2, 3))}
# Four blobs small enough to be read whole (TUNING.whole_blob_max).
SMALL = {Blob("sha256:" + hashlib.sha256(d).hexdigest(), len(d)): d for d in (bytes([n]) * 12 * KiB for n in range(4))}
ALL_DATA = {BLOB.digest: DATA, **{b.digest: d for b, d in (*MORE.items(), *SMALL.items())}}
# Small pieces and buffers, so that paces of tens of milliseconds a piece make a read of seconds.
TUNING = Tuning(chunk_size=1024 * KiB, piece_size=8 * KiB, whole_blob_max=16 * KiB, buffer_size=32 * KiB, detach_after_s=0.3)


class StandInSource:
    name = key = "source.test"
    policy = RetryPolicy()
    on_retry = None

    def __init__(self) -> None:
        self.reads_from: list[int] = []
        self.reads_of: list[str] = []

    async def open_blob(self, repo: str, digest: str, offset: int = 0, size: int | None = None) -> tuple[StreamedBlob, int]:
        self.reads_from.append(offset)
        self.reads_of.append(digest)
        return StreamedBlob(ALL_DATA[digest][offset:]), offset

    async def read_blob(self, repo: str, digest: str, size: int) -> bytes:
        self.reads_of.append(digest)
        return ALL_DATA[digest][:size]


class PacedTarget:
    """Takes one piece every `pace` seconds, evenly: never a long wait, one after another."""

    def __init__(self, name: str, pace: float) -> None:
        self.name = self.key = self.account = name
        self.pace = pace
        self.received: dict[str, bytes] = {}
        self.done_at: dict[str, float] = {}
        self.tagged_at = 0.0

    async def head_blob(self, repo: str, digest: str) -> bool:
        return False

    def named(self, location: str) -> bool:
        return False

    def mountable(self, from_repo: str) -> bool:
        return True

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
        self.received[digest] = bytes(got)
        self.done_at[digest] = asyncio.get_running_loop().time()

    async def upload_blob(self, repo: str, digest: str, data: bytes, location: str | None = None, carry: object = None) -> None:
        self.received[digest] = data
        self.done_at[digest] = asyncio.get_running_loop().time()

    async def put_manifest(self, repo: str, ref: str, manifest: Manifest) -> None:
        self.tagged_at = asyncio.get_running_loop().time()


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
    assert all(t.received == {BLOB.digest: DATA} for t in targets)
    return source, began


async def test_a_target_that_takes_its_pieces_smoothly_but_slowly_reads_on_its_own() -> None:
    fast, slow = PacedTarget("fast", 0.0), PacedTarget("slow", 0.03)  # ~2 s for the blob

    source, began = await _copy(fast, slow)

    assert len(source.reads_from) == 2 and source.reads_from[0] == 0, source.reads_from
    fast_took, slow_took = fast.done_at[BLOB.digest] - began, slow.done_at[BLOB.digest] - began
    assert fast_took < slow_took / 2, (fast_took, slow_took)


async def test_targets_close_in_speed_stay_on_one_read() -> None:
    # One could go 2.5 times as fast on its own: not worth a second read of the source.
    source, _ = await _copy(PacedTarget("a", 0.012), PacedTarget("b", 0.03))

    assert source.reads_from == [0]


async def test_a_target_that_left_a_shared_read_does_not_keep_the_others_from_their_next_blobs() -> None:
    # One blob at a time: the slow target must not hold that one slot while it uploads on its own.
    fast, slow = PacedTarget("fast", 0.0), PacedTarget("slow", 0.02)  # ~1.3 s a blob for the slow one
    source = StandInSource()
    copy = ImageCopy(
        Source(source, "r", "v1"), [Target(i, t, "r", "v1") for i, t in enumerate((fast, slow))],  # type: ignore[arg-type]
        MemoryEvents(), asyncio.Event(), dataclasses.replace(TUNING, parallel_blobs=1),
    )
    blobs = [BLOB, *MORE]
    copy.tree = Tree(Manifest(OCI_MANIFEST, b"{}", sha256_digest(b"{}"), blobs=tuple(blobs)))
    copy.blobs = blobs

    await asyncio.wait_for(copy._copy_to(copy.targets), 60)

    assert fast.received == slow.received == {b.digest: ALL_DATA[b.digest] for b in blobs}
    # The fast target had every blob, and its tag, before the slow one had its first blob.
    assert fast.tagged_at < min(slow.done_at.values()), (fast.tagged_at, slow.done_at)
    assert slow.tagged_at >= max(slow.done_at.values())
    # The first blob: the shared read and the slow target's own; each later one: the fast
    # target's read and the slow one's.
    assert sorted(source.reads_of) == sorted(b.digest for b in blobs for _ in range(2)), source.reads_of


class HangingTarget(PacedTarget):
    """Answers nothing at one step until `wake` is set: a registry that accepts connections and
    then hangs, until it comes back."""

    def __init__(self, name: str, step: str) -> None:
        super().__init__(name, 0.0)
        self.step = step
        self.wake = asyncio.Event()

    async def head_blob(self, repo: str, digest: str) -> bool:
        if self.step == "head_blob":
            await self.wake.wait()
        return False

    async def start_upload(self, repo: str) -> str:
        if self.step == "start_upload":
            await self.wake.wait()
        return f"/{self.name}/upload"

    async def finish_upload(self, location: str, repo: str, digest: str, body: AsyncIterator[bytes], length: int = 0) -> None:
        if self.step != "last_bytes":
            return await super().finish_upload(location, repo, digest, body, length)
        # Takes all but the last few pieces, which its buffer holds, then stops: it never held
        # the shared read up.
        got = bytearray()
        async for piece in body:
            if len(got) + 4 * len(piece) >= length and not self.wake.is_set():
                await self.wake.wait()
            got += piece
        self.received[digest] = bytes(got)
        self.done_at[digest] = asyncio.get_running_loop().time()


@pytest.mark.parametrize(("step", "blobs"), [
    pytest.param(step, blobs, id=f"{kind}-{step}")
    for kind, blobs in (("streamed", [BLOB, *MORE]), ("read-whole", list(SMALL)))
    for step in ("head_blob", "start_upload", "last_bytes") if (kind, step) != ("read-whole", "last_bytes")
])
async def test_a_target_that_stops_answering_does_not_keep_the_others_from_their_blobs(step: str, blobs: list[Blob]) -> None:
    fast, hung = PacedTarget("fast", 0.0), HangingTarget("hung", step)
    source = StandInSource()
    copy = ImageCopy(
        Source(source, "r", "v1"), [Target(i, t, "r", "v1") for i, t in enumerate((fast, hung))],  # type: ignore[arg-type]
        MemoryEvents(), asyncio.Event(), dataclasses.replace(TUNING, parallel_blobs=1, preflight_wait_s=0.2),
    )
    copy.tree = Tree(Manifest(OCI_MANIFEST, b"{}", sha256_digest(b"{}"), blobs=tuple(blobs)))
    copy.blobs = blobs

    async def wake_when_fast_is_tagged() -> float:
        while not fast.tagged_at:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        hung.wake.set()
        return asyncio.get_running_loop().time()

    waking = asyncio.ensure_future(wake_when_fast_is_tagged())
    await asyncio.wait_for(copy._copy_to(copy.targets), 30)
    woke = await waking

    expected = {b.digest: ALL_DATA[b.digest] for b in blobs}
    assert fast.received == hung.received == expected
    # The fast target had every blob and its tag while the other still answered nothing.
    assert fast.tagged_at < woke < hung.tagged_at


async def test_blobs_after_every_target_went_its_own_way_still_reach_them() -> None:
    # Both hang at the first blob's check: the later blobs have no target left for a shared read.
    blobs = [BLOB, *MORE]
    first, second = HangingTarget("one", "head_blob"), HangingTarget("two", "head_blob")
    copy = ImageCopy(
        Source(StandInSource(), "r", "v1"), [Target(i, t, "r", "v1") for i, t in enumerate((first, second))],  # type: ignore[arg-type]
        MemoryEvents(), asyncio.Event(), dataclasses.replace(TUNING, parallel_blobs=1, preflight_wait_s=0.2),
    )
    copy.tree = Tree(Manifest(OCI_MANIFEST, b"{}", sha256_digest(b"{}"), blobs=tuple(blobs)))
    copy.blobs = blobs
    asyncio.get_running_loop().call_later(0.5, lambda: (first.wake.set(), second.wake.set()))

    await asyncio.wait_for(copy._copy_to(copy.targets), 30)

    expected = {b.digest: ALL_DATA[b.digest] for b in blobs}
    assert first.received == second.received == expected
    assert first.tagged_at and second.tagged_at


# -- edges ------------------------------------------------------------------------------------------


def _one_blob_copy(targets: list[PacedTarget], events: MemoryEvents | None = None, source: StandInSource | None = None,
                   tuning: Tuning = TUNING) -> ImageCopy:
    copy = ImageCopy(Source(source or StandInSource(), "r", "v1"), [Target(i, t, "r", "v1") for i, t in enumerate(targets)],  # type: ignore[arg-type]
                     events or MemoryEvents(), asyncio.Event(), tuning)
    for t in copy.targets:
        copy._lacking[t.idx] = {BLOB.digest}
        copy._complete[t.idx] = asyncio.Event()
    return copy


class SlowToOpen(PacedTarget):
    def __init__(self, name: str) -> None:
        super().__init__(name, 0.0)
        self.opened: list[str] = []

    async def start_upload(self, repo: str) -> str:
        await asyncio.sleep(0.5)
        self.opened.append(f"/{self.name}/upload")
        return self.opened[-1]


async def test_a_cancel_while_targets_are_waited_for_stops_their_steps() -> None:
    # Else a session opened after the job ended would be recorded where nobody gives it back.
    a, b = SlowToOpen("a"), SlowToOpen("b")
    copy = _one_blob_copy([a, b], tuning=dataclasses.replace(TUNING, preflight_wait_s=5))
    task = asyncio.create_task(copy._copy_blob(BLOB, copy.targets))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.6)
    assert a.opened == b.opened == []


class LostLease(Exception):
    pass


class LosingEvents(MemoryEvents):
    async def save_upload(self, idx: int, digest: str, location: str, offset: int, named: bool = False) -> None:
        raise LostLease()  # what the worker's fenced write raises


async def test_a_failure_opening_sessions_that_is_not_a_registrys_reaches_the_copy() -> None:
    a, b = PacedTarget("a", 0.0), PacedTarget("b", 0.0)
    copy = _one_blob_copy([a, b], LosingEvents())
    with pytest.raises(LostLease):
        await asyncio.wait_for(copy._copy_blob(BLOB, copy.targets), 10)
    assert a.received == b.received == {}


class FailsOnceAtTheEnd(PacedTarget):
    """Takes the blob at its pace, then answers one 503 at the commit of its first try."""

    def __init__(self, name: str, pace: float) -> None:
        super().__init__(name, pace)
        self.tries = 0

    async def finish_upload(self, location: str, repo: str, digest: str, body: AsyncIterator[bytes], length: int = 0) -> None:
        self.tries += 1
        await super().finish_upload(location, repo, digest, body, length)
        if self.tries == 1:
            del self.received[digest]
            raise RegistryError(self.name, "upload", "busy", status=503, transient=True)


class OneSecondBudget(StandInSource):
    policy = RetryPolicy(max_total=1.0, base_delay=0.01)  # stands for 300 s against a longer upload


async def test_an_upload_longer_than_the_retry_budget_is_still_retried_once_it_fails() -> None:
    # The budget counts the time spent failing, not the time the bytes took.
    t = FailsOnceAtTheEnd("t", 0.02)  # about 1.3 s for the blob
    events = MemoryEvents()
    copy = _one_blob_copy([t], events, OneSecondBudget())
    await asyncio.wait_for(copy._copy_blob(BLOB, copy.targets), 30)
    assert t.received == {BLOB.digest: DATA} and t.tries == 2, events.errors


async def test_a_retry_is_not_held_to_the_pace_of_a_target_that_left_the_shared_read() -> None:
    # The fast target fails once on the blob that the other, hanging with its last bytes in its
    # buffer, leaves: its retry, and its later blobs, must not wait for that one.
    fast, hung = FailsOnceAtTheEnd("fast", 0.0), HangingTarget("hung", "last_bytes")
    blobs = [BLOB, *MORE]
    copy = ImageCopy(Source(StandInSource(), "r", "v1"), [Target(i, t, "r", "v1") for i, t in enumerate((fast, hung))],  # type: ignore[arg-type]
                     MemoryEvents(), asyncio.Event(), dataclasses.replace(TUNING, parallel_blobs=1, preflight_wait_s=0.2))
    copy.tree = Tree(Manifest(OCI_MANIFEST, b"{}", sha256_digest(b"{}"), blobs=tuple(blobs)))
    copy.blobs = blobs
    loop = asyncio.get_running_loop()

    async def wake_after_fast_or_6_s() -> float:
        began = loop.time()
        while not fast.tagged_at and loop.time() - began < 6:
            await asyncio.sleep(0.05)
        hung.wake.set()
        return loop.time()

    waking = asyncio.ensure_future(wake_after_fast_or_6_s())
    await asyncio.wait_for(copy._copy_to(copy.targets), 30)
    woke = await waking

    assert fast.received == hung.received == {b.digest: ALL_DATA[b.digest] for b in blobs}
    assert fast.tries == 5 and fast.tagged_at < woke, (fast.tries, fast.tagged_at - woke)


# -- the service's stream slots, across jobs --------------------------------------------------------


class PacedSource(StandInSource):
    """Serves one piece every `pace` seconds: a far or slow source registry."""

    def __init__(self, name: str, pace: float) -> None:
        super().__init__()
        self.name = self.key = self.account = name
        self.pace = pace

    async def open_blob(self, repo: str, digest: str, offset: int = 0, size: int | None = None) -> tuple[StreamedBlob, int]:
        answer, at = await super().open_blob(repo, digest, offset, size)
        answer.pace = self.pace
        return answer, at


def _job(target: PacedTarget, streams: Slots, source: StandInSource | None = None) -> ImageCopy:
    copy = ImageCopy(Source(source or StandInSource(), "r", "v1"), [Target(0, target, "r", "v1")],  # type: ignore[arg-type]
                     MemoryEvents(), asyncio.Event(), TUNING, streams=streams)
    copy._lacking[0] = {BLOB.digest}
    copy._complete[0] = asyncio.Event()
    return copy


async def _held_back_then_another(held: ImageCopy, other: ImageCopy) -> tuple[float, float]:
    """`held` copies the blob in about 2 s through the service's only stream slot; `other` asks
    for it 0.1 s later. When each had the blob."""
    first = asyncio.ensure_future(held._copy_blob(BLOB, held.targets))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(asyncio.gather(first, other._copy_blob(BLOB, other.targets)), 30)
    ends = []
    for copy in (held, other):
        target = copy.targets[0].client
        assert target.received == {BLOB.digest: DATA}  # type: ignore[attr-defined]
        ends.append(target.done_at[BLOB.digest])  # type: ignore[attr-defined]
    return ends[0], ends[1]


async def test_a_read_held_back_by_a_slow_registry_gives_its_stream_slot_to_another_registrys_blob() -> None:
    streams = Slots(1, spare=1)
    held, other = await _held_back_then_another(
        _job(PacedTarget("slow.test", 0.03), streams), _job(PacedTarget("fast.test", 0.0), streams))
    # Given the slot once the slow read had been held back for detach_after_s (0.3 s), not
    # once the slow target had the whole blob.
    assert other < held - 0.8, (other, held)


async def test_a_read_for_a_slow_registry_keeps_its_slot_from_another_read_for_it() -> None:
    # A second read for the same registry would go no faster, and hold memory beside the first.
    streams = Slots(1, spare=1)
    held, other = await _held_back_then_another(
        _job(PacedTarget("slow.test", 0.03), streams), _job(PacedTarget("slow.test", 0.0), streams))
    assert other >= held, (other, held)


async def test_a_read_held_back_by_a_slow_source_gives_its_stream_slot_to_a_blob_from_another() -> None:
    streams = Slots(1, spare=1)
    held, other = await _held_back_then_another(
        _job(PacedTarget("reg.test", 0.0), streams, PacedSource("far.test", 0.03)),
        _job(PacedTarget("reg.test", 0.0), streams))
    assert other < held - 0.8, (other, held)


async def test_a_read_from_a_slow_source_keeps_its_slot_from_another_read_from_it() -> None:
    streams = Slots(1, spare=1)
    held, other = await _held_back_then_another(
        _job(PacedTarget("reg.test", 0.0), streams, PacedSource("far.test", 0.03)),
        _job(PacedTarget("other.test", 0.0), streams, PacedSource("far.test", 0.0)))
    assert other >= held, (other, held)


class HungTarget(PacedTarget):
    """Takes nothing until woken: a registry that stopped answering mid-upload."""

    def __init__(self, name: str) -> None:
        super().__init__(name, 0.0)
        self.wake = asyncio.Event()

    async def finish_upload(self, location: str, repo: str, digest: str, body: AsyncIterator[bytes], length: int = 0) -> None:
        await self.wake.wait()
        await super().finish_upload(location, repo, digest, body, length)


async def test_reads_that_gave_their_slot_way_are_bounded_by_the_allowance(monkeypatch: pytest.MonkeyPatch) -> None:
    # Five jobs to five hung registries, one stream and one read allowed beside it: two buffers
    # are held at most, however many jobs wait.
    pipes: list[Pipe] = []

    class Recorded(Pipe):
        def __init__(self, limit: int) -> None:
            super().__init__(limit)
            pipes.append(self)

    monkeypatch.setattr(transfer, "Pipe", Recorded)
    streams = Slots(1, spare=1)
    targets = [HungTarget(f"hung{i}.test") for i in range(5)]
    jobs = [_job(t, streams) for t in targets]
    copying = asyncio.ensure_future(asyncio.gather(*(j._copy_blob(BLOB, j.targets) for j in jobs)))
    await asyncio.sleep(2)
    held, reading = sum(p.held for p in pipes), sum(1 for p in pipes if p.held)
    for t in targets:
        t.wake.set()
    await asyncio.wait_for(copying, 30)
    assert all(t.received == {BLOB.digest: DATA} for t in targets)
    assert reading == 2 and held <= 2 * TUNING.buffer_size, (reading, held)


# -- uploads another job leads ----------------------------------------------------------------------


class RefusingTarget(PacedTarget):
    """Takes the blob at its pace, then refuses it for good."""

    async def finish_upload(self, location: str, repo: str, digest: str, body: AsyncIterator[bytes], length: int = 0) -> None:
        await super().finish_upload(location, repo, digest, body, length)
        del self.received[digest]
        raise RegistryError(self.name, "upload", "denied", status=403, code="DENIED")


class MountingTarget(PacedTarget):
    def __init__(self, name: str, pace: float, refuses: bool = False) -> None:
        super().__init__(name, pace)
        self.refuses = refuses  # as a registry does where these credentials may not read `from_repo`
        self.asked: list[str] = []
        self.mounted: list[str] = []

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        self.asked.append(from_repo)
        if not self.refuses:
            self.mounted.append(from_repo)
        return not self.refuses


def _leader_and_follower(
    leader: PacedTarget, follower: PacedTarget, source_of_follower: str = "source.test",
    source: type[StandInSource] = StandInSource,
) -> tuple[ImageCopy, ImageCopy]:
    """Two jobs that copy the blob to repositories r1 and r2 of one registry, with the service's
    uploads in flight between them."""
    uploads = InFlight()
    copies = []
    for target, repo, key in ((leader, "r1", StandInSource.key), (follower, "r2", source_of_follower)):
        src = source()
        src.key = key
        copy = ImageCopy(Source(src, "r", "v1"), [Target(0, target, repo, "v1")],  # type: ignore[arg-type]
                         MemoryEvents(), asyncio.Event(), TUNING, uploads=uploads)
        copy._lacking[0] = {BLOB.digest}
        copy._complete[0] = asyncio.Event()
        copies.append(copy)
    return copies[0], copies[1]


async def _two_jobs(leader: PacedTarget, follower: MountingTarget, source_of_follower: str = "source.test",
                    source: type[StandInSource] = StandInSource) -> None:
    """The second job starts while the first sends the blob."""
    first, second = _leader_and_follower(leader, follower, source_of_follower, source)
    leading = asyncio.ensure_future(first._copy_blob(BLOB, first.targets))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(asyncio.gather(leading, second._copy_blob(BLOB, second.targets)), 30)


async def test_a_job_waits_for_another_jobs_upload_to_its_registry_and_mounts_the_blob() -> None:
    leader, follower = PacedTarget("reg.test", 0.01), MountingTarget("reg.test", 0.0)
    await _two_jobs(leader, follower)
    assert leader.received == {BLOB.digest: DATA}
    assert follower.mounted == ["r1"] and follower.received == {}


async def test_a_job_sends_the_blob_itself_when_the_upload_it_waited_for_fails() -> None:
    leader, follower = RefusingTarget("reg.test", 0.01), MountingTarget("reg.test", 0.0)
    await _two_jobs(leader, follower)
    assert follower.mounted == [] and follower.received == {BLOB.digest: DATA}


async def test_a_job_sends_the_blob_itself_when_the_registry_refuses_the_mount() -> None:
    leader, follower = PacedTarget("reg.test", 0.01), MountingTarget("reg.test", 0.0, refuses=True)
    await _two_jobs(leader, follower)
    assert follower.asked == ["r1"] and follower.received == {BLOB.digest: DATA}


async def test_a_job_reading_another_source_does_not_wait_for_an_upload_from_elsewhere() -> None:
    # That upload goes at its own source's pace, which may be far slower.
    leader, follower = PacedTarget("reg.test", 0.01), MountingTarget("reg.test", 0.0)
    await _two_jobs(leader, follower, source_of_follower="elsewhere.test")
    assert follower.mounted == [] and follower.received == {BLOB.digest: DATA}
    assert follower.done_at[BLOB.digest] < leader.done_at[BLOB.digest], (follower.done_at, leader.done_at)


async def test_a_job_with_other_credentials_does_not_wait_for_an_upload_to_its_registry() -> None:
    # They may not read the leader's repository, which it would learn only once the wait was over.
    leader, follower = PacedTarget("reg.test", 0.01), MountingTarget("reg.test", 0.0)
    follower.account = "reg.test another-user"
    await _two_jobs(leader, follower)
    assert follower.asked == [] and follower.received == {BLOB.digest: DATA}
    assert follower.done_at[BLOB.digest] < leader.done_at[BLOB.digest], (follower.done_at, leader.done_at)


@pytest.mark.parametrize("account", ["reg.test", "reg.test another-user"])
async def test_a_target_of_the_same_repository_needs_nothing_once_another_holds_the_blob(account: str) -> None:
    # Other tags of one repository: whatever their credentials, one upload serves both.
    a, b = PacedTarget("reg.test", 0.0), PacedTarget("reg.test", 0.0)
    b.account = account
    copy = ImageCopy(Source(StandInSource(), "r", "v1"), [Target(0, a, "team/app", "v1"), Target(1, b, "team/app", "v2")],  # type: ignore[arg-type]
                     MemoryEvents(), asyncio.Event(), TUNING)
    for t in copy.targets:
        copy._lacking[t.idx] = {BLOB.digest}
        copy._complete[t.idx] = asyncio.Event()
    await asyncio.wait_for(copy._copy_blob(BLOB, copy.targets), 30)
    assert a.received == {BLOB.digest: DATA} and b.received == {}
    assert not copy._lacking[1]


class RefusesToOpen(PacedTarget):
    async def start_upload(self, repo: str) -> str:
        raise RegistryError(self.name, "start upload", "denied", status=403, code="DENIED")


async def test_a_job_is_told_at_once_that_the_upload_it_waits_for_failed() -> None:
    # The leading job's target at that registry is refused at once; its other target takes
    # about 3 s: the waiting job must not wait for that one.
    uploads = InFlight()
    refused, slow = RefusesToOpen("reg.test", 0.0), PacedTarget("slow.test", 0.05)
    first = ImageCopy(Source(StandInSource(), "r", "v1"), [Target(0, refused, "r1", "v1"), Target(1, slow, "r1", "v1")],  # type: ignore[arg-type]
                      MemoryEvents(), asyncio.Event(), TUNING, uploads=uploads)
    follower = MountingTarget("reg.test", 0.0)
    second = ImageCopy(Source(StandInSource(), "r", "v1"), [Target(0, follower, "r2", "v1")],  # type: ignore[arg-type]
                       MemoryEvents(), asyncio.Event(), TUNING, uploads=uploads)
    for copy in (first, second):
        for t in copy.targets:
            copy._lacking[t.idx] = {BLOB.digest}
            copy._complete[t.idx] = asyncio.Event()
    leading = asyncio.ensure_future(first._copy_blob(BLOB, first.targets))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(asyncio.gather(leading, second._copy_blob(BLOB, second.targets)), 30)
    assert follower.received == {BLOB.digest: DATA} and follower.mounted == []
    assert follower.done_at[BLOB.digest] < slow.done_at[BLOB.digest] - 1.5, (follower.done_at, slow.done_at)


class QuickRetrySource(StandInSource):
    policy = RetryPolicy(base_delay=0.01)


async def test_a_job_waits_out_the_retry_of_the_upload_it_follows() -> None:
    # The leading job's commit meets one 503; its retry lands: the other job mounts the blob
    # then, instead of sending the registry a copy of its own.
    leader, follower = FailsOnceAtTheEnd("reg.test", 0.01), MountingTarget("reg.test", 0.0)
    await _two_jobs(leader, follower, source=QuickRetrySource)
    assert leader.received == {BLOB.digest: DATA} and leader.tries == 2
    assert follower.mounted == ["r1"] and follower.received == {}


async def test_a_job_whose_target_fails_meanwhile_waits_no_more_for_the_upload_it_follows() -> None:
    leader, follower = PacedTarget("reg.test", 0.03), MountingTarget("reg.test", 0.0)  # ~2 s upload
    first, second = _leader_and_follower(leader, follower)
    loop = asyncio.get_running_loop()
    leading = asyncio.ensure_future(first._copy_blob(BLOB, first.targets))
    await asyncio.sleep(0.1)
    following = asyncio.ensure_future(second._copy_blob(BLOB, second.targets))
    await asyncio.sleep(0.2)
    failed_at = loop.time()
    await second._fail(second.targets[0], RegistryError("reg.test", "push manifest", "denied", status=403))
    await asyncio.wait_for(following, 30)
    assert loop.time() - failed_at < 0.5 and follower.mounted == []
    await leading
