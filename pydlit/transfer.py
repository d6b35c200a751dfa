"""Copy one image from a source to many targets: plan the tree, decide per target, fan each blob
out from a single source read, checkpoint every acknowledged chunk, push manifests last.

Knows nothing of HTTP handlers or the job store: progress and checkpoints go through `Events`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp

from .inflight import InFlight, Upload, may_link
from .metrics import DOWNLOADED, UPLOADED
from .pipe import Pipe, PipeClosed
from .referrers import DigestTag, ReferrerPusher, Referrers, find_digest_tags, find_referrers, tag_names
from .registry.client import RegistryClient, RegistryError, broken_stream, out_of_budget, retrying
from .registry.manifests import DIGEST, Blob, Manifest, Tree, digest_matches
from .registry.trees import push_levels, read_tree
from .slots import Slot, Slots

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_IDLE_CHECK_S = 0.1  # how often a read held up by one full buffer looks again whether the others sit idle
_GIVE_WAY_CHECK_S = 0.25  # how often a read holding a stream slot looks whether it should give it away
_GIVE_BACK_S = 2.0  # how long a cancelled copy spends giving its unused upload sessions back


@dataclass(frozen=True)
class Tuning:
    chunk_size: int = 16 * MiB  # one PATCH, one checkpoint; what a crash inside a chunk can cost
    piece_size: int = 1 * MiB  # one read from the source
    # A blob up to this size is read whole and checked before any target sees it, then sent in
    # one POST and one PUT per target: none of the streaming machinery, no digest-mismatch round.
    whole_blob_max: int = 1 * MiB
    # Memory per job is about parallel_blobs x targets x buffer_size: 4 x 8 MiB keeps a 512 MiB
    # copy to 3 targets under 150 MiB RSS, and 4 layers in flight leave no lone last layer at the end.
    buffer_size: int = 8 * MiB  # how far a slow target may lag behind the fastest, per blob
    parallel_blobs: int = 4
    # Streamed blobs in flight across every job of a service: what bounds its memory, at about
    # max_streams x targets x buffer_size, whatever the job concurrency. A read held back by its
    # source or its targets (see detach_after_s) gives its slot to a blob for other registries
    # that waits for one, and goes on beside the limit (as many again at most: the worker's
    # allowance), its buffers lowered to two pieces as they drain.
    max_streams: int = 8
    parallel_manifests: int = 8
    mount_candidates: int = 3
    preflight_wait_s: float = 3.0  # how long targets wait for each other before the shared read
    # A target that has held the shared read back while another target sat idle this long, and
    # for over three quarters of the read, takes the rest of that blob from a read of its own:
    # the others go on at their own pace, at the cost of reading that part of the source again.
    # So long held back by its source or its targets, a read gives its stream slot away (see
    # max_streams).
    # 0: never.
    detach_after_s: float = 2.0


class Stopped(Exception):
    """The job is stopping (the service is, or a user cancelled it); every upload in flight was
    checkpointed at a chunk boundary."""


class SourceError(Exception):
    """The source image cannot be read: the whole job fails with this reason."""


class DigestMismatch(Exception):
    pass


class Events(Protocol):
    """How a copy reports progress and persists what a restart needs to resume."""

    async def target_state(self, idx: int, state: str, error: str | None = None) -> None: ...

    def set_total(self, idx: int, total: int) -> None: ...

    def blob_progress(self, idx: int, digest: str, done: int) -> None: ...

    uploads: dict[tuple[int, str], tuple[str, int]]  # (target, digest) -> checkpointed (Location, offset)

    def saved_upload(self, idx: int, digest: str) -> tuple[str, int] | None: ...

    async def save_upload(self, idx: int, digest: str, location: str, offset: int, named: bool = False) -> None: ...

    async def drop_upload(self, idx: int, digest: str) -> None: ...

    async def mount_sources(self, registry: str, digest: str) -> list[str]: ...

    async def remember_blob(self, registry: str, repo: str, digest: str) -> None: ...

    def retrying(self, idx: int, error: str) -> None: ...


class MemoryEvents:
    """Events kept in dicts for the copy's length: what `pydlit copy` uses as is, and what the
    worker's JobEvents builds on to persist (a copy run only in memory starts over next time)."""

    def __init__(self, uploads: dict[tuple[int, str], tuple[str, int]] | None = None) -> None:
        self.states: dict[int, str] = {}
        self.errors: dict[int, str | None] = {}
        self.totals: dict[int, int] = {}
        self.blobs: dict[int, dict[str, int]] = {}
        self.uploads: dict[tuple[int, str], tuple[str, int]] = uploads if uploads is not None else {}
        self.mounts: dict[tuple[str, str], list[str]] = {}  # (registry, digest) -> repositories
        self.retries: dict[int, str] = {}  # the last failure each target's copy is retrying

    def done(self, idx: int) -> int:
        """Bytes a target holds so far."""
        return sum(self.blobs.get(idx, {}).values())

    async def target_state(self, idx: int, state: str, error: str | None = None) -> None:
        self.states[idx] = state
        self.errors[idx] = error

    def set_total(self, idx: int, total: int) -> None:
        self.totals[idx] = total

    def blob_progress(self, idx: int, digest: str, done: int) -> None:
        self.blobs.setdefault(idx, {})[digest] = done

    def saved_upload(self, idx: int, digest: str) -> tuple[str, int] | None:
        return self.uploads.get((idx, digest))

    async def save_upload(self, idx: int, digest: str, location: str, offset: int, named: bool = False) -> None:
        self.uploads[(idx, digest)] = (location, offset)  # `named`: the client that saved it trusts it

    async def drop_upload(self, idx: int, digest: str) -> None:
        self.uploads.pop((idx, digest), None)

    async def mount_sources(self, registry: str, digest: str) -> list[str]:
        # A copy: the engine puts its own candidates in front.
        return list(self.mounts.get((registry, digest), []))

    async def remember_blob(self, registry: str, repo: str, digest: str) -> None:
        repos = self.mounts.setdefault((registry, digest), [])
        if repo not in repos:
            repos.append(repo)

    def retrying(self, idx: int, error: str) -> None:
        self.retries[idx] = error


@dataclass
class Source:
    client: RegistryClient
    repo: str
    ref: str


@dataclass(eq=False)  # one per target of a job: compared and hashed as itself
class Target:
    idx: int
    client: RegistryClient
    repo: str
    ref: str
    overwrite: bool = False
    failed: bool = False
    fresh: bool = False  # the registry had no repository of this name when the copy began
    current: bool = False  # the tag already holds the image: only its referrers are copied
    held: set[str] = field(default_factory=set)  # digests (blobs, manifests) known to be there already
    # It left a shared read, too slow for the others: its later blobs come from reads of its own.
    slow: bool = False


@dataclass
class _Sink:
    """One target's upload session for one blob."""

    target: Target
    location: str | None = None
    offset: int = 0
    start: int = 0  # the offset this sink's pipe begins at
    error: BaseException | None = None
    pipe: Pipe | None = None
    done: bool = False
    monolithic: bool = False  # the registry refused PATCH: one PUT with the whole blob
    verified: asyncio.Future[bool] | None = None  # the verdict on the bytes this sink was fed
    held_back: float = 0.0  # how long another sink sat idle, waiting for the read this sink held up
    detached: bool = False  # it left the shared read and reads the rest on its own


@dataclass
class _Read:
    """One read of a blob from the source."""

    began: float
    slot: Slot | None = None  # the service's stream slot it holds, if any


class ImageCopy:
    """One job's copy of one image to its targets."""

    def __init__(
        self, source: Source, targets: list[Target], events: Events, stop: asyncio.Event, tuning: Tuning = Tuning(),
        first_attempt: bool = True, streams: Slots | None = None, referrers: bool = False,
        uploads: InFlight | None = None,
    ) -> None:
        self.source = source
        self.targets = targets
        self.events = events
        self.stop = stop
        self.tuning = tuning
        self.first_attempt = first_attempt
        # A service passes the one all its jobs share; a copy on its own is bounded by parallel_blobs.
        self.streams = streams or Slots(tuning.parallel_blobs)
        # The service's uploads in flight, which this copy's targets may follow (see _send_led);
        # and what to tell of those this copy leads, by target and digest.
        self.uploads = uploads or InFlight()
        self._leads: dict[tuple[int, str], Callable[[bool], None]] = {}
        self._kept: dict[int, list[str]] = {}  # per target, why each session it gave back is still held
        self._pushed: set[tuple[str, str, str]] = set()  # child manifests in place: (registry, repository, digest)
        self.tree: Tree | None = None
        self.with_referrers = referrers
        self.referrers: list[Referrers] = []  # found at the source
        self.digest_tags: list[DigestTag] = []
        self.blobs: list[Blob] = []  # the image's and those of what is attached to it, each once
        # Per target: the blobs it still lacks, and what wakes its manifest push (see _copy_to).
        self._lacking: dict[int, set[str]] = {}
        self._complete: dict[int, asyncio.Event] = {}
        # A slow target's reads of its own, at most parallel_blobs at once.
        self._alone = {t.idx: asyncio.Semaphore(tuning.parallel_blobs) for t in targets}
        # Told whenever a target gets a blob or fails: what targets waiting to link a blob from
        # another target of their registry wait on.
        self._settled = asyncio.Condition()
        # Requests carrying a blob's bytes by chunks, each with its checkpoint: what a stop
        # waits for (see run).
        self._carrying = 0
        self._unloaded = asyncio.Event()
        self._unloaded.set()

    async def run(self) -> None:
        """Copy the image. A stop (a shutdown, a user's cancel) ends the copy with Stopped as soon
        as no chunk is on its way: every upload session then stands at a checkpointed chunk
        boundary, which a restart resumes and which a registry can delete. Distribution can do
        neither with a session whose chunk was cut. Nothing else is waited for: not a retry's
        sleep, nor a registry that does not answer."""
        work = asyncio.ensure_future(self._run())
        halt = asyncio.ensure_future(self._halt())
        try:
            await asyncio.wait([work, halt], return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.cancel()
            work.cancel()
            await _join([work, halt])
            for t in self.targets:  # never reached (a stop, a failure): nobody waits for them
                self._end_leads(t)
        if work.cancelled():
            raise Stopped()
        work.result()

    async def give_back(self, within: float) -> dict[int, list[str]]:
        """Give the registries back the upload sessions the copy still holds, once it has ended
        (no later attempt resumes them): all at once, for `within` seconds at most. Per target,
        why each session the copy gave back (now or earlier) is still held: a registry's
        refusal, no answer in time."""
        asks = {asyncio.ensure_future(self._cancel(self.targets[idx], location)): idx
                for (idx, _), (location, _) in list(self.events.uploads.items())}
        if asks:
            try:
                await asyncio.wait(asks, timeout=within)
            finally:
                for ask in asks:
                    ask.cancel()
                await _join(list(asks))
            for ask, idx in asks.items():
                if ask.cancelled():
                    self._kept.setdefault(idx, []).append(f"no answer within {within:g} s")
        return self._kept

    async def _cancel(self, t: Target, location: str) -> None:
        """Give one upload session back; a refusal is kept for give_back to report."""
        try:
            refused = await t.client.cancel_upload(location, t.repo)
        except (RuntimeError, OSError, aiohttp.ClientError) as exc:  # the session closed at shutdown
            refused = exc
        if refused is not None:
            self._kept.setdefault(t.idx, []).append(str(refused) or type(refused).__name__)

    async def _halt(self) -> None:
        await self.stop.wait()
        await self._unloaded.wait()

    @contextlib.contextmanager
    def _carry(self) -> Iterator[None]:
        """Around a request that carries a blob's bytes and its checkpoint; none starts once the
        copy is stopping."""
        self._check_stop()
        self._carrying += 1
        self._unloaded.clear()
        try:
            yield
        finally:
            self._carrying -= 1
            if not self._carrying:
                self._unloaded.set()

    async def _run(self) -> None:
        self._lead_resumed()
        # The targets' tags are looked up while the source tree is read: one round trip less.
        heads = [asyncio.create_task(self._head_tag(t)) for t in self.targets]
        src = self.source
        # So are the source's tags, which tell what is attached to the image.
        tags = asyncio.create_task(tag_names(src.client, src.repo)) if self.with_referrers else None
        checks: dict[asyncio.Task[bool], Target] = {}
        try:
            try:
                self.tree = await read_tree(src.client, src.repo, src.ref)
                if tags is not None:
                    await self._find_attached(await tags)
                found = [*self.tree.blobs, *(b for t in self._attached_trees() for b in t.blobs)]
                self.blobs = await self._held_at_source(list({b.digest: b for b in found}.values()))
            except RegistryError as exc:
                raise SourceError(str(exc)) from None
            needed = {b.digest for b in self.blobs}
            for idx, digest in [k for k in self._leads if k[1] not in needed]:  # the tag moved meanwhile
                self._end_lead(self.targets[idx], digest, False)
            total = sum(b.size for b in self.blobs)
            for t in self.targets:
                self.events.set_total(t.idx, total)
            checks = {asyncio.create_task(self._preflight(t, head)): t for t, head in zip(self.targets, heads, strict=True)}
            # Targets that answer promptly share one read of the source; one slow to answer
            # (retrying, unreachable) must not hold them back, so it gets a read of its own later.
            done, pending = await asyncio.wait(checks, timeout=self.tuning.preflight_wait_s)
            # In the request's order: the first target on a registry is the one its others link from.
            ready = sorted((checks[task] for task in done if task.result()), key=lambda t: t.idx)
            for task in done:
                if not task.result():  # finished, skipped or failed: it sends nothing
                    self._end_leads(checks[task])
            groups = [self._copy_to(ready)] if ready else []
            groups += [self._copy_late(task, checks[task]) for task in pending]
            await _gather_all(groups)
        finally:
            for task in [*heads, *checks, *([tags] if tags else [])]:
                task.cancel()

    async def _find_attached(self, tags: set[str] | None) -> None:
        """The image's referrers, and the digest tags of its manifests and theirs."""
        assert self.tree is not None
        src = self.source
        self.referrers = await find_referrers(src.client, src.repo, self.tree, tags)
        named = [m.digest for t in [self.tree, *self._referrer_trees()] for m in (t.top, *t.children)]
        self.digest_tags = await find_digest_tags(src.client, src.repo, named, tags)

    async def _held_at_source(self, blobs: list[Blob]) -> list[Blob]:
        """The blobs to copy: a layer that names URLs is left to them when the source lacks it
        (the registry need not hold it), and copied when it has it, so the target does too."""
        src = self.source
        doubtful = [b for b in blobs if b.maybe_elsewhere]
        held = await asyncio.gather(*(src.client.head_blob(src.repo, b.digest) for b in doubtful))
        absent = {b.digest for b, there in zip(doubtful, held) if not there}
        for digest in absent:
            log.info("layer %s is not at the source but at its URLs: left to them", digest)
        return [b for b in blobs if b.digest not in absent]

    async def _copy_late(self, check: asyncio.Task[bool], target: Target) -> None:
        if await check:
            await self._copy_to([target])
        else:
            self._end_leads(target)

    async def _copy_to(self, targets: list[Target]) -> None:
        """Every blob to every target; each target's manifests as soon as it holds all its blobs,
        so that a fast target is finished while a slow one is still uploading."""
        assert self.tree is not None
        blobs = sorted(self.blobs, key=lambda b: -b.size)
        sem = Slots(self.tuning.parallel_blobs)
        for t in targets:
            self._lacking[t.idx] = {b.digest for b in blobs}
            self._complete[t.idx] = asyncio.Event()
            if not blobs:
                self._complete[t.idx].set()

        async def one(blob: Blob) -> None:
            async with sem.take() as slot:
                self._check_stop()
                live = [t for t in targets if not t.failed]
                await _gather_all([
                    self._copy_blob(blob, [t for t in live if not t.slow], slot.release),
                    *(self._on_its_own(t, blob) for t in live if t.slow),
                ])

        async def every_blob() -> None:
            try:
                await _gather_all(one(b) for b in blobs)
            finally:
                for t in targets:  # also wakes the targets left incomplete by a stop or a failure
                    self._complete[t.idx].set()

        async def manifests(t: Target) -> None:
            await self._complete[t.idx].wait()
            if not t.failed and not self._lacking[t.idx]:
                await self._push_manifests(t)

        await _gather_all([every_blob(), *(manifests(t) for t in targets)])

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    async def _on_its_own(self, t: Target, blob: Blob) -> None:
        """A blob for a target too slow to share reads: read for it alone, a few at a time."""
        async with self._alone[t.idx]:
            self._check_stop()
            if not t.failed:
                await self._copy_blob(blob, [t], alone=True)

    async def _fail(self, target: Target, error: BaseException) -> None:
        if not target.failed:
            target.failed = True
            self._end_leads(target)
            if target.idx in self._complete:
                self._complete[target.idx].set()
            async with self._settled:
                self._settled.notify_all()
            log.warning("target %s/%s failed: %s", target.client.name, target.repo, error)
            await self.events.target_state(target.idx, "FAILED", str(error))

    async def _head_tag(self, t: Target) -> str | None | RegistryError:
        # A repository the registry does not know has no blob to find: one request saves a HEAD
        # per blob. Only on a first attempt: distribution counts a repository with blobs but no
        # tag as unknown, and that is what an interrupted attempt leaves. Asked beside the tag,
        # not after it: a round trip less for a new repository, and for one that turns out to
        # hold the tag, a request the service makes once (a known repository is not asked again).
        probe = asyncio.create_task(t.client.repository_known(t.repo)) if self.first_attempt else None
        try:
            current = await t.client.head_manifest(t.repo, t.ref)
            if probe is not None:
                known = await probe
                t.fresh = current is None and not known
            return current
        except RegistryError as exc:
            return exc
        finally:
            if probe is not None and not probe.done():
                probe.cancel()

    async def _preflight(self, t: Target, head: asyncio.Task[str | None | RegistryError]) -> bool:
        """Finished, skipped, or to copy: decided by what the target's tag holds now."""
        assert self.tree is not None
        current = await head
        if isinstance(current, RegistryError):
            await self._fail(t, current)
            return False
        if DIGEST.fullmatch(t.ref) and not digest_matches(t.ref, self.tree.top.data):
            # Known before any blob goes: the registry would refuse the manifest at the end.
            await self._fail(t, RegistryError(
                t.client.name, f"push manifest {t.repo}@{t.ref}",
                f"the source image is {self.tree.top.digest}: a manifest is pushed under its own digest only "
                "(name a tag, or no ref)",
            ))
            return False
        if current == self.tree.top.digest:
            copied = {b.digest for b in self.blobs}  # a layer left to its URLs is not counted
            for b in self.tree.blobs:
                if b.digest in copied:
                    self.events.blob_progress(t.idx, b.digest, b.size)
            # One with a subject goes on to be listed under it, should an earlier run have ended first.
            if not self._attached_trees() and self.tree.top.subject is None:
                await self.events.target_state(t.idx, "FINISHED")
                return False
            t.current = True
            t.held.update(b.digest for b in self.tree.blobs)
            try:
                await self._held_attachments(t)
            except RegistryError as exc:
                await self._fail(t, exc)
                return False
        elif current is not None and not t.overwrite:
            await self.events.target_state(
                t.idx, "SKIPPED", f"{t.repo}:{t.ref} already exists with digest {current} and overwrite is false"
            )
            return False
        await self.events.target_state(t.idx, "RUNNING")
        return True

    async def _held_attachments(self, t: Target) -> None:
        """The referrers and digest tags a target holds already, and so their blobs: a manifest
        is only taken once every blob it names is there."""
        sem = asyncio.Semaphore(self.tuning.parallel_manifests)

        async def held(tree: Tree) -> None:
            async with sem:
                if await t.client.head_manifest(t.repo, tree.top.digest) == tree.top.digest:
                    t.held.update(m.digest for m in (tree.top, *tree.children))
                    t.held.update(b.digest for b in tree.blobs)

        await _gather_all(held(tree) for tree in self._attached_trees())

    def _referrer_trees(self) -> list[Tree]:
        return [tree for r in self.referrers for tree in r.trees]

    def _attached_trees(self) -> list[Tree]:
        """What goes with the image beside its own manifests: referrers and digest tags."""
        return [*self._referrer_trees(), *(dt.tree for dt in self.digest_tags)]

    async def _push_manifests(self, t: Target) -> None:
        assert self.tree is not None
        sem = asyncio.Semaphore(self.tuning.parallel_manifests)

        async def child(m: Manifest) -> None:
            async with sem:
                where = (t.client.key, t.repo, m.digest)
                if where in self._pushed:  # by another target of the job, into this repository
                    return
                if t.fresh or await t.client.head_manifest(t.repo, m.digest) != m.digest:
                    await t.client.put_manifest(t.repo, m.digest, m)
                self._pushed.add(where)

        top = self.tree.top
        try:
            async with self.uploads.pushing_manifests(t.client.key, t.repo):
                if not t.current:
                    for level in push_levels(self.tree):
                        await _gather_all(child(m) for m in level)
                attached = bool(self._attached_trees())
                pusher = ReferrerPusher(t.client, t.repo, t.held)
                indexed = None  # the subject the registry says it listed the image under
                if attached:
                    if not t.current:
                        indexed = await t.client.put_manifest(t.repo, top.digest, top)  # their subject, before them
                    await pusher.push(self.referrers)
                    await pusher.push_tags(self.digest_tags, t.overwrite)
                if not t.current and not (attached and t.ref == top.digest):
                    indexed = await t.client.put_manifest(t.repo, t.ref, top)
                if top.subject is not None and indexed != top.subject:
                    await pusher.list_itself(top, pushed=not t.current)  # the image is itself a referrer: a signature copied alone
        except RegistryError as exc:
            await self._fail(t, exc)
            return
        await self.events.target_state(t.idx, "FINISHED")

    # -- blobs ----------------------------------------------------------------------------------

    async def _copy_blob(
        self, blob: Blob, targets: list[Target], shared_done: Callable[[], None] | None = None, alone: bool = False,
    ) -> None:
        """`shared_done` is called once the blob's shared read is over, while targets that left
        it may still be uploading; `alone`: the read is for one slow target. A target that does
        not answer in time (a hung registry) gets the blob later, on its own."""
        checks = self._checks(blob, targets)
        late: list[Target] = []
        try:
            prompt = await self._in_time(checks, blob)
            late = [t for t in targets if t not in prompt]
            need = [t for t in prompt if not checks[t].result() and not t.failed]
            late += await self._send_once_per_registry(blob, need, shared_done, alone)
        finally:
            if shared_done is not None:
                shared_done()
        await _gather_all(self._on_its_own(t, blob) for t in late)

    async def _in_time(self, steps: dict[Target, asyncio.Future[Any]], blob: Blob) -> list[Target]:
        """The targets whose step for this blob ended within preflight_wait_s, every one when it is
        one target's alone. The others' steps are given up: slow, they get this blob and their
        later ones from reads of their own, instead of keeping the others from theirs."""
        if not steps:
            return []  # every target has failed, or gets its blobs on its own
        try:
            await asyncio.wait(steps.values(), timeout=self.tuning.preflight_wait_s if len(steps) > 1 else None)
        except BaseException:
            # Cancelled (a DELETE, a stop): the steps go too, before a session they open is
            # recorded where nobody gives it back.
            for step in steps.values():
                step.cancel()
            await _join(list(steps.values()))
            raise
        late = [t for t, step in steps.items() if not step.done()]
        for t in late:
            steps[t].cancel()
            t.slow = True
            self._end_lead(t, blob.digest, False)  # it gets the blob later, on its own
            log.info("%s did not answer within %g s: it gets %s, and its later blobs, on its own",
                     t.client.name, self.tuning.preflight_wait_s, blob.digest[:19])
        await _join([steps[t] for t in late])
        return [t for t in steps if t not in late]

    async def _send_once_per_registry(
        self, blob: Blob, need: list[Target], shared_done: Callable[[], None] | None, alone: bool,
    ) -> list[Target]:
        """Send the blob to the targets that need it; the targets too late to send to now."""
        # A registry takes the bytes once: its other targets wait for them, then link them (a
        # mount, or nothing in the same repository) instead of uploading them again.
        first, later = self._one_per_registry(blob, need)
        if not later:
            return await self._send_led(blob, first, shared_done, alone)

        async def send_first() -> list[Target]:
            try:
                return await self._send_led(blob, first, shared_done, alone)
            finally:
                async with self._settled:
                    self._settled.notify_all()

        sending = asyncio.ensure_future(send_first())
        try:
            linked = await asyncio.gather(*(self._link_from(t, blob, first, sending) for t in later))
        except asyncio.CancelledError:
            sending.cancel()
            raise
        finally:
            await _join([sending])
        unlinked = [t for t, ok in zip(later, linked, strict=True) if not ok and not t.failed]
        return [*sending.result(), *await self._send(blob, unlinked, alone=alone)]

    async def _send_led(
        self, blob: Blob, targets: list[Target], shared_done: Callable[[], None] | None, alone: bool,
    ) -> list[Target]:
        """Send the blob to targets of distinct registries, save those another job is already
        sending it to from this source: they wait for that upload and mount the blob from it."""
        src = self.source.client.key
        following: dict[Target, Upload] = {}
        for t in targets:
            # A session to resume holds bytes already: worth more than another job's upload.
            up = None if self._resumable(t, blob) else self.uploads.leader(t.client.key, blob.digest, src, t.client.account, t.repo)
            if up is not None:
                following[t] = up
        leading = [t for t in targets if t not in following]
        for t in leading:
            if (t.idx, blob.digest) not in self._leads:  # a session to resume leads from the start (see _lead_resumed)
                self._leads[(t.idx, blob.digest)] = self.uploads.lead(t.client.key, blob.digest, t.repo, src, t.client.account)
        try:
            if not following:
                return await self._send(blob, leading, shared_done, alone)
            steps = [
                asyncio.ensure_future(self._send(blob, leading, shared_done, alone)),
                *(asyncio.ensure_future(self._follow(t, blob, up, alone)) for t, up in following.items()),
            ]
            await _gather_all(steps)
            return [t for step in steps for t in step.result()]
        finally:
            # Most were told as soon as their target had the blob, failed, fell behind, or met
            # an error it will not retry.
            for t in leading:
                self._end_lead(t, blob.digest, False)

    def _lead_resumed(self) -> None:
        """Announce the uploads this run resumes before it reads anything: a job that starts with
        it (both requeued by a stop) then waits for them instead of sending those blobs afresh."""
        src = self.source.client.key
        for idx, digest in self.events.uploads:
            t = self.targets[idx]
            self._leads[(idx, digest)] = self.uploads.lead(t.client.key, digest, t.repo, src, t.client.account)

    def _end_leads(self, t: Target) -> None:
        """t sends none of the blobs it led: the jobs waiting for them are told."""
        for _, digest in [k for k in self._leads if k[0] == t.idx]:
            self._end_lead(t, digest, False)

    def _end_lead(self, t: Target, digest: str, landed: bool) -> None:
        """Tell the jobs waiting for t's upload of the blob whether it is there now."""
        end = self._leads.pop((t.idx, digest), None)
        if end is not None:
            end(landed)

    async def _follow(self, t: Target, blob: Blob, up: Upload, alone: bool) -> list[Target]:
        """Once another job's upload of the blob to t's registry has landed, mount it from there.
        Should that upload fail, or the registry refuse the mount, the blob is sent after all;
        an error answering the mount fails the target, as any step's does."""
        landing = asyncio.shield(up.landed)
        # Woken too should the target fail meanwhile, on another blob: then it waits no more.
        failing = asyncio.ensure_future(self._complete[t.idx].wait())
        try:
            await asyncio.wait([landing, failing], return_when=asyncio.FIRST_COMPLETED)
        finally:
            landing.cancel()
            failing.cancel()
        if t.failed:
            return []
        if up.landed.done() and up.landed.result() and await self._linked(t, blob, up.repo):
            log.info("%s at %s: linked from %s, where another job had just uploaded it", blob.digest[:19],
                     t.client.name, up.repo)
            return []
        if t.failed:
            return []  # the registry's answer to the mount
        self._check_stop()  # that upload may have ended for the same stop
        return await self._send_led(blob, [t], None, alone)

    def _one_per_registry(self, blob: Blob, need: list[Target]) -> tuple[list[Target], list[Target]]:
        """The targets that get the blob's bytes, and those that wait to link it from one of them."""
        first: list[Target] = []
        later: list[Target] = []
        for t in need:
            # A session to resume is worth more than what another target's upload would spare.
            if any(_may_link(f, t) for f in first) and not self._resumable(t, blob):
                later.append(t)
            else:
                first.append(t)
        return first, later

    async def _link_from(self, t: Target, blob: Blob, first: list[Target], sending: asyncio.Future[None]) -> bool:
        """Whether `t` now holds the blob, linked from the target of its registry that takes it,
        as soon as that one has it: not held to the pace of the other registries' uploads."""
        peer = next(f for f in first if _may_link(f, t))
        async with self._settled:
            await self._settled.wait_for(lambda: blob.digest not in self._lacking[peer.idx] or peer.failed or sending.done())
        if blob.digest in self._lacking[peer.idx]:
            return False  # it failed there: `t` gets the bytes itself
        return await self._linked(t, blob, peer.repo)

    async def _linked(self, t: Target, blob: Blob, repo: str) -> bool:
        """Whether `t` now holds the blob, linked from `repo` of its registry, which holds it:
        mounted, or there already when it is t's own. An error answering fails `t`."""
        try:
            # Other credentials may not read that repository: the mount is then refused.
            if repo == t.repo or await t.client.mount_blob(t.repo, blob.digest, repo):
                await self._blob_done(t, blob)
                return True
        except RegistryError as exc:
            await self._fail(t, exc)
        return False

    async def _send(
        self, blob: Blob, need: list[Target], shared_done: Callable[[], None] | None = None, alone: bool = False,
    ) -> list[Target]:
        """Copy the blob to the targets; those too late to open an upload session are returned."""
        if not need:
            return []
        if blob.size <= min(self.tuning.whole_blob_max, self.tuning.chunk_size):
            return await self._copy_whole(blob, need)
        if alone:
            # Outside the service's streams: paced by one slow target, through a small buffer.
            return await self._copy_streamed(blob, need, buffer_size=self._small_buffer)
        return await self._copy_streamed(blob, need, shared_done, streams=self.streams)

    @property
    def _small_buffer(self) -> int:
        """A read's buffer per target outside the service's streams."""
        return min(self.tuning.buffer_size, 2 * self.tuning.piece_size)

    async def _copy_streamed(
        self, blob: Blob, need: list[Target], shared_done: Callable[[], None] | None = None, buffer_size: int | None = None,
        streams: Slots | None = None,
    ) -> list[Target]:
        """`streams`: whose slot each round's shared read takes (None: a read outside them)."""
        sinks = [_Sink(t) for t in need]
        # The uploads of sinks that left a shared read, which go on beside the retries of the
        # others and are joined here at the end.
        handed: list[asyncio.Future[None]] = []
        try:
            late = await self._rounds(blob, sinks, shared_done, buffer_size, streams, handed)
            if not handed:
                return late
            if shared_done is not None:
                shared_done()  # every other sink is settled: the job's blob slot goes
            await _gather_all(handed)
        except Stopped:
            await _join(handed)  # they stop at their own next chunk boundary
            raise
        except BaseException:
            for f in handed:
                f.cancel()
            await _join(handed)
            raise
        for s in sinks:
            if s.detached and not s.done and not s.target.failed:
                if s.error is None or _retryable(s.error):
                    late.append(s.target)  # tried again on its own, as its later blobs are
                else:
                    await self._fail(s.target, s.error)
        return late

    async def _rounds(
        self, blob: Blob, sinks: list[_Sink], shared_done: Callable[[], None] | None, buffer_size: int | None,
        streams: Slots | None, handed: list[asyncio.Future[None]],
    ) -> list[Target]:
        policy = self.source.client.policy
        mismatches = 0
        # The budget counts the time spent failing, not sending: it starts at the first failed
        # round, and again after a round that moved bytes (a long upload may fail once, late).
        failing_since: float | None = None
        late: list[Target] = []
        for attempt in range(1, policy.attempts + 1):
            opening = {s.target: asyncio.ensure_future(self._open_session(s, blob)) for s in sinks}
            if attempt == 1:
                prompt = await self._in_time(opening, blob)
                late = [s.target for s in sinks if s.target not in prompt]
                sinks = [s for s in sinks if s.target in prompt]
            await asyncio.gather(*(opening[s.target] for s in sinks))  # what they raised beyond a RegistryError
            live = [s for s in sinks if s.error is None]
            for s in sinks:
                if s.error is not None and not _retryable(s.error):  # it fails: nobody waits for it
                    self._end_lead(s.target, blob.digest, False)
            held = sum(s.offset for s in live)
            try:
                if live:
                    await self._fan_out(blob, live, shared_done, buffer_size or self.tuning.buffer_size, streams, handed)
            except DigestMismatch:
                mismatches += 1
                if mismatches >= 2:
                    err = self._read_twice_wrong(blob)
                    for s in sinks:
                        if not s.done and not s.detached:  # one that left reads and checks on its own
                            await self._fail(s.target, err)
                    return late
            retry = []
            for s in sinks:
                if s.done or s.target.failed or s.detached:
                    continue
                if s.error is None or _retryable(s.error):
                    retry.append(s)
                else:
                    await self._fail(s.target, s.error)
            if not retry:
                return late
            sinks = retry
            self._check_stop()
            if attempt == policy.attempts:
                break
            # A registry that said when to come back (429 Retry-After) is obeyed, within the
            # step's time budget; one that asks for longer fails its target now.
            now = asyncio.get_running_loop().time()
            if failing_since is None or sum(s.offset for s in live) > held:
                failing_since = now
            elapsed = now - failing_since
            if elapsed >= policy.max_total:
                break  # the blob's budget is spent, whatever its steps' own retries took of it
            waiting = []
            for s in sinks:
                refused = out_of_budget(policy, s.error, elapsed) if isinstance(s.error, RegistryError) else None
                if refused is not None:
                    await self._fail(s.target, refused)
                else:
                    waiting.append(s)
            sinks = waiting
            if not sinks:
                return late
            waits = [s.error.retry_after for s in sinks if isinstance(s.error, RegistryError) and s.error.retry_after is not None]
            for s in sinks:
                log.info("blob %s to %s: attempt %d failed (%s), retrying", blob.digest[:19], s.target.client.name, attempt, s.error)
                self.events.retrying(s.target.idx, str(s.error))
                s.error = None
            await asyncio.sleep(policy.delay(attempt, max(waits) if waits else None, elapsed))
        # Out of attempts: only the sinks of the last round are still unfinished.
        for s in sinks:
            await self._fail(s.target, s.error or RegistryError(s.target.client.name, "upload", "gave up"))
        return late

    def _read_twice_wrong(self, blob: Blob) -> SourceError:
        return SourceError(
            f"{self.source.client.name}: source blob {blob.digest} does not match its digest (read twice); "
            "nothing was committed"
        )

    async def _copy_whole(self, blob: Blob, targets: list[Target]) -> list[Target]:
        # Each target's upload session opens while the source is read: a round trip less per blob.
        sessions = {t.idx: _unwatched(asyncio.create_task(t.client.start_upload(t.repo))) for t in targets}
        try:
            data = await self._read_whole(blob)
        except SourceError as err:
            await self._give_back(targets, sessions)
            for t in targets:
                await self._fail(t, err)
            return []
        except BaseException:
            await self._give_back_awhile(targets, sessions)
            raise
        committed: set[int] = set()

        async def put(t: Target) -> None:
            try:
                location = await sessions[t.idx]
                await t.client.upload_blob(t.repo, blob.digest, data, location, carry=self._carry)
            except RegistryError as exc:
                await self._fail(t, exc)
                return
            committed.add(t.idx)
            UPLOADED.inc(blob.size)
            await self._blob_done(t, blob)

        prompt = await self._in_time({t: sessions[t.idx] for t in targets}, blob)
        try:
            await _gather_all(put(t) for t in prompt)
        except (Stopped, asyncio.CancelledError):
            await self._give_back_awhile([t for t in prompt if t.idx not in committed], sessions)
            raise
        return [t for t in targets if t not in prompt]

    async def _give_back(self, targets: list[Target], sessions: dict[int, asyncio.Task[str]], wait: bool = True) -> None:
        """Upload sessions opened for bytes that will not come: the registry may drop them now.
        One still being opened is waited for, or, when the copy is being cancelled, abandoned."""

        async def one(t: Target) -> None:
            session = sessions[t.idx]
            if not session.done():
                if not wait:
                    session.cancel()
                    return
                await asyncio.wait([session])
            if not session.cancelled() and session.exception() is None:
                await self._cancel(t, session.result())

        await asyncio.gather(*(one(t) for t in targets))

    async def _give_back_awhile(self, targets: list[Target], sessions: dict[int, asyncio.Task[str]]) -> None:
        """The sessions of a copy that stops or is cancelled (a user's DELETE, a shutdown) are
        given back all the same, for a moment at most and whatever that meets (a session closed
        at shutdown, say): the stop goes on."""
        giving = _unwatched(asyncio.ensure_future(self._give_back(targets, sessions, wait=False)))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(giving), _GIVE_BACK_S)

    async def _read_whole(self, blob: Blob) -> bytes:
        """A blob small enough to hold, read and checked against its digest (twice at most)."""
        src = self.source
        try:
            for _ in range(2):
                data = await src.client.read_blob(src.repo, blob.digest, blob.size)
                DOWNLOADED.inc(len(data))
                if digest_matches(blob.digest, data):
                    return data
        except RegistryError as exc:
            raise SourceError(str(exc)) from None
        raise self._read_twice_wrong(blob)

    def _checks(self, blob: Blob, targets: list[Target]) -> dict[Target, asyncio.Future[bool]]:
        """Whether each target holds the blob, asked once per repository: the other targets of a
        repository take the first one's answer. Two mounts of one blob into one repository at
        once rewrite its link twice, and distribution 2.8 truncates a link before writing it: a
        manifest pushed meanwhile finds the blob unknown (400 MANIFEST_BLOB_UNKNOWN)."""
        checks: dict[Target, asyncio.Future[bool]] = {}
        asked: dict[tuple[str, str], asyncio.Future[bool]] = {}
        for t in targets:
            first = asked.get((t.client.key, t.repo))
            checks[t] = asyncio.ensure_future(self._already_there(t, blob, first))
            asked.setdefault((t.client.key, t.repo), checks[t])
        return checks

    async def _already_there(self, t: Target, blob: Blob, first: asyncio.Future[bool] | None) -> bool:
        """Present at the target, or mounted there from a repository known to hold it; or, with
        `first`, as another target of its repository found."""
        try:
            there = await self._there(t, blob, first)
        except RegistryError as exc:
            await self._fail(t, exc)
            return False
        if there:
            saved = self.events.saved_upload(t.idx, blob.digest)
            if saved is not None:  # an earlier attempt's session, of no use now
                await self._cancel(t, saved[0])
            await self._blob_done(t, blob)
        return there

    async def _there(self, t: Target, blob: Blob, first: asyncio.Future[bool] | None) -> bool:
        if blob.digest in t.held:
            return True
        if first is not None:
            return await _answer(first)
        if not t.fresh and await t.client.head_blob(t.repo, blob.digest):
            return True
        if self._resumable(t, blob):
            return False  # a session to resume beats a mount attempt
        candidates = await self.events.mount_sources(t.client.key, blob.digest)
        if self.source.client.key == t.client.key:
            candidates.insert(0, self.source.repo)
        tried = [r for r in dict.fromkeys(candidates) if r != t.repo and t.client.mountable(r)]
        for repo in tried[: self.tuning.mount_candidates]:
            if await t.client.mount_blob(t.repo, blob.digest, repo):
                return True
        return False

    def _resumable(self, t: Target, blob: Blob) -> bool:
        """A session of an earlier attempt holds part of the blob: one sent in chunks."""
        return blob.size > self.tuning.chunk_size and self.events.saved_upload(t.idx, blob.digest) is not None

    async def _blob_done(self, t: Target, blob: Blob) -> None:
        self.events.blob_progress(t.idx, blob.digest, blob.size)
        self._end_lead(t, blob.digest, True)  # the jobs that waited for this upload mount the blob now
        lacking = self._lacking.get(t.idx)
        if lacking is not None:
            lacking.discard(blob.digest)
            if not lacking:
                self._complete[t.idx].set()
            async with self._settled:
                self._settled.notify_all()
        if self.events.saved_upload(t.idx, blob.digest):
            await self.events.drop_upload(t.idx, blob.digest)
        await self.events.remember_blob(t.client.key, t.repo, blob.digest)

    async def _open_session(self, s: _Sink, blob: Blob) -> None:
        """Resume the checkpointed session where the registry says it stands, else start anew."""
        t = s.target
        chunked = blob.size > self.tuning.chunk_size and not s.monolithic
        try:
            saved = (s.location, s.offset) if s.location else self.events.saved_upload(t.idx, blob.digest)
            if saved and chunked:
                try:
                    held = await t.client.upload_offset(saved[0], t.repo, expected=saved[1])
                except RegistryError as exc:
                    if exc.code != "BLOB_UPLOAD_INVALID":
                        raise
                    # A chunk of it was cut (a SIGKILL): the registry keeps its bytes until its
                    # purge. Asked to drop it all the same (another registry may), it is named
                    # with the sessions kept when the job ends.
                    log.info("upload session for %s at %s holds a cut chunk and cannot go on; starting that blob over",
                             blob.digest[:19], t.client.name)
                    await self._cancel(t, saved[0])
                else:
                    if held is not None and held <= blob.size:
                        s.location, s.offset = saved[0], held
                        self.events.blob_progress(t.idx, blob.digest, held)
                        return
                    log.info("upload session for %s at %s is gone; starting that blob over", blob.digest[:19], t.client.name)
            elif saved:
                # One PUT carries the blob: a session of an earlier try is given back, not resumed.
                await self._cancel(t, saved[0])
            s.location = await t.client.start_upload(t.repo)
            s.offset = 0
            self.events.blob_progress(t.idx, blob.digest, 0)
            # Kept even when one PUT carries the whole blob: a cancelled job gives back every
            # session it has open, and this is where it finds them.
            await self._checkpoint(s, blob)
        except RegistryError as exc:
            s.error = exc

    async def _checkpoint(self, s: _Sink, blob: Blob) -> None:
        assert s.location is not None
        await self.events.save_upload(s.target.idx, blob.digest, s.location, s.offset, s.target.client.named(s.location))

    async def _fan_out(
        self, blob: Blob, sinks: list[_Sink], shared_done: Callable[[], None] | None, buffer_size: int,
        streams: Slots | None, handed: list[asyncio.Future[None]],
    ) -> None:
        """Read the blob once from the lowest offset any sink needs; every sink takes its part.
        The uploads of sinks that left the shared read are handed on (to `handed`) once the
        others have ended, with the reads of their own. The read holds a slot of `streams`
        until it is over: not while the sessions open, nor between rounds."""
        start = min(s.offset for s in sinks)
        verified = _verdict()
        for s in sinks:
            s.pipe = Pipe(buffer_size)
            s.start = s.offset
            s.verified = verified
            s.held_back = 0.0
            s.detached = False
        if start == blob.size:
            # Every session holds the whole blob (a commit failed, or a crash came just before
            # it): nothing to read, and the registry checks the digest as it commits.
            verified.set_result(True)
            await _gather_all(self._write_target(blob, s) for s in sinks)
            return
        keys = [self.source.client.key, *(s.target.client.key for s in sinks)]
        slot = streams.take(keys) if streams is not None else None
        if slot is not None:
            await slot.acquire()
        # The shared read, then the reads of any sinks that leave it (see _put).
        readers: list[asyncio.Task[None]] = []
        left = asyncio.Event()  # told when a sink leaves the shared read
        on_read = list(sinks)  # the sinks still on the shared read
        read = _Read(asyncio.get_running_loop().time(), slot)
        readers.append(asyncio.create_task(self._read_source(blob, start, on_read, verified, readers, left, read)))
        watch = asyncio.create_task(self._give_way_when_held(read, on_read)) if slot is not None else None
        writers = [asyncio.ensure_future(self._write_target(blob, s)) for s in sinks]
        going_on: list[asyncio.Future[None]] = []
        try:
            if shared_done is not None or slot is not None:
                await self._until_shared_read_over(blob, sinks, writers, readers[0], left)
                if slot is not None:
                    slot.release()
                if shared_done is not None and all(s.done for s in sinks if not s.detached):
                    shared_done()
            try:
                await _gather_all(w for s, w in zip(sinks, writers, strict=True) if not s.detached)
            finally:
                # Also when the others stopped (Stopped): these reach their own chunk boundary.
                going_on = [w for s, w in zip(sinks, writers, strict=True) if s.detached]
                if going_on:
                    handed.append(asyncio.ensure_future(self._finish_alone(going_on, readers[1:])))
                    del readers[1:]
        except BaseException:
            staying = [w for w in writers if w not in going_on]
            for w in staying:
                w.cancel()
            await _join(staying)
            raise
        finally:
            if slot is not None:
                slot.release()
            if watch is not None:
                watch.cancel()
            for reader in readers:
                reader.cancel()
            # Waited for, not awaited: their failures reached the writers through the pipes, and
            # a cancellation of this copy itself must still get through.
            await _join([*readers, *([watch] if watch is not None else [])])
        if verified.done() and not verified.cancelled() and verified.exception() is None and verified.result() is False:
            raise DigestMismatch()

    @staticmethod
    async def _finish_alone(writers: list[asyncio.Future[None]], readers: list[asyncio.Task[None]]) -> None:
        try:
            await _gather_all(writers)
        finally:
            for reader in readers:
                reader.cancel()
            await _join(readers)

    async def _until_shared_read_over(
        self, blob: Blob, sinks: list[_Sink], writers: list[asyncio.Future[None]], reader: asyncio.Task[None],
        left: asyncio.Event,
    ) -> None:
        """Until every sink still on the shared read has ended; those that left it go on. So do
        those still sending their last buffered bytes preflight_wait_s after the read is over and
        another sink is done: a target that stopped answering with the rest of the blob in its
        buffer never held the read up, yet must not hold the others either."""
        while True:
            left.clear()
            attached = [(s, w) for s, w in zip(sinks, writers, strict=True) if not s.detached]
            waiting = [w for _, w in attached if not w.done()]
            if not waiting:
                return
            draining = reader.done() and len(waiting) < len(attached)
            leaving = asyncio.ensure_future(left.wait())
            try:
                done, _ = await asyncio.wait(
                    [*waiting, leaving, *([] if reader.done() else [reader])],
                    timeout=self.tuning.preflight_wait_s if draining else None, return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                leaving.cancel()
            if not done:
                for s, w in attached:
                    if not w.done():
                        s.detached = s.target.slow = True
                        log.info("%s still sends the end of %s %g s after the others had it; the later blobs go "
                                 "without it", s.target.client.name, blob.digest[:19], self.tuning.preflight_wait_s)
                return

    async def _read_source(
        self, blob: Blob, start: int, sinks: list[_Sink], verified: asyncio.Future[bool], readers: list[asyncio.Task[None]],
        left: asyncio.Event, read: _Read | None = None,
    ) -> None:
        """`read`: the shared read's account, with the stream slot it holds (see _give_way)."""
        # Only a read from byte 0 can be hashed here; a resumed one is checked by the registry,
        # which refuses to commit bytes that do not hash to the digest.
        hasher = _OffLoopHash() if start == 0 and blob.digest.startswith("sha256:") else None
        pos = start
        src = self.source
        read = read or _Read(asyncio.get_running_loop().time())

        async def stream() -> None:
            nonlocal pos
            resp, at = await src.client.open_blob(src.repo, blob.digest, pos, size=blob.size)
            async with resp:
                skip = pos - at  # the registry ignored Range: drop what we already have
                try:
                    async for piece in resp.content.iter_chunked(self.tuning.piece_size):
                        if skip:
                            cut = min(skip, len(piece))
                            piece, skip = piece[cut:], skip - cut
                            if not piece:
                                continue
                        if pos + len(piece) > blob.size:
                            raise RegistryError(src.client.name, f"read blob {blob.digest[:19]}", "the blob is larger than its descriptor says")
                        if hasher:
                            await hasher.update(piece)
                        DOWNLOADED.inc(len(piece))
                        await self._deliver(blob, piece, pos, sinks, readers, read.began, left)
                        pos += len(piece)
                        if all(s.pipe is None or s.pipe.closed for s in sinks):
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise broken_stream(src.client.name, f"read blob {blob.digest[:19]}", pos, exc) from None
            if pos < blob.size:
                raise RegistryError(src.client.name, f"read blob {blob.digest[:19]}", f"the stream ended at byte {pos} of {blob.size}", transient=True)

        try:
            await retrying(src.client.policy, stream, src.client.on_retry)
        except Exception as exc:
            err = SourceError(str(exc)) if isinstance(exc, RegistryError) else exc
            verified.set_exception(err)
            for s in sinks:
                await s.pipe.finish(err)  # type: ignore[union-attr]
            raise
        if pos < blob.size:
            return  # every target left; nobody waits for the verdict
        ok = hasher is None or "sha256:" + await hasher.hexdigest() == blob.digest
        verified.set_result(ok)
        for s in sinks:
            await s.pipe.finish(None if ok else DigestMismatch())  # type: ignore[union-attr]

    async def _deliver(
        self, blob: Blob, piece: bytes, pos: int, sinks: list[_Sink], readers: list[asyncio.Task[None]], began: float,
        left: asyncio.Event,
    ) -> None:
        for s in list(sinks):
            if s.pipe is None or s.pipe.closed:
                continue
            if pos + len(piece) <= s.start:
                continue
            cut = max(0, s.start - pos)
            if not await self._put(s, piece[cut:] if cut else piece, sinks, began):
                # This sink goes on alone from this piece; the shared read no longer waits for it,
                # nor do the later blobs of this copy (they are read for its target on their own).
                sinks.remove(s)
                s.detached = s.target.slow = True
                left.set()
                s.verified = _verdict()
                s.pipe.limit = min(s.pipe.limit, self._small_buffer)  # as a slow target's own reads are
                log.info("%s held the read of %s back for %.1f s; it reads the rest, from byte %d, on its own",
                         s.target.client.name, blob.digest[:19], s.held_back, pos + cut)
                readers.append(asyncio.create_task(self._read_source(blob, pos + cut, [s], s.verified, readers, left)))

    async def _put(self, s: _Sink, piece: bytes, sinks: list[_Sink], began: float) -> bool:
        """Queue the piece for the sink, waiting while its buffer is full; False when the sink should
        leave the shared read: while it held the read up, another sink sat idle long enough, and
        for over three quarters of the read, so that one could go at least four times as fast on
        its own. (Targets a little apart in speed, as registries sharing a machine are, stay
        together: a second read of the source, and the buffers it fills, would cost more than
        it saves.)"""
        assert s.pipe is not None
        after = self.tuning.detach_after_s
        if after <= 0 or len(sinks) < 2:
            await s.pipe.put(piece)
            return True
        loop = asyncio.get_running_loop()
        while True:
            if s.held_back >= after and s.held_back * 4 > (loop.time() - began) * 3:
                return False
            if not s.pipe.full:
                return await s.pipe.put(piece)
            # Counted while this sink holds the read up: how long the most starved other sink
            # waited meanwhile, short waits too (a target that frees a piece just in time, again
            # and again, holds the others to its pace as surely as one that stops).
            others = [o.pipe for o in sinks if o is not s and o.pipe is not None and not o.pipe.closed]
            before = [o.starved() for o in others]
            delivered = await s.pipe.put(piece, timeout=_IDLE_CHECK_S)
            s.held_back += max((o.starved() - b for o, b in zip(others, before, strict=True)), default=0.0)
            if delivered:
                return True

    async def _give_way_when_held(self, read: _Read, sinks: list[_Sink]) -> None:
        assert read.slot is not None
        while read.slot.held:
            await asyncio.sleep(_GIVE_WAY_CHECK_S)
            self._give_way(read, sinks)

    def _give_way(self, read: _Read, sinks: list[_Sink]) -> None:
        """A read held back for detach_after_s, and for over three quarters of its time, by the
        source (every target waited for bytes) or by its targets (none did) gives its stream
        slot way to a blob bound for other registries, should one wait for it: a slow or hung
        registry's jobs must not keep the others' from theirs. It goes on beside the count (within
        the service's allowance), its buffers lowered to two pieces as they drain."""
        after = self.tuning.detach_after_s
        slot = read.slot
        if slot is None or not slot.held or after <= 0:
            return
        live = [(s.target, s.pipe) for s in sinks if s.pipe is not None and not s.pipe.closed]
        if not live:
            return
        elapsed = asyncio.get_running_loop().time() - read.began
        starved = [pipe.starved() for _, pipe in live]
        fed = elapsed - sum(starved)  # at least this long, every target had bytes to send
        if fed >= after and fed * 4 > elapsed * 3:
            slow = {t.client.key for t, _ in live}
            names, held = sorted({t.client.name for t, _ in live}), fed
        elif min(starved) >= after and min(starved) * 4 > elapsed * 3:
            slow, names, held = {self.source.client.key}, [self.source.client.name], min(starved)
        else:
            return  # going well, or its targets differ in pace (one holding the others back leaves it: see _put)
        if not slot.give_way(slow):
            return
        for _, pipe in live:
            pipe.limit = min(pipe.limit, self._small_buffer)
        log.info("%s held a read back for %.1f s of %.1f: it gives its stream slot to another registry's blob and goes "
                 "on beside the limit, through %g MiB buffers", ", ".join(names), held, elapsed, self._small_buffer / MiB)

    async def _write_target(self, blob: Blob, s: _Sink) -> None:
        t = s.target
        assert s.pipe is not None and s.location is not None
        try:
            if s.offset == 0 and (s.monolithic or blob.size <= self.tuning.chunk_size):
                # One request, nothing worth a checkpoint; the registry refuses bytes that do
                # not hash to the digest, so a bad read is never committed.
                with self._carry():  # to the checkpoint's end: a stop gives back no committed session
                    body = _read_exact(s.pipe, blob.size)
                    await t.client.finish_upload(s.location, t.repo, blob.digest, body, blob.size)
                    UPLOADED.inc(blob.size)
                    s.done = True
                    await self._blob_done(t, blob)
                return
            while s.offset < blob.size:
                length = min(self.tuning.chunk_size, blob.size - s.offset)
                with self._carry():
                    s.location = await t.client.patch_chunk(s.location, t.repo, _read_exact(s.pipe, length), s.offset, length)
                    s.offset += length
                    UPLOADED.inc(length)
                    await self._checkpoint(s, blob)
                self.events.blob_progress(t.idx, blob.digest, s.offset)
            # Read now, not at the start: a sink that left the shared read has a verdict of its own.
            assert s.verified is not None
            if not await asyncio.shield(s.verified):
                await self._abandon(s, blob)
                return
            with self._carry():  # the commit too: cut, its session would be given back after it took the blob
                await t.client.finish_upload(s.location, t.repo, blob.digest)
                s.done = True
                await self._blob_done(t, blob)
        except (RegistryError, SourceError, Stopped, PipeClosed, EOFError, DigestMismatch) as exc:
            # A request whose body failed reports a connection error: the reader's own is the reason.
            s.error = s.pipe.error or exc
            if not _retryable(s.error):  # it fails: nobody waits for it (a retry is still waited for)
                self._end_lead(t, blob.digest, False)
            if isinstance(exc, RegistryError) and exc.status in (405, 501) and not s.monolithic:
                s.monolithic, s.location = True, None
            elif isinstance(exc, RegistryError) and (exc.status == 416 or exc.code == "DIGEST_INVALID"):
                # The session holds other bytes than the registry said it does (zot and Quay
                # misreport an offset; 2.8 takes a PATCH from the wrong one): asked again, it
                # would say the same, and its bytes can never be committed.
                await self._abandon(s, blob)
        finally:
            await s.pipe.close()
        if isinstance(s.error, Stopped):
            raise s.error

    async def _abandon(self, s: _Sink, blob: Blob) -> None:
        """The sink's session is given back: the blob starts over in a new one."""
        location, s.location = s.location, None
        await self.events.drop_upload(s.target.idx, blob.digest)
        if location is not None:
            await self._cancel(s.target, location)


def _may_link(peer: Target, t: Target) -> bool:
    """Whether `t` may wait for `peer`, a target of the same job, to hold a blob and link it."""
    return peer.client.key == t.client.key and may_link(t.client.account, t.repo, peer.client.account, peer.repo)


class _OffLoopHash:
    """SHA-256 of a stream, computed on a worker thread one piece behind the reader: the event
    loop keeps moving bytes while another core hashes (hashlib releases the GIL)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._last: asyncio.Future[None] | None = None

    async def update(self, piece: bytes) -> None:
        if self._last is not None:
            await self._last
        self._last = asyncio.get_running_loop().run_in_executor(None, self._sha.update, piece)

    async def hexdigest(self) -> str:
        if self._last is not None:
            await self._last
        return self._sha.hexdigest()


def _verdict() -> asyncio.Future[bool]:
    """Whether a read's bytes matched the digest. A failed read also reaches its writers through
    their pipes, so a failure nobody awaited here is not worth an asyncio warning."""
    return _unwatched(asyncio.get_running_loop().create_future())


_Fut = TypeVar("_Fut", bound=asyncio.Future)  # type: ignore[type-arg]


def _unwatched(fut: _Fut) -> _Fut:
    """A future whose failure may go unawaited (its outcome reaches the caller another way, or
    no longer matters): asyncio is told it was seen."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


async def _read_exact(pipe: Pipe, length: int) -> AsyncIterator[bytes]:
    remaining = length
    while remaining:
        piece = await pipe.get(remaining)
        remaining -= len(piece)
        yield piece


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, RegistryError):
        # A lost or refused upload session (404 BLOB_UPLOAD_UNKNOWN, 400 BLOB_UPLOAD_INVALID,
        # 416 for a gap) is started over; other 4xx are final.
        return (
            exc.transient
            or exc.code in ("BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID", "DIGEST_INVALID")
            or exc.status in (405, 416, 501)
        )
    return isinstance(exc, (PipeClosed, EOFError, DigestMismatch))


async def _answer(check: asyncio.Future[bool]) -> bool:
    """Another target's check: True only when it found the blob there. Waited for, not awaited:
    a late target's check, cancelled, must not cancel the one it waits on."""
    await asyncio.wait([check])
    return not check.cancelled() and check.exception() is None and check.result()


async def _join(futs: list[asyncio.Future[Any]]) -> None:
    """Wait for the futures to end. Cancelled meanwhile, cancel them and wait all the same (a
    cancellation again cancels them again), then raise CancelledError: nothing they started
    goes on unowned once the caller is gone."""
    for f in futs:
        _unwatched(f)
    pending = [f for f in futs if not f.done()]
    cancelled = False
    for _ in range(100):  # a round ends with them all, or with one more cancellation of the caller
        if not pending:
            break
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
            for f in pending:
                f.cancel()
        pending = [f for f in pending if not f.done()]
    if cancelled:
        raise asyncio.CancelledError()


async def _gather_all(aws) -> None:  # type: ignore[no-untyped-def]
    """Like gather, but lets every sibling finish before raising the first error (e.g. Stopped),
    so that no upload is abandoned between its chunk and its checkpoint."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
