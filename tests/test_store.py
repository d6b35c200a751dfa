"""The SQLite job store against a real database file, with an injectable clock."""
from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import pytest_asyncio

from pydlit.secretbox import SecretBox
from pydlit.store import MIGRATIONS, LeaseLost, Store, StoreError, iso, migrate

pytestmark = pytest.mark.asyncio

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
TARGETS = [
    {"endpoint": "http://127.0.0.1:5001/v2", "image": "app", "ref": "v1"},
    {"endpoint": "https://127.0.0.1:5002", "image": "mirror/app", "ref": "stable"},
]
SECRETS = {"source": {"basicauth": {"user": "u", "password": "s3cr3t-PASSWORD"}}, "targets": [None, {"header": {"X-Token": "hdr-SECRET"}}]}
REQUEST = {"source": {"endpoint": "http://127.0.0.1:5000", "image": "app", "ref": "v1", "auth": {"basicauth": "<redacted>"}}, "targets": []}
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def newest_migration() -> int:
    return max(int(m.group(1)) for p in MIGRATIONS.glob("*.sql") if (m := re.match(r"(\d+)_", p.name)))


def raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection: what it sees has been committed."""
    conn = sqlite3.connect(str(path))
    conn.row_factory = sqlite3.Row
    return conn


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest_asyncio.fixture
async def store(db_path: Path, clock: Clock):
    s = await Store.open(db_path, clock=clock)
    yield s
    await s.close()


async def enqueue(store: Store, targets=TARGETS, secrets=SECRETS) -> str:
    return await store.enqueue(REQUEST, secrets, targets, "http://127.0.0.1:5000 app:v1")


# -- migrations ------------------------------------------------------------------------------------


async def test_migrations_set_user_version_to_newest(store: Store, db_path: Path) -> None:
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newest_migration() >= 1
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "job_secrets", "job_targets", "uploads", "known_blobs"} <= tables


async def test_reopening_a_migrated_db_keeps_data(db_path: Path, clock: Clock) -> None:
    s = await Store.open(db_path, clock=clock)
    job_id = await enqueue(s)
    await s.close()
    s = await Store.open(db_path, clock=clock)
    try:
        assert (await s.job_view(job_id))["value"] == "QUEUED"
    finally:
        await s.close()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newest_migration()


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    with sqlite3.connect(str(db_path)) as conn:
        conn.execute(f"PRAGMA user_version = {newest_migration() + 41}")
    with pytest.raises(StoreError) as caught:
        await Store.open(db_path)
    msg = str(caught.value)
    assert str(newest_migration() + 41) in msg
    assert "newer" in msg and "refusing" in msg
    with raw(db_path) as conn:
        # Nothing was created in the refused database.
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'jobs'").fetchone()[0] == 0


async def test_a_failing_migration_rolls_back_and_names_the_file(tmp_path: Path) -> None:
    import aiosqlite

    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_first.sql").write_text("CREATE TABLE a (x INTEGER);")
    (folder / "0002_broken.sql").write_text("CREATE TABLE b (x INTEGER);\nTHIS IS NOT SQL;")
    db = await aiosqlite.connect(str(tmp_path / "m.db"), isolation_level=None)
    try:
        with pytest.raises(StoreError, match="0002_broken.sql"):
            await migrate(db, folder)
        async with db.execute("PRAGMA user_version") as cur:
            assert (await cur.fetchone())[0] == 1
        async with db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cur:
            names = {r[0] for r in await cur.fetchall()}
        assert names == {"a"}
    finally:
        await db.close()


# -- enqueue and claim -----------------------------------------------------------------------------


async def test_enqueue_commits_job_targets_and_secrets(store: Store, db_path: Path) -> None:
    job_id = await enqueue(store)
    with raw(db_path) as conn:
        job = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        targets = conn.execute("SELECT * FROM job_targets WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
        sealed = conn.execute("SELECT sealed FROM job_secrets WHERE job_id = ?", (job_id,)).fetchone()["sealed"]
    assert job["state"] == "QUEUED"
    assert job["attempt"] == 0 and job["lease_owner"] is None
    assert job["created_at"] == iso(T0)
    assert job["source"] == "http://127.0.0.1:5000 app:v1"
    assert json.loads(job["request"]) == REQUEST
    assert [(t["idx"], t["endpoint"], t["image"], t["ref"], t["state"]) for t in targets] == [
        (0, TARGETS[0]["endpoint"], "app", "v1", "PENDING"),
        (1, TARGETS[1]["endpoint"], "mirror/app", "stable", "PENDING"),
    ]
    # Sealed at rest: sqlite3 shows opaque text, never a credential.
    assert sealed.startswith("v1:")
    assert "s3cr3t-PASSWORD" not in sealed and "hdr-SECRET" not in sealed and "basicauth" not in sealed
    assert (await store.claim("node/w", 30)).secrets == SECRETS


async def test_secrets_sealed_with_another_key_are_not_opened(db_path: Path, clock: Clock) -> None:
    first = await Store.open(db_path, clock=clock, box=SecretBox(b"k" * 32))
    await enqueue(first)
    await first.close()
    other = await Store.open(db_path, clock=clock, box=SecretBox(b"x" * 32))
    try:
        job = await other.claim("node/w", 30)
    finally:
        await other.close()
    assert job is not None and job.secrets is None


async def test_enqueue_is_all_or_nothing(store: Store, db_path: Path) -> None:
    with pytest.raises(KeyError):
        await enqueue(store, targets=[TARGETS[0], {"endpoint": "http://x"}])  # second lacks image/ref
    with raw(db_path) as conn:
        for table in ("jobs", "job_targets", "job_secrets"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


async def test_jobs_submitted_together_share_a_commit_and_fail_alone(
    store: Store, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    insert = store._insert_jobs

    async def counting(batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        await insert(batch)

    monkeypatch.setattr(store, "_insert_jobs", counting)
    bad_target = [{"endpoint": None, "image": "app", "ref": "v1"}]  # NOT NULL: refused by SQLite
    results = await asyncio.gather(
        enqueue(store), enqueue(store), enqueue(store, targets=bad_target), enqueue(store), enqueue(store),
        return_exceptions=True,
    )

    assert isinstance(results[2], sqlite3.IntegrityError), results
    ids = [r for i, r in enumerate(results) if i != 2]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 4
    # One commit for the five; when it failed, each went on its own and only the bad one failed.
    assert batches == [5, 1, 1, 1, 1, 1]
    with raw(db_path) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT id FROM jobs")) == sorted(ids)
        assert conn.execute("SELECT count(*) FROM job_targets").fetchone()[0] == 4 * len(TARGETS)
        assert conn.execute("SELECT count(*) FROM job_secrets").fetchone()[0] == 4


async def test_claim_on_an_empty_queue_returns_none(store: Store) -> None:
    assert await store.claim("node/a", 30) is None


async def test_claim_takes_the_oldest_first_and_leases_it(store: Store, clock: Clock, db_path: Path) -> None:
    clock.advance(10)
    newer = await enqueue(store)
    clock.now = T0  # inserted second, but created earlier
    older = await enqueue(store)
    clock.now = T0 + timedelta(seconds=100)

    first = await store.claim("node/a", 30)
    assert first is not None and first.id == older
    assert first.attempt == 1
    assert first.request == REQUEST
    assert first.secrets == SECRETS
    second = await store.claim("node/a", 30)
    assert second is not None and second.id == newer
    assert await store.claim("node/a", 30) is None

    with raw(db_path) as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (older,)).fetchone()
    assert row["state"] == "RUNNING"
    assert row["lease_owner"] == "node/a"
    assert row["lease_expires"] == iso(T0 + timedelta(seconds=130))
    assert row["started_at"] == iso(T0 + timedelta(seconds=100))


async def test_concurrent_claims_never_share_a_job(store: Store) -> None:
    ids = {await enqueue(store) for _ in range(6)}
    results = await asyncio.gather(*(store.claim(f"node/{i}", 30) for i in range(12)))
    claimed = [r.id for r in results if r is not None]
    assert sorted(claimed) == sorted(ids)  # each once, none twice
    assert results.count(None) == 6


async def test_concurrent_claims_from_two_connections_never_share_a_job(store: Store, db_path: Path, clock: Clock) -> None:
    other = await Store.open(db_path, clock=clock)
    try:
        ids = {await enqueue(store) for _ in range(20)}

        async def drain(s: Store, owner: str) -> list[str]:
            got = []
            while (job := await s.claim(owner, 30)) is not None:
                got.append(job.id)
            return got

        results = await asyncio.gather(*(drain(s, f"{name}/{i}") for s, name in ((store, "a"), (other, "b")) for i in range(3)))
    finally:
        await other.close()
    claimed = [i for r in results for i in r]
    assert len(claimed) == len(set(claimed)) == 20
    assert set(claimed) == ids


async def test_release_requeues_and_the_next_claim_counts_an_attempt(store: Store, clock: Clock, db_path: Path) -> None:
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    await store.release(job_id, "node/a")
    assert (await store.job_view(job_id))["value"] == "QUEUED"
    clock.advance(5)
    again = await store.claim("node/b", 30)
    assert again is not None and again.id == job_id and again.attempt == 2
    with raw(db_path) as conn:
        # started_at is the first start, not the latest claim.
        assert conn.execute("SELECT started_at FROM jobs").fetchone()[0] == iso(T0)


# -- fencing ---------------------------------------------------------------------------------------


async def test_fenced_writes_fail_after_another_owner_took_the_job(store: Store, clock: Clock) -> None:
    job_id = await enqueue(store)
    await store.claim("node-a/1", 30)
    clock.advance(31)  # node-a's lease ran out
    assert await store.recover("node-b/") == 1
    taken = await store.claim("node-b/1", 30)
    assert taken is not None and taken.id == job_id

    with pytest.raises(LeaseLost):
        await store.renew(job_id, "node-a/1", 30)
    with pytest.raises(LeaseLost):
        await store.target_state(job_id, "node-a/1", 0, "FINISHED", None)
    with pytest.raises(LeaseLost):
        await store.save_upload(job_id, "node-a/1", 0, DIGEST_A, "http://127.0.0.1:5001/up?_state=x", 10)
    with pytest.raises(LeaseLost):
        await store.release(job_id, "node-a/1")
    with pytest.raises(LeaseLost):
        await store.finish(job_id, "node-a/1", "FINISHED", None)

    # The owner's writes still land, and the stale ones changed nothing.
    await store.renew(job_id, "node-b/1", 30)
    await store.target_state(job_id, "node-b/1", 1, "SKIPPED", "exists")
    view = await store.job_view(job_id)
    assert view["value"] == "RUNNING"
    assert [t["state"] for t in view["targets"]] == ["PENDING", "SKIPPED"]
    assert await store.uploads(job_id) == {}


async def test_fenced_writes_fail_after_finish(store: Store) -> None:
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    await store.finish(job_id, "node/a", "FINISHED", None)
    with pytest.raises(LeaseLost):
        await store.renew(job_id, "node/a", 30)
    with pytest.raises(LeaseLost):
        await store.target_state(job_id, "node/a", 0, "FAILED", "late")
    with pytest.raises(LeaseLost):
        await store.save_upload(job_id, "node/a", 0, DIGEST_A, "http://127.0.0.1:5001/up", 1)
    with pytest.raises(LeaseLost):
        await store.finish(job_id, "node/a", "FAILED", "twice")
    view = await store.job_view(job_id)
    assert view["value"] == "FINISHED" and view["error"] is None
    assert view["targets"][0]["state"] == "PENDING"


# -- recovery --------------------------------------------------------------------------------------


async def test_recover_requeues_own_node_and_expired_leases_only(store: Store, clock: Clock) -> None:
    own = await enqueue(store)
    expired = await enqueue(store)
    live = await enqueue(store)
    lookalike = await enqueue(store)
    by_owner = {}  # which job each owner got (equal created_at: the order among them does not matter)
    for owner, lease in (("node_1/old-life", 300), ("node2/x", 10), ("node2/y", 300), ("nodeX1/z", 300)):
        job = await store.claim(owner, lease)
        by_owner[owner] = job.id
    assert set(by_owner.values()) == {own, expired, live, lookalike}
    clock.advance(60)  # node2/x's lease (10 s) has expired; the others (300 s) have not

    # The node's own earlier life (live lease) and the expired lease; an '_' in the prefix is a
    # literal character, so "node_1/" matches "node_1/..." but not "nodeX1/...".
    assert await store.recover("node_1/") == 2
    assert await store.recover("node_1/") == 0

    states = {owner: (await store.job_view(job_id))["value"] for owner, job_id in by_owner.items()}
    assert states == {"node_1/old-life": "QUEUED", "node2/x": "QUEUED", "node2/y": "RUNNING", "nodeX1/z": "RUNNING"}


async def test_recover_leaves_queued_and_ended_jobs_alone(store: Store, clock: Clock) -> None:
    ended = await enqueue(store)
    clock.advance(1)
    queued = await enqueue(store)
    job = await store.claim("node1/a", 1)
    assert job.id == ended
    await store.finish(ended, "node1/a", "FAILED", "boom")
    clock.advance(100)
    assert await store.recover("node1/") == 0
    assert (await store.job_view(ended))["value"] == "FAILED"
    assert (await store.job_view(queued))["value"] == "QUEUED"


# -- finish and views ------------------------------------------------------------------------------


async def test_finish_deletes_secrets_and_uploads(store: Store, clock: Clock, db_path: Path) -> None:
    job_id = await enqueue(store)
    keep = await enqueue(store)
    await store.claim("node/a", 30)
    await store.save_upload(job_id, "node/a", 0, DIGEST_A, "http://127.0.0.1:5001/up/1?_state=s", 512)
    clock.advance(7)
    await store.finish(job_id, "node/a", "FAILED", "1 of 2 target(s) failed")
    with raw(db_path) as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert conn.execute("SELECT count(*) FROM job_secrets WHERE job_id = ?", (job_id,)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM uploads WHERE job_id = ?", (job_id,)).fetchone()[0] == 0
        # Another job's secrets are untouched.
        assert conn.execute("SELECT count(*) FROM job_secrets WHERE job_id = ?", (keep,)).fetchone()[0] == 1
    assert row["state"] == "FAILED"
    assert row["error"] == "1 of 2 target(s) failed"
    assert row["finished_at"] == iso(T0 + timedelta(seconds=7))
    assert row["lease_owner"] is None and row["lease_expires"] is None


async def test_job_view_shape_and_no_secret(store: Store) -> None:
    targets = TARGETS + [{"endpoint": "http://127.0.0.1:5003", "image": "app", "ref": "v1"}]
    job_id = await enqueue(store, targets=targets)
    await store.claim("node/a", 30)
    await store.progress(job_id, "node/a", {0: (100, 300), 1: (300, 300), 2: (0, None)})
    # What a target waits out shows while it runs, and goes when it ends.
    await store.retrying(job_id, "node/a", {0: "t0: HTTP 503", 1: "t1: HTTP 429", 2: "t2: HTTP 502"})
    await store.target_state(job_id, "node/a", 1, "FINISHED", None)
    await store.target_state(job_id, "node/a", 2, "SKIPPED", "app:v1 already exists")
    await store.target_state(job_id, "node/a", 0, "RUNNING", None)
    await store.retrying(job_id, "node/a", {1: "too late: ended"})

    view = await store.job_view(job_id)
    assert {"id", "value", "created_at", "started_at", "finished_at", "finished_endpoints", "skipped_clusters",
            "error", "targets"} <= set(view)
    assert view["id"] == job_id
    assert view["value"] == "RUNNING"
    assert view["started_at"] == iso(T0) and view["finished_at"] is None
    assert view["finished_endpoints"] == [TARGETS[1]["endpoint"]]
    assert view["skipped_clusters"] == ["http://127.0.0.1:5003"]
    assert view["bytes_done"] == 400 and view["bytes_total"] == 600
    assert view["targets"] == [
        {"endpoint": TARGETS[0]["endpoint"], "image": "app", "ref": "v1", "state": "RUNNING", "error": None,
         "retrying": "t0: HTTP 503", "bytes_done": 100, "bytes_total": 300},
        {"endpoint": TARGETS[1]["endpoint"], "image": "mirror/app", "ref": "stable", "state": "FINISHED", "error": None,
         "retrying": None, "bytes_done": 300, "bytes_total": 300},
        {"endpoint": "http://127.0.0.1:5003", "image": "app", "ref": "v1", "state": "SKIPPED",
         "error": "app:v1 already exists", "retrying": None, "bytes_done": 0, "bytes_total": None},
    ]
    text = json.dumps(view)
    assert "s3cr3t-PASSWORD" not in text and "hdr-SECRET" not in text
    assert "secrets" not in view


async def test_a_job_ended_for_its_unended_targets_shows_none_of_them_still_retrying(store: Store) -> None:
    # The source failed while both targets waited out its 503s.
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    await store.retrying(job_id, "node/a", {0: "the source: HTTP 503", 1: "the source: HTTP 503"})
    await store.finish(job_id, "node/a", "FAILED", "cannot read the source", target_error="not copied: the job failed")
    view = await store.job_view(job_id)
    assert [(t["state"], t["retrying"]) for t in view["targets"]] == [("FAILED", None), ("FAILED", None)]


async def test_a_targets_progress_does_not_go_back_when_a_restarted_run_counts_again(store: Store) -> None:
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    await store.progress(job_id, "node/a", {0: (150, 300)})
    # The restarted run starts counting from nothing, as it finds what the target holds.
    await store.target_state(job_id, "node/a", 0, "RUNNING", None, (0, 300))
    await store.progress(job_id, "node/a", {0: (40, 300)})
    assert (await store.job_view(job_id))["targets"][0]["bytes_done"] == 150
    await store.progress(job_id, "node/a", {0: (200, 300)})
    assert (await store.job_view(job_id))["targets"][0]["bytes_done"] == 200


async def test_a_later_attempt_at_an_image_of_another_size_or_a_targets_end_counts_afresh(store: Store) -> None:
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    await store.progress(job_id, "node/a", {0: (250, 300), 1: (250, 300)})
    # Requeued, the job finds the tag moved to an image of 100 bytes; and target 1 skipped.
    await store.target_state(job_id, "node/a", 0, "RUNNING", None, (0, 100))
    await store.target_state(job_id, "node/a", 1, "SKIPPED", "app:v1 already exists", (0, None))
    await store.progress(job_id, "node/a", {0: (40, 100)})
    assert [(t["bytes_done"], t["bytes_total"]) for t in (await store.job_view(job_id))["targets"]] == [(40, 100), (0, 300)]
    await store.target_state(job_id, "node/a", 0, "FINISHED", None, (100, 100))
    assert (await store.job_view(job_id))["targets"][0]["bytes_done"] == 100


async def test_a_queued_job_cancelled_after_a_requeue_shows_no_target_retrying(store: Store) -> None:
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    await store.retrying(job_id, "node/a", {0: "target: HTTP 503", 1: "target: HTTP 503"})
    await store.release(job_id, "node/a")
    assert await store.request_cancel(job_id) == "QUEUED"
    assert [(t["state"], t["retrying"]) for t in (await store.job_view(job_id))["targets"]] == [("FAILED", None)] * 2


async def test_target_state_writes_the_byte_counts_given_with_it(store: Store) -> None:
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    await store.progress(job_id, "node/a", {0: (10, 300), 1: (20, 300)})
    await store.target_state(job_id, "node/a", 0, "FINISHED", None, (300, 300))
    await store.target_state(job_id, "node/a", 1, "FAILED", "boom")  # no counts: they stay as they were

    targets = (await store.job_view(job_id))["targets"]
    assert [(t["state"], t["bytes_done"], t["bytes_total"]) for t in targets] == [("FINISHED", 300, 300), ("FAILED", 20, 300)]


async def test_job_view_of_an_unknown_job_is_none(store: Store) -> None:
    assert await store.job_view("no-such-job") is None


# -- constraints -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE jobs SET state = 'DONE'",
        "UPDATE jobs SET state = 'RUNNING'",  # RUNNING needs a lease owner
        "UPDATE jobs SET lease_owner = 'node/a'",  # a lease owner needs RUNNING
        "UPDATE jobs SET request = 'not json'",
        "UPDATE job_targets SET state = 'BOGUS'",
        "INSERT INTO uploads (job_id, target_idx, digest, location, offset, updated_at) "
        "SELECT id, 0, 'sha256:x', 'http://l', -1, 't' FROM jobs",
    ],
)
async def test_check_constraints_refuse_bad_rows(store: Store, db_path: Path, sql: str) -> None:
    await enqueue(store)
    with raw(db_path) as conn:
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(sql)
        conn.rollback()
        assert conn.execute("SELECT state FROM jobs").fetchone()[0] == "QUEUED"


# -- upload checkpoints and known blobs ------------------------------------------------------------


async def test_upload_checkpoints_round_trip(store: Store) -> None:
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    assert await store.uploads(job_id) == {}
    await store.save_upload(job_id, "node/a", 0, DIGEST_A, "http://127.0.0.1:5001/up/1?_state=one", 0)
    await store.save_upload(job_id, "node/a", 1, DIGEST_A, "http://127.0.0.1:5002/up/2?_state=two", 64)
    # Saving again replaces the Location and offset (newest wins).
    await store.save_upload(job_id, "node/a", 0, DIGEST_A, "http://127.0.0.1:5001/up/1?_state=three", 4096)
    assert await store.uploads(job_id) == {
        (0, DIGEST_A): ("http://127.0.0.1:5001/up/1?_state=three", 4096),
        (1, DIGEST_A): ("http://127.0.0.1:5002/up/2?_state=two", 64),
    }
    await store.drop_upload(job_id, "node/a", 0, DIGEST_A)
    assert await store.uploads(job_id) == {(1, DIGEST_A): ("http://127.0.0.1:5002/up/2?_state=two", 64)}
    await store.drop_upload(job_id, "node/a", 1, DIGEST_B)  # not there: no effect
    assert len(await store.uploads(job_id)) == 1


async def test_a_checkpoint_says_whether_the_registry_named_its_host(store: Store) -> None:
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    named = "http://localhost:5001/up/1?_state=one"
    await store.save_upload(job_id, "node/a", 0, DIGEST_A, named, 0, named=True)
    await store.save_upload(job_id, "node/a", 1, DIGEST_A, "http://127.0.0.1:5002/up/2?_state=two", 64)
    assert await store.named_uploads(job_id) == [(0, named)]
    # The newest checkpoint decides: a session the registry now names by the endpoint's host.
    await store.save_upload(job_id, "node/a", 0, DIGEST_A, "http://127.0.0.1:5001/up/1?_state=three", 4096)
    assert await store.named_uploads(job_id) == []


async def test_uploads_survive_a_release(store: Store) -> None:
    job_id = await enqueue(store)
    await store.claim("node/a", 30)
    await store.save_upload(job_id, "node/a", 0, DIGEST_A, "http://127.0.0.1:5001/up?_state=s", 8)
    await store.release(job_id, "node/a")
    await store.claim("node/b", 30)
    assert await store.uploads(job_id) == {(0, DIGEST_A): ("http://127.0.0.1:5001/up?_state=s", 8)}


async def test_remember_blobs_and_mount_sources(store: Store, clock: Clock) -> None:
    reg, other = "http://127.0.0.1:5001", "http://127.0.0.1:5002"
    assert await store.mount_sources(reg, DIGEST_A) == []
    await store.remember_blobs([(reg, "team/a", DIGEST_A)])
    clock.advance(1)
    await store.remember_blobs([(reg, "team/b", DIGEST_A), (reg, "team/c", DIGEST_B), (other, "elsewhere", DIGEST_A)])
    assert await store.mount_sources(reg, DIGEST_A) == ["team/b", "team/a"]  # newest first
    clock.advance(1)
    await store.remember_blobs([(reg, "team/a", DIGEST_A)])  # seen again: no duplicate, newer
    assert await store.mount_sources(reg, DIGEST_A) == ["team/a", "team/b"]
    assert await store.mount_sources(reg, DIGEST_A, limit=1) == ["team/a"]
    assert await store.mount_sources(other, DIGEST_A) == ["elsewhere"]
    assert await store.mount_sources(reg, DIGEST_B) == ["team/c"]
