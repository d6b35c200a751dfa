"""The durable job queue in SQLite: migrations, enqueue, atomic claims with leases, fenced
progress writes, upload checkpoints, and the read-only views the API serves."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiosqlite

from .secretbox import SecretBox, SecretError, load_key

MIGRATIONS = Path(__file__).parent / "migrations"
WAL_ATTEMPTS = 50  # 0.1 s apart: as long as busy_timeout waits for any other lock
ENDED = ("FINISHED", "FAILED")


# A running target's new bytes_done (or none: NULL) for the same total, never below the one it
# replaces (see Store.progress); as given for an ended target, or another total.
_NOT_BELOW = ("CASE WHEN ? IN ('PENDING', 'RUNNING') AND coalesce(?, bytes_total) IS bytes_total "
              "THEN max(coalesce(?, bytes_done), coalesce(bytes_done, 0)) ELSE coalesce(?, bytes_done) END")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(t: datetime) -> str:
    # One fixed width, so that ISO strings compare in SQL as the times they name.
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")


class LeaseLost(Exception):
    """Another worker owns the job now (or it ended); this one must stop touching it."""


class StoreError(Exception):
    pass


@dataclass(frozen=True)
class _NewJob:
    """A submitted job's rows, waiting for the commit it shares with others."""

    job: tuple[Any, ...]
    secrets: tuple[Any, ...] | None  # None: the job brought no credentials
    targets: list[tuple[Any, ...]]
    committed: asyncio.Future[None]


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    request: dict[str, Any]
    secrets: dict[str, Any] | None  # None: sealed with a key this process does not have
    attempt: int
    cancel_requested: bool = False


class Store:
    def __init__(self, db: aiosqlite.Connection, box: SecretBox, clock: Callable[[], datetime] = utcnow) -> None:
        self._db = db
        self._box = box
        self._clock = clock
        # aiosqlite runs one connection on one thread; a transaction of several statements must
        # still keep other coroutines out until it commits.
        self._tx = asyncio.Lock()
        # Jobs submitted while a commit is on its way to the disk share the next one.
        self._arrivals: list[_NewJob] = []
        self._committer: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, path: str | Path, clock: Callable[[], datetime] = utcnow, box: SecretBox | None = None,
        secret_key: str | None = None,
    ) -> Store:
        """Open (and migrate) the DB; credentials are sealed with `box`, by default with the key
        from `secret_key` (PYDLIT_SECRET_KEY) or kept beside the DB, created on first start."""
        db = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            # Before anything that locks: a process starting beside this one waits, not fails.
            await db.execute("PRAGMA busy_timeout=5000")
            await _use_wal(db)
            await db.execute("PRAGMA foreign_keys=ON")
            # A commit need not wait for the disk: WAL keeps every write through a crash of this
            # process, and a power cut can cost the last progress writes, which a job repeats
            # harmlessly. What must survive that too (an accepted job, a cancel) commits with
            # FULL (see _transaction). An fsync per progress write made the one DB thread the
            # bottleneck under load: 10-50 ms per write with registries busy on the same disk.
            await db.execute("PRAGMA synchronous=NORMAL")
            await migrate(db)
            if box is None:
                # A key file made now could not open what is sealed: the old key is missing.
                box = SecretBox(load_key(str(path), secret_key, create=not await _holds_credentials(db)))
        except BaseException:
            await db.close()
            raise
        return cls(db, box, clock)

    async def close(self) -> None:
        if self._committer is not None:
            await self._committer  # submissions already accepted reach the disk first
        await self._db.close()

    def _now(self) -> str:
        return iso(self._clock())

    @contextlib.asynccontextmanager
    async def _transaction(self, durable: bool = False) -> AsyncIterator[None]:
        """A transaction; `durable` ones are on disk when this returns (a power cut keeps them)."""
        async with self._tx:
            if durable:
                await self._db.execute("PRAGMA synchronous=FULL")
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
            finally:
                if durable:
                    await self._db.execute("PRAGMA synchronous=NORMAL")

    async def _write(self, sql: str, params: tuple[Any, ...] | list[tuple[Any, ...]], many: bool = False) -> int:
        """One write statement, kept out of any other coroutine's open transaction."""
        async with self._tx:
            if many:
                cur = await self._db.executemany(sql, params)  # type: ignore[arg-type]
            else:
                cur = await self._db.execute(sql, params)
            return cur.rowcount

    # -- queue ----------------------------------------------------------------------------------

    async def enqueue(self, request: dict[str, Any], secrets: dict[str, Any], targets: list[dict[str, str]], source: str) -> str:
        """Commit a job and its targets, durably; returns its id. Jobs that arrive together are
        committed together (one fsync for a burst of submissions, not one each)."""
        job_id = str(uuid.uuid4())
        now = self._now()
        job = _NewJob(
            (job_id, source, json.dumps(request), now),
            # Nothing sealed for a job without credentials, so a lost key never fails it.
            (job_id, self._box.seal(secrets)) if _brings_credentials(secrets) else None,
            [(job_id, i, t["endpoint"], t["image"], t["ref"], now) for i, t in enumerate(targets)],
            asyncio.get_running_loop().create_future(),
        )
        self._arrivals.append(job)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_arrivals())
        await asyncio.shield(job.committed)
        return job_id

    async def _commit_arrivals(self) -> None:
        while self._arrivals:
            batch, self._arrivals = self._arrivals, []
            try:
                await self._insert_jobs(batch)
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].committed.set_exception(exc)
                    continue
                # One bad job must not take its neighbours down with it: each on its own.
                for job in batch:
                    try:
                        await self._insert_jobs([job])
                    except Exception as one:
                        job.committed.set_exception(one)
                    else:
                        job.committed.set_result(None)
            else:
                for job in batch:
                    job.committed.set_result(None)

    async def _insert_jobs(self, batch: list[_NewJob]) -> None:
        async with self._transaction(durable=True):
            await self._db.executemany("INSERT INTO jobs (id, source, request, created_at) VALUES (?, ?, ?, ?)", [j.job for j in batch])
            await self._db.executemany(
                "INSERT INTO job_secrets (job_id, sealed) VALUES (?, ?)", [j.secrets for j in batch if j.secrets]
            )
            await self._db.executemany(
                "INSERT INTO job_targets (job_id, idx, endpoint, image, ref, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                [t for j in batch for t in j.targets],
            )

    async def claim(self, owner: str, lease_s: float, cancelled_only: bool = False) -> ClaimedJob | None:
        """Atomically move a job to RUNNING under `owner`'s lease: a RUNNING one whose lease
        expired first (its process died, whatever its node's name; should it still live, every
        write it makes from now on fails its fence), else the oldest QUEUED one. A job taken
        over keeps its checkpoints, and the claim counts as an attempt, unless the owner takes
        back its own (its loop was held up past the lease: the same run goes on). Each half is
        one index search: a long queue costs a claim nothing more. `cancelled_only`: a QUEUED
        job whose cancel waits for its upload sessions to be given back (see request_cancel)."""
        now = self._clock()
        expired = "state = 'RUNNING' AND lease_expires < ?"
        # The planner would rather walk the whole queue by jobs_queue than take the partial index.
        queued = "jobs INDEXED BY jobs_queued_cancelled WHERE state = 'QUEUED' AND cancel_requested = 1" if cancelled_only \
            else "jobs WHERE state = 'QUEUED'"
        async with self._tx:
            rows = await self._db.execute_fetchall(
                f"""UPDATE jobs SET state = 'RUNNING', attempt = attempt + (lease_owner IS NOT ?), lease_owner = ?,
                          lease_expires = ?, started_at = coalesce(started_at, ?)
                   WHERE id = coalesce(
                       (SELECT id FROM jobs WHERE {expired} AND NOT ? ORDER BY created_at LIMIT 1),
                       (SELECT id FROM {queued} ORDER BY created_at LIMIT 1))
                   RETURNING id, request, attempt, cancel_requested,
                             (SELECT sealed FROM job_secrets WHERE job_id = jobs.id) AS sealed""",
                (owner, owner, iso(now + timedelta(seconds=lease_s)), iso(now), iso(now), cancelled_only),
            )
        if not rows:
            return None
        row = next(iter(rows))
        secrets: dict[str, Any] | None = {}
        if row["sealed"]:
            try:
                secrets = self._box.open(row["sealed"])
            except SecretError:
                secrets = None
        return ClaimedJob(row["id"], json.loads(row["request"]), secrets, row["attempt"], bool(row["cancel_requested"]))

    async def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend the lease; True when someone has asked for the job to be cancelled."""
        async with self._tx:
            rows = await self._db.execute_fetchall(
                "UPDATE jobs SET lease_expires = ? WHERE id = ? AND state = 'RUNNING' AND lease_owner = ? "
                "RETURNING cancel_requested",
                (iso(self._clock() + timedelta(seconds=lease_s)), job_id, owner),
            )
        if not rows:
            raise LeaseLost(job_id)
        return bool(next(iter(rows))[0])

    async def release(self, job_id: str, owner: str) -> None:
        """Hand a running job back to the queue (a graceful stop); its checkpoints stay."""
        await self._fenced(
            "UPDATE jobs SET state = 'QUEUED', lease_owner = NULL, lease_expires = NULL "
            "WHERE id = ? AND state = 'RUNNING' AND lease_owner = ?",
            (job_id, owner),
        )

    async def recover(self, owner_prefix: str) -> int:
        """Requeue RUNNING jobs of a dead process: this node's earlier lives, or expired leases."""
        return await self._write(
            "UPDATE jobs SET state = 'QUEUED', lease_owner = NULL, lease_expires = NULL "
            "WHERE state = 'RUNNING' AND (lease_owner LIKE ? ESCAPE '\\' OR lease_expires < ?)",
            (_like_prefix(owner_prefix), self._now()),
        )

    async def finish(
        self, job_id: str, owner: str, state: str, error: str | None, target_error: str | None = None
    ) -> None:
        """End a job; its credentials and checkpoints go with it (the job_ended trigger). With
        `target_error`, its targets not yet ended fail with it, in the same transaction."""
        now = self._now()
        end = (
            """UPDATE jobs SET state = ?, error = ?, finished_at = ?, lease_owner = NULL, lease_expires = NULL
               WHERE id = ? AND state = 'RUNNING' AND lease_owner = ?""",
            (state, error, now, job_id, owner),
        )
        if target_error is None:
            await self._fenced(*end)
            return
        async with self._transaction():
            await self._db.execute(
                "UPDATE job_targets SET state = 'FAILED', error = ?, updated_at = ?, retrying = NULL "
                f"WHERE job_id = ? AND state IN ('PENDING', 'RUNNING') AND {self._LEASED}",
                (target_error, now, job_id, job_id, owner),
            )
            if (await self._db.execute(*end)).rowcount == 0:
                raise LeaseLost(job_id)

    async def _fenced(self, sql: str, params: tuple[Any, ...]) -> None:
        if await self._write(sql, params) == 0:
            raise LeaseLost(str(params))

    # -- per-target progress, fenced by the lease ------------------------------------------------

    _LEASED = "EXISTS (SELECT 1 FROM jobs WHERE id = ? AND state = 'RUNNING' AND lease_owner = ?)"

    async def target_state(
        self, job_id: str, owner: str, idx: int, state: str, error: str | None,
        progress: tuple[int, int | None] | None = None,
    ) -> None:
        """A target's new state, with its byte counts as they stand when given (one write, not two).
        A running target's bytes_done does not go down (see progress)."""
        done, total = progress or (None, None)
        await self._fenced(
            f"UPDATE job_targets SET state = ?, error = ?, bytes_done = {_NOT_BELOW}, "
            "bytes_total = coalesce(?, bytes_total), updated_at = ?, "
            "retrying = CASE WHEN ? IN ('PENDING', 'RUNNING') THEN retrying END "
            f"WHERE job_id = ? AND idx = ? AND {self._LEASED}",
            (state, error, state, total, done, done, total, self._now(), state, job_id, idx, job_id, owner),
        )

    async def retrying(self, job_id: str, owner: str, notes: dict[int, str | None]) -> None:
        """What running targets wait out now (None: nothing any more)."""
        await self._write(
            "UPDATE job_targets SET retrying = ? WHERE job_id = ? AND idx = ? AND state IN ('PENDING', 'RUNNING') "
            f"AND {self._LEASED}",
            [(note, job_id, idx, job_id, owner) for idx, note in notes.items()],
            many=True,
        )

    async def progress(self, job_id: str, owner: str, counts: dict[int, tuple[int, int | None]]) -> None:
        """Byte counts as a run sees them. A restarted run counts again from 0, as it finds what
        the target holds; what a target was seen to hold stands until the new count passes it, so
        that progress does not go back (a SIGKILL that cost a session's bytes is made up for
        before the count moves on). An image of another size (its tag moved between attempts)
        counts afresh, and a target's end says what it holds."""
        now = self._now()
        await self._write(
            f"UPDATE job_targets SET bytes_done = {_NOT_BELOW}, bytes_total = ?, updated_at = ? WHERE job_id = ? AND idx = ? AND {self._LEASED}",
            [("RUNNING", total, done, done, total, now, job_id, idx, job_id, owner) for idx, (done, total) in counts.items()],
            many=True,
        )

    async def save_upload(
        self, job_id: str, owner: str, idx: int, digest: str, location: str, offset: int, named: bool = False,
    ) -> None:
        """`named`: the Location is on a host the registry named for itself (see named_uploads)."""
        await self._fenced(
            f"""INSERT INTO uploads (job_id, target_idx, digest, location, offset, named, updated_at)
                SELECT ?, ?, ?, ?, ?, ?, ? WHERE {self._LEASED}
                ON CONFLICT (job_id, target_idx, digest)
                DO UPDATE SET location = excluded.location, offset = excluded.offset, named = excluded.named,
                              updated_at = excluded.updated_at""",
            (job_id, idx, digest, location, offset, named, self._now(), job_id, owner),
        )

    async def drop_upload(self, job_id: str, owner: str, idx: int, digest: str) -> None:
        """Forget a checkpoint (none there: nothing to do); a worker that lost the lease must
        not take the new owner's resume point away."""
        async with self._tx:
            cur = await self._db.execute(
                f"DELETE FROM uploads WHERE job_id = ? AND target_idx = ? AND digest = ? AND {self._LEASED}",
                (job_id, idx, digest, job_id, owner),
            )
            if cur.rowcount == 0:
                rows = await self._db.execute_fetchall(f"SELECT {self._LEASED}", (job_id, owner))
                if not next(iter(rows))[0]:
                    raise LeaseLost(job_id)

    async def uploads(self, job_id: str) -> dict[tuple[int, str], tuple[str, int]]:
        rows = await self._db.execute_fetchall("SELECT target_idx, digest, location, offset FROM uploads WHERE job_id = ?", (job_id,))
        return {(r["target_idx"], r["digest"]): (r["location"], r["offset"]) for r in rows}

    async def named_uploads(self, job_id: str) -> list[tuple[int, str]]:
        """(target, Location) of the checkpoints on a host the registry named for itself, which
        the target's client of a later attempt trusts as the one that saved them did."""
        rows = await self._db.execute_fetchall("SELECT target_idx, location FROM uploads WHERE job_id = ? AND named", (job_id,))
        return [(r["target_idx"], r["location"]) for r in rows]

    # -- where blobs are, for cross-repository mounts ---------------------------------------------

    async def mount_sources(self, registry: str, digest: str, limit: int = 5) -> list[str]:
        rows = await self._db.execute_fetchall(
            "SELECT repository FROM known_blobs WHERE registry = ? AND digest = ? ORDER BY seen_at DESC LIMIT ?",
            (registry, digest, limit),
        )
        return [r["repository"] for r in rows]

    async def remember_blobs(self, sightings: list[tuple[str, str, str]]) -> None:
        """(registry, repository, digest) triples now known to hold the blob."""
        now = self._now()
        await self._write(
            "INSERT INTO known_blobs (registry, repository, digest, seen_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET seen_at = excluded.seen_at",
            [(*s, now) for s in sightings],
            many=True,
        )

    async def request_cancel(self, job_id: str) -> str | None:
        """Cancel a job: a QUEUED one ends here and now; a RUNNING one, or a QUEUED one holding
        upload sessions of an earlier attempt (which a worker gives back), is flagged for a
        worker. Returns the state the job was in, or None when there is no such job."""
        async with self._transaction(durable=True):
            rows = await self._db.execute_fetchall(
                "SELECT state, EXISTS (SELECT 1 FROM uploads WHERE job_id = jobs.id) AS sessions FROM jobs WHERE id = ?",
                (job_id,),
            )
            row = next(iter(rows)) if rows else None
            state = row["state"] if row else None
            if state == "RUNNING" or (state == "QUEUED" and row["sessions"]):
                await self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            elif state == "QUEUED":
                now = self._now()
                await self._db.execute(
                    "UPDATE jobs SET state = 'FAILED', error = 'cancelled', finished_at = ?, cancel_requested = 1 WHERE id = ?",
                    (now, job_id),
                )
                await self._db.execute(
                    "UPDATE job_targets SET state = 'FAILED', error = 'cancelled', updated_at = ?, retrying = NULL "
                    "WHERE job_id = ? AND state IN ('PENDING', 'RUNNING')",
                    (now, job_id),
                )
        return state

    async def prune(self, older_than: timedelta) -> int:
        """Delete ended jobs (with their targets) and blob sightings older than `older_than`."""
        cutoff = iso(self._clock() - older_than)
        pruned = await self._write("DELETE FROM jobs WHERE state IN ('FINISHED', 'FAILED') AND finished_at < ?", (cutoff,))
        await self._write("DELETE FROM known_blobs WHERE seen_at < ?", (cutoff,))
        return pruned

    async def count_by_state(self) -> dict[str, int]:
        rows = await self._db.execute_fetchall("SELECT state, count(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    # -- views ------------------------------------------------------------------------------------

    async def job_view(self, job_id: str) -> dict[str, Any] | None:
        """The API's status document for one job (never any credential)."""
        jobs = list(await self._db.execute_fetchall("SELECT * FROM jobs WHERE id = ?", (job_id,)))
        return (await self._views(jobs))[0] if jobs else None

    async def list_jobs(self, state: str | None, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """A page of jobs, newest first; the cursor (the last job's created_at and id) pages on."""
        where, params = [], []
        if state:
            where.append("state = ?")
            params.append(state)
        if cursor:
            created, _, job_id = cursor.partition("|")
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [created, created, job_id]
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        rows = list(await self._db.execute_fetchall(sql, (*params, limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = f"{rows[-1]['created_at']}|{rows[-1]['id']}" if more else None
        return await self._views(rows), next_cursor

    async def _views(self, jobs: list[sqlite3.Row]) -> list[dict[str, Any]]:
        if not jobs:
            return []
        ids = [j["id"] for j in jobs]
        marks = ",".join("?" * len(ids))
        by_job: dict[str, list[sqlite3.Row]] = {i: [] for i in ids}
        for t in await self._db.execute_fetchall(f"SELECT * FROM job_targets WHERE job_id IN ({marks}) ORDER BY job_id, idx", ids):
            by_job[t["job_id"]].append(t)
        return [_view(job, by_job[job["id"]]) for job in jobs]

    async def check_writable(self) -> None:
        """Raise unless the DB takes a write (a transaction that changes nothing durable)."""
        async with self._transaction():
            pass


async def migrate(db: aiosqlite.Connection, folder: Path = MIGRATIONS) -> int:
    """Apply migrations/NNNN_*.sql above the DB's user_version, each in its own transaction."""
    files = sorted((int(m.group(1)), p) for p in folder.glob("*.sql") if (m := re.match(r"(\d+)_", p.name)))
    if not files:
        raise StoreError(f"no migrations found in {folder}")
    version = await _user_version(db)
    newest = files[-1][0]
    if version > newest:
        raise StoreError(f"the database is at schema version {version}, newer than this pydlit knows ({newest}); refusing to start")
    for number, path in files:
        if number <= version:
            continue
        # Statement by statement, not with executescript, which would commit the transaction
        # that the version check below must share with the script.
        try:
            await db.execute("BEGIN IMMEDIATE")
            # A process starting beside this one may have applied it since the read above.
            version = await _user_version(db)
            if number > version:
                for statement in _statements(path.read_text()):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {number}")
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise StoreError(f"migration {path.name} failed: {exc}") from exc
    return newest


async def _use_wal(db: aiosqlite.Connection) -> None:
    # While a process starting beside this one turns a new database to WAL, SQLite answers
    # "locked" at once, busy_timeout or not; asked again a moment later, it finds WAL in place.
    for attempt in range(WAL_ATTEMPTS):
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == WAL_ATTEMPTS - 1:
                raise
        await asyncio.sleep(0.1)


async def _user_version(db: aiosqlite.Connection) -> int:
    async with db.execute("PRAGMA user_version") as cur:
        return int((await cur.fetchone())[0])


def _statements(script: str) -> list[str]:
    """The script's statements, cut where SQLite's parser sees one end: not at a ';' inside a
    string, a comment or a trigger's body."""
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    if pending.strip():
        statements.append(pending)  # unfinished: SQLite names the problem when it runs
    return statements


def _view(job: sqlite3.Row, targets: list[sqlite3.Row]) -> dict[str, Any]:
    return {
        "id": job["id"],
        "value": job["state"],
        "created_at": job["created_at"],
        "started_at": job["started_at"],
        "finished_at": job["finished_at"],
        "finished_endpoints": [t["endpoint"] for t in targets if t["state"] == "FINISHED"],
        "skipped_clusters": [t["endpoint"] for t in targets if t["state"] == "SKIPPED"],
        "error": job["error"],
        "attempt": job["attempt"],
        "cancel_requested": bool(job["cancel_requested"]),
        "source": job["source"],
        "bytes_done": sum(t["bytes_done"] for t in targets),
        "bytes_total": sum(t["bytes_total"] or 0 for t in targets),
        "targets": [
            {
                "endpoint": t["endpoint"],
                "image": t["image"],
                "ref": t["ref"],
                "state": t["state"],
                "error": t["error"],
                "retrying": t["retrying"],
                "bytes_done": t["bytes_done"],
                "bytes_total": t["bytes_total"],
            }
            for t in targets
        ],
    }


def asks_credentials(request: dict[str, Any]) -> bool:
    """Whether a job's stored request (its auth values redacted) brought credentials."""
    return "auth" in request["source"] or any("auth" in t for t in request["targets"])


def _brings_credentials(secrets: dict[str, Any]) -> bool:
    return bool(secrets.get("source")) or any(secrets.get("targets") or ())


async def _holds_credentials(db: aiosqlite.Connection) -> bool:
    """Whether a job still waits with credentials sealed in the DB. Rows that an earlier pydlit
    sealed for jobs without any do not count: their requests bring no auth."""
    rows = await db.execute_fetchall("SELECT jobs.request FROM job_secrets JOIN jobs ON jobs.id = job_secrets.job_id")
    return any(asks_credentials(json.loads(r["request"])) for r in rows)


def _like_prefix(prefix: str) -> str:
    return re.sub(r"([%_\\])", r"\\\1", prefix) + "%"
