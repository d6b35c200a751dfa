"""The background worker: claims queued jobs, runs their copies under a lease, records what
happened, and hands unfinished work back to the queue on a graceful stop."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import ssl
import uuid
from dataclasses import dataclass
from datetime import timedelta
from collections.abc import Iterable
from typing import Any

import aiohttp

from .credentials import CredentialStore
from .inflight import InFlight
from .logs import job_context
from .registry.auth import ChallengeCache, TokenCache
from .registry.client import KnownRepositories, RegistryClient
from .settings import Settings
from .slots import Slots
from .store import ClaimedJob, LeaseLost, Store, asks_credentials, iso, utcnow
from .transfer import ImageCopy, MemoryEvents, Source, SourceError, Stopped, Target

log = logging.getLogger(__name__)

# Why a job's task is cancelled: a DELETE, a lease another worker took, the shutdown grace ran out.
CANCEL_REASONS = ("user", "lease", "shutdown")
NOT_COPIED = "not copied: the job failed before this target finished"


@dataclass(frozen=True)
class Ending:
    """What a job's run writes last: its end state (None: back to the queue, checkpoints kept),
    the job's error, and the error its targets not yet ended take."""

    state: str | None
    error: str | None = None
    target_error: str | None = None


REQUEUE = Ending(None)
CANCELLED = Ending("FAILED", "cancelled", "cancelled")


class JobEvents(MemoryEvents):
    """A running job's events. Checkpoints and target states are written to the store at once,
    fenced by the job's lease; byte counts and blob sightings wait for the next heartbeat or state
    change (a sighting lost in a crash costs at most an upload where a mount would have done)."""

    def __init__(self, store: Store, job_id: str, owner: str, uploads: dict[tuple[int, str], tuple[str, int]]) -> None:
        super().__init__(uploads)
        self.store = store
        self.job_id = job_id
        self.owner = owner
        self._dirty: set[int] = set()  # targets whose byte counts the store has not seen
        self._sightings: list[tuple[str, str, str]] = []
        # What each target waits out now, if anything: shown with its status until it moves on.
        self._notes: dict[int, str | None] = {}
        self._unsaid: set[int] = set()  # notes the store has not seen

    async def target_state(self, idx: int, state: str, error: str | None = None) -> None:
        await super().target_state(idx, state, error)
        # A target starting is implied by its job starting: only outcomes are worth a line each.
        log.log(logging.DEBUG if state == "RUNNING" else logging.INFO,
                "job %s target %d: %s%s", self.job_id, idx, state, f" ({error})" if error else "")
        self._dirty.discard(idx)
        await self.store.target_state(self.job_id, self.owner, idx, state, error, (self.done(idx), self.totals.get(idx)))

    def set_total(self, idx: int, total: int) -> None:
        super().set_total(idx, total)
        self._dirty.add(idx)

    def blob_progress(self, idx: int, digest: str, done: int) -> None:
        super().blob_progress(idx, digest, done)
        self._dirty.add(idx)
        if self._notes.get(idx):
            self._notes[idx] = None  # bytes move again: whatever it waited out is over
            self._unsaid.add(idx)

    def retrying(self, idx: int, error: str) -> None:
        super().retrying(idx, error)
        self._notes[idx] = f"{iso(utcnow())}: {error}"
        self._unsaid.add(idx)

    async def save_upload(self, idx: int, digest: str, location: str, offset: int, named: bool = False) -> None:
        await self.store.save_upload(self.job_id, self.owner, idx, digest, location, offset, named)
        await super().save_upload(idx, digest, location, offset, named)

    async def drop_upload(self, idx: int, digest: str) -> None:
        await self.store.drop_upload(self.job_id, self.owner, idx, digest)
        await super().drop_upload(idx, digest)

    async def mount_sources(self, registry: str, digest: str) -> list[str]:
        # This job's own sightings first: they may not have reached the store yet.
        return [*await super().mount_sources(registry, digest), *await self.store.mount_sources(registry, digest)]

    async def remember_blob(self, registry: str, repo: str, digest: str) -> None:
        await super().remember_blob(registry, repo, digest)
        self._sightings.append((registry, repo, digest))

    async def flush(self) -> None:
        if self._dirty:
            counts = {idx: (self.done(idx), self.totals.get(idx)) for idx in self._dirty}
            self._dirty = set()
            await self.store.progress(self.job_id, self.owner, counts)
        if self._sightings:
            sightings, self._sightings = self._sightings, []
            await self.store.remember_blobs(sightings)
        if self._unsaid:
            notes = {idx: self._notes[idx] for idx in self._unsaid}
            self._unsaid = set()
            await self.store.retrying(self.job_id, self.owner, notes)


def _outcome(events: MemoryEvents, n_targets: int) -> Ending:
    failed = [i for i, state in events.states.items() if state == "FAILED"]
    if not failed:
        return Ending("FINISHED")
    reason = f"{len(failed)} of {n_targets} target(s) failed"
    # One cause for all of them (the source's blob could not be read, say) is worth saying here.
    causes = {events.errors.get(i) for i in failed}
    cause = next(iter(causes)) if len(causes) == 1 else None
    return Ending("FAILED", f"{reason}: {cause}" if cause else reason)


def _note_retry(events: JobEvents, targets: Iterable[int], where: str, exc: Exception) -> None:
    for idx in targets:
        events.retrying(idx, f"{where}{exc}")


class Worker:
    def __init__(
        self, store: Store, session: aiohttp.ClientSession, settings: Settings, credentials: CredentialStore | None = None
    ) -> None:
        self.store = store
        self.session = session
        self.settings = settings
        self.credentials = credentials
        self.owner = f"{settings.node}/{uuid.uuid4().hex[:12]}"
        self.challenges = ChallengeCache()
        self.tokens = TokenCache()
        self.repos = KnownRepositories()
        # As many reads again may go on beside the limit, once they gave their slot way.
        self.streams = Slots(settings.tuning.max_streams, spare=settings.tuning.max_streams)
        self.uploads = InFlight()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        # What tells each running job's copy to stop at its uploads' next chunk boundaries (a
        # shutdown, a user's cancel), and when a user's cancel stops waiting for them.
        self._stops: dict[str, asyncio.Event] = {}
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        # The CANCEL_REASONS each running job's task was cancelled for, first one first.
        self._cancels: dict[str, list[str]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._housekeeping_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        recovered = await self.store.recover(f"{self.settings.node}/")
        if recovered:
            log.info("requeued %d job(s) left running by an earlier process", recovered)
        self._loop_task = asyncio.create_task(self._claim_loop(), name="pydlit-claim-loop")
        self._housekeeping_task = asyncio.create_task(self._housekeeping(), name="pydlit-housekeeping")

    def notify(self) -> None:
        """A job was queued: claim it now rather than at the next poll."""
        self._wake.set()

    def cancel(self, job_id: str, reason: str = "user") -> None:
        """Stop a job this worker runs, once per reason (the heartbeat repeats a DELETE every
        second): "user" ends it FAILED "cancelled" with its uploads cancelled, "shutdown" puts
        it back in the queue, "lease" leaves it to its new owner.

        A user's cancel first lets every upload reach its chunk boundary, for stop_grace_s at
        most: distribution deletes a session that stands at one, but can neither resume nor
        delete one whose chunk was cut (its bytes stay on its disk until the purge, a week later)."""
        task = self._running.get(job_id)
        if task is None or task.done():
            return
        reasons = self._cancels.setdefault(job_id, [])
        if reason in reasons:
            return
        reasons.append(reason)
        # A task cancelled before its first step dies before its first line, leaving the job
        # RUNNING with nobody to end it: it reads the reason when it starts instead.
        if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:
            return
        if reasons == ["user"]:
            self._stops[job_id].set()
            self._deadlines[job_id] = asyncio.get_running_loop().call_later(self.settings.stop_grace_s, task.cancel)
        else:
            task.cancel()

    async def _housekeeping(self) -> None:
        """Prune ended jobs past the retention time, at start and then hourly."""
        keep = timedelta(days=self.settings.retention_days)
        while True:
            try:
                pruned = await self.store.prune(keep)
                if pruned:
                    log.info("pruned %d job(s) ended more than %g day(s) ago", pruned, self.settings.retention_days)
            except Exception:
                log.exception("pruning old jobs failed")
            await asyncio.sleep(3600)

    async def stop(self) -> None:
        """Stop claiming; let every copy reach a chunk boundary and checkpoint, then requeue it."""
        self._stop.set()
        self._wake.set()
        if self._housekeeping_task:
            self._housekeeping_task.cancel()
        if self._loop_task:
            await self._loop_task
        for stop in self._stops.values():
            stop.set()
        tasks = list(self._running.values())
        if tasks:
            log.info("stopping: waiting for %d job(s) to reach a safe point", len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=self.settings.stop_grace_s)
            for job_id, task in list(self._running.items()):
                if task in pending:
                    self.cancel(job_id, "shutdown")
            if pending:
                await asyncio.wait(pending, timeout=5)

    async def _claim_loop(self) -> None:
        while not self._stop.is_set():
            # Cleared before looking, not after: a job queued while the claim is on its way to
            # the DB must wake the next round, not wait for the poll.
            self._wake.clear()
            job = None
            # Full, it still takes a cancelled job that only has sessions to give back, as many
            # again at most (one at a time where the concurrency is 0 and no copy runs).
            running, limit = len(self._running), self.settings.concurrency
            if running < limit + max(limit, 1):
                try:
                    job = await self.store.claim(self.owner, self.settings.lease_s, cancelled_only=running >= limit)
                except Exception:
                    log.exception("claiming a job failed")
            if job is not None and job.id in self._running:
                # Its lease ran out while this very worker ran it (the loop was held up that long):
                # the claim renewed it, and the task running it goes on.
                log.warning("job %s: its lease had expired while it ran here", job.id)
                continue
            if job is not None:
                self._stops[job.id] = asyncio.Event()
                task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
                self._running[job.id] = task
                task.add_done_callback(lambda _t, jid=job.id: self._job_done(jid))
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.poll_s)

    def _job_done(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._cancels.pop(job_id, None)
        self._stops.pop(job_id, None)
        deadline = self._deadlines.pop(job_id, None)
        if deadline is not None:
            deadline.cancel()
        self._wake.set()

    async def _run(self, job: ClaimedJob) -> None:
        with job_context(job.id):
            await self._run_job(job)

    async def _run_job(self, job: ClaimedJob) -> None:
        log.info("job %s: started (attempt %d)", job.id, job.attempt)
        events = JobEvents(self.store, job.id, self.owner, {})
        beat = asyncio.create_task(self._heartbeat(job.id, events))
        n_targets = len(job.request["targets"])
        copy: ImageCopy | None = None
        ending: Ending | None = None  # None: the lease is lost, there is nothing to write
        # The handlers below do not await: a cancel lands inside this try, where it is caught.
        try:
            events.uploads.update(await self.store.uploads(job.id))
            named = await self.store.named_uploads(job.id) if events.uploads else []
            if job.cancel_requested or self._cancels.get(job.id):
                # Asked for before a crash or a stop took its worker, or before this task ran:
                # the sessions of its earlier attempt are given back all the same (with the
                # job's own credentials, if it brought any).
                if events.uploads and not (asks_credentials(job.request) and not job.secrets):
                    with contextlib.suppress(ValueError, ssl.SSLError):
                        copy = self._build(job, events, named)
                raise asyncio.CancelledError()
            if asks_credentials(job.request) and not job.secrets:
                raise SourceError(
                    "the job's credentials cannot be opened: the secret key (PYDLIT_SECRET_KEY or the "
                    ".key file beside the database) changed or was lost; submit the job again"
                )
            try:
                copy = self._build(job, events, named)
            except (ValueError, ssl.SSLError) as exc:
                raise SourceError(f"the request cannot be run: {exc}") from None
            await copy.run()
            ending = _outcome(events, n_targets)
        except SourceError as exc:
            ending = Ending("FAILED", str(exc), NOT_COPIED)
        except LeaseLost:
            log.warning("job %s: lease lost; another worker owns it now", job.id)
        except (Stopped, asyncio.CancelledError):
            ending = self._cancelled(job)
        except Exception as exc:  # a bug must fail one job, never the worker
            log.exception("job %s: internal error", job.id)
            ending = Ending("FAILED", f"internal error: {type(exc).__name__}: {exc}", NOT_COPIED)
        # A job that ends leaves no session for a later attempt to resume (a failure's, or an
        # earlier attempt's that this one did not need): the registries get them back, and the
        # log names those they kept, these or ones given back along the way. A
        # cancel's first, so that its end means they are gone; the others' once the end is
        # written (which a registry that stopped answering must not hold up), and only then:
        # a job whose lease another worker took is that worker's to resume.
        ended = copy if ending is not None and ending.state is not None else None
        try:
            if ended is not None and ending is CANCELLED:
                await self._give_back_uploads(job.id, ended)
        finally:
            beat.cancel()
            written = ending is not None and await self._settle(job.id, events, ending)
        if written and ended is not None and ending is not CANCELLED:
            await self._give_back_uploads(job.id, ended)

    def _cancelled(self, job: ClaimedJob) -> Ending | None:
        """How a stopped or cancelled job ends, by the first reason it was cancelled for (none:
        the service stopped)."""
        reasons = self._cancels.get(job.id)
        reason = reasons[0] if reasons else "user" if job.cancel_requested else "shutdown"
        if reason == "user":
            return CANCELLED
        if reason == "shutdown":
            log.warning("job %s: cancelled at shutdown; it resumes from its last checkpoint", job.id)
            return REQUEUE
        return None  # the heartbeat found the lease lost, and said so

    async def _give_back_uploads(self, job_id: str, copy: ImageCopy) -> None:
        """The job ended (a user cancelled it, it failed or finished): its upload sessions go back
        to the registries, for stop_grace_s at most (a registry that stopped answering keeps
        them)."""
        try:
            kept = await copy.give_back(self.settings.stop_grace_s)
        except asyncio.CancelledError:  # the service stops: the job's end goes on being written
            log.warning("job %s: stopped giving its upload sessions back to the registries", job_id)
            return
        for idx, reasons in sorted(kept.items()):
            # Left to the registry's purge: the operator learns why (with token auth, say, the
            # job's user may not delete).
            log.warning("job %s target %d: %d upload session(s) not given back: %s", job_id, idx, len(reasons), reasons[0])

    async def _settle(self, job_id: str, events: JobEvents, ending: Ending) -> bool:
        """Write how the job ended, to the end: a cancel landing meanwhile (the heartbeat finding
        the lease lost, the shutdown grace running out) only interrupts the wait, never the
        write, so the row is never left RUNNING with no task to end it. Whether it was written
        (not when another worker owns the job now)."""
        write = asyncio.ensure_future(self._write_ending(job_id, events, ending))
        waits = len(CANCEL_REASONS) + 1  # a task is cancelled once per reason
        for wait in range(waits):
            try:
                return await asyncio.shield(write)
            except asyncio.CancelledError:
                if write.done() or wait == waits - 1:
                    raise
        raise AssertionError("unreachable: the last wait returns or raises")

    async def _write_ending(self, job_id: str, events: JobEvents, ending: Ending) -> bool:
        try:
            await events.flush()
            if ending.state is None:
                await self.store.release(job_id, self.owner)
                log.info("job %s: checkpointed and requeued", job_id)
                return True
            await self.store.finish(job_id, self.owner, ending.state, ending.error, ending.target_error)
        except LeaseLost:
            log.warning("job %s: lease lost before its end was written; another worker owns it now", job_id)
            return False
        except Exception:
            log.exception("job %s: writing its end failed; it is taken up again once its lease expires", job_id)
            return False
        level = logging.WARNING if ending.state == "FAILED" else logging.INFO
        log.log(level, "job %s: %s%s", job_id, ending.state, f" ({ending.error})" if ending.error else "")
        return True

    async def _heartbeat(self, job_id: str, events: JobEvents) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await events.flush()
                if await self.store.renew(job_id, self.owner, self.settings.lease_s):
                    self.cancel(job_id, "user")
            except LeaseLost:
                log.warning("job %s: lease lost; stopping it", job_id)
                self.cancel(job_id, "lease")
                return
            except Exception:
                log.exception("job %s: heartbeat failed", job_id)

    def _build(self, job: ClaimedJob, events: JobEvents, named: list[tuple[int, str]]) -> ImageCopy:
        """The job's copy; `named`: its checkpoints' Locations on hosts the registries named (see
        Store.named_uploads), which their targets' clients trust again."""
        req = job.request
        src = req["source"]
        secrets = job.secrets or {}

        def client(side: dict[str, Any], auth: dict[str, Any] | None, push: bool = False) -> RegistryClient:
            return RegistryClient(
                self.session, side["endpoint"], auth=auth, verify_tls=side.get("verify_tls", False),
                ca_cert=side.get("ca_cert"), policy=self.settings.retry, stall_timeout=self.settings.stall_timeout_s,
                challenges=self.challenges, tokens=self.tokens, repos=self.repos, push=push,
            )

        def auth_for(given: dict[str, Any] | None, endpoint: str) -> dict[str, Any] | None:
            # Server-side credentials stand in only where the request brought none.
            if given is None and self.credentials is not None:
                return self.credentials.lookup(endpoint)
            return given

        source_client = client(src, auth_for(secrets.get("source"), src["endpoint"]))
        # What the source's reads wait out, every target waits out.
        source_client.on_retry = functools.partial(_note_retry, events, range(len(req["targets"])), "the source: ")
        source = Source(source_client, source_client.repository(src["image"]), src["ref"])
        target_auth = secrets.get("targets") or []
        targets = []
        for idx, t in enumerate(req["targets"]):
            c = client(t, auth_for(target_auth[idx] if idx < len(target_auth) else None, t["endpoint"]), push=True)
            c.on_retry = functools.partial(_note_retry, events, [idx], "")
            for location in (loc for i, loc in named if i == idx):
                c.trust_named(location)
            targets.append(Target(idx, c, c.repository(t.get("image") or src["image"]), t.get("ref") or src["ref"], t.get("overwrite", False)))
        return ImageCopy(
            source, targets, events, self._stops[job.id], self.settings.tuning, first_attempt=job.attempt == 1, streams=self.streams,
            referrers=req.get("referrers", False), uploads=self.uploads,
        )
