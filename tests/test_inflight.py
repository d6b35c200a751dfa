"""The service's uploads in flight: who leads, who may follow, and what ends a lead."""
from __future__ import annotations

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
