"""Fault tolerance and restarts, end to end: the real service, real registries, a fault proxy.

Every test copies an image through a FaultProxy that injects 429/503 bursts, cuts connections,
stalls or throttles, or kills the service mid-transfer. Every test then proves the job ended as it
should (FINISHED with the exact same tree at the target, every digest read back and verified, or
FAILED at once for a permanent error) and prints the bytes that crossed the proxy as a multiple of
the image size (`pytest -s` shows them).
"""
from __future__ import annotations

import signal
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.images import Image, assert_same_tree, push_image, read_back
from support.proxy import FaultProxy, classify
from support.regclient import RegistryHTTP
from support.registry import Registry
from support.tokenserver import ANY_USER, TokenServer
from support.service import ServiceProcess, job_body, job_state, wait_for

MiB = 1 << 20
CHUNK = 4 * MiB  # PYDLIT_CHUNK_MIB=4 below
POLL = 0.05


# -- helpers --------------------------------------------------------------------------------------


def service_env(**extra: Any) -> dict[str, str]:
    """Quick retries, 4 MiB chunks, a node name of this test's own (leases and recovery)."""
    env = {
        "PYDLIT_RETRY_BASE_DELAY": "0.1",
        "PYDLIT_RETRY_MAX_DELAY": "1",
        "PYDLIT_CHUNK_MIB": str(CHUNK // MiB),
        "PYDLIT_NODE": f"resume-{uuid.uuid4().hex[:8]}",
        "PYDLIT_LOG_LEVEL": "INFO",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


class TimedProxy(FaultProxy):
    """A FaultProxy that also notes when each request arrived and when each fault was answered,
    so a test can see how long the client waited before its next request."""

    def __init__(self, upstream: Any) -> None:
        super().__init__(upstream)
        self.arrivals: list[tuple[float, str, str]] = []
        self.fault_times: list[tuple[float, int]] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append((time.monotonic(), request.method, classify(request.method, request.path)))
        return await super()._handle(request)

    def _fail_response(self, rule: Any) -> web.Response:
        self.fault_times.append((time.monotonic(), rule.status))
        return super()._fail_response(rule)


def report(label: str, what: str, nbytes: int, image_bytes: int) -> float:
    ratio = nbytes / image_bytes
    print(f"\n[test_resume] {label}: {what} {nbytes} B = {ratio:.3f}x the image ({image_bytes} B)")
    return ratio


def finished(service: ServiceProcess, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    status = service.wait(job_id, timeout=timeout)
    assert job_state(status) == "FINISHED", f"job ended {job_state(status)}: {status}\n{service.log_tail()}"
    assert all(t["state"] == "FINISHED" for t in status["targets"]), status
    return status


def assert_copied(image: Image, target: Any, repo: str) -> None:
    """The target's tree, every blob streamed and its digest checked, equals the source's."""
    assert_same_tree(image, read_back(target, repo, image.tag))


def faulted(proxy: FaultProxy, kind: str | None = None, fault: str = "fail") -> list[Any]:
    return [r for r in proxy.requests
            if r.fault and r.fault.startswith(fault) and (kind is None or r.kind == kind)]


def wait_mid_transfer(service: ServiceProcess, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll until the job is RUNNING with 0 < bytes_done < bytes_total."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = service.status(job_id)
        assert job_state(last) in ("QUEUED", "RUNNING"), f"job ended before the fault: {last}"
        total = last.get("bytes_total") or 0
        if job_state(last) == "RUNNING" and 0 < last.get("bytes_done", 0) < total:
            return last
        time.sleep(POLL)
    raise AssertionError(f"job {job_id} never seen mid-transfer within {timeout}s: {last}\n"
                         f"{service.log_tail()}")


def restart_and_finish(
    service: ServiceProcess, proxy: FaultProxy, job: str, image: Image, registry: Any, repo: str, how: str
) -> int:
    """Start the stopped service again at full speed; once the job finished (on a later attempt)
    with the same tree, the blob bytes uploaded through the proxy in all."""
    proxy.rate_limit(None)
    service.start()
    status = finished(service, job, timeout=60)
    assert status["attempt"] >= 2, status
    assert_copied(image, registry, repo)
    sent = proxy.blob_upload_bytes()
    report(f"{how} + restart", "uploaded", sent, image.total_bytes)
    return sent


def copy_over_slow_link(
    service: ServiceProcess, source: Any, proxy: FaultProxy, image: Image, registry: Any, repo: str, rate: float, label: str
) -> int:
    """Copy from `source` through a throttled proxy in front of `registry`; the blob bytes the
    proxy saw uploaded, once the copy is proven."""
    started = time.monotonic()
    job = service.submit(job_body(source, repo, "v1", [proxy]))
    finished(service, job, timeout=60)
    elapsed = time.monotonic() - started
    assert_copied(image, registry, repo)
    assert elapsed >= 0.8 * image.total_bytes / rate, "the link was not slow: the test proves nothing"
    sent = proxy.blob_upload_bytes()
    report(f"{label}, {elapsed:.1f}s", "uploaded", sent, image.total_bytes)
    return sent


def db_rows(db_path: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db_path, timeout=5)
    try:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(sql, params))
    finally:
        conn.close()


# -- transient HTTP errors --------------------------------------------------------------------------


SMALL_BLOBS = (3 * MiB + 5, 2 * MiB + 3, 300_007)  # every blob <= one chunk: one PUT each
ONE_CHUNKED = (9 * MiB + 5, 2 * MiB + 3, 300_007)  # the first is PATCHed in 3 chunks


@pytest.mark.parametrize(
    ("kind", "layers", "seed"),
    [("upload_post", ONE_CHUNKED, 4201), ("upload_patch", ONE_CHUNKED, 4202), ("upload_put", SMALL_BLOBS, 4203)],
    ids=["POST", "PATCH", "PUT"],
)
def test_429_burst_with_retry_after_on_upload_requests_is_waited_out(
    registries, proxy_factory, service_factory, repo_name, kind, layers, seed
):
    # Blobs one at a time: every request to the target follows the previous one, so the wait
    # after each 429 is the gap to the next request.
    image = push_image(registries.source, repo_name, "v1", layer_sizes=layers, seed=seed)
    target = proxy_factory(registries.target_a, cls=TimedProxy)
    retry_after = 1
    target.fail_next(2, 429, kinds=kind, retry_after=retry_after)
    service = service_factory(env=service_env(PYDLIT_PARALLEL_BLOBS=1))

    job = service.submit(job_body(registries.source, repo_name, "v1", [target]))
    finished(service, job)
    assert_copied(image, registries.target_a, repo_name)

    assert len(faulted(target, kind)) == 2 and all(r.status == 429 for r in faulted(target))
    method = {"upload_post": "POST", "upload_patch": "PATCH", "upload_put": "PUT"}[kind]
    normal = {"upload_post": len(image.blobs), "upload_put": len(image.blobs),
              "upload_patch": sum(-(-s // CHUNK) for s in image.blobs.values() if s > CHUNK)}[kind]
    assert target.count(method, kind) >= normal + 2, "a 429-ed request was not sent again"
    # Retry-After was honoured: nothing reached the target for that long after each 429.
    assert len(target.fault_times) == 2
    origin = target.arrivals[0][0]
    for t0, _ in target.fault_times:
        later = [t for t, _, _ in target.arrivals if t > t0]
        assert later, "no request after a 429"
        gap = later[0] - t0
        assert gap >= 0.9 * retry_after, (
            f"the next request came {gap:.2f}s after a 429 on {method} with Retry-After: {retry_after}; "
            f"429s at {[round(t - origin, 2) for t, _ in target.fault_times]}s, requests "
            f"{[(round(t - origin, 2), m, k) for t, m, k in target.arrivals]}"
        )
    sent = target.blob_upload_bytes()
    report(f"429 burst on {method}", "uploaded", sent, image.total_bytes)
    assert sent <= 1.2 * image.total_bytes
    if kind == "upload_put":
        # The largest blob goes first and takes both 429s; one PUT carries it, so each refused
        # session is given back rather than left to the registry's purge.
        refused = {r.path for r in faulted(target, kind)}
        assert refused <= {r.path for r in target.requests if r.method == "DELETE"}, target.requests


@pytest.mark.parametrize(("kind", "size"), [("upload_put", 2 * MiB), ("upload_patch", 2 * CHUNK + 5)], ids=["one-PUT", "chunked"])
def test_a_retry_after_past_the_budget_fails_a_streamed_blob_at_once(
    registries, proxy_factory, service_factory, repo_name, kind, size
):
    push_image(registries.source, repo_name, "v1", layer_sizes=(size,), seed=4212)
    target = proxy_factory(registries.target_a)
    target.fail_next(100, 429, kinds=kind, retry_after=3600)
    service = service_factory(env=service_env(PYDLIT_RETRY_MAX_TOTAL="5"))

    started = time.monotonic()
    status = service.wait(service.submit(job_body(registries.source, repo_name, "v1", [target])), timeout=60)

    assert time.monotonic() - started < 5, status
    assert job_state(status) == "FAILED", status
    assert "asked to wait 3600 s" in status["targets"][0]["error"], status
    refused = [r.path for r in faulted(target, kind)]
    assert refused and len(set(refused)) == len(refused), target.requests  # none asked again


def test_what_a_target_waits_out_shows_in_its_status_until_it_ends(registries, proxy_factory, service_factory, repo_name):
    push_image(registries.source, repo_name, "v1", layer_sizes=(2048,), seed=4214)
    target = proxy_factory(registries.target_a)
    target.fail_next(3, 503, kinds="manifest_put", retry_after=1)
    service = service_factory(env=service_env())

    job = service.submit(job_body(registries.source, repo_name, "v1", [target]))
    seen = None
    for _ in range(300):
        status = service.status(job)
        seen = status["targets"][0]["retrying"]
        if seen or job_state(status) in ("FINISHED", "FAILED"):
            break
        time.sleep(0.05)

    assert seen and f"push manifest {repo_name}:v1 failed: HTTP 503" in seen, status
    final = service.wait(job, timeout=30)
    assert job_state(final) == "FINISHED" and final["targets"][0]["retrying"] is None, final


def test_a_streamed_blob_retries_within_one_budget_not_one_per_attempt(registries, proxy_factory, service_factory, repo_name):
    # A streamed upload is retried in rounds (a new session, a new read), each as long as its
    # upload takes: a registry that never answers makes each one a stall timeout. The rounds
    # share the step's budget instead of each taking up to all of it.
    push_image(registries.source, repo_name, "v1", layer_sizes=(2 * MiB,), seed=4213)
    target = proxy_factory(registries.target_a)
    target.rate_limit(2 * MiB, download=False)
    target.cut_upload_after(MiB, times=10_000)  # half a second a round, then the connection drops
    service = service_factory(env=service_env(PYDLIT_RETRY_MAX_TOTAL="1", PYDLIT_RETRY_MAX_DELAY="0.1", PYDLIT_RETRY_ATTEMPTS="20"))

    status = service.wait(service.submit(job_body(registries.source, repo_name, "v1", [target])), timeout=60)

    assert job_state(status) == "FAILED" and "the connection failed" in status["targets"][0]["error"], status
    rounds = [line for line in service.log_text().splitlines() if "failed (" in line and "retrying" in line and "attempt" in line]
    assert len(rounds) <= 3, rounds  # 19, before: as many as the attempts allowed


@pytest.mark.parametrize(
    ("where", "layers", "seed"),
    [
        ("source_blob_get", ONE_CHUNKED, 4204),
        ("target_patch", ONE_CHUNKED, 4205),
        ("target_put", SMALL_BLOBS, 4206),
        # The first PUT is the commit of the chunked blob, after all its bytes were acknowledged.
        ("target_commit_put", ONE_CHUNKED, 4207),
    ],
    ids=["source-blob-GET", "target-PATCH", "target-PUT", "target-commit-PUT"],
)
def test_503_burst_is_retried(
    registries, proxy_factory, service_factory, repo_name, where, layers, seed
):
    image = push_image(registries.source, repo_name, "v1", layer_sizes=layers, seed=seed)
    source = proxy_factory(registries.source)
    target = proxy_factory(registries.target_a)
    kind, proxy, method = {
        "source_blob_get": ("blob_get", source, "GET"),
        "target_patch": ("upload_patch", target, "PATCH"),
        "target_put": ("upload_put", target, "PUT"),
        "target_commit_put": ("upload_put", target, "PUT"),
    }[where]
    proxy.fail_next(3, 503, kinds=kind)
    # One blob at a time, largest first: which request the burst hits is known.
    service = service_factory(env=service_env(PYDLIT_PARALLEL_BLOBS=1))

    job = service.submit(job_body(source, repo_name, "v1", [target]))
    finished(service, job)
    assert_copied(image, registries.target_a, repo_name)

    assert len(faulted(proxy, kind)) == 3 and all(r.status == 503 for r in faulted(proxy))
    normal = len(image.blobs) if kind != "upload_patch" else sum(
        -(-s // CHUNK) for s in image.blobs.values() if s > CHUNK)
    assert proxy.count(method, kind) >= normal + 3, "a 503-ed request was not sent again"
    read, sent = source.downloaded_bytes(), target.blob_upload_bytes()
    report(f"503 burst on {where}", "read from the source", read, image.total_bytes)
    report(f"503 burst on {where}", "uploaded", sent, image.total_bytes)
    # A 503 is answered before any body byte is forwarded: nothing is uploaded twice. A failed
    # upload may need its blob read again from the acknowledged offset, at most once per fault.
    assert sent <= 1.05 * image.total_bytes
    assert read <= image.total_bytes + 3 * max(image.blobs.values())


def test_permanent_403_on_upload_post_fails_the_target_without_retries(
    registries, proxy_factory, service_factory, repo_name
):
    image = push_image(registries.source, repo_name, "v1", layer_sizes=(5 * MiB, 100_003), seed=4104)
    target = proxy_factory(registries.target_a)
    target.fail_next(1000, 403, kinds="upload_post")
    service = service_factory(env=service_env(PYDLIT_PARALLEL_BLOBS=1))

    started = time.monotonic()
    job = service.submit(job_body(registries.source, repo_name, "v1", [target]))
    status = service.wait(job, timeout=30)
    elapsed = time.monotonic() - started
    assert job_state(status) == "FAILED", status
    (t,) = status["targets"]
    assert t["state"] == "FAILED" and t["error"] and "403" in t["error"], t
    assert "DENIED" in t["error"], t
    assert status["error"] == f"1 of 1 target(s) failed: {t['error']}"  # the one cause, said on the job too
    # Not retried: the one POST was refused and that was the end of it.
    assert target.count("POST", "upload_post") == 1, target.requests
    assert target.count("PATCH", "upload_patch") == 0 and target.count("PUT", "upload_put") == 0
    assert target.count("PUT", "manifest_put") == 0
    assert elapsed < 10, f"a permanent failure took {elapsed:.1f}s"
    sent = target.blob_upload_bytes()
    report("403 on upload POST", "uploaded", sent, image.total_bytes)
    assert sent == 0


# -- cut connections, slow and stalled links ------------------------------------------------------------


def test_connection_cut_mid_upload_costs_at_most_the_lost_chunk(
    registries, proxy_factory, service_factory, repo_name
):
    image = push_image(registries.source, repo_name, "v1",
                       layer_sizes=(14 * MiB + 11, 9 * MiB + 7, 5 * MiB + 3), seed=4105)
    target = proxy_factory(registries.target_a)
    target.cut_upload_after(2 * MiB + 12_345, methods="PATCH", kinds="upload_patch")
    service = service_factory(env=service_env())

    job = service.submit(job_body(registries.source, repo_name, "v1", [target]))
    finished(service, job)
    assert_copied(image, registries.target_a, repo_name)

    cuts = faulted(target, "upload_patch", fault="upload cut")
    assert len(cuts) == 1, target.requests
    sent = target.blob_upload_bytes()
    report("connection cut mid-PATCH", "uploaded", sent, image.total_bytes)
    assert sent <= image.total_bytes + CHUNK


def test_connection_cut_mid_download_resumes_the_read_with_range(
    registries, proxy_factory, service_factory, repo_name
):
    # Two targets: the source is read once for both, and the cut read resumes where it broke.
    image = push_image(registries.source, repo_name, "v1",
                       layer_sizes=(14 * MiB + 11, 9 * MiB + 7, 5 * MiB + 3), seed=4106)
    source = proxy_factory(registries.source)
    source.cut_download_after(6 * MiB + 999)
    service = service_factory(env=service_env())

    job = service.submit(job_body(source, repo_name, "v1", [registries.target_a, registries.target_b]))
    finished(service, job)
    assert_copied(image, registries.target_a, repo_name)
    assert_copied(image, registries.target_b, repo_name)

    assert len(faulted(source, "blob_get", fault="download cut")) == 1
    assert any(r.kind == "blob_get" and r.status == 206 for r in source.requests), \
        "the broken read was not resumed with a Range request"
    read = source.downloaded_bytes()
    report("connection cut mid-download (2 targets)", "read from the source", read, image.total_bytes)
    assert read < 1.2 * image.total_bytes


def test_slow_link_still_finishes(registries, proxy_factory, service_factory, repo_name):
    image = push_image(registries.source, repo_name, "v1",
                       layer_sizes=(10 * MiB + 11, 6 * MiB + 7, 4 * MiB + 3), seed=4107)
    target = proxy_factory(registries.target_a)
    rate = 8 * MiB
    target.rate_limit(rate)
    service = service_factory(env=service_env())

    label = f"slow link ({rate // MiB} MiB/s)"
    sent = copy_over_slow_link(service, registries.source, target, image, registries.target_a, repo_name, rate, label)
    assert sent <= 1.05 * image.total_bytes


def test_slow_but_moving_upload_is_not_taken_for_a_stall(
    registries, proxy_factory, service_factory, repo_name
):
    # One 4 MiB chunk takes ~4 s on this link, longer than the stall timeout, but bytes flow the
    # whole time; README: only "a connection that sends no byte for this long is cut". (The tail
    # of a PATCH body waits in socket buffers, several MiB on loopback as on fast WAN links, after
    # the client has handed it over: the answer comes that much later than the last write.)
    image = push_image(registries.source, repo_name, "v1", layer_sizes=(CHUNK + 100_003,), seed=4118)
    target = proxy_factory(registries.target_a)
    rate = 1 * MiB
    target.rate_limit(rate, download=False)
    service = service_factory(env=service_env(PYDLIT_STALL_TIMEOUT_S=2, PYDLIT_RETRY_ATTEMPTS=3))

    label = f"slow upload ({rate / MiB:.1f} MiB/s, stall timeout 2 s)"
    sent = copy_over_slow_link(service, registries.source, target, image, registries.target_a, repo_name, rate, label)
    assert sent <= 1.05 * image.total_bytes


def test_stalled_download_is_cut_and_retried(registries, proxy_factory, service_factory, repo_name):
    image = push_image(registries.source, repo_name, "v1",
                       layer_sizes=(9 * MiB + 11, 2 * MiB + 7, 100_003), seed=4108)
    source = proxy_factory(registries.source)
    stall_s = 12.0
    source.stall_next_download(stall_s, after_bytes=1 * MiB)
    service = service_factory(env=service_env(PYDLIT_STALL_TIMEOUT_S=2))

    started = time.monotonic()
    job = service.submit(job_body(source, repo_name, "v1", [registries.target_a]))
    finished(service, job, timeout=40)
    elapsed = time.monotonic() - started
    assert_copied(image, registries.target_a, repo_name)

    assert len(faulted(source, "blob_get", fault="stall")) == 1
    assert source.count("GET", "blob_get") >= len(image.blobs) + 1, "the stalled read was not retried"
    assert elapsed < stall_s - 2, f"took {elapsed:.1f}s: the stall was waited out, not cut"
    read = source.downloaded_bytes()
    report(f"stalled download (finished in {elapsed:.1f}s)", "read from the source", read, image.total_bytes)
    assert read < 1.2 * image.total_bytes


# -- stopping and killing the service mid-transfer ---------------------------------------------------


BIG_LAYERS = (24 * MiB + 1, 24 * MiB + 2, 24 * MiB + 3, 24 * MiB + 4)


def copying_over_a_slow_link(
    registries: Any, proxy_factory: Any, service_factory: Any, repo: str, layers: tuple[int, ...], seed: int, rate: int = 24 * MiB,
) -> tuple[Image, FaultProxy, ServiceProcess, str]:
    """A job copying a new image to target_a through a proxy that takes uploads at `rate`:
    (the image, the proxy, the service, the job id)."""
    image = push_image(registries.source, repo, "v1", layer_sizes=layers, seed=seed)
    target = proxy_factory(registries.target_a)
    target.rate_limit(rate, download=False)
    service = service_factory(env=service_env())
    return image, target, service, service.submit(job_body(registries.source, repo, "v1", [target]))


def test_sigterm_mid_transfer_checkpoints_requeues_and_resumes(
    registries, proxy_factory, service_factory, repo_name
):
    image, target, service, job = copying_over_a_slow_link(registries, proxy_factory, service_factory, repo_name, BIG_LAYERS, 4109)
    mid = wait_mid_transfer(service, job)
    stopping = time.monotonic()
    code = service.stop(signal.SIGTERM, timeout=30)
    took = time.monotonic() - stopping
    assert code == 0, f"SIGTERM exit code {code} after {took:.1f}s\n{service.log_tail()}"
    assert took < 30

    (row,) = db_rows(service.db_path, "SELECT state, lease_owner FROM jobs WHERE id = ?", job)
    assert row["state"] == "QUEUED" and row["lease_owner"] is None, dict(row)
    uploads = db_rows(service.db_path, "SELECT digest, location, offset FROM uploads WHERE job_id = ?", job)
    assert uploads, "no upload checkpoint left for the restart"
    assert all(u["digest"] in image.blobs and 0 <= u["offset"] <= image.blobs[u["digest"]] for u in uploads)
    assert any(u["offset"] > 0 for u in uploads), [dict(u) for u in uploads]
    assert all(u["offset"] % CHUNK == 0 or u["offset"] == image.blobs[u["digest"]] for u in uploads), \
        "a checkpoint off a chunk boundary"
    print(f"\n[test_resume] SIGTERM at {mid['bytes_done']}/{mid['bytes_total']} B, exited 0 in "
          f"{took:.1f}s with {len(uploads)} checkpoint(s)")

    sent = restart_and_finish(service, target, job, image, registries.target_a, repo_name, "SIGTERM")
    assert sent <= 1.05 * image.total_bytes


def test_a_second_signal_during_the_stop_does_not_cut_it_short(registries, proxy_factory, service_factory, repo_name):
    image, target, service, job = copying_over_a_slow_link(registries, proxy_factory, service_factory, repo_name, BIG_LAYERS[:1], 4115,
                                                           rate=8 * MiB)
    wait_for(lambda: any(u["offset"] > 0 for u in db_rows(service.db_path, "SELECT offset FROM uploads WHERE job_id = ?", job)))
    proc = service._proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the stop waits for the chunk on its way, half a second at this pace
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)

    assert code == 0, service.log_tail()
    assert "already stopping" in service.log_text()
    (row,) = db_rows(service.db_path, "SELECT state, lease_owner FROM jobs WHERE id = ?", job)
    assert (row["state"], row["lease_owner"]) == ("QUEUED", None)
    sent = restart_and_finish(service, target, job, image, registries.target_a, repo_name, "two more signals in a SIGTERM")
    assert sent <= 1.05 * image.total_bytes  # every chunk ended at its boundary: resumed, not started over


def test_sigterm_while_a_target_is_waited_for_exits_at_once_and_resumes(
    registries, proxy_factory, service_factory, repo_name
):
    # The registry asked for a minute's pause after a chunk: no chunk is on its way, so the stop
    # has nothing to wait for.
    image, target, service, job = copying_over_a_slow_link(
        registries, proxy_factory, service_factory, repo_name, BIG_LAYERS[:1], 4112, rate=8 * MiB)
    wait_for(lambda: target.count("PATCH", "upload_patch") >= 2)
    target.fail_next(1, 503, methods="PATCH", retry_after=60)
    wait_for(lambda: any(r.fault for r in target.requests))

    stopping = time.monotonic()
    code = service.stop(signal.SIGTERM, timeout=30)
    took = time.monotonic() - stopping

    assert code == 0 and took < 5, f"SIGTERM exit code {code} after {took:.1f}s\n{service.log_tail()}"
    (row,) = db_rows(service.db_path, "SELECT state FROM jobs WHERE id = ?", job)
    assert row["state"] == "QUEUED"
    sent = restart_and_finish(service, target, job, image, registries.target_a, repo_name, "SIGTERM in a retry's wait")
    assert sent <= image.total_bytes + CHUNK  # at most the refused chunk again


@pytest.mark.parametrize("then", ["resume", "cancel"])
def test_sessions_of_a_registry_that_names_itself_by_another_host_resume_or_are_given_back_after_a_restart(
    registries, proxy_factory, service_factory, repo_name, tmp_path, then
):
    # Reached at 127.0.0.1, it names its sessions localhost (distribution's http.host; Quay and
    # Harbor do the same with their configured hostname), with token auth: a restart's client
    # sends that host the credentials only because the checkpoint says the registry named it.
    # Its users may delete: distribution asks for that action to end a session.
    tokens = TokenServer().start()
    tokens.set_acl(ANY_USER, [("*", ["pull", "push", "delete"])])
    registry = Registry(tmp_path / "named", "token", token_server=tokens)
    target = proxy_factory(registry)
    with tokens, registry.name_itself(f"http://localhost:{target.host.rsplit(':', 1)[1]}"):
        image = push_image(registries.source, repo_name, "v1", layer_sizes=BIG_LAYERS[:2], seed=4114)
        target.rate_limit(24 * MiB, download=False)
        service = service_factory(env=service_env())
        job = service.submit(job_body(registries.source, repo_name, "v1", [target]))
        # Past 2 chunks: a blob started over would cost more than the test's allowance.
        wait_for(lambda: any(u["offset"] > 2 * CHUNK for u in db_rows(service.db_path, "SELECT offset FROM uploads WHERE job_id = ?", job)))
        assert service.stop(signal.SIGTERM, timeout=30) == 0
        uploads = db_rows(service.db_path, "SELECT location, offset, named FROM uploads WHERE job_id = ?", job)
        assert uploads and all(u["named"] == 1 and "//localhost:" in u["location"] for u in uploads), [dict(u) for u in uploads]

        if then == "resume":
            sent = restart_and_finish(service, target, job, image, registry, repo_name, "SIGTERM, sessions on a named host")
            assert sent <= image.total_bytes + 2 * CHUNK  # not started over
            return
        assert registry.session_bytes(repo_name) > 0
        with sqlite3.connect(service.db_path) as db:  # a DELETE while the service was down
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job,))
        service.start()
        assert service.wait(job, timeout=30)["error"] == "cancelled"
        assert registry.session_bytes(repo_name) == 0


def test_a_job_whose_cancel_its_stopped_worker_never_acted_on_gives_its_sessions_back(
    registries, proxy_factory, service_factory, repo_name
):
    image, target, service, job = copying_over_a_slow_link(registries, proxy_factory, service_factory, repo_name, BIG_LAYERS[:2], 4113)
    wait_mid_transfer(service, job)
    assert service.stop(signal.SIGTERM, timeout=30) == 0
    assert registries.target_a.session_bytes(repo_name) > 0
    with sqlite3.connect(service.db_path) as db:  # a DELETE's write, which the stopping worker did not see
        db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job,))

    service.start()
    view = service.wait(job, timeout=30)

    assert (view["value"], view["error"]) == ("FAILED", "cancelled"), view
    assert registries.target_a.session_bytes(repo_name) == 0
    assert target.count("DELETE") >= 1 and image.total_bytes > 0


def test_a_job_that_fails_after_a_restart_gives_its_sessions_back(registries, proxy_factory, service_factory, repo_name):
    # No later attempt resumes them: left alone, they would stay on the registry's disk until
    # its purge (distribution: 7 days).
    image = push_image(registries.source, repo_name, "v1", layer_sizes=BIG_LAYERS[:2], seed=4116)
    source, target = proxy_factory(registries.source), proxy_factory(registries.target_a)
    target.rate_limit(24 * MiB, download=False)
    service = service_factory(env=service_env())
    job = service.submit(job_body(source, repo_name, "v1", [target]))
    wait_mid_transfer(service, job)
    assert service.stop(signal.SIGTERM, timeout=30) == 0
    assert registries.target_a.session_bytes(repo_name) > 0
    source.fail_next(1000, 404, kinds="manifest_get")  # the image is gone from the source meanwhile

    service.start()
    view = service.wait(job, timeout=30)

    assert view["value"] == "FAILED" and "read manifest" in view["error"], view
    wait_for(lambda: registries.target_a.session_bytes(repo_name) == 0)
    assert target.count("DELETE") >= 1 and image.total_bytes > 0


def test_a_session_whose_offset_the_registry_misreports_is_started_over(
    registries, proxy_factory, service_factory, repo_name
):
    image, target, service, job = copying_over_a_slow_link(registries, proxy_factory, service_factory, repo_name, BIG_LAYERS[:2], 4111)
    wait_mid_transfer(service, job)
    assert service.stop(signal.SIGTERM, timeout=30) == 0
    # Asked where a checkpointed session stands, the registry names bytes it does not hold. 2.8
    # takes the PATCH sent from there (others answer 416), so the session's bytes are wrong and
    # its commit is refused, as it would be again however often the session were asked.
    target.upload_range_shift = 7

    restart_and_finish(service, target, job, image, registries.target_a, repo_name, "misreported offset")

    refused = {r.path for r in target.requests if r.kind in ("upload_patch", "upload_put") and r.status in (400, 416)}
    assert refused, target.requests
    given_back = {r.path for r in target.requests if r.method == "DELETE"}
    assert refused <= given_back, target.requests


def test_sigkill_mid_transfer_restart_resumes(registries, proxy_factory, service_factory, repo_name):
    image = push_image(registries.source, repo_name, "v1", layer_sizes=BIG_LAYERS, seed=4110)
    target = proxy_factory(registries.target_a)
    target.rate_limit(24 * MiB, download=False)
    service = service_factory(env=service_env())

    job = service.submit(job_body(registries.source, repo_name, "v1", [target]))
    mid = wait_mid_transfer(service, job)
    assert service.kill() == -signal.SIGKILL
    (row,) = db_rows(service.db_path, "SELECT state FROM jobs WHERE id = ?", job)
    assert row["state"] == "RUNNING", dict(row)  # nobody got to requeue it
    n_uploads = len(db_rows(service.db_path, "SELECT 1 FROM uploads WHERE job_id = ?", job))
    print(f"\n[test_resume] SIGKILL at {mid['bytes_done']}/{mid['bytes_total']} B "
          f"with {n_uploads} checkpoint(s)")

    sent = restart_and_finish(service, target, job, image, registries.target_a, repo_name, "SIGKILL")
    assert sent <= 1.6 * image.total_bytes


def test_after_a_restart_a_blob_sent_in_one_put_is_mounted_rather_than_sent_again(
    registries, proxy_factory, service_factory, repo_name
):
    # Streamed, yet one PUT carries it (its session is kept only to be given back), and far
    # larger than what the kernel's socket buffers and the proxy take at once (14 MiB was not,
    # now and then), so a SIGKILL does cut it.
    layer = 40 * MiB + 7
    image = push_image(registries.source, repo_name, "v1", layer_sizes=(layer,), seed=4213)
    target = proxy_factory(registries.target_a)
    service = service_factory(env=service_env(PYDLIT_CHUNK_MIB="64"))
    # The image lands in one repository of the target, which the service remembers.
    finished(service, service.submit(job_body(registries.source, repo_name, "v1", [target])))
    # A second job, to another repository: its two mounts are refused once (as a registry may
    # refuse one), so the layer goes up in one slow PUT, which a SIGKILL cuts.
    target.reset_counters()
    target.fail_next(2, 404, methods="POST", kinds="upload_post")
    # 16 s for the PUT: a loaded machine's poll must not see it end before the kill.
    target.rate_limit(MiB, download=False)
    job = service.submit(job_body(registries.source, repo_name, "v1", [(target, {"image": f"{repo_name}-b"})]))
    deadline = time.monotonic() + 30
    while target.uploaded_bytes("PUT", "upload_put") < MiB and time.monotonic() < deadline:
        time.sleep(POLL)
    assert service.kill() == -signal.SIGKILL
    assert db_rows(service.db_path, "SELECT 1 FROM uploads WHERE job_id = ?", job), "the session was not kept"
    target.rate_limit(None)
    target.reset_counters()

    service.start()
    finished(service, job)

    assert_copied(image, registries.target_a, f"{repo_name}-b")
    mounted = [r for r in target.requests if r.kind == "upload_post" and r.status == 201]
    assert mounted, "\n".join(f"{r.method} {r.kind} {r.status} {r.path[-60:]}" for r in target.requests)
    assert target.blob_upload_bytes() < layer, target.counters()  # the layer was not sent again


def test_sigkill_with_queued_jobs_every_job_finishes_after_restart(
    registries, proxy_factory, service_factory, repo_name
):
    big = push_image(registries.source, repo_name, "v1", layer_sizes=(16 * MiB + 1, 16 * MiB + 2, 16 * MiB + 3),
                     seed=4111)
    small = [push_image(registries.source, f"{repo_name}-s{i}", "v1", layer_sizes=(5 * MiB + i, 60_000 + i),
                        seed=4112 + i) for i in range(2)]
    target = proxy_factory(registries.target_a)
    target.rate_limit(12 * MiB, download=False)
    # One blob at a time: what the kill can cost is bounded by the one blob in flight.
    service = service_factory(env=service_env(PYDLIT_CONCURRENCY=1, PYDLIT_PARALLEL_BLOBS=1))

    images = [big, *small]
    jobs = [service.submit(job_body(registries.source, im.repo, "v1", [target])) for im in images]
    mid = wait_mid_transfer(service, jobs[0])
    assert [job_state(service.status(j)) for j in jobs[1:]] == ["QUEUED", "QUEUED"]
    assert service.kill() == -signal.SIGKILL
    print(f"\n[test_resume] SIGKILL with job 1 of 3 at {mid['bytes_done']}/{mid['bytes_total']} B")

    target.rate_limit(None)
    service.start()
    for job, im in zip(jobs, images):
        finished(service, job, timeout=60)
        assert_copied(im, registries.target_a, im.repo)
    total = sum(im.total_bytes for im in images)
    sent = target.blob_upload_bytes()
    report("SIGKILL with 3 jobs queued/running", "uploaded", sent, total)
    # Blobs committed before the kill are not sent again; the blob in flight may start over.
    assert sent <= total + max(big.blobs.values()) + CHUNK


# -- what a registry will not do, and what a source gets wrong ------------------------------------


def test_registry_refusing_chunked_uploads_gets_one_monolithic_put(
    registries, proxy_factory, service_factory, repo_name
):
    image = push_image(registries.source, repo_name, "v1", "schema2", ONE_CHUNKED, seed=41)
    target = proxy_factory(registries.target_a)
    # Like a registry without chunked upload support (Google Artifact Registry): PATCH refused.
    target.fail_next(1000, 405, methods="PATCH")
    service = service_factory(env=service_env(PYDLIT_PARALLEL_BLOBS=1))

    finished(service, service.submit(job_body(registries.source, repo_name, "v1", [target])))

    assert_copied(image, registries.target_a, repo_name)
    assert target.count("PATCH") == 1, "after one refusal the blob goes as a whole PUT"
    put_bytes = target.uploaded_bytes("PUT", kinds="upload_put")
    report("PATCH refused (405)", "uploaded by PUT", put_bytes, image.total_bytes)
    assert put_bytes == image.total_bytes


@pytest.mark.parametrize(
    ("layers", "after", "seed"),
    [(ONE_CHUNKED, 5 * MiB, 42), ((600_001,), 300_000, 44)],
    ids=["streamed", "read-whole"],
)
def test_corrupt_source_bytes_are_read_again_and_never_committed(
    registries, proxy_factory, service_factory, repo_name, layers, after, seed
):
    image = push_image(registries.source, repo_name, "v1", "schema2", layers, seed=seed)
    big = max(image.blobs, key=image.blobs.get)
    assert image.blobs[big] > after
    source = proxy_factory(registries.source)
    service = service_factory(env=service_env(PYDLIT_PARALLEL_BLOBS=1))

    # Once: the blob is read again and the copy completes.
    source.corrupt_downloads(after_bytes=after, times=1)
    finished(service, service.submit(job_body(source, repo_name, "v1", [registries.target_a])))
    assert_copied(image, registries.target_a, repo_name)
    report("one corrupt read", "read from the source", source.downloaded_bytes(), image.total_bytes)
    assert source.downloaded_bytes() >= image.total_bytes + image.blobs[big]

    # Every time: the target fails saying so, and the bad bytes were never committed.
    source.corrupt_downloads(after_bytes=after, times=10)
    other = f"{repo_name}-bad"
    target = proxy_factory(registries.target_b)
    status = service.wait(service.submit(job_body(source, repo_name, "v1", [(target, {"image": other})])), timeout=60)
    assert job_state(status) == "FAILED"
    error = status["targets"][0]["error"]
    assert "does not match its digest" in error and big in error, error
    assert RegistryHTTP.for_endpoint(registries.target_b).blob_size(other, big) is None
    # Every upload session opened for the bad blob was given back to the registry.
    sessions, commits = target.count("POST", "upload_post"), target.count("PUT", "upload_put")
    assert target.count("DELETE") == sessions - commits > 0, target.requests


def test_a_target_out_of_retries_fails_alone(registries, proxy_factory, service_factory, repo_name):
    image = push_image(registries.source, repo_name, "v1", "schema2", ONE_CHUNKED, seed=43)
    broken = proxy_factory(registries.target_b)
    broken.fail_next(1000, 503, methods="PATCH")
    service = service_factory(env=service_env(PYDLIT_RETRY_ATTEMPTS=1))

    status = service.wait(service.submit(job_body(registries.source, repo_name, "v1", [registries.target_a, broken])), timeout=60)

    assert job_state(status) == "FAILED"
    good, bad = status["targets"]
    assert good["state"] == "FINISHED", status
    assert bad["state"] == "FAILED" and "HTTP 503" in bad["error"], status
    assert status["finished_endpoints"] == [registries.target_a.endpoint]
    assert_copied(image, registries.target_a, repo_name)
