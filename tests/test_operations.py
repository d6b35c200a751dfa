"""Operations (issue: secrets, API token, job list, cancel, progress, metrics, retention, leases,
settings, migrations) against the real service process and real registries, and against the worker
and the store in this process, with an injectable clock, where a race must be hit exactly."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import aiosqlite
import pytest
from aiohttp import web
from support.images import manifest_digest, push_image
from support.proxy import FaultProxy
from support.registry import free_port
from support.service import ServiceProcess, job_body, wait_for

from pydlit.registry.client import RegistryClient, RetryPolicy
from pydlit.secretbox import SecretBox, SecretError
from pydlit.settings import Settings, from_env
from pydlit.store import MIGRATIONS, LeaseLost, Store, StoreError, migrate
from pydlit.worker import Worker

MiB = 1024 * 1024
CLOSED = "http://127.0.0.1:9"  # nothing listens: a job that runs fails at once, without leaving loopback
REQUEST = {"source": {"endpoint": CLOSED, "image": "team/app", "ref": "v1"}, "targets": [{"endpoint": CLOSED}]}
TARGETS = [{"endpoint": CLOSED, "image": "team/app", "ref": "v1"}]
NO_AUTH = {"source": None, "targets": [None]}  # what the API hands the store for a request without auth
DIGEST = "sha256:" + "a" * 64
T0 = datetime.fromisoformat("2026-01-01T00:00:00+00:00")


def call(svc, method, path, token=None, data=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(svc.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_api_token_guards_every_call_but_health(service_factory):
    svc = service_factory(env={"PYDLIT_API_TOKEN": "tok-123-secret"})

    assert call(svc, "GET", "/healthz")[0] == 200
    for method, path in [("GET", "/api/distribute/image"), ("GET", "/api/distribute/image/x"), ("GET", "/metrics"), ("POST", "/api/distribute/image")]:
        status, body = call(svc, method, path, data=b"{}" if method == "POST" else None)
        assert status == 401, (method, path, status)
        assert json.loads(body)["status"] == "error"
        assert call(svc, method, path, token="wrong")[0] == 401
    assert call(svc, "GET", "/api/distribute/image", token="tok-123-secret")[0] == 200
    assert "tok-123-secret" not in svc.log_text()


def test_job_list_newest_first_with_state_filter_and_pages(service_factory, registries, repo_name):
    svc = service_factory(env={"PYDLIT_CONCURRENCY": "1"})
    push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[1024], seed=31)
    ids = [svc.submit(job_body(registries.source, repo_name, "v1", [(registries.target_a, {"image": f"{repo_name}-{i}"})])) for i in range(5)]
    for job_id in ids:
        svc.wait(job_id, timeout=30)

    status, body = call(svc, "GET", "/api/distribute/image?limit=2")
    page = json.loads(body)
    assert status == 200 and [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    seen = [j["id"] for j in page["jobs"]]
    for _ in range(5):
        if not page["next"]:
            break
        page = json.loads(call(svc, "GET", f"/api/distribute/image?limit=2&cursor={urllib.parse.quote(page['next'])}")[1])
        seen += [j["id"] for j in page["jobs"]]
    assert seen == ids[::-1]

    finished = json.loads(call(svc, "GET", "/api/distribute/image?state=FINISHED&limit=50")[1])["jobs"]
    assert {j["id"] for j in finished} == set(ids)
    assert json.loads(call(svc, "GET", "/api/distribute/image?state=RUNNING")[1])["jobs"] == []
    status, body = call(svc, "GET", "/api/distribute/image?state=DONE")
    assert status == 400 and "state must be one of" in json.loads(body)["msg"]


def test_cancel_queued_running_and_ended_jobs(service_factory, proxy_factory, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[6 * MiB, 6 * MiB], seed=32)
    slow = proxy_factory(registries.target_a)
    slow.rate_limit(2 * MiB, download=False, upload=True)
    svc = service_factory(env={"PYDLIT_CONCURRENCY": "1", "PYDLIT_CHUNK_MIB": "1"})
    running = svc.submit(job_body(registries.source, repo_name, "v1", [(slow, {"image": f"{repo_name}-r"})]))
    queued = svc.submit(job_body(registries.source, repo_name, "v1", [(registries.target_b, {"image": f"{repo_name}-q"})]))
    wait_for(lambda: svc.status(running)["bytes_done"] > 0)

    status, body = call(svc, "DELETE", f"/api/distribute/image/{queued}")
    assert status == 200 and json.loads(body)["value"] == "FAILED" and json.loads(body)["error"] == "cancelled"

    with sqlite3.connect(svc.db_path) as db:
        sessions = [r[0] for r in db.execute("select location from uploads where job_id = ?", (running,))]
    assert sessions, "a chunked upload should be in flight"
    started = time.monotonic()
    status, body = call(svc, "DELETE", f"/api/distribute/image/{running}")
    view = svc.wait(running, timeout=10)
    assert time.monotonic() - started < 5
    assert status == 200 and view["value"] == "FAILED" and view["error"] == "cancelled"
    assert view["targets"][0]["state"] == "FAILED" and view["targets"][0]["error"] == "cancelled"
    # The upload session was given back to the registry.
    for location in sessions:
        direct = location.replace(slow.url, registries.target_a.url)
        assert call_url("GET", direct) == 404

    assert call(svc, "DELETE", f"/api/distribute/image/{running}")[0] == 409
    assert call(svc, "DELETE", "/api/distribute/image/no-such-job")[0] == 404
    assert image.total_bytes > 0


def a_chunk_in(service_factory, proxy_factory, source, target, repo_name: str, seed: int) -> tuple[ServiceProcess, str]:  # type: ignore[no-untyped-def]
    """A service and its job copying a 12 MiB layer to `target` in 3 MiB chunks, through a
    proxy that takes 2 MiB/s: once the first chunk is in, the next on its way."""
    push_image(source, repo_name, "v1", "schema2", layer_sizes=[12 * MiB], seed=seed)
    slow = proxy_factory(target)
    slow.rate_limit(2 * MiB, download=False, upload=True)
    svc = service_factory(env={"PYDLIT_CHUNK_MIB": "3"})
    job_id = svc.submit(job_body(source, repo_name, "v1", [slow]))
    wait_for(lambda: svc.status(job_id)["bytes_done"] >= 3 * MiB)
    return svc, job_id


def test_a_cancel_ends_chunks_cleanly_so_the_registry_frees_their_sessions(service_factory, proxy_factory, registries, repo_name):
    # A chunk cut in the middle leaves distribution a session it can neither resume nor delete
    # (BLOB_UPLOAD_INVALID): its bytes stay on the registry's disk until its purge, days later.
    svc, job_id = a_chunk_in(service_factory, proxy_factory, registries.source, registries.target_a, repo_name, 41)
    assert registries.target_a.session_bytes(repo_name) > 3 * MiB

    started = time.monotonic()
    status, _ = call(svc, "DELETE", f"/api/distribute/image/{job_id}")
    view = svc.wait(job_id, timeout=15)

    assert status == 200 and (view["value"], view["error"]) == ("FAILED", "cancelled"), view
    assert view["targets"][0]["error"] == "cancelled"
    assert time.monotonic() - started < 5  # the chunk on its way had at most 1.5 s to go
    assert registries.target_a.session_bytes(repo_name) == 0


def test_sessions_a_cancel_may_not_give_back_are_named_in_the_log(service_factory, proxy_factory, registries, repo_name):
    # distribution wants the delete action to end a session; this token registry's users have
    # pull,push only. The sessions are left to its purge, and the operator is told.
    svc, job_id = a_chunk_in(service_factory, proxy_factory, registries.source, registries.token, repo_name, 44)

    status, _ = call(svc, "DELETE", f"/api/distribute/image/{job_id}")
    view = svc.wait(job_id, timeout=15)

    assert status == 200 and (view["value"], view["error"]) == ("FAILED", "cancelled"), view
    assert registries.token.session_bytes(repo_name) > 0
    warning = next(line for line in svc.log_text().splitlines() if "not given back" in line)
    assert f"job {job_id} target 0: 1 upload session(s) not given back" in warning and "insufficient_scope" in warning
    assert registries.token.password not in svc.log_text()


def test_small_blobs_sessions_a_failed_job_may_not_give_back_are_named_in_the_log(service_factory, proxy_factory, registries, repo_name):
    # Each small blob's session opens while the source is read; the source fails for good, and
    # the token registry will not let them go (no delete action): the log says so, once.
    push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[2048, 9000], seed=45)
    source = proxy_factory(registries.source)
    source.fail_next(1000, 404, kinds="blob_get")
    svc = service_factory(env={"PYDLIT_RETRY_ATTEMPTS": "1"})
    view = svc.wait(svc.submit(job_body(source, repo_name, "v1", [registries.token])), timeout=30)

    assert view["value"] == "FAILED", view
    warnings = [line for line in svc.log_text().splitlines() if "not given back" in line]
    assert len(warnings) == 1 and "target 0: 3 upload session(s) not given back" in warnings[0], warnings
    assert "insufficient_scope" in warnings[0]


def test_a_cancel_during_a_retrys_wait_ends_the_job_at_once(service_factory, proxy_factory, registries, repo_name):
    # No chunk is on its way: nothing to wait for, however long the registry asked to be left.
    push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[12 * MiB], seed=42)
    target = proxy_factory(registries.target_a)
    target.fail_next(1, 503, methods="PATCH", retry_after=60)
    svc = service_factory(env={"PYDLIT_CHUNK_MIB": "3"})
    job_id = svc.submit(job_body(registries.source, repo_name, "v1", [target]))
    wait_for(lambda: target.count("PATCH") == 1)
    time.sleep(0.3)

    started = time.monotonic()
    status, _ = call(svc, "DELETE", f"/api/distribute/image/{job_id}")
    view = svc.wait(job_id, timeout=15)

    assert status == 200 and (view["value"], view["error"]) == ("FAILED", "cancelled"), view
    assert time.monotonic() - started < 3
    assert target.count("PATCH") == 1 and target.count("DELETE") == 1
    assert registries.target_a.session_bytes(repo_name) == 0


def test_cancel_during_a_small_blob_read_gives_its_upload_session_back(service, proxy_factory, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[20_000, 30_000], seed=34)
    blobs = len(image.blobs)
    source, target = proxy_factory(registries.source), proxy_factory(registries.target_a)
    source.stall_next_download(10.0, after_bytes=0)  # one blob's read hangs; its session is open
    job_id = service.submit(job_body(source, repo_name, "v1", [target]))
    wait_for(lambda: (target.count("POST", "upload_post"), target.count("PUT", "upload_put")) == (blobs, blobs - 1))

    status, _ = call(service, "DELETE", f"/api/distribute/image/{job_id}")
    view = service.wait(job_id, timeout=10)

    assert status == 200 and view["value"] == "FAILED" and view["error"] == "cancelled", view
    wait_for(lambda: target.count("DELETE") == 1, timeout=5)
    assert (target.count("POST", "upload_post"), target.count("PUT", "upload_put")) == (blobs, blobs - 1), target.requests


def call_url(method, url):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def test_progress_is_reported_while_running(service_factory, proxy_factory, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[4 * MiB, 4 * MiB], seed=33)
    slow = proxy_factory(registries.target_a)
    slow.rate_limit(2 * MiB, download=False, upload=True)
    svc = service_factory(env={"PYDLIT_CHUNK_MIB": "1"})
    job_id = svc.submit(job_body(registries.source, repo_name, "v1", [slow]))

    samples = []
    for _ in range(200):
        view = svc.status(job_id)
        samples.append(view["targets"][0]["bytes_done"])
        if view["value"] in ("FINISHED", "FAILED"):
            break
        time.sleep(0.25)
    assert view["value"] == "FINISHED"
    partial = {s for s in samples if 0 < s < image.total_bytes}
    # At ~2 MiB/s an 8 MiB image takes ~4 s: a 1 s refresh shows several distinct partial values.
    assert len(partial) >= 2, samples
    assert view["bytes_done"] == view["bytes_total"] == image.total_bytes


def test_metrics_in_prometheus_text(service_factory, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[100_000], seed=34)
    svc = service_factory()
    svc.wait(svc.submit(job_body(registries.source, repo_name, "v1", [registries.target_a])), timeout=30)

    status, body = call(svc, "GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert 'pydlit_jobs{state="FINISHED"} 1.0' in text
    uploaded = [line for line in text.splitlines() if line.startswith('pydlit_bytes_total{direction="upload"}')]
    assert uploaded and float(uploaded[0].split()[-1]) >= image.total_bytes
    assert 'pydlit_registry_request_seconds_count{operation="manifest_put"}' in text


@pytest.mark.parametrize("days,kept", [("30", True), ("0", False)])
def test_retention_prunes_ended_jobs(service_factory, registries, repo_name, days, kept):
    push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[1024], seed=35)
    svc = service_factory()
    job_id = svc.submit(job_body(registries.source, repo_name, "v1", [registries.target_a]))
    svc.wait(job_id, timeout=30)
    svc.stop()

    svc.env["PYDLIT_RETENTION_DAYS"] = days
    svc.start()
    # Pruning runs at start; give it a moment, bounded.
    time.sleep(0.5)
    with sqlite3.connect(svc.db_path) as db:
        jobs = db.execute("select count(*) from jobs where id = ?", (job_id,)).fetchone()[0]
        targets = db.execute("select count(*) from job_targets where job_id = ?", (job_id,)).fetchone()[0]
    assert (jobs, targets) == ((1, 1) if kept else (0, 0))


def test_server_side_credentials_are_used_when_a_request_has_none(service_factory, registries, repo_name, tmp_path):
    image = push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[2048], seed=36)
    tls = registries.tls
    creds = tmp_path / "credentials.json"
    # A Docker config.json, as `docker login` writes it.
    import base64

    token = base64.b64encode(f"{tls.user}:{tls.password}".encode()).decode()
    creds.write_text(json.dumps({"auths": {tls.host: {"auth": token}}}))
    svc = service_factory(env={"PYDLIT_CREDENTIALS": str(creds)})
    body = job_body(registries.source, repo_name, "v1", [tls])
    body["targets"][0].pop("auth")

    view = svc.wait(svc.submit(body), timeout=30)

    assert view["value"] == "FINISHED", view
    assert view["targets"][0]["bytes_done"] == image.total_bytes
    assert tls.password not in svc.log_text() and token not in svc.log_text()


def test_json_logs_carry_the_job_id_and_no_secret(service_factory, registries, repo_name):
    push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[2048], seed=37)
    svc = service_factory(env={"PYDLIT_LOG_FORMAT": "json"})
    tls = registries.tls
    body = job_body(registries.source, repo_name, "v1", [(tls, {"image": repo_name})])
    job_id = svc.submit(body)
    svc.wait(job_id, timeout=30)
    svc.stop()

    lines = [json.loads(line) for line in svc.log_text().splitlines() if line.startswith("{")]
    job_lines = [entry for entry in lines if entry.get("job") == job_id]
    assert any("FINISHED" in entry["msg"] for entry in job_lines)
    assert {"ts", "level", "logger", "msg"} <= set(job_lines[0])
    assert tls.password not in svc.log_text()


def test_two_services_on_one_database_run_every_job_exactly_once(service_factory, registries, repo_name, tmp_path):
    db = tmp_path / "shared.db"
    env = {"PYDLIT_CONCURRENCY": "1"}  # one job at a time each, so that both must take a share
    services = [service_factory(env={**env, "PYDLIT_NODE": f"node-{n}"}, db_path=db) for n in "ab"]
    images = [push_image(registries.source, f"{repo_name}-{i}", "v1", "schema2", [2048, 30_000 + i], seed=3900 + i)
              for i in range(8)]

    ids = [services[i % 2].submit(job_body(registries.source, f"{repo_name}-{i}", "v1", [registries.target_a]))
           for i in range(len(images))]

    for job_id in ids:
        status = services[0].wait(job_id, timeout=60)
        assert status["value"] == "FINISHED" and status["attempt"] == 1, status
    for i, image in enumerate(images):
        assert manifest_digest(registries.target_a, f"{repo_name}-{i}", "v1") == image.digest
    started = [{j for j in ids if f"job {j}: started" in svc.log_text()} for svc in services]
    assert started[0] | started[1] == set(ids)
    assert not started[0] & started[1], "a job ran in both services"
    assert started[0] and started[1], f"one service ran everything: {[len(s) for s in started]}"


# -- cancelling a running job ----------------------------------------------------------------------


class SlowToGiveBack(FaultProxy):
    """Answers an upload session's DELETE only after 2.5 s: two and a half heartbeats."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            await asyncio.sleep(2.5)
        return await super()._handle(request)


def test_a_cancel_whose_sessions_take_long_to_give_back_still_ends_the_job(service_factory, proxy_factory, registries, repo_name):
    push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[8 * MiB], seed=40)
    slow = proxy_factory(registries.target_a, cls=SlowToGiveBack)
    slow.rate_limit(1 * MiB, download=False, upload=True)
    svc = service_factory(env={"PYDLIT_CHUNK_MIB": "1"})
    job_id = svc.submit(job_body(registries.source, repo_name, "v1", [slow]))
    wait_for(lambda: svc.status(job_id)["bytes_done"] > 0)
    with sqlite3.connect(svc.db_path) as db:
        sessions = [r[0] for r in db.execute("select location from uploads where job_id = ?", (job_id,))]

    # Meanwhile the heartbeat finds the cancel request again: the job's end must still be written.
    status, _ = call(svc, "DELETE", f"/api/distribute/image/{job_id}")
    view = svc.wait(job_id, timeout=15)

    assert status == 200 and (view["value"], view["error"]) == ("FAILED", "cancelled"), view
    assert view["targets"][0]["state"] == "FAILED" and view["targets"][0]["error"] == "cancelled"
    assert sessions and all(call_url("GET", s.replace(slow.url, registries.target_a.url)) == 404 for s in sessions)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def worker_settings(tmp_path: Path, **overrides: object) -> Settings:
    base = Settings(
        db=str(tmp_path / "t.db"), node="node-b", concurrency=2, poll_s=0.02, heartbeat_s=0.05, lease_s=30.0,
        stop_grace_s=2.0, retry=RetryPolicy(attempts=1, base_delay=0.0, max_delay=0.0, max_total=1.0),
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


async def ended(store: Store, job_id: str, timeout: float = 10.0, step: float = 0.02) -> dict:
    view: dict = {}
    for _ in range(int(timeout / step)):
        view = await store.job_view(job_id)
        if view["value"] in ("FINISHED", "FAILED"):
            return view
        await asyncio.sleep(step)
    raise AssertionError(f"job still {view.get('value')} after {timeout}s: {view}")


def slowed(monkeypatch: pytest.MonkeyPatch, store: Store, method: str, seconds: float = 0.3) -> asyncio.Event:
    """Make `store.<method>` take `seconds` longer; the event is set once it is called."""
    called = asyncio.Event()
    real = getattr(store, method)

    async def slow(*args: object) -> object:
        called.set()
        await asyncio.sleep(seconds)
        return await real(*args)

    monkeypatch.setattr(store, method, slow)
    return called


@pytest.mark.asyncio
async def test_a_cancel_while_a_claimed_job_reads_its_checkpoints_ends_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await Store.open(tmp_path / "t.db")
    # Under load, the one DB thread is queued behind every job's writes.
    reading = slowed(monkeypatch, store, "uploads")
    job_id = await store.enqueue(REQUEST, NO_AUTH, TARGETS, "x")
    async with aiohttp.ClientSession() as session:
        worker = Worker(store, session, worker_settings(tmp_path))
        await worker.start()
        try:
            await asyncio.wait_for(reading.wait(), timeout=5)
            assert (await store.job_view(job_id))["cancel_requested"] is False
            assert await store.request_cancel(job_id) == "RUNNING"  # what DELETE does
            pending = await store.job_view(job_id)  # winding down: the view says why
            assert (pending["value"], pending["cancel_requested"]) == ("RUNNING", True)
            worker.cancel(job_id)
            view = await ended(store, job_id)
        finally:
            await worker.stop()
            await store.close()
    assert (view["value"], view["error"]) == ("FAILED", "cancelled")
    assert [(t["state"], t["error"]) for t in view["targets"]] == [("FAILED", "cancelled")]


@pytest.mark.asyncio
async def test_a_cancel_before_a_claimed_jobs_task_first_runs_ends_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await Store.open(tmp_path / "t.db")
    job_id = await store.enqueue(REQUEST, NO_AUTH, TARGETS, "x")
    async with aiohttp.ClientSession() as session:
        worker = Worker(store, session, worker_settings(tmp_path, concurrency=1))
        real_claim = store.claim

        async def claim_then_delete(owner: str, lease_s: float, cancelled_only: bool = False):  # type: ignore[no-untyped-def]
            job = await real_claim(owner, lease_s, cancelled_only)
            if job is not None:
                await store.request_cancel(job.id)
                # The DELETE's call lands after the claim loop made the job's task, and before
                # that task's first step (it was scheduled first).
                asyncio.get_running_loop().call_soon(worker.cancel, job.id)
            return job

        monkeypatch.setattr(store, "claim", claim_then_delete)
        await worker.start()
        try:
            view = await ended(store, job_id, timeout=5)
        finally:
            await worker.stop()
            await store.close()
    assert (view["value"], view["error"]) == ("FAILED", "cancelled")


@pytest.mark.asyncio
async def test_cancels_landing_while_a_job_writes_its_end_do_not_stop_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await Store.open(tmp_path / "t.db")
    writing = slowed(monkeypatch, store, "finish")
    job_id = await store.enqueue(REQUEST, NO_AUTH, TARGETS, "x")
    async with aiohttp.ClientSession() as session:
        worker = Worker(store, session, worker_settings(tmp_path))
        await worker.start()
        try:
            await asyncio.wait_for(writing.wait(), timeout=5)  # the source could not be read
            for reason in ("lease", "shutdown", "user"):  # the heartbeat, a SIGTERM, a DELETE
                worker.cancel(job_id, reason)
                await asyncio.sleep(0.05)
            view = await ended(store, job_id)
        finally:
            await worker.stop()
            await store.close()
    assert view["value"] == "FAILED" and "127.0.0.1:9" in view["error"]


# -- leases of dead processes ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_claim_takes_over_an_expired_lease_and_fences_out_its_old_owner(tmp_path: Path) -> None:
    clock = Clock()
    store = await Store.open(tmp_path / "t.db", clock=clock)
    location = "http://127.0.0.1:9/v2/team/app/blobs/uploads/1?_state=s"
    try:
        job_id = await store.enqueue(REQUEST, NO_AUTH, TARGETS, "x")
        assert (await store.claim("old-host/1", 30)).attempt == 1
        await store.save_upload(job_id, "old-host/1", 0, DIGEST, location, 4 * MiB)
        clock.advance(29)
        assert await store.claim("new-host/1", 30) is None  # a live lease stays with its owner
        clock.advance(2)

        taken = await store.claim("new-host/1", 30)

        assert taken is not None and taken.id == job_id and taken.attempt == 2
        assert await store.uploads(job_id) == {(0, DIGEST): (location, 4 * MiB)}  # it resumes there
        # Should the old owner still live, it changes nothing: not even the new owner's checkpoint.
        with pytest.raises(LeaseLost):
            await store.drop_upload(job_id, "old-host/1", 0, DIGEST)
        with pytest.raises(LeaseLost):
            await store.save_upload(job_id, "old-host/1", 0, DIGEST, location, 5 * MiB)
        with pytest.raises(LeaseLost):
            await store.finish(job_id, "old-host/1", "FAILED", "stale", "stale")
        assert await store.uploads(job_id) == {(0, DIGEST): (location, 4 * MiB)}
        await store.drop_upload(job_id, "new-host/1", 0, DIGEST)
        await store.drop_upload(job_id, "new-host/1", 0, DIGEST)  # gone already: nothing to do
        assert await store.uploads(job_id) == {}
        assert (await store.job_view(job_id))["targets"][0]["state"] == "PENDING"
        # An owner taking back its own expired lease (its loop was held up) goes on with the
        # same run: no attempt more.
        clock.advance(31)
        assert (await store.claim("new-host/1", 30)).attempt == 2
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_running_worker_takes_up_a_dead_nodes_job_once_its_lease_expires(tmp_path: Path) -> None:
    clock = Clock()
    store = await Store.open(tmp_path / "t.db", clock=clock)
    job_id = await store.enqueue(REQUEST, NO_AUTH, TARGETS, "x")
    # A container that died holding the job; the one that replaces it has another hostname.
    await store.claim("3f2a9c1b0d4e/aaaaaaaaaaaa", 30)
    async with aiohttp.ClientSession() as session:
        worker = Worker(store, session, worker_settings(tmp_path, node="9b8c7d6e5f4a"))
        await worker.start()
        try:
            await asyncio.sleep(0.2)  # ten polls
            view = await store.job_view(job_id)
            assert (view["value"], view["attempt"]) == ("RUNNING", 1)
            clock.advance(31)
            view = await ended(store, job_id)
        finally:
            await worker.stop()
            await store.close()
    assert view["attempt"] == 2
    assert view["value"] == "FAILED" and "127.0.0.1:9" in view["error"]  # it ran: nothing listens there


def test_a_live_node_takes_up_the_job_of_a_killed_one(service_factory, proxy_factory, registries, repo_name, tmp_path):
    image = push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[8 * MiB], seed=43)
    slow = proxy_factory(registries.target_a)
    slow.rate_limit(1 * MiB, download=False, upload=True)
    db = tmp_path / "shared.db"
    env = {"PYDLIT_CHUNK_MIB": "1", "PYDLIT_LEASE_S": "3"}
    dying = service_factory(env={**env, "PYDLIT_NODE": "old-pod"}, db_path=db)
    job_id = dying.submit(job_body(registries.source, repo_name, "v1", [slow]))
    wait_for(lambda: dying.status(job_id)["bytes_done"] > 0)
    # Started while the job's lease is live, under another name: its start leaves the job alone.
    living = service_factory(env={**env, "PYDLIT_NODE": "new-pod"}, db_path=db)
    assert living.status(job_id)["value"] == "RUNNING"

    dying.kill()
    slow.rate_limit(None)
    view = living.wait(job_id, timeout=30)

    assert (view["value"], view["attempt"]) == ("FINISHED", 2), view
    assert manifest_digest(registries.target_a, repo_name, "v1") == image.digest
    assert f"job {job_id}: started (attempt 2)" in living.log_text()


# -- the secret key --------------------------------------------------------------------------------

WITH_AUTH = {**REQUEST, "source": {**REQUEST["source"], "auth": {"basicauth": "<redacted>"}}}
SECRETS = {"source": {"basicauth": {"user": "u", "password": "pw-SECRET-31337"}}, "targets": [None]}


@pytest.mark.asyncio
async def test_a_changed_key_fails_only_the_jobs_that_brought_credentials(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    old_key = SecretBox(b"k" * 32)
    first = await Store.open(db, box=old_key)
    anonymous = await first.enqueue(REQUEST, NO_AUTH, TARGETS, "anonymous")
    legacy = await first.enqueue(REQUEST, NO_AUTH, TARGETS, "legacy")
    with_auth = await first.enqueue(WITH_AUTH, SECRETS, TARGETS, "with auth")
    await first.close()
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT job_id FROM job_secrets")] == [with_auth]
        # What an earlier pydlit sealed for every job, credentials or not.
        conn.execute("INSERT INTO job_secrets (job_id, sealed) VALUES (?, ?)", (legacy, old_key.seal(NO_AUTH)))

    store = await Store.open(db, box=SecretBox(b"x" * 32))  # PYDLIT_SECRET_KEY changed
    async with aiohttp.ClientSession() as session:
        worker = Worker(store, session, worker_settings(tmp_path))
        await worker.start()
        try:
            views = {job_id: await ended(store, job_id) for job_id in (anonymous, legacy, with_auth)}
        finally:
            await worker.stop()
            await store.close()
    for job_id in (anonymous, legacy):
        assert "key" not in views[job_id]["error"] and "127.0.0.1:9" in views[job_id]["error"]  # it ran
    assert "credentials cannot be opened" in views[with_auth]["error"]
    assert "submit the job again" in views[with_auth]["error"]


@pytest.mark.asyncio
async def test_a_job_whose_lease_was_taken_leaves_its_sessions_to_the_new_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its target failed, then another worker took the job over (an expired lease) and resumes
    # the job's session: the old owner's end is refused, and it must not DELETE that session.
    store = await Store.open(tmp_path / "t.db")
    given_back: list[str] = []

    class Client:
        async def cancel_upload(self, location: str, repo: str) -> None:
            given_back.append(location)

    class Copy:
        targets = [SimpleNamespace(client=Client(), repo="team/app")]

        def __init__(self, events: Any) -> None:
            self.events = events

        async def run(self) -> None:
            await self.events.target_state(0, "FAILED", "t: push manifest app:v1 failed: HTTP 403")
            await store._db.execute("UPDATE jobs SET lease_expires = ? WHERE id = ?", ("2000-01-01T00:00:00+00:00", job_id))
            await store._db.commit()
            assert (await store.claim("node-c/1", 30.0)).id == job_id  # type: ignore[union-attr]

    job_id = await store.enqueue(REQUEST, NO_AUTH, TARGETS, "x")
    async with aiohttp.ClientSession() as session:
        worker = Worker(store, session, worker_settings(tmp_path))
        job = await store.claim(worker.owner, 30.0)
        assert job is not None
        await store.save_upload(job_id, worker.owner, 0, DIGEST, "http://reg.test/v2/team/app/blobs/uploads/u1?_state=s", 4 * MiB)
        monkeypatch.setattr(worker, "_build", lambda job, events, named: Copy(events))
        worker._stops[job.id] = asyncio.Event()
        await worker._run_job(job)
    row = (await store._db.execute_fetchall("SELECT state, lease_owner FROM jobs WHERE id = ?", (job_id,)))[0]
    uploads = await store.uploads(job_id)
    await store.close()
    assert (row["state"], row["lease_owner"]) == ("RUNNING", "node-c/1")
    assert given_back == [] and uploads, "the old owner gave back a session the new owner resumes"


@pytest.mark.asyncio
@pytest.mark.parametrize("meanwhile", ["the-image-at-the-tag", "another-image-at-the-tag", "the-blob-under-another-tag"])
async def test_a_job_that_finishes_without_its_earlier_attempts_sessions_gives_them_back(
    tmp_path: Path, registry_factory: Any, meanwhile: str,
) -> None:
    # Before the second attempt someone else pushed to the target: the tag holds the image (the
    # target finishes), another image (overwrite false: skipped), or the blob is there. The 4 MiB
    # session of the first attempt is not needed, and would stay until the registry's purge.
    source, target = registry_factory(), registry_factory()
    repo = "team/app"
    image = push_image(source, repo, "v1", layer_sizes=(6 * MiB + 1, 1000), seed=7)
    push_image(target, repo, "other" if meanwhile == "the-blob-under-another-tag" else "v1",
               layer_sizes=(6 * MiB + 1, 1000), seed=8 if meanwhile == "another-image-at-the-tag" else 7)
    store = await Store.open(tmp_path / "t.db")
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(session, target.endpoint, push=True)
        location = await client.patch_chunk(await client.start_upload(repo), repo, b"x" * (4 * MiB), 0, 4 * MiB)
        request = {"source": {"endpoint": source.endpoint, "image": repo, "ref": "v1"}, "targets": [{"endpoint": target.endpoint}]}
        job_id = await store.enqueue(request, NO_AUTH, [{"endpoint": target.endpoint, "image": repo, "ref": "v1"}], "x")
        await store.claim("node-a/1", 30.0)
        await store.save_upload(job_id, "node-a/1", 0, max(image.blobs, key=image.blobs.get), location, 4 * MiB)
        await store.release(job_id, "node-a/1")  # a stop requeued it
        assert target.session_bytes(repo) == 4 * MiB

        worker = Worker(store, session, worker_settings(tmp_path))
        await worker.start()
        try:
            view = await ended(store, job_id)
            for _ in range(100):  # given back once the end is written
                if target.session_bytes(repo) == 0:
                    break
                await asyncio.sleep(0.05)
        finally:
            await worker.stop()
            await store.close()
    assert view["value"] == "FINISHED", view
    assert target.session_bytes(repo) == 0


async def stand_in_registry(answer) -> tuple[web.AppRunner, str]:  # type: ignore[no-untyped-def]
    """A registry on loopback that answers every request with `answer`: its runner and URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def first_attempt_left_a_session(store: Store, job_id: str, registry: str) -> None:
    """The job's first attempt, on another node ("node-a/1"), running with one upload session of
    4 MiB checkpointed at `registry`."""
    claimed = await store.claim("node-a/1", 30.0)
    assert claimed is not None and claimed.id == job_id
    await store.save_upload(job_id, "node-a/1", 0, "sha256:" + "a" * 64, f"{registry}/v2/team/app/blobs/uploads/u1?_state=s", 4 * MiB)


async def _cancelled_between_attempts(tmp_path: Path, secrets: dict, box: SecretBox, hang_s: float = 0.0) -> tuple[list[str], float]:
    """A job cancelled while its worker stopped, with an upload session of its first attempt,
    run by a worker whose key is `box`: the DELETEs its target registry was sent (and answered
    `hang_s` later), and how long the job took to end."""
    tmp_path.mkdir()
    deletes: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        if request.method == "DELETE":
            deletes.append(request.path)
            await asyncio.sleep(hang_s)
        return web.Response(status=204 if request.method == "DELETE" else 200)

    runner, registry = await stand_in_registry(answer)
    request = {**WITH_AUTH, "targets": [{"endpoint": registry}]}
    targets = [{"endpoint": registry, "image": "team/app", "ref": "v1"}]
    try:
        store = await Store.open(tmp_path / "t.db", box=SecretBox(b"k" * 32))
        job_id = await store.enqueue(request, secrets, targets, "x")
        await first_attempt_left_a_session(store, job_id, registry)
        assert await store.request_cancel(job_id) == "RUNNING"
        await store.release(job_id, "node-a/1")  # a SIGTERM came before the worker saw the cancel
        await store.close()
        store = await Store.open(tmp_path / "t.db", box=box)
        async with aiohttp.ClientSession() as session:
            worker = Worker(store, session, worker_settings(tmp_path))
            began = time.monotonic()
            await worker.start()
            try:
                view = await ended(store, job_id)
                took = time.monotonic() - began
            finally:
                await worker.stop()
                await store.close()
        assert (view["value"], view["error"]) == ("FAILED", "cancelled")
    finally:
        await runner.shutdown()
        await runner.cleanup()
    return deletes, took


@pytest.mark.asyncio
async def test_a_job_cancelled_between_attempts_gives_back_its_sessions_with_its_own_credentials(tmp_path: Path) -> None:
    deletes, _ = await _cancelled_between_attempts(tmp_path / "a", SECRETS, SecretBox(b"k" * 32))
    assert deletes == ["/v2/team/app/blobs/uploads/u1"]
    # Its credentials sealed with another key: no request goes without them, or with others.
    deletes, _ = await _cancelled_between_attempts(tmp_path / "b", SECRETS, SecretBox(b"x" * 32))
    assert deletes == []


@pytest.mark.asyncio
async def test_a_registry_that_does_not_answer_a_give_back_holds_a_cancelled_job_for_the_grace_only(tmp_path: Path) -> None:
    deletes, took = await _cancelled_between_attempts(tmp_path / "a", SECRETS, SecretBox(b"k" * 32), hang_s=10.0)
    assert deletes == ["/v2/team/app/blobs/uploads/u1"]
    assert took < 8  # stop_grace_s is 2 s here; the DELETE's stall timeout 60 s


@pytest.mark.asyncio
@pytest.mark.parametrize("concurrency", [1, 0])  # full with one job; running none at all
async def test_a_queued_job_cancelled_with_sessions_of_an_earlier_attempt_gives_them_back_though_the_worker_is_full(
    tmp_path: Path, concurrency: int,
) -> None:
    deletes: list[str] = []
    over = asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        if request.method == "DELETE":
            deletes.append(request.path)
            return web.Response(status=204)
        if request.path.startswith("/hang"):
            await asyncio.wait_for(over.wait(), 30)  # the job that keeps the worker full reads from here
        return web.Response(status=200)

    runner, registry = await stand_in_registry(answer)
    store = await Store.open(tmp_path / "t.db")
    try:
        targets = [{"endpoint": registry, "image": "team/app", "ref": "v1"}]
        job_id = await store.enqueue({**REQUEST, "targets": [{"endpoint": registry}]}, NO_AUTH, targets, "x")
        await first_attempt_left_a_session(store, job_id, registry)
        busy = {**REQUEST, "source": {"endpoint": f"{registry}/hang", "image": "team/busy", "ref": "v1"}}
        blocker = await store.enqueue(busy, NO_AUTH, TARGETS, "busy")
        waiting = await store.enqueue(busy, NO_AUTH, TARGETS, "waiting")
        async with aiohttp.ClientSession() as session:
            worker = Worker(store, session, worker_settings(tmp_path, concurrency=concurrency))
            await worker.start()
            try:
                for _ in range(250 if concurrency else 0):
                    if (await store.job_view(blocker))["value"] == "RUNNING":
                        break
                    await asyncio.sleep(0.02)
                await store.release(job_id, "node-a/1")  # a stop requeued it, checkpoints kept
                assert await store.request_cancel(job_id) == "QUEUED"  # what DELETE does
                worker.notify()
                view = await ended(store, job_id)
                assert (await store.job_view(blocker))["value"] == ("RUNNING" if concurrency else "QUEUED")
                assert (await store.job_view(waiting))["value"] == "QUEUED"  # full for any other job
            finally:
                await worker.stop()
    finally:
        over.set()
        await store.close()
        await runner.shutdown()
        await runner.cleanup()
    assert (view["value"], view["error"]) == ("FAILED", "cancelled")
    assert deletes == ["/v2/team/app/blobs/uploads/u1"]


@pytest.mark.asyncio
async def test_start_makes_no_new_key_file_while_credentials_wait_sealed_with_the_old_one(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    key_file = tmp_path / "t.db.key"
    store = await Store.open(db)
    await store.enqueue(REQUEST, NO_AUTH, TARGETS, "anonymous")
    await store.close()
    key_file.unlink()
    store = await Store.open(db)  # nothing sealed waits: a new key costs nothing
    job_id = await store.enqueue(WITH_AUTH, SECRETS, TARGETS, "with auth")
    await store.close()
    key_file.unlink()

    with pytest.raises(SecretError) as caught:
        await Store.open(db)

    msg = str(caught.value)
    assert f"the secret key file {key_file} is missing" in msg and "PYDLIT_SECRET_KEY" in msg
    assert "DELETE FROM job_secrets" in msg and "pw-SECRET" not in msg
    assert not key_file.exists()
    # The way out the message names: the job that brought credentials then fails, saying why.
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM job_secrets")
    store = await Store.open(db)
    async with aiohttp.ClientSession() as session:
        worker = Worker(store, session, worker_settings(tmp_path))
        await worker.start()
        try:
            view = await ended(store, job_id)
        finally:
            await worker.stop()
            await store.close()
    assert view["value"] == "FAILED" and "credentials cannot be opened" in view["error"]


# -- two processes starting on one database --------------------------------------------------------


def newest_migration() -> int:
    return max(int(p.name.split("_")[0]) for p in MIGRATIONS.glob("*.sql"))


async def open_while_other_commits_later(db: Path, other: sqlite3.Connection) -> None:
    """Open (and migrate) the store while `other`, another process's connection, holds its open
    transaction for 0.3 s more; `other` is closed after."""
    commit = threading.Timer(0.3, other.execute, ("COMMIT",))
    commit.start()
    try:
        store = await Store.open(db, box=SecretBox(b"k" * 32))
        await store.close()
    finally:
        commit.join()
        other.close()


@pytest.mark.asyncio
async def test_a_migration_another_process_applies_meanwhile_is_skipped(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA journal_mode=WAL")
    first = min(MIGRATIONS.glob("*.sql"))
    # The other process is inside its first migration when this one reads the schema version.
    other.executescript(f"BEGIN IMMEDIATE;\n{first.read_text()}\nPRAGMA user_version = 1;")
    await open_while_other_commits_later(db, other)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newest_migration()


@pytest.mark.asyncio
async def test_a_new_database_is_turned_to_wal_while_another_process_writes_to_it(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    # Its write lock on the database, not yet WAL, as while the other process turns it to WAL:
    # SQLite answers a switch to WAL with "locked" at once then, whatever busy_timeout says.
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE scratch (x INTEGER)")
    await open_while_other_commits_later(db, other)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newest_migration()


@pytest.mark.asyncio
async def test_migrations_run_statement_by_statement_and_a_bad_one_still_names_its_file(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    # Semicolons inside a comment, a string and a trigger's body do not end a statement.
    (folder / "0001_first.sql").write_text(
        "-- a comment; with a semicolon\nCREATE TABLE a (x TEXT DEFAULT ';');\n"
        "CREATE TRIGGER t AFTER INSERT ON a BEGIN DELETE FROM a WHERE x = 'gone'; END;\n"
    )
    (folder / "0002_unfinished.sql").write_text("CREATE TABLE b (x INTEGER")
    db = await aiosqlite.connect(str(tmp_path / "m.db"), isolation_level=None)
    try:
        with pytest.raises(StoreError, match="0002_unfinished.sql"):
            await migrate(db, folder)
        async with db.execute("PRAGMA user_version") as cur:
            assert (await cur.fetchone())[0] == 1
        async with db.execute("SELECT type, name FROM sqlite_master ORDER BY name") as cur:
            assert [tuple(r) for r in await cur.fetchall()] == [("table", "a"), ("trigger", "t")]
    finally:
        await db.close()


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, rule",
    [
        ("PYDLIT_CHUNK_MIB", "0", "a number from 1 to 4096 MiB"),
        ("PYDLIT_CHUNK_MIB", "0.5", "a number from 1 to 4096 MiB"),
        ("PYDLIT_CHUNK_MIB", "8192", "a number from 1 to 4096 MiB"),
        ("PYDLIT_BUFFER_MIB", "0", "a number above 0 and at most 4096 MiB"),
        ("PYDLIT_BUFFER_MIB", "-1", "a number above 0 and at most 4096 MiB"),
        ("PYDLIT_RETENTION_DAYS", "-1", "a number from 0 to 36500 days"),
        ("PYDLIT_RETENTION_DAYS", "1e9", "a number from 0 to 36500 days"),
        ("PYDLIT_LEASE_S", "0", "a number from 3 to 86400 s"),
        ("PYDLIT_STALL_TIMEOUT_S", "0", "a number from 1 to 3600 s"),
        ("PYDLIT_STOP_GRACE_S", "-5", "a number from 0 to 3600 s"),
        ("PYDLIT_DETACH_AFTER_S", "-1", "a number from 0 to 3600 s"),
        ("PYDLIT_RETRY_BASE_DELAY", "-1", "a number from 0 to 3600 s"),
        ("PYDLIT_RETRY_MAX_DELAY", "1e12", "a number from 0 to 3600 s"),
        ("PYDLIT_RETRY_MAX_TOTAL", "-1", "a number from 0 to 86400 s"),
        ("PYDLIT_RETRY_ATTEMPTS", "0", "a whole number of at least 1 and at most 100"),
        ("PYDLIT_RETRY_ATTEMPTS", "2.5", "a whole number of at least 1 and at most 100"),
        ("PYDLIT_PORT", "0", "a whole number of at least 1 and at most 65535"),
        ("PYDLIT_PORT", "70000", "a whole number of at least 1 and at most 65535"),
        ("PYDLIT_CONCURRENCY", "-1", "a whole number of at least 0"),
        ("PYDLIT_CONCURRENCY", "1.5", "a whole number of at least 0"),
        ("PYDLIT_CHUNK_MIB", "inf", "a number"),
        ("PYDLIT_RETENTION_DAYS", "nan", "a number"),
        ("PYDLIT_LOG_LEVEL", "LOUD", "one of debug, info, warning, error"),
        ("PYDLIT_LOG_FORMAT", "xml", "one of text, json"),
    ],
)
def test_a_setting_out_of_its_range_stops_the_start_naming_it_and_the_range(name: str, value: str, rule: str) -> None:
    with pytest.raises(SystemExit) as caught:
        from_env({name: value})
    assert str(caught.value) == f"pydlit: {name} must be {rule}, not {value!r}"


def test_settings_at_the_edges_of_their_ranges_are_taken() -> None:
    s = from_env({
        "PYDLIT_CHUNK_MIB": "1", "PYDLIT_BUFFER_MIB": "0.000001", "PYDLIT_RETENTION_DAYS": "0", "PYDLIT_CONCURRENCY": "0",
        "PYDLIT_LEASE_S": "3", "PYDLIT_STOP_GRACE_S": "0", "PYDLIT_PORT": "65535", "PYDLIT_RETRY_ATTEMPTS": "1",
    })
    assert (s.tuning.chunk_size, s.tuning.buffer_size) == (MiB, 2)  # room for one piece at a time
    assert (s.retention_days, s.concurrency, s.lease_s, s.stop_grace_s, s.port, s.retry.attempts) == (0, 0, 3, 0, 65535, 1)


def _job_row(db: Path, job_id: str) -> tuple:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT state, attempt, lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()


def test_a_second_process_as_the_same_node_is_refused_and_takes_no_job(service_factory):
    # A start takes back the jobs its node left RUNNING: never those of a live process.
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes connections, never answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}/v2"
        first = service_factory(env={"PYDLIT_NODE": "one-node"})
        job = first.submit({"source": {"endpoint": endpoint, "image": "team/app", "ref": "v1"},
                            "targets": [{"endpoint": endpoint, "image": "mirror/app"}]})
        wait_for(lambda: _job_row(first.db_path, job)[0] == "RUNNING")
        running = _job_row(first.db_path, job)
        second = service_factory(env={"PYDLIT_NODE": "one-node"}, db_path=first.db_path, start=False)
        with pytest.raises(RuntimeError, match="exited with 1"):
            second.start()
        log = second.log_text()
        assert f"pydlit: another pydlit process (pid {first.pid}) runs as node 'one-node' on this job database" in log, log
        assert _job_row(first.db_path, job) == running
        # Once the first is gone, so is its lock: a start under its name goes on.
        first.kill()
        second.start()


def test_the_service_listens_on_every_address_its_host_name_gives(monkeypatch):
    # As aiohttp's host= does: `localhost` may give ::1 first, and 127.0.0.1 must still answer.
    from pydlit import cli

    port = free_port()
    given = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in ("127.0.0.2", "127.0.0.1", "127.0.0.2")]
    monkeypatch.setattr(cli.socket, "getaddrinfo", lambda *args, **kwargs: given)
    sockets = cli._listen("twice.test", port)
    try:
        assert sorted(s.getsockname() for s in sockets) == [("127.0.0.1", port), ("127.0.0.2", port)]
    finally:
        for s in sockets:
            s.close()


def test_a_port_in_use_stops_the_start_before_any_job_is_touched(service_factory):
    first = service_factory(env={"PYDLIT_NODE": "first", "PYDLIT_CONCURRENCY": "0"})
    job = first.submit({"source": {"endpoint": "http://127.0.0.1:9/v2", "image": "team/app", "ref": "v1"},
                        "targets": [{"endpoint": "http://127.0.0.1:9/v2", "image": "mirror/app"}]})
    queued = _job_row(first.db_path, job)
    second = service_factory(env={"PYDLIT_NODE": "second"}, db_path=first.db_path, start=False)
    second.port = first.port
    with pytest.raises(RuntimeError, match="exited with 1"):
        second.start()
    log = second.log_text()
    assert f"pydlit: cannot listen on 127.0.0.1:{first.port}: Address already in use" in log, log
    assert "Traceback" not in log and "pydlit listening on" not in log, log
    assert _job_row(first.db_path, job) == queued


@pytest.mark.parametrize("env, said", [
    ({"PYDLIT_CREDENTIALS": "/nonexistent.json"}, "could copy images with the PYDLIT_CREDENTIALS registries' credentials"),
])
def test_credentials_are_not_lent_to_the_network_without_an_api_token(tmp_path, env, said):
    proc = subprocess.run([sys.executable, "-m", "pydlit", "--host", "0.0.0.0", "--port", "1", "--db", str(tmp_path / "x.db")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and said in proc.stderr, proc.stderr
    assert not (tmp_path / "x.db").exists()


def test_a_database_that_cannot_be_opened_is_named(service_factory, tmp_path):
    not_sqlite = tmp_path / "not.db"
    not_sqlite.write_bytes(b"this is not a database" * 100)
    svc = service_factory(start=False, db_path=not_sqlite)
    with pytest.raises(RuntimeError, match="exited with 1"):
        svc.start()
    log = svc.log_text()
    assert f"pydlit: cannot use the job database {not_sqlite}: file is not a database" in log, log
    assert "Traceback" not in log, log


def test_the_service_does_not_start_with_a_chunk_of_zero(service_factory):
    svc = service_factory(env={"PYDLIT_CHUNK_MIB": "0"}, start=False)
    with pytest.raises(RuntimeError, match="exited with 1"):
        svc.start()
    assert "pydlit: PYDLIT_CHUNK_MIB must be a number from 1 to 4096 MiB, not '0'" in svc.log_text()
