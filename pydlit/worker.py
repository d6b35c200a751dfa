"""The background worker: claims queued jobs, runs their copies under a lease, records what
happened, and hands unfinished work back to the queue on a graceful stop."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from datetime import timedelta
from typing import Any

import aiohttp

from .credentials import CredentialStore
from .logs import job_context
from .registry.auth import ChallengeCache, TokenCache
from .registry.client import KnownRepositories, RegistryClient
from .settings import Settings
from .store import ClaimedJob, LeaseLost, Store
from .transfer import ImageCopy, MemoryEvents, Source, SourceError, Stopped, Target

log = logging.getLogger(__name__)


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

    async def save_upload(self, idx: int, digest: str, location: str, offset: int) -> None:
        await self.store.save_upload(self.job_id, self.owner, idx, digest, location, offset)
        await super().save_upload(idx, digest, location, offset)

    async def drop_upload(self, idx: int, digest: str) -> None:
        await self.store.drop_upload(self.job_id, idx, digest)
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
        self.streams = asyncio.Semaphore(settings.tuning.max_streams)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        # Why a job task was cancelled: "user" (DELETE), "lease" (another owner), else shutdown.
        self._cancel_reason: dict[str, str] = {}
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
        """Stop a job this worker runs; it ends FAILED "cancelled" with its uploads cancelled."""
        task = self._running.get(job_id)
        if task is not None and not task.done():
            self._cancel_reason.setdefault(job_id, reason)
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
        tasks = list(self._running.values())
        if tasks:
            log.info("stopping: waiting for %d job(s) to reach a safe point", len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=self.settings.stop_grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    async def _claim_loop(self) -> None:
        while not self._stop.is_set():
            # Cleared before looking, not after: a job queued while the claim is on its way to
            # the DB must wake the next round, not wait for the poll.
            self._wake.clear()
            job = None
            if len(self._running) < self.settings.concurrency:
                try:
                    job = await self.store.claim(self.owner, self.settings.lease_s)
                except Exception:
                    log.exception("claiming a job failed")
            if job is not None:
                task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
                self._running[job.id] = task
                task.add_done_callback(lambda _t, jid=job.id: self._job_done(jid))
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.poll_s)

    def _job_done(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._wake.set()

    async def _run(self, job: ClaimedJob) -> None:
        with job_context(job.id):
            await self._run_job(job)

    async def _run_job(self, job: ClaimedJob) -> None:
        log.info("job %s: started (attempt %d)", job.id, job.attempt)
        events = JobEvents(self.store, job.id, self.owner, await self.store.uploads(job.id))
        beat = asyncio.create_task(self._heartbeat(job.id, events))
        n_targets = len(job.request["targets"])
        copy: ImageCopy | None = None
        try:
            if job.cancel_requested:
                raise asyncio.CancelledError()  # asked for before a crash took its worker
            if job.secrets is None:
                raise SourceError(
                    "the job's credentials were sealed with another secret key (PYDLIT_SECRET_KEY or the "
                    ".key file beside the database changed); submit the job again"
                )
            try:
                copy = self._build(job, events)
            except (ValueError, ssl.SSLError) as exc:
                raise SourceError(f"the request cannot be run: {exc}") from None
            await copy.run()
            await events.flush()
            failed = [i for i, s in events.states.items() if s == "FAILED"]
            state = "FAILED" if failed else "FINISHED"
            error = f"{len(failed)} of {n_targets} target(s) failed" if failed else None
            await self.store.finish(job.id, self.owner, state, error)
            log.info("job %s: %s%s", job.id, state, f" ({error})" if error else "")
        except SourceError as exc:
            await self._fail_job(job.id, events, n_targets, str(exc))
        except Stopped:
            await events.flush()
            await self.store.release(job.id, self.owner)
            log.info("job %s: checkpointed and requeued for the next start", job.id)
        except LeaseLost:
            log.warning("job %s: lease lost; another worker owns it now", job.id)
        except asyncio.CancelledError:
            reason = self._cancel_reason.pop(job.id, "user" if job.cancel_requested else "shutdown")
            if reason == "user":
                await self._cancelled(job, events, copy, n_targets)
            elif reason == "shutdown":
                log.warning("job %s: cancelled at shutdown; it resumes from its last checkpoint", job.id)
                with contextlib.suppress(Exception):
                    await self.store.release(job.id, self.owner)
        except Exception as exc:  # a bug must fail one job, never the worker
            log.exception("job %s: internal error", job.id)
            with contextlib.suppress(Exception):
                await self._fail_job(job.id, events, n_targets, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            beat.cancel()

    async def _cancelled(self, job: ClaimedJob, events: JobEvents, copy: ImageCopy | None, n_targets: int) -> None:
        """A user cancelled the job: give the registries their upload sessions back, then end it."""
        if copy is not None:
            for (idx, _digest), (location, _offset) in list(events.uploads.items()):
                target = copy.targets[idx]
                await target.client.cancel_upload(location, target.repo)
        with contextlib.suppress(LeaseLost):
            await self._fail_job(job.id, events, n_targets, "cancelled", target_error="cancelled")

    async def _fail_job(
        self, job_id: str, events: JobEvents, n_targets: int, reason: str,
        target_error: str = "not copied: the job failed before this target finished",
    ) -> None:
        for idx in range(n_targets):
            if events.states.get(idx) not in ("FINISHED", "SKIPPED", "FAILED"):
                await events.target_state(idx, "FAILED", target_error)
        await self.store.finish(job_id, self.owner, "FAILED", reason)
        log.warning("job %s: FAILED (%s)", job_id, reason)

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

    def _build(self, job: ClaimedJob, events: JobEvents) -> ImageCopy:
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
        source = Source(source_client, source_client.repository(src["image"]), src["ref"])
        target_auth = secrets.get("targets") or []
        targets = []
        for idx, t in enumerate(req["targets"]):
            c = client(t, auth_for(target_auth[idx] if idx < len(target_auth) else None, t["endpoint"]), push=True)
            targets.append(Target(idx, c, c.repository(t.get("image") or src["image"]), t.get("ref") or src["ref"], t.get("overwrite", False)))
        return ImageCopy(
            source, targets, events, self._stop, self.settings.tuning, first_attempt=job.attempt == 1, streams=self.streams,
            referrers=req.get("referrers", False),
        )
