"""The `pydlit` client commands: reference parsing, progress rendering, the HTTP commands against
a fake service (and the real app), and `copy` end to end between real registries."""
from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.bgserver import BackgroundServer
from support.images import assert_same_tree, push_image, read_back
from support.referrers import push_referrer, tag_index
from support.regclient import RegistryHTTP
from support.registry import free_port
from support.service import wait_for

from pydlit import commands
from pydlit.app import create_app
from pydlit.commands import (
    ImageRef,
    ProgressPrinter,
    copy,
    jobs,
    parse_reference,
    render_progress,
    status,
    submit,
)
from pydlit.registry.client import RetryPolicy
from pydlit.settings import Settings
from pydlit.transfer import MemoryEvents

JOB_ID = "0b7f6d9e-6a0e-4c55-9d33-4a1f0c2b9e11"
DIGEST = "sha256:" + "ab" * 32
MiB = 1024 * 1024


class TtyIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def target(state: str = "PENDING", done: int = 0, total: int | None = None, error: str | None = None,
           endpoint: str = "http://127.0.0.1:5000/v2", image: str = "team/app", ref: str = "v1") -> dict[str, Any]:
    return {"endpoint": endpoint, "image": image, "ref": ref, "state": state, "error": error,
            "bytes_done": done, "bytes_total": total}


def view(value: str, targets: list[dict[str, Any]], error: str | None = None, job_id: str = JOB_ID,
         created_at: str = "2026-01-01T00:00:00+00:00") -> dict[str, Any]:
    return {
        "id": job_id, "value": value, "created_at": created_at, "started_at": None, "finished_at": None,
        "finished_endpoints": [t["endpoint"] for t in targets if t["state"] == "FINISHED"],
        "skipped_clusters": [t["endpoint"] for t in targets if t["state"] == "SKIPPED"],
        "error": error, "attempt": 1, "source": "http://127.0.0.1:4000/v2 team/app:v1",
        "bytes_done": sum(t["bytes_done"] for t in targets),
        "bytes_total": sum(t["bytes_total"] or 0 for t in targets),
        "targets": targets,
    }


FINISHING = [
    view("QUEUED", [target(), target(image="mirror/app")]),
    view("RUNNING", [target("RUNNING", 1 * MiB, 4 * MiB), target("RUNNING", 0, 4 * MiB, image="mirror/app")]),
    view("RUNNING", [target("FINISHED", 4 * MiB, 4 * MiB), target("RUNNING", 2 * MiB, 4 * MiB, image="mirror/app")]),
    view("FINISHED", [target("FINISHED", 4 * MiB, 4 * MiB), target("FINISHED", 4 * MiB, 4 * MiB, image="mirror/app")]),
]
FAILING = [
    view("RUNNING", [target("RUNNING", 0, 100), target("RUNNING", 0, 100, image="mirror/app")]),
    view("FAILED", [target("FINISHED", 100, 100),
                    target("FAILED", 0, 100, image="mirror/app",
                           error="127.0.0.1:5000: push manifest mirror/app:v1: HTTP 403 DENIED: access denied")],
         error="1 of 2 target(s) failed"),
]


# -- a fake service -----------------------------------------------------------------------------


class FakeService:
    """Answers like pydlit from scripted status documents; pages its list PAGE jobs at most."""

    PAGE = 3

    def __init__(self, views: list[dict[str, Any]], listed: list[dict[str, Any]] | None, token: str | None,
                 dropped: int) -> None:
        self.views = list(views)
        self.listed = listed
        self.token = token
        self.dropped = dropped  # status requests whose connection is cut, as by a restarting service
        self.posted: list[bytes] = []
        self.authorization: list[str | None] = []
        self.list_queries: list[dict[str, str]] = []
        self._server = BackgroundServer(self._app, "fake-pydlit")
        self.url = f"http://127.0.0.1:{self._server.start()}"

    def stop(self) -> None:
        self._server.stop()

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/api/distribute/image", self._post)
        app.router.add_get("/api/distribute/image/{id}", self._get)
        if self.listed is not None:
            app.router.add_get("/api/distribute/image", self._list)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        self.authorization.append(request.headers.get("Authorization"))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"status": "error", "msg": "unauthorized"}, status=401)
        return await handler(request)

    async def _post(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.posted.append(raw)
        if "targets" not in json.loads(raw):
            return web.json_response({"status": "error", "msg": "request body: 'targets' is a required property"}, status=400)
        return web.json_response({"id": JOB_ID, "msg": "Image sync started", "status": "success"}, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        if self.dropped:
            self.dropped -= 1
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if request.match_info["id"] != JOB_ID:
            return web.json_response({"status": "error", "msg": "no job with id 'nope'"}, status=404)
        return web.json_response(self.views.pop(0) if len(self.views) > 1 else self.views[0])

    async def _list(self, request: web.Request) -> web.Response:
        assert self.listed is not None
        self.list_queries.append(dict(request.query))
        chosen = [j for j in self.listed if j["value"] == request.query.get("state", j["value"])]
        start = int(request.query.get("cursor", "0"))
        end = start + min(int(request.query.get("limit", "50")), self.PAGE)
        return web.json_response({"jobs": chosen[start:end], "next": str(end) if end < len(chosen) else None})


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeService]]:
    started: list[FakeService] = []

    def make(views: list[dict[str, Any]] = FINISHING, listed: list[dict[str, Any]] | None = None,
             token: str | None = None, dropped: int = 0) -> FakeService:
        service = FakeService(views, listed, token, dropped)
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    path = tmp_path / "request.json"
    # Odd spacing on purpose: the file must be sent as written, not re-serialised.
    path.write_text('{"source": {"endpoint": "http://127.0.0.1:4000", "image": "team/app", "ref": "v1"},\n'
                    ' "targets": [{"endpoint": "http://127.0.0.1:5000/v2"}]}\n')
    return path


# -- references ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:5000/library/alpine:3.19", ImageRef("http", "127.0.0.1:5000", "library/alpine", "3.19")),
        ("https://127.0.0.1:5000/library/alpine:3.19", ImageRef("https", "127.0.0.1:5000", "library/alpine", "3.19")),
        ("localhost:5000/repo@" + DIGEST, ImageRef("http", "localhost:5000", "repo", DIGEST)),
        ("127.0.0.1:5000/a/b/c", ImageRef("http", "127.0.0.1:5000", "a/b/c", "latest")),
        ("localhost/repo:v1", ImageRef("http", "localhost", "repo", "v1")),
        ("[::1]:5000/x:y", ImageRef("http", "[::1]:5000", "x", "y")),
        ("quay.io/team/app:v1.2_3-rc", ImageRef("https", "quay.io", "team/app", "v1.2_3-rc")),
        ("registry.example:8443/app", ImageRef("https", "registry.example:8443", "app", "latest")),
        ("myregistry/app", ImageRef("https", "myregistry", "app", "latest")),
        ("http://registry.example/app", ImageRef("http", "registry.example", "app", "latest")),
        ("HTTPS://LOCALHOST:5000/app", ImageRef("https", "LOCALHOST:5000", "app", "latest")),
        # One-part Docker Hub names stay as written: RegistryClient.repository adds library/.
        ("registry-1.docker.io/alpine", ImageRef("https", "registry-1.docker.io", "alpine", "latest")),
        ("docker.io/library/alpine:3.19", ImageRef("https", "registry-1.docker.io", "library/alpine", "3.19")),
        ("  localhost:5000/repo/  ", ImageRef("http", "localhost:5000", "repo", "latest")),
        ("localhost:5000/a__b.c-d/e:" + "t" * 128, ImageRef("http", "localhost:5000", "a__b.c-d/e", "t" * 128)),
    ],
)
def test_parse_reference(text: str, expected: ImageRef) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("alpine:3.19", "expected"),
        ("alpine", "expected"),
        ("/alpine", "expected"),
        ("localhost:5000", "expected"),
        ("localhost:5000/", "no repository"),
        ("ftp://localhost/app", "scheme must be http or https"),
        ("localhost:99999/app", "not a registry host"),
        ("localhost:0/app", "not a registry host"),
        ("localhost:port/app", "not a registry host"),
        ("user:pw@localhost:5000/app", "not a registry host"),
        ("localhost:5000/App", "not a repository name"),
        ("localhost:5000/app//x", "not a repository name"),
        ("localhost:5000/app:", "neither a tag nor a digest"),
        ("localhost:5000/app:-bad", "neither a tag nor a digest"),
        ("localhost:5000/app@sha256:abc", "neither a tag nor a digest"),
        ("localhost:5000/app:v1@" + DIGEST, "not both"),
    ],
)
def test_parse_reference_refuses(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        parse_reference(text)
    assert repr(text) in str(info.value)


def test_a_target_takes_what_it_leaves_out_from_the_source() -> None:
    source = parse_reference("localhost:5000/team/app:v1")
    assert parse_reference("localhost:6000", source) == ImageRef("http", "localhost:6000", "team/app", "v1")
    assert parse_reference("https://localhost:6000/", source) == ImageRef("https", "localhost:6000", "team/app", "v1")
    assert parse_reference("localhost:6000/mirror", source) == ImageRef("http", "localhost:6000", "mirror", "v1")
    assert parse_reference("localhost:6000/mirror:v2", source).ref == "v2"
    with pytest.raises(ValueError, match="no repository"):
        parse_reference("localhost:6000/:v2", source)


def test_image_ref_renders_tags_and_digests() -> None:
    assert str(parse_reference("localhost:5000/a:v1")) == "http://localhost:5000/a:v1"
    assert str(parse_reference("localhost:5000/a@" + DIGEST)) == f"http://localhost:5000/a@{DIGEST}"
    assert parse_reference("registry.example/a").endpoint == "https://registry.example"


# -- progress rendering -------------------------------------------------------------------------


def test_render_progress_line() -> None:
    running = view("RUNNING", [target("RUNNING", 3 * MiB, 4 * MiB), target("FINISHED", 4 * MiB, 4 * MiB),
                               target("PENDING")])
    line = render_progress(running, rate=1.5 * MiB, bar_width=8)
    assert line == "[#######-]  87% 7.0 MiB/8.0 MiB  1.5 MiB/s  1 PENDING, 1 RUNNING, 1 FINISHED"
    assert render_progress(view("QUEUED", [target()]), bar_width=4) == "[----]  0 B  1 PENDING"
    done = render_progress(view("FINISHED", [target("FINISHED", 2048, 2048)]), bar_width=4)
    assert done == "[####]  100% 2.0 KiB/2.0 KiB  1 FINISHED"


def test_non_tty_prints_one_line_per_state_change() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, "job x")
    for v in [FINISHING[0], FINISHING[1], FINISHING[1], FINISHING[2], FINISHING[3]]:
        printer.update(v)
    printer.close()
    assert out.getvalue().splitlines() == [
        "job x: QUEUED  0 B",
        "job x: RUNNING  12% 1.0 MiB/8.0 MiB",
        "  http://127.0.0.1:5000/v2 team/app:v1: RUNNING  25% 1.0 MiB/4.0 MiB",
        "  http://127.0.0.1:5000/v2 mirror/app:v1: RUNNING  0% 0 B/4.0 MiB",
        "  http://127.0.0.1:5000/v2 team/app:v1: FINISHED  100% 4.0 MiB/4.0 MiB",
        "job x: FINISHED  100% 8.0 MiB/8.0 MiB",
        "  http://127.0.0.1:5000/v2 mirror/app:v1: FINISHED  100% 4.0 MiB/4.0 MiB",
    ]
    assert "\r" not in out.getvalue() and "[" not in out.getvalue()


def test_tty_redraws_a_bar_with_rate_under_the_state_lines() -> None:
    out = TtyIO()
    now = [100.0]
    printer = ProgressPrinter(out, "job x", clock=lambda: now[0])
    printer.update(FINISHING[1])
    now[0] += 2.0
    printer.update(FINISHING[2])  # 1 MiB -> 6 MiB in 2 s
    assert printer.rate() == 2.5 * MiB
    now[0] += 1.0
    printer.update(FINISHING[3])
    printer.close()
    frames = out.getvalue().split("\r\x1b[K")[1:]
    assert len(frames) == 3
    assert frames[0].endswith("[##------------------]  12% 1.0 MiB/8.0 MiB  2 RUNNING")
    assert frames[1] == (
        "  http://127.0.0.1:5000/v2 team/app:v1: FINISHED  100% 4.0 MiB/4.0 MiB\n"
        "[###############-----]  75% 6.0 MiB/8.0 MiB  2.5 MiB/s  1 RUNNING, 1 FINISHED"
    )
    assert frames[2].startswith("job x: FINISHED")
    assert frames[2].endswith("  2 FINISHED\n")  # close() ends the bar's line


def test_tty_bar_is_cut_to_the_terminal_width() -> None:
    out = TtyIO()
    now = [0.0]
    printer = ProgressPrinter(out, "job x", clock=lambda: now[0])
    states = ["RUNNING", "FINISHED", "SKIPPED", "FAILED"]
    printer.update(view("RUNNING", [target(s, 0, 999 * MiB) for s in states]))
    now[0] = 1.0
    printer.update(view("RUNNING", [target(s, 700 * MiB, 999 * MiB) for s in states]))
    bar = out.getvalue().rsplit("\r\x1b[K", 1)[-1]
    # A wrapped line could not be redrawn in place.
    assert bar.startswith("[") and len(bar) == commands.DEFAULT_COLUMNS - 1


# -- submit, status, jobs against a fake service --------------------------------------------------


def test_submit_sends_the_file_as_is_and_prints_the_job_id(fake, request_file: Path) -> None:
    service = fake()
    out = io.StringIO()
    assert submit(service.url, str(request_file), False, None, out) == 0
    assert out.getvalue() == f"{JOB_ID}\n"
    assert service.posted == [request_file.read_bytes()]
    assert service.authorization == [None]


def test_submit_wait_follows_the_job_to_finished(fake, request_file: Path) -> None:
    service = fake(FINISHING)
    out = io.StringIO()
    assert submit(service.url.removeprefix("http://") + "/", str(request_file), True, None, out, interval=0.01) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == JOB_ID
    assert lines[1] == f"job {JOB_ID}: QUEUED  0 B"
    assert f"job {JOB_ID}: FINISHED  100% 8.0 MiB/8.0 MiB" in lines
    assert lines[-1] == "FINISHED: 2 target(s) hold the image, 0 skipped"


def test_submit_wait_on_a_tty_draws_the_bar(fake, request_file: Path) -> None:
    service = fake(FINISHING)
    out = TtyIO()
    assert submit(service.url, str(request_file), True, None, out, interval=0.01) == 0
    assert "\r\x1b[K" in out.getvalue() and "[####################]  100%" in out.getvalue()
    assert out.getvalue().endswith("  2 FINISHED\nFINISHED: 2 target(s) hold the image, 0 skipped\n")


def test_submit_wait_reports_a_failed_job(fake, request_file: Path) -> None:
    service = fake(FAILING)
    out = io.StringIO()
    assert submit(service.url, str(request_file), True, None, out, interval=0.01) == 1
    assert out.getvalue().splitlines()[-2:] == [
        "FAILED: 1 of 2 target(s) failed",
        "  http://127.0.0.1:5000/v2 mirror/app:v1: 127.0.0.1:5000: push manifest mirror/app:v1: HTTP 403 DENIED: access denied",
    ]


def test_submit_wait_rides_out_a_short_outage(fake, request_file: Path) -> None:
    service = fake(FINISHING, dropped=3)
    out = io.StringIO()
    assert submit(service.url, str(request_file), True, None, out, interval=0.01) == 0
    notes = [line for line in out.getvalue().splitlines() if line.startswith("pydlit:")]
    assert notes == [f"pydlit: lost the connection to pydlit at {service.url}: remote end closed connection without"
                     f" response; retrying for up to {commands.RECONNECT_GRACE_S:g} s"]
    assert out.getvalue().splitlines()[-1] == "FINISHED: 2 target(s) hold the image, 0 skipped"


def test_submit_wait_gives_up_on_a_long_outage(fake, request_file: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(commands, "RECONNECT_GRACE_S", 0.2)
    service = fake(FINISHING, dropped=1000)
    out = io.StringIO()
    assert submit(service.url, str(request_file), True, None, out, interval=0.02) == 2
    assert capsys.readouterr().err.startswith(f"pydlit: lost the connection to pydlit at {service.url}")


def test_submit_wait_gives_up_after_the_timeout(fake, request_file: Path, capsys) -> None:
    service = fake([FINISHING[1]])
    out = io.StringIO()
    assert submit(service.url, str(request_file), True, None, out, timeout=0.3, interval=0.05) == 3
    assert out.getvalue().splitlines()[0] == JOB_ID
    assert capsys.readouterr().err == f"pydlit: gave up waiting after 0.3 s; job {JOB_ID} is RUNNING and goes on\n"


def test_submit_refused_request_is_a_usage_error(fake, tmp_path: Path, capsys) -> None:
    service = fake()
    bad = tmp_path / "bad.json"
    bad.write_text('{"source": {}}')
    out = io.StringIO()
    assert submit(service.url, str(bad), True, None, out) == 2
    assert out.getvalue() == ""  # the output is a job id or nothing
    assert capsys.readouterr().err == "pydlit: the service answered HTTP 400: request body: 'targets' is a required property\n"


def test_submit_sends_the_token(fake, request_file: Path, capsys) -> None:
    service = fake(token="t0ken")
    out = io.StringIO()
    assert submit(service.url, str(request_file), False, None, out) == 2
    assert capsys.readouterr().err == "pydlit: the service requires an API token\n"
    assert submit(service.url, str(request_file), False, "wrong", out) == 2
    assert capsys.readouterr().err == "pydlit: the service refused the API token\n"
    assert out.getvalue() == ""
    assert submit(service.url, str(request_file), True, "t0ken", io.StringIO(), interval=0.01) == 0
    assert set(service.authorization[2:]) == {"Bearer t0ken"}


def test_unreachable_service_and_unreadable_file_are_usage_errors(request_file: Path, tmp_path: Path, capsys) -> None:
    port = free_port()
    out = io.StringIO()
    assert submit(f"http://127.0.0.1:{port}", str(request_file), False, None, out) == 2
    assert capsys.readouterr().err == f"pydlit: cannot reach pydlit at http://127.0.0.1:{port}: connection refused\n"
    assert submit(f"127.0.0.1:{port}", str(tmp_path / "missing.json"), False, None, out) == 2
    assert capsys.readouterr().err.startswith(f"pydlit: cannot read {tmp_path / 'missing.json'}: no such file")
    assert out.getvalue() == ""
    out = io.StringIO()
    assert status(f"http://127.0.0.1:{port}", JOB_ID, None, out) == 2
    assert jobs(f"http://127.0.0.1:{port}", None, 10, None, out) == 2


def test_a_server_that_is_not_pydlit(fake, capsys) -> None:
    service = fake(listed=None)  # no list route: aiohttp answers a text/plain 405
    out = io.StringIO()
    assert jobs(service.url, None, 10, None, out) == 2
    assert capsys.readouterr().err == f"pydlit: the service at {service.url} cannot list jobs (it predates GET /api/distribute/image)\n"


def test_status_readable_json_and_unknown(fake, capsys) -> None:
    service = fake([FAILING[1]])
    out = io.StringIO()
    assert status(service.url, JOB_ID, None, out) == 1
    assert out.getvalue().splitlines() == [
        f"job      {JOB_ID}",
        "state    FAILED (attempt 1)",
        "source   http://127.0.0.1:4000/v2 team/app:v1",
        "created  2026-01-01T00:00:00+00:00",
        "started  -",
        "finished -",
        "progress 50% 100 B/200 B",
        "error    1 of 2 target(s) failed",
        "targets",
        "  FINISHED http://127.0.0.1:5000/v2 team/app:v1  100% 100 B/100 B",
        "  FAILED   http://127.0.0.1:5000/v2 mirror/app:v1  0% 0 B/100 B",
        "           127.0.0.1:5000: push manifest mirror/app:v1: HTTP 403 DENIED: access denied",
    ]
    out = io.StringIO()
    assert status(service.url, JOB_ID, None, out, as_json=True) == 1
    assert json.loads(out.getvalue()) == FAILING[1]
    out = io.StringIO()
    assert status(service.url, "nope", None, out) == 2
    assert capsys.readouterr().err == "pydlit: the service answered HTTP 404: no job with id 'nope'\n"


def test_status_says_a_running_job_is_being_cancelled(fake) -> None:
    service = fake([{**FAILING[0], "cancel_requested": True}])
    out = io.StringIO()
    assert status(service.url, JOB_ID, None, out) == 0
    assert out.getvalue().splitlines()[1] == "state    RUNNING (attempt 1), cancelling"


def _listed() -> list[dict[str, Any]]:
    states = ["FINISHED", "FAILED", "RUNNING", "FINISHED", "QUEUED", "FAILED", "FINISHED"]
    return [
        view(state, [target("FINISHED", 10 * i, 20 * i) if i else target()], job_id=f"job-{i}",
             created_at=f"2026-01-0{i + 1}T00:00:00+00:00")
        for i, state in reversed(list(enumerate(states)))
    ]


def test_jobs_lists_newest_first_following_the_cursor(fake) -> None:
    service = fake(listed=_listed())
    out = io.StringIO()
    assert jobs(service.url, None, 5, None, out) == 0
    assert out.getvalue().splitlines() == [
        f"job-{i}  {state:<8}  2026-01-0{i + 1}T00:00:00+00:00  50% {10 * i} B/{20 * i} B  http://127.0.0.1:4000/v2 team/app:v1"
        for i, state in [(6, "FINISHED"), (5, "FAILED"), (4, "QUEUED"), (3, "FINISHED"), (2, "RUNNING")]
    ]
    assert service.list_queries == [{"limit": "5"}, {"limit": "2", "cursor": "3"}]


def test_jobs_filters_by_state(fake, capsys) -> None:
    service = fake(listed=_listed())
    out = io.StringIO()
    assert jobs(service.url, "finished", 50, None, out) == 0
    assert [line.split()[0] for line in out.getvalue().splitlines()] == ["job-6", "job-3", "job-0"]
    assert out.getvalue().splitlines()[-1].split("  ")[3] == "-"  # nothing known about its size yet
    assert service.list_queries[0] == {"state": "FINISHED", "limit": "50"}
    out = io.StringIO()
    assert jobs(service.url, "DONE", 50, None, out) == 2
    assert capsys.readouterr().err == "pydlit: state must be one of QUEUED, RUNNING, FINISHED, FAILED\n"
    assert jobs(service.url, None, 0, None, io.StringIO()) == 2


# -- against the real service ----------------------------------------------------------------------


def test_submit_wait_and_status_against_the_real_service(registries, repo_name, tmp_path: Path) -> None:
    image = push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[4096, 70_000], seed=41)
    settings = Settings(
        db=str(tmp_path / "jobs.db"), node="test-node", concurrency=1, poll_s=0.05, heartbeat_s=0.05,
        retry=RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0, max_total=5.0),
    )
    app = BackgroundServer(lambda: create_app(settings), "pydlit-app")
    server = f"http://127.0.0.1:{app.start()}"
    try:
        request = tmp_path / "request.json"
        request.write_text(json.dumps({
            "source": {"endpoint": registries.source.endpoint, "image": repo_name, "ref": "v1"},
            "targets": [{"endpoint": registries.target_a.endpoint}],
        }))
        out = io.StringIO()
        assert submit(server, str(request), True, None, out, interval=0.05) == 0, out.getvalue()
        job_id = out.getvalue().splitlines()[0]
        assert out.getvalue().splitlines()[-1] == "FINISHED: 1 target(s) hold the image, 0 skipped"
        out = io.StringIO()
        assert status(server, job_id, None, out, as_json=True) == 0
        answer = json.loads(out.getvalue())
        assert answer["value"] == "FINISHED" and answer["bytes_done"] == answer["bytes_total"] == image.total_bytes
    finally:
        app.stop()
    assert_same_tree(image, read_back(registries.target_a, repo_name, "v1"))


# -- copy without a service --------------------------------------------------------------------------


def test_copy_to_two_targets_reads_back_identical(registries, repo_name) -> None:
    image = push_image(registries.source, repo_name, "v1", "oci_index", seed=42, platforms=2)
    target = registries.target_a
    out = io.StringIO()
    code = asyncio.run(copy(
        f"{registries.source.host}/{repo_name}:v1",
        [target.host, f"{target.url}/{repo_name}-mirror:stable"],
        overwrite=False, verify_tls=False, out=out,
    ))
    assert code == 0, out.getvalue()
    assert_same_tree(image, read_back(target, repo_name, "v1"))
    assert_same_tree(image, read_back(target, f"{repo_name}-mirror", "stable"))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"copy http://{registries.source.host}/{repo_name}:v1: RUNNING")
    assert f"  http://{target.host} {repo_name}-mirror:stable: FINISHED  100% " in "\n".join(lines)
    assert lines[-1] == "FINISHED: 2 target(s) hold the image, 0 skipped"

    # Again: the tag holds the same digest, so nothing is sent and the copy still succeeds.
    out = io.StringIO()
    assert asyncio.run(copy(f"{registries.source.host}/{repo_name}:v1", [target.host],
                            overwrite=False, verify_tls=False, out=out)) == 0
    assert out.getvalue().splitlines()[-1] == "FINISHED: 1 target(s) hold the image, 0 skipped"


def test_copy_by_digest_and_skip_without_overwrite(registries, repo_name) -> None:
    first = push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[2048, 9000], seed=43)
    other = push_image(registries.source, repo_name, "v2", "schema2", layer_sizes=[2048, 9001], seed=44)
    pinned = f"{registries.source.host}/{repo_name}@{first.digest}"
    target = f"{registries.target_a.host}/{repo_name}:pinned"
    assert asyncio.run(copy(pinned, [target], overwrite=False, verify_tls=False, out=io.StringIO())) == 0
    assert_same_tree(first, read_back(registries.target_a, repo_name, "pinned"))

    out = io.StringIO()
    newer = f"{registries.source.host}/{repo_name}:v2"
    assert asyncio.run(copy(newer, [target], overwrite=False, verify_tls=False, out=out)) == 0
    assert out.getvalue().splitlines()[-2:] == [
        "FINISHED: 0 target(s) hold the image, 1 skipped",
        f"  skipped http://{registries.target_a.host} {repo_name}:pinned: "
        f"{repo_name}:pinned already exists with digest {first.digest} and overwrite is false",
    ]
    assert asyncio.run(copy(newer, [target], overwrite=True, verify_tls=False, out=io.StringIO())) == 0
    assert_same_tree(other, read_back(registries.target_a, repo_name, "pinned"))


def test_copy_with_referrers_brings_the_signature(registries, repo_name) -> None:
    image = push_image(registries.source, repo_name, "v1", "oci", layer_sizes=[2048], seed=45)
    media_type, data = image.manifests[image.digest]
    sig = push_referrer(registries.source, repo_name, (image.digest, media_type, len(data)), "application/vnd.example.sig", b"signed")
    target = registries.target_a
    for referrers in (False, True):
        assert asyncio.run(copy(f"{registries.source.host}/{repo_name}:v1", [target.host], overwrite=False,
                                verify_tls=False, referrers=referrers, out=io.StringIO())) == 0
        assert (tag_index(target, repo_name, image.digest) is not None) is referrers
    assert RegistryHTTP.for_endpoint(target).head_manifest(repo_name, sig.digest) == sig.digest


def test_copy_of_a_missing_image_fails_with_the_reason(registries, repo_name) -> None:
    out = io.StringIO()
    code = asyncio.run(copy(f"{registries.source.host}/{repo_name}:nope", [registries.target_a.host],
                            overwrite=False, verify_tls=False, out=out))
    assert code == 1
    last = out.getvalue().splitlines()[-1]
    assert last.startswith(f"FAILED: cannot read the source: {registries.source.host}: read manifest {repo_name}:nope")
    assert "404" in last


def test_a_copy_whose_target_fails_gives_its_upload_sessions_back(registries, repo_name, proxy_factory) -> None:
    push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[2 * 1024 * 1024], seed=46)
    target = proxy_factory(registries.target_a)
    target.fail_next(100, 403, methods="PUT", kinds="upload_put")  # the blob's commit, for good
    out = io.StringIO()
    code = asyncio.run(copy(f"{registries.source.host}/{repo_name}:v1", [f"{target.host}/{repo_name}:v1"],
                            overwrite=False, verify_tls=False, out=out))
    assert code == 1, out.getvalue()
    # Both: the big layer's (checkpointed) and the config blob's (opened for its one PUT).
    assert [r.status for r in target.requests if r.method == "DELETE"] == [204, 204]
    sessions = registries.target_a.storage_dir / "docker/registry/v2/repositories" / repo_name / "_uploads"
    assert not any(sessions.glob("*/data")), "a session was left to the registry's purge"


def _copy_process(src: str, target: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pydlit", "copy", src, target], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt_mid_chunk(proc: subprocess.Popen[str], target, times: int, sig: int = signal.SIGINT) -> tuple[str, str, float]:
    wait_for(lambda: target.blob_upload_bytes() >= 4 * MiB or proc.poll() is not None, timeout=30)
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    for _ in range(times):
        proc.send_signal(sig)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=30)
    return out, err, time.monotonic() - t0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_ends_a_copys_chunks_then_gives_the_sessions_back(registries, repo_name, proxy_factory, sig, code) -> None:
    push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[40 * MiB, 40 * MiB], seed=47)
    target = proxy_factory(registries.target_a)
    target.rate_limit(16 * MiB, download=False)
    proc = _copy_process(f"{registries.source.host}/{repo_name}:v1", f"{target.host}/{repo_name}:v1")
    out, err, took = _interrupt_mid_chunk(proc, target, times=1, sig=sig)
    assert proc.returncode == code, (out, err)
    assert out.splitlines()[-1] == "FAILED: interrupted"
    assert "pydlit: interrupted: ending the chunks on their way" in err and "Traceback" not in err
    assert took < 10
    # Every session stood at a chunk boundary, so the registry deleted it with its bytes.
    assert [r.status for r in target.requests if r.method == "DELETE"] == [204, 204]
    assert registries.target_a.session_bytes(repo_name) == 0


def test_a_second_ctrl_c_quits_a_copy_at_once(registries, repo_name, proxy_factory) -> None:
    push_image(registries.source, repo_name, "v1", "schema2", layer_sizes=[40 * MiB], seed=48)
    target = proxy_factory(registries.target_a)
    target.rate_limit(1 * MiB, download=False)  # the chunk on its way would take 12 s more
    proc = _copy_process(f"{registries.source.host}/{repo_name}:v1", f"{target.host}/{repo_name}:v1")
    out, err, took = _interrupt_mid_chunk(proc, target, times=2)
    assert proc.returncode == 130, (out, err)
    assert "pydlit: quit at once" in err and "Traceback" not in err
    assert took < 5


def test_a_copy_gives_ctrl_c_back_to_asyncio_run_as_it_found_it(registries, repo_name) -> None:
    async def main() -> tuple[object, object]:
        before = signal.getsignal(signal.SIGINT)
        await copy(f"{registries.source.host}/{repo_name}:nope", [registries.target_a.host], overwrite=False,
                   verify_tls=False, out=io.StringIO())
        return before, signal.getsignal(signal.SIGINT)

    before, after = asyncio.run(main())
    assert after == before and after is not signal.default_int_handler


def test_copy_refuses_bad_references_before_any_request(capsys) -> None:
    out = io.StringIO()
    assert asyncio.run(copy("alpine:3.19", ["localhost:5000"], overwrite=False, verify_tls=False, out=out)) == 2
    assert capsys.readouterr().err == (
        "pydlit: bad image reference 'alpine:3.19': expected [http[s]://]HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]\n"
    )
    assert asyncio.run(copy("localhost:5000/a", [], overwrite=False, verify_tls=False, out=out)) == 2
    assert capsys.readouterr().err == "pydlit: name at least one target\n"
    assert out.getvalue() == ""


def test_memory_events_keep_what_the_engine_reports() -> None:
    async def scenario() -> MemoryEvents:
        events = MemoryEvents()
        events.set_total(0, 300)
        events.blob_progress(0, "sha256:a", 100)
        events.blob_progress(0, "sha256:b", 50)
        events.blob_progress(0, "sha256:b", 150)
        await events.save_upload(0, "sha256:b", "http://r/upload/1", 150)
        assert events.saved_upload(0, "sha256:b") == ("http://r/upload/1", 150)
        await events.drop_upload(0, "sha256:b")
        assert events.saved_upload(0, "sha256:b") is None
        await events.remember_blob("http://r", "team/app", "sha256:a")
        await events.remember_blob("http://r", "team/app", "sha256:a")
        await events.remember_blob("http://r", "other/app", "sha256:a")
        candidates = await events.mount_sources("http://r", "sha256:a")
        candidates.insert(0, "mutated")  # as the engine does: must not leak back
        await events.target_state(0, "FAILED", "boom")
        return events

    events = asyncio.run(scenario())
    assert events.done(0) == 250 and events.totals == {0: 300}
    assert asyncio.run(events.mount_sources("http://r", "sha256:a")) == ["team/app", "other/app"]
    assert asyncio.run(events.mount_sources("http://r", "sha256:c")) == []
    assert (events.states, events.errors) == ({0: "FAILED"}, {0: "boom"})


def test_the_jobs_command_takes_a_state_in_any_case() -> None:
    from pydlit.cli import client_parser

    assert client_parser().parse_args(["jobs", "--state", "failed"]).state == "FAILED"


@pytest.mark.parametrize("timeout", ["-1", "0", "abc", "inf"])
def test_submit_takes_only_a_timeout_above_zero(timeout, capsys) -> None:
    from pydlit.cli import client_parser

    assert client_parser().parse_args(["submit", "r.json", "--wait", "--timeout", "2.5"]).timeout == 2.5
    with pytest.raises(SystemExit) as exited:
        client_parser().parse_args(["submit", "r.json", "--wait", "--timeout", timeout])
    assert exited.value.code == 2
    assert f"argument --timeout: must be a number of seconds above 0, not '{timeout}'" in capsys.readouterr().err
