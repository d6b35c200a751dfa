"""The worker's claim loop: a job queued while a claim is on its way to the DB is taken at once,
not at the next idle poll."""
from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from pydlit.registry.client import RetryPolicy
from pydlit.settings import Settings
from pydlit.store import Store
from pydlit.transfer import MemoryEvents
from pydlit.worker import Worker, _outcome

CLOSED = "http://127.0.0.1:9"  # nothing listens: a job fails at once, without leaving loopback
REQUEST = {"source": {"endpoint": CLOSED, "image": "team/app", "ref": "v1"}, "targets": [{"endpoint": CLOSED}]}
TARGETS = [{"endpoint": CLOSED, "image": "team/app", "ref": "v1"}]


@pytest.mark.asyncio
async def test_a_job_queued_during_an_empty_claim_is_taken_without_waiting_for_the_poll(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "t.db")
    settings = Settings(
        db=str(tmp_path / "t.db"), node="test-node", concurrency=2, poll_s=30.0, heartbeat_s=0.05,
        stop_grace_s=2.0, retry=RetryPolicy(attempts=1, base_delay=0.0, max_delay=0.0, max_total=1.0),
    )
    async with aiohttp.ClientSession() as session:
        worker = Worker(store, session, settings)
        real_claim = store.claim
        queued: list[str] = []

        async def claim_racing_a_submission(owner: str, lease_s: float, cancelled_only: bool = False):  # type: ignore[no-untyped-def]
            found = await real_claim(owner, lease_s, cancelled_only)
            if not queued:
                # The queue was empty when the claim looked; a job arrives before it returns.
                queued.append(await store.enqueue(REQUEST, {}, TARGETS, "x"))
                worker.notify()
            return found

        store.claim = claim_racing_a_submission  # type: ignore[method-assign]
        await worker.start()
        try:
            for _ in range(100):  # 2 s at most, against a 30 s poll
                await asyncio.sleep(0.02)
                if queued and (await store.job_view(queued[0]))["started_at"]:
                    break
            view = await store.job_view(queued[0])
            assert view["started_at"] is not None, "the job waited for the idle poll"
        finally:
            await worker.stop()
            await store.close()


@pytest.mark.asyncio
async def test_a_failed_jobs_error_names_the_cause_its_failed_targets_share() -> None:
    events = MemoryEvents()
    await events.target_state(0, "FINISHED")
    await events.target_state(1, "FAILED", "src: read blob sha256:ab failed: HTTP 503")
    await events.target_state(2, "FAILED", "src: read blob sha256:ab failed: HTTP 503")
    assert _outcome(events, 3).error == "2 of 3 target(s) failed: src: read blob sha256:ab failed: HTTP 503"
    await events.target_state(2, "FAILED", "t2: push manifest app:v1 failed: HTTP 403")
    assert _outcome(events, 3).error == "2 of 3 target(s) failed"  # each its own: see the targets
    await events.target_state(1, "FINISHED")
    await events.target_state(2, "SKIPPED", "exists")
    assert _outcome(events, 3).state == "FINISHED"
