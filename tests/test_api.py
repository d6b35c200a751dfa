"""The HTTP API in-process (aiohttp test client), with the job store in a real SQLite file."""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import sqlite3
from pathlib import Path

import pytest
import pytest_asyncio

from pydlit.app import create_app
from pydlit.keys import STORE
from pydlit.registry.client import RetryPolicy
from pydlit.secretbox import SecretBox, load_key
from pydlit.settings import Settings

pytestmark = pytest.mark.asyncio

PASSWORD = "s3cr3t-PASSWORD"
HEADER_VALUE = "hdr-VALUE-4242"
STATUS_KEYS = {"id", "value", "started_at", "finished_at", "finished_endpoints", "skipped_clusters", "error", "targets"}


def free_port() -> int:
    """A 127.0.0.1 port where nothing listens (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SOURCE = f"http://127.0.0.1:{free_port()}/v2"
TARGET_A = f"http://127.0.0.1:{free_port()}/v2/"
TARGET_B = f"http://127.0.0.1:{free_port()}"


def body() -> dict:
    return {
        "source": {"endpoint": SOURCE, "image": "team/app", "ref": "v1"},
        "targets": [{"endpoint": TARGET_A}, {"endpoint": TARGET_B, "image": "mirror/app", "ref": "stable", "overwrite": True}],
    }


def settings(tmp_path: Path, **overrides) -> Settings:
    base = dict(
        db=str(tmp_path / "t.db"),
        node="test-node",
        concurrency=0,  # by default nothing is claimed: a job stays exactly as the API queued it
        poll_s=0.05,
        heartbeat_s=0.05,
        lease_s=5.0,
        stop_grace_s=2.0,
        stall_timeout_s=2.0,
        retry=RetryPolicy(attempts=1, base_delay=0.0, max_delay=0.0, max_total=1.0),
    )
    base.update(overrides)
    return Settings(**base)


def db(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(tmp_path / "t.db"))
    conn.row_factory = sqlite3.Row
    return conn


def job_count(tmp_path: Path) -> int:
    with db(tmp_path) as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


@pytest_asyncio.fixture
async def client(aiohttp_client, tmp_path: Path):
    return await aiohttp_client(create_app(settings(tmp_path)))


async def post(client, payload) -> tuple[int, dict]:
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    resp = await client.post("/api/distribute/image", data=data, headers={"Content-Type": "application/json"})
    assert resp.content_type == "application/json"
    return resp.status, await resp.json()


# -- accepted jobs ---------------------------------------------------------------------------------


async def test_post_answers_201_and_commits_a_queued_job(client, tmp_path: Path) -> None:
    status, answer = await post(client, body())
    assert status == 201
    assert answer["status"] == "success" and answer["msg"] == "Image sync started"
    job_id = answer["id"]
    assert isinstance(job_id, str) and job_id

    with db(tmp_path) as conn:
        job = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        targets = conn.execute("SELECT * FROM job_targets WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
    assert job is not None
    assert job["state"] in ("QUEUED", "RUNNING", "FINISHED", "FAILED")
    assert job["state"] == "QUEUED"  # concurrency=0: no worker slot takes it
    assert job["source"] == f"{SOURCE} team/app:v1"
    request = json.loads(job["request"])
    assert request["source"]["image"] == "team/app"
    assert request["targets"][0]["overwrite"] is False and request["targets"][1]["overwrite"] is True
    # Endpoints exactly as posted; a target's image and ref default to the source's.
    assert [(t["idx"], t["endpoint"], t["image"], t["ref"], t["state"]) for t in targets] == [
        (0, TARGET_A, "team/app", "v1", "PENDING"),
        (1, TARGET_B, "mirror/app", "stable", "PENDING"),
    ]


async def test_a_source_named_by_digest_reads_image_at_digest(client, tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    payload = body()
    payload["source"]["ref"] = digest
    _, answer = await post(client, payload)
    view = await (await client.get(f"/api/distribute/image/{answer['id']}")).json()
    assert view["source"] == f"{SOURCE} team/app@{digest}"


async def test_get_answers_the_status_document(client) -> None:
    _, answer = await post(client, body())
    resp = await client.get(f"/api/distribute/image/{answer['id']}")
    assert resp.status == 200
    view = await resp.json()
    assert STATUS_KEYS <= set(view)
    assert view["id"] == answer["id"]
    assert view["value"] == "QUEUED"
    assert view["started_at"] is None and view["finished_at"] is None and view["error"] is None
    assert view["finished_endpoints"] == [] and view["skipped_clusters"] == []
    assert [(t["endpoint"], t["image"], t["ref"], t["state"]) for t in view["targets"]] == [
        (TARGET_A, "team/app", "v1", "PENDING"),
        (TARGET_B, "mirror/app", "stable", "PENDING"),
    ]


async def test_each_post_is_its_own_job(client, tmp_path: Path) -> None:
    ids = {(await post(client, body()))[1]["id"] for _ in range(3)}
    assert len(ids) == 3
    assert job_count(tmp_path) == 3


# -- refused requests ------------------------------------------------------------------------------


def _without(path: list, key: str) -> dict:
    b = body()
    node = b
    for p in path:
        node = node[p]
    del node[key]
    return b


def _with(path: list, key: str, value) -> dict:
    b = body()
    node = b
    for p in path:
        node = node[p]
    node[key] = value
    return b


BAD = [
    pytest.param(b"{not json", "not valid JSON", id="not-json"),
    pytest.param(b"\xff\xfe{}", "not valid JSON", id="not-utf8"),
    pytest.param(b"", "not valid JSON", id="empty-body"),
    pytest.param(b"[]", "must be a JSON object", id="json-array"),
    pytest.param(b'"hello"', "must be a JSON object", id="json-string"),
    pytest.param(_without([], "source"), "'source' is a required property", id="missing-source"),
    pytest.param(_without(["source"], "image"), "source: 'image' is a required property", id="missing-image"),
    pytest.param(_without(["source"], "ref"), "source: 'ref' is a required property", id="missing-ref"),
    pytest.param(_without(["source"], "endpoint"), "source: 'endpoint' is a required property", id="missing-source-endpoint"),
    pytest.param(_without(["targets", 0], "endpoint"), "targets[0]: 'endpoint' is a required property", id="missing-target-endpoint"),
    pytest.param(_without([], "targets"), "'targets' is a required property", id="missing-targets"),
    pytest.param(_with([], "targets", []), "targets: must hold at least one target", id="empty-targets"),
    pytest.param(_with(["source"], "endpoint", "ftp://127.0.0.1/v2"), "source.endpoint: must be an http:// or https:// URL", id="ftp-endpoint"),
    pytest.param(_with(["targets", 1], "endpoint", "ftp://127.0.0.1:21"), "targets[1].endpoint: must be an http:// or https:// URL", id="ftp-target"),
    pytest.param(_with(["targets", 0], "overwrite", "true"), "targets[0].overwrite: must be a boolean", id="overwrite-string"),
    pytest.param(_with(["source"], "image", "Team/App"), "source.image: must be a repository name", id="bad-image"),
    pytest.param(_with(["source"], "ref", "v1 beta"), "source.ref: ref must be a tag or a digest", id="bad-ref"),
    pytest.param(_with([], "targest", []), "unknown key 'targest'", id="misspelled-top-key"),
    pytest.param(_with(["targets", 0], "overwirte", True), "targets[0]: unknown key 'overwirte'", id="misspelled-target-key"),
]


@pytest.mark.parametrize("payload, words", BAD)
async def test_bad_input_is_a_400_naming_the_problem_and_queues_nothing(client, tmp_path: Path, payload, words: str) -> None:
    status, answer = await post(client, payload)
    assert status == 400
    assert answer["status"] == "error"
    assert words in answer["msg"], answer["msg"]
    assert set(answer) == {"status", "msg"}
    assert job_count(tmp_path) == 0


async def test_a_bad_auth_value_is_not_echoed(client, tmp_path: Path) -> None:
    payload = _with(["source"], "auth", {"basicauth": {"user": "u", "password": PASSWORD}, "token_type": PASSWORD})
    status, answer = await post(client, payload)
    assert status == 400
    assert "source.auth.token_type" in answer["msg"]
    assert PASSWORD not in answer["msg"]
    assert job_count(tmp_path) == 0


async def test_a_body_over_1_mib_is_a_413_in_json(client, tmp_path: Path) -> None:
    payload = body()
    payload["padding"] = "x" * (1024 * 1024)
    resp = await client.post("/api/distribute/image", data=json.dumps(payload), headers={"Content-Type": "application/json"})
    assert resp.status == 413
    answer = await resp.json()
    assert answer["status"] == "error" and "too large" in answer["msg"]
    assert job_count(tmp_path) == 0


async def test_a_body_that_is_not_its_content_encoding_is_a_400_in_json(client, tmp_path: Path, caplog) -> None:
    resp = await client.post("/api/distribute/image", data=json.dumps(body()),
                             headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert resp.status == 400 and resp.content_type == "application/json"
    assert (await resp.json())["msg"] == "the request body cannot be read: Can not decode content-encoding: gzip"
    assert resp.headers["Connection"] == "close"  # its parser reads nothing more: a kept connection would hang
    assert (await client.get("/healthz")).status == 200
    assert job_count(tmp_path) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_unknown_job_is_a_json_404(client) -> None:
    resp = await client.get("/api/distribute/image/00000000-0000-0000-0000-000000000000")
    assert resp.status == 404
    answer = await resp.json()
    assert answer["status"] == "error"
    assert "00000000-0000-0000-0000-000000000000" in answer["msg"]


async def test_unknown_route_is_a_json_404(client) -> None:
    resp = await client.get("/api/nothing/here")
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert (await resp.json()) == {"status": "error", "msg": "no such resource"}


@pytest.mark.parametrize("method, path", [("PUT", "/api/distribute/image"), ("PATCH", "/api/distribute/image/abc"), ("POST", "/healthz")])
async def test_wrong_method_is_a_json_405(client, tmp_path: Path, method: str, path: str) -> None:
    resp = await client.request(method, path, data=json.dumps(body()))
    assert resp.status == 405
    assert resp.content_type == "application/json"
    answer = await resp.json()
    assert answer["status"] == "error" and "method not allowed" in answer["msg"]
    assert "Allow" in resp.headers
    assert job_count(tmp_path) == 0


async def test_healthz(client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_healthz_says_why_the_database_takes_no_write(client, monkeypatch) -> None:
    async def locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(client.app[STORE], "check_writable", locked)
    resp = await client.get("/healthz")
    assert resp.status == 503
    assert (await resp.json())["msg"] == "the job database is not writable: database is locked"


# -- credentials -----------------------------------------------------------------------------------


def unseal(tmp_path: Path, sealed: str) -> dict:
    db_file = next(tmp_path.glob("*.db"))
    return SecretBox(load_key(str(db_file), None)).open(sealed)


def with_credentials() -> dict:
    b = body()
    b["source"]["auth"] = {"basicauth": {"user": "alice", "password": PASSWORD}}
    b["targets"][0]["auth"] = {"header": {"X-Registry-Token": HEADER_VALUE}, "url": "http://127.0.0.1:9/token"}
    b["targets"][1]["auth"] = {"header": f"X-Other: {HEADER_VALUE}-2"}
    return b


async def test_stored_request_and_status_have_credentials_redacted(client, tmp_path: Path) -> None:
    status, answer = await post(client, with_credentials())
    assert status == 201
    job_id = answer["id"]

    with db(tmp_path) as conn:
        stored = conn.execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()["request"]
        every_job_column = json.dumps([tuple(r) for r in conn.execute("SELECT * FROM jobs")])
        every_target_column = json.dumps([tuple(r) for r in conn.execute("SELECT * FROM job_targets")])
        sealed = conn.execute("SELECT sealed FROM job_secrets WHERE job_id = ?", (job_id,)).fetchone()["sealed"]
    for text in (stored, every_job_column, every_target_column, sealed):
        assert PASSWORD not in text and HEADER_VALUE not in text
    request = json.loads(stored)
    assert request["source"]["auth"] == {"basicauth": "<redacted>"}
    assert request["targets"][0]["auth"] == {"header": "<redacted>", "url": "<redacted>"}

    # The job can still run: its credentials wait in job_secrets, sealed with the key beside the DB.
    secrets = unseal(tmp_path, sealed)
    assert secrets["source"] == {"basicauth": {"user": "alice", "password": PASSWORD}}
    assert secrets["targets"][0]["header"] == {"X-Registry-Token": HEADER_VALUE}
    assert secrets["targets"][1]["header"] == {"X-Other": f"{HEADER_VALUE}-2"}

    resp = await client.get(f"/api/distribute/image/{job_id}")
    text = await resp.text()
    assert resp.status == 200
    assert PASSWORD not in text and HEADER_VALUE not in text


async def test_secrets_are_deleted_when_the_job_ends(aiohttp_client, tmp_path: Path) -> None:
    # A worker that runs jobs: every registry is a closed 127.0.0.1 port and retries are off,
    # so the job fails at once.
    client = await aiohttp_client(create_app(settings(tmp_path, concurrency=2)))
    status, answer = await post(client, with_credentials())
    assert status == 201
    job_id = answer["id"]

    view: dict = {}
    for _ in range(200):
        view = await (await client.get(f"/api/distribute/image/{job_id}")).json()
        if view["value"] in ("FINISHED", "FAILED"):
            break
        await asyncio.sleep(0.025)
    assert view["value"] == "FAILED", view
    assert SOURCE.split("//")[1].split("/")[0] in view["error"]  # names the unreachable source registry
    assert view["started_at"] is not None and view["finished_at"] is not None
    assert [t["state"] for t in view["targets"]] == ["FAILED", "FAILED"]
    assert PASSWORD not in json.dumps(view) and HEADER_VALUE not in json.dumps(view)

    with db(tmp_path) as conn:
        assert conn.execute("SELECT count(*) FROM job_secrets WHERE job_id = ?", (job_id,)).fetchone()[0] == 0
        stored = conn.execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()["request"]
    assert PASSWORD not in stored and HEADER_VALUE not in stored


async def test_redaction_does_not_touch_the_posted_document_shape(client, tmp_path: Path) -> None:
    # Guard against redaction by accident: a request without any auth is stored as validated,
    # and nothing is sealed for it (so that a lost key can never fail it).
    payload = body()
    _, answer = await post(client, copy.deepcopy(payload))
    with db(tmp_path) as conn:
        stored = json.loads(conn.execute("SELECT request FROM jobs WHERE id = ?", (answer["id"],)).fetchone()["request"])
        sealed = conn.execute("SELECT count(*) FROM job_secrets").fetchone()[0]
    assert "auth" not in stored["source"] and all("auth" not in t for t in stored["targets"])
    assert stored["source"]["endpoint"] == payload["source"]["endpoint"]
    assert sealed == 0


async def test_an_auth_json_string_is_sealed_as_the_object_it_holds(client, tmp_path: Path) -> None:
    # The original pydlit's request reference shows auth.json as a string holding the payload.
    payload = body()
    payload["source"]["auth"] = {"url": "http://127.0.0.1:9/token", "json": json.dumps({"password": PASSWORD})}
    status, answer = await post(client, payload)
    assert status == 201, answer
    with db(tmp_path) as conn:
        stored = conn.execute("SELECT request FROM jobs WHERE id = ?", (answer["id"],)).fetchone()["request"]
        sealed = conn.execute("SELECT sealed FROM job_secrets WHERE job_id = ?", (answer["id"],)).fetchone()["sealed"]
    assert PASSWORD not in stored
    assert json.loads(stored)["source"]["auth"] == {"url": "<redacted>", "json": "<redacted>"}
    assert unseal(tmp_path, sealed)["source"]["json"] == {"password": PASSWORD}

    payload["source"]["auth"]["json"] = f"password={PASSWORD}"
    status, answer = await post(client, payload)
    assert status == 400 and "source.auth.json" in answer["msg"] and "JSON object" in answer["msg"]
    assert PASSWORD not in answer["msg"]
    assert job_count(tmp_path) == 1


@pytest.mark.parametrize("depth", [100_000, 900])
async def test_deeply_nested_bodies_are_a_400(client, tmp_path: Path, depth: int) -> None:
    # As bare garbage, and inside the one free-form field (an auth `json` payload).
    payload = body()
    payload["source"]["auth"] = {"url": "http://127.0.0.1:9/token", "json": {"k": 0}}
    text = json.dumps(payload).replace('{"k": 0}', '{"k": ' + "[" * depth + "]" * depth + "}")
    for data in (("[" * depth + "]" * depth).encode(), text.encode()):
        resp = await client.post("/api/distribute/image", data=data, headers={"Content-Type": "application/json"})
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["status"] == "error"
    assert job_count(tmp_path) == 0


# -- the API token ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, status",
    [(b"Bearer tok-secret", 200), (b"Bearer \xff", 401), (b"Bearer tok-secre\xff", 401), ("Bearer é".encode(), 401),
     (b"bearer tok-secret", 200), (b"BEARER tok-secret", 200), (b"Bearer TOK-SECRET", 401), (b"Basic tok-secret", 401),
     (b"Bearertok-secret", 401), (b"Bearer  tok-secret", 401)],
)
async def test_an_authorization_header_that_is_not_utf8_is_a_401(aiohttp_client, tmp_path: Path, value: bytes, status: int) -> None:
    # Raw bytes on the wire: the test client would refuse to send a byte that is not UTF-8.
    client = await aiohttp_client(create_app(settings(tmp_path, api_token="tok-secret")))
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(b"GET /api/distribute/image HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + value + b"\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == f"HTTP/1.1 {status} ".encode() + (b"OK" if status == 200 else b"Unauthorized")
    if status == 401:
        assert b"missing or wrong API token" in payload
