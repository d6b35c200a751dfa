"""Operations (issue: secrets, API token, job list, cancel, progress, metrics, retention) against
the real service process and real registries."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request

import pytest
from support.images import manifest_digest, push_image
from support.service import job_body

MiB = 1024 * 1024


def call(svc, method, path, token=None, data=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(svc.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def wait_for(predicate, timeout=30.0, step=0.05):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 1):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


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
