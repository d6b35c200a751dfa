"""The service end to end (issue: HTTP API, durable queue, packaging): the real pydlit process,
real registries, the job database as a person would read it."""

from __future__ import annotations

import json
import sqlite3
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.images import assert_same_tree, push_image, read_back
from support.registry import free_port
from support.service import REPO_ROOT, job_body, wait_for

STATUS_KEYS = {"id", "value", "started_at", "finished_at", "finished_endpoints", "skipped_clusters", "error", "targets"}


def count_jobs(db_path) -> int:
    with sqlite3.connect(db_path) as db:
        return db.execute("select count(*) from jobs").fetchone()[0]


def test_copy_to_two_targets_through_the_api(service, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[4096, 300_000, 1_200_000], seed=21)
    a, b = registries.targets
    body = job_body(registries.source, repo_name, "v1", [a, b])
    # Endpoints are accepted with or without /v2 and a trailing slash, and reported back as given.
    body["targets"][1]["endpoint"] = b.url + "/"
    job_id = service.submit(body)

    status = service.wait(job_id, timeout=60)

    assert status["value"] == "FINISHED", status
    assert STATUS_KEYS <= status.keys()
    assert status["id"] == job_id
    assert status["finished_endpoints"] == [a.endpoint, b.url + "/"]
    assert status["skipped_clusters"] == []
    assert status["started_at"] and status["finished_at"] >= status["started_at"]
    for target in status["targets"]:
        assert target["state"] == "FINISHED" and target["error"] is None
        assert target["bytes_done"] == target["bytes_total"] == image.total_bytes
    for registry in (a, b):
        assert_same_tree(image, read_back(registry, repo_name, "v1"))

    # The DB is a user interface too: one row per job, the same state the API shows.
    with sqlite3.connect(service.db_path) as db:
        row = db.execute("select state, finished_at from jobs where id = ?", (job_id,)).fetchone()
        targets = db.execute("select endpoint, state from job_targets where job_id = ? order by idx", (job_id,)).fetchall()
    assert row == ("FINISHED", status["finished_at"])
    assert targets == [(a.endpoint, "FINISHED"), (b.url + "/", "FINISHED")]


BAD_BODIES = [
    ("not json", b"{source:", "not valid JSON"),
    ("not an object", b"[1, 2]", "must be a JSON object"),
    ("missing source", {"targets": [{"endpoint": "http://127.0.0.1:9/v2"}]}, "'source' is a required property"),
    ("missing image", {"source": {"endpoint": "http://127.0.0.1:9/v2", "ref": "v1"}, "targets": [{"endpoint": "http://127.0.0.1:9/v2"}]}, "source: 'image' is a required property"),
    ("missing ref", {"source": {"endpoint": "http://127.0.0.1:9/v2", "image": "a"}, "targets": [{"endpoint": "http://127.0.0.1:9/v2"}]}, "source: 'ref' is a required property"),
    ("missing endpoint", {"source": {"image": "a", "ref": "v1"}, "targets": [{"endpoint": "http://127.0.0.1:9/v2"}]}, "source: 'endpoint' is a required property"),
    ("target without endpoint", {"source": {"endpoint": "http://127.0.0.1:9/v2", "image": "a", "ref": "v1"}, "targets": [{"overwrite": True}]}, "targets[0]: 'endpoint' is a required property"),
    ("empty targets", {"source": {"endpoint": "http://127.0.0.1:9/v2", "image": "a", "ref": "v1"}, "targets": []}, "targets: must hold at least one target"),
    ("ftp endpoint", {"source": {"endpoint": "ftp://127.0.0.1:9/v2", "image": "a", "ref": "v1"}, "targets": [{"endpoint": "http://127.0.0.1:9/v2"}]}, "source.endpoint: must be an http:// or https:// URL"),
    ("string overwrite", {"source": {"endpoint": "http://127.0.0.1:9/v2", "image": "a", "ref": "v1"}, "targets": [{"endpoint": "http://127.0.0.1:9/v2", "overwrite": "true"}]}, "targets[0].overwrite: must be a boolean"),
    ("string verify_tls", {"source": {"endpoint": "http://127.0.0.1:9/v2", "image": "a", "ref": "v1", "verify_tls": "no"}, "targets": [{"endpoint": "http://127.0.0.1:9/v2"}]}, "source.verify_tls: must be a boolean"),
    ("bad image name", {"source": {"endpoint": "http://127.0.0.1:9/v2", "image": "Bad/Name", "ref": "v1"}, "targets": [{"endpoint": "http://127.0.0.1:9/v2"}]}, "source.image: must be a repository name"),
    ("bad ref", {"source": {"endpoint": "http://127.0.0.1:9/v2", "image": "a", "ref": "sha256:xyz"}, "targets": [{"endpoint": "http://127.0.0.1:9/v2"}]}, "source.ref: ref must be a tag or a digest"),
    ("misspelled key", {"source": {"endpoint": "http://127.0.0.1:9/v2", "image": "a", "ref": "v1"}, "targets": [{"endpoint": "http://127.0.0.1:9/v2", "overwrtie": True}]}, "targets[0]: unknown key 'overwrtie'"),
]


@pytest.mark.parametrize("body,expected", [(b, e) for _, b, e in BAD_BODIES], ids=[n for n, _, _ in BAD_BODIES])
def test_bad_input_is_a_400_that_says_what_is_wrong_and_queues_nothing(service, body, expected):
    before = count_jobs(service.db_path)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    status, answer = service.post_raw(data)

    assert status == 400, answer
    assert answer["status"] == "error"
    assert expected in answer["msg"], answer["msg"]
    assert count_jobs(service.db_path) == before


def test_oversized_body_unknown_id_and_unknown_route_answer_json(service):
    status, answer = service.post_raw(b'{"pad": "' + b"x" * (1024 * 1024 + 10) + b'"}')
    assert status == 413 and answer["status"] == "error" and "too large" in answer["msg"]

    status, answer = service.get("/api/distribute/image/00000000-0000-0000-0000-000000000000")
    assert status == 404 and answer["status"] == "error" and "no job" in answer["msg"]

    status, answer = service.get("/api/nothing-here")
    assert status == 404 and answer["status"] == "error"


def test_missing_source_image_fails_fast_with_the_reason(service, registries, repo_name):
    started = time.monotonic()
    job_id = service.submit(job_body(registries.source, repo_name, "v404", [registries.target_a]))

    status = service.wait(job_id, timeout=30)

    assert status["value"] == "FAILED"
    assert "MANIFEST_UNKNOWN" in status["error"] or "NAME_UNKNOWN" in status["error"], status["error"]
    assert repo_name in status["error"] and registries.source.host in status["error"]
    # A permanent source error is not retried: no backoff budget is spent on it.
    assert time.monotonic() - started < 10
    assert status["targets"][0]["state"] == "FAILED"


def test_sigterm_exits_zero_and_a_restart_keeps_every_job(service_factory, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "oci", layer_sizes=[2048, 50_000], seed=22)
    svc = service_factory(env={"PYDLIT_CONCURRENCY": "1"})
    # Several jobs queued at once; the service stops before it can have done them all.
    ids = [
        svc.submit(job_body(registries.source, repo_name, "v1", [(registries.target_a, {"image": f"{repo_name}-{i}"})]))
        for i in range(4)
    ]
    assert svc.stop() == 0
    assert "stopping: no new job is claimed" in Path(svc.log_path).read_text()  # a stop is never silent

    svc.start()
    for i, job_id in enumerate(ids):
        assert svc.wait(job_id, timeout=60)["value"] == "FINISHED"
        assert_same_tree(image, read_back(registries.target_a, f"{repo_name}-{i}", "v1"))


def test_command_line_shows_its_flags_and_variables():
    out = subprocess.run([sys.executable, "-m", "pydlit", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--db", "PYDLIT_DB", "PYDLIT_PORT"):
        assert flag in out.stdout


def test_a_client_command_that_fails_says_why_on_stderr_and_prints_nothing(tmp_path):
    # What a script capturing the job id, JOB=$(pydlit submit req.json), relies on.
    missing = tmp_path / "missing.json"
    run = subprocess.run([sys.executable, "-m", "pydlit", "submit", str(missing)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30, env={**os.environ, "PYDLIT_URL": "http://127.0.0.1:9"})
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"pydlit: cannot read {missing}: no such file")


@pytest.mark.parametrize("case", ["missing credentials file", "bad credentials file", "no such directory", "a directory"])
def test_a_start_that_cannot_go_on_says_why_in_one_line_and_exits(tmp_path, case):
    # A credentials file found bad once the job DB was open used to leave the process hanging,
    # its DB thread alive and its port taken, for a supervisor to wait on for ever.
    env = {**os.environ, "PYDLIT_PORT": str(free_port())}
    db = tmp_path / "jobs.db"
    if case == "missing credentials file":
        env["PYDLIT_CREDENTIALS"] = str(tmp_path / "none.json")
        said = f"pydlit: cannot read the credentials file {tmp_path / 'none.json'}: No such file or directory"
    elif case == "bad credentials file":
        (tmp_path / "bad.json").write_text('{"registries": 5}')
        env["PYDLIT_CREDENTIALS"] = str(tmp_path / "bad.json")
        said = f"pydlit: the credentials file {tmp_path / 'bad.json'}: 'registries' must be an object of hosts"
    elif case == "no such directory":
        db = tmp_path / "nowhere" / "jobs.db"
        said = f"pydlit: cannot use the job database {db}: there is no directory {db.parent}"
    else:
        db = tmp_path
        said = f"pydlit: cannot use the job database {db}: it is a directory"
    run = subprocess.run([sys.executable, "-m", "pydlit", "--host", "127.0.0.1", "--db", str(db)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30, env=env)
    assert run.returncode == 1 and run.stderr == said + "\n", run.stderr


def test_a_client_gone_mid_body_is_no_error(service):
    # The real process: aiohttp's test server cancels the handler instead.
    log = Path(service.log_path)
    seen = log.stat().st_size
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(b"POST /api/distribute/image HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"source\"")
        time.sleep(0.2)
    said = "POST /api/distribute/image: the client went away before its request was read"
    wait_for(lambda: said in log.read_bytes()[seen:].decode(errors="replace"), timeout=10)
    since = log.read_bytes()[seen:].decode(errors="replace")
    assert not [line for line in since.splitlines() if " ERROR " in line or "Traceback" in line], since
