"""The service's uploads in flight: who leads, who may follow, and what ends a lead."""
from __future__ import annotations

import pytest

from pydlit.inflight import InFlight

pytestmark = pytest.mark.asyncio


async def test_a_lead_is_followed_by_jobs_reading_its_source_until_it_ends() -> None:
    uploads = InFlight()
    end = uploads.lead("reg", "sha256:a", "r1", "src")
    up = uploads.leader("reg", "sha256:a", "src")
    assert up is not None and up.repo == "r1"
    assert uploads.leader("reg", "sha256:a", "elsewhere") is None  # another source's pace
    assert uploads.leader("other-reg", "sha256:a", "src") is None
    end(True)
    end(False)  # told once: the first word stands
    assert up.landed.result() is True
    assert uploads.leader("reg", "sha256:a", "src") is None


async def test_a_second_upload_of_a_led_blob_leaves_the_first_lead_in_place() -> None:
    # A job resuming its own session sends the blob beside the lead; when it ends, later jobs
    # still follow the first.
    uploads = InFlight()
    uploads.lead("reg", "sha256:a", "r1", "src")
    beside = uploads.lead("reg", "sha256:a", "r2", "src")
    beside(False)
    up = uploads.leader("reg", "sha256:a", "src")
    assert up is not None and up.repo == "r1" and not up.landed.done()
