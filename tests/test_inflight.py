"""The service's writes in flight: who leads an upload, who may follow, what ends a lead; and manifest
pushes into one repository, one at a time."""
from __future__ import annotations

import asyncio

import pytest

from pydlit.inflight import InFlight

pytestmark = pytest.mark.asyncio


async def test_a_lead_is_followed_by_jobs_reading_its_source_until_it_ends() -> None:
    uploads = InFlight()
    end = uploads.lead("reg", "sha256:a", "r1", "src", "alice")
    up = uploads.leader("reg", "sha256:a", "src", "alice", "r2")
    assert up is not None and up.repo == "r1"
    assert uploads.leader("reg", "sha256:a", "elsewhere", "alice", "r2") is None  # another source's pace
    assert uploads.leader("other-reg", "sha256:a", "src", "alice", "r2") is None
    end(True)
    end(False)  # told once: the first word stands
    assert up.landed.result() is True
    assert uploads.leader("reg", "sha256:a", "src", "alice", "r2") is None


async def test_other_credentials_follow_a_lead_into_their_own_repository_only() -> None:
    # They may not read another repository of the leader's: the mount would be refused, after
    # the wait. Into their own, the blob needs no mount at all.
    uploads = InFlight()
    uploads.lead("reg", "sha256:a", "r1", "src", "alice")
    assert uploads.leader("reg", "sha256:a", "src", "bob", "r2") is None
    assert uploads.leader("reg", "sha256:a", "src", "bob", "r1") is not None


async def test_a_second_upload_of_a_led_blob_leaves_the_first_lead_in_place() -> None:
    # A job resuming its own session sends the blob beside the lead; when it ends, later jobs
    # still follow the first.
    uploads = InFlight()
    uploads.lead("reg", "sha256:a", "r1", "src", "alice")
    beside = uploads.lead("reg", "sha256:a", "r2", "src", "alice")
    beside(False)
    up = uploads.leader("reg", "sha256:a", "src", "alice", "r3")
    assert up is not None and up.repo == "r1" and not up.landed.done()


async def test_manifests_go_into_a_repository_one_push_at_a_time() -> None:
    pushes = InFlight()
    log: list[str] = []

    async def push(name: str, registry: str, repo: str) -> None:
        async with pushes.pushing_manifests(registry, repo):
            log.append(f"{name} in")
            await asyncio.sleep(0.01)
            log.append(f"{name} out")

    await asyncio.gather(push("a", "reg", "r1"), push("b", "reg", "r1"), push("c", "reg", "r2"), push("d", "other", "r1"))
    assert log.index("b in") > log.index("a out")  # the same repository: after
    assert log.index("c in") < log.index("a out") and log.index("d in") < log.index("a out")  # others: beside
    assert pushes._pushing == {}  # nothing kept for repositories no push waits for


async def test_a_push_cancelled_while_it_waits_its_turn_leaves_the_others_theirs() -> None:
    pushes = InFlight()
    async with pushes.pushing_manifests("reg", "r1"):
        waiting = asyncio.ensure_future(_hold(pushes))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    async with asyncio.timeout(1):
        await _hold(pushes)
    assert pushes._pushing == {}


async def _hold(pushes: InFlight) -> None:
    async with pushes.pushing_manifests("reg", "r1"):
        pass
