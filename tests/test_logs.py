"""Logging setup: JSON and text lines, the job id from the task's context, secret redaction."""
from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator

import aiosqlite
import pytest

from pydlit.logs import REDACTED, current_job, job_context, redact, setup_logging

log = logging.getLogger("pydlit.test")


@pytest.fixture
def capture() -> Iterator[Callable[[str, str], io.StringIO]]:
    """capture(level, fmt) sets logging up into a buffer; the root logger is restored after."""
    root, access, sql = logging.getLogger(), logging.getLogger("aiohttp.access"), logging.getLogger("aiosqlite")
    saved_handlers, saved_level, saved_access, saved_sql = root.handlers[:], root.level, access.level, sql.level

    def make(level: str = "INFO", fmt: str = "text") -> io.StringIO:
        buf = io.StringIO()
        setup_logging(level, fmt, stream=buf)
        return buf

    yield make
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    access.setLevel(saved_access)
    sql.setLevel(saved_sql)


def json_lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


async def run_jobs() -> None:
    async def job(job_id: str, started: asyncio.Event, other_started: asyncio.Event) -> None:
        with job_context(job_id):
            log.info("start %s", job_id)
            started.set()
            await other_started.wait()  # the two jobs' lines interleave
            await asyncio.create_task(child(job_id))
            log.info("end %s", job_id)

    async def child(job_id: str) -> None:
        log.info("child of %s", job_id)

    a, b = asyncio.Event(), asyncio.Event()
    log.info("before")
    await asyncio.gather(job("job-a", a, b), job("job-b", b, a))
    log.info("after")


def test_json_lines_carry_the_job_of_their_task(capture) -> None:
    buf = capture("INFO", "json")
    asyncio.run(run_jobs())
    lines = json_lines(buf)
    assert lines[0]["msg"] == "before" and lines[-1]["msg"] == "after"
    for line in lines:
        assert set(line) >= {"ts", "level", "logger", "msg"}
        assert line["level"] == "INFO" and line["logger"] == "pydlit.test"
        assert line["ts"].endswith("+00:00") and "T" in line["ts"]
        if line["msg"] in ("before", "after"):
            assert "job" not in line
        else:
            assert line["msg"].endswith(line["job"]), line
    assert sorted(line["msg"] for line in lines if "job" in line) == sorted(
        f"{what} {job}" for what in ("start", "child of", "end") for job in ("job-a", "job-b"))
    assert current_job.get() is None


def test_json_exception_is_one_line_with_exc(capture) -> None:
    buf = capture("INFO", "json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        with job_context("job-x"):
            log.exception("copy failed")
    assert buf.getvalue().count("\n") == 1
    [line] = json_lines(buf)
    assert line["level"] == "ERROR" and line["msg"] == "copy failed" and line["job"] == "job-x"
    assert line["exc"].startswith("Traceback") and "RuntimeError: boom" in line["exc"]


def test_text_format_appends_the_job(capture) -> None:
    buf = capture("INFO", "text")
    log.info("outside")
    with job_context("job-42"):
        log.info("inside %d", 1)
    log.info("extra", extra={"job": "job-7"})
    lines = buf.getvalue().splitlines()
    assert lines[0].endswith("INFO pydlit.test: outside") and "job=" not in lines[0]
    assert lines[1].endswith("INFO pydlit.test: inside 1 job=job-42")
    assert lines[2].endswith("extra job=job-7")


def test_text_format_does_not_repeat_a_job_the_message_names(capture) -> None:
    buf = capture("INFO", "text")
    with job_context("job-42"):
        log.info("job %s: FINISHED", "job-42")
    assert buf.getvalue().rstrip("\n").endswith("INFO pydlit.test: job job-42: FINISHED")


def test_text_traceback_follows_the_job_line(capture) -> None:
    buf = capture("INFO", "text")
    with job_context("job-9"):
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("failed")
    first, *rest = buf.getvalue().splitlines()
    assert first.endswith("failed job=job-9")
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: bad"


def test_level_and_aiohttp_access(capture) -> None:
    buf = capture("warning", "json")
    log.info("hidden")
    log.warning("shown")
    assert [line["msg"] for line in json_lines(buf)] == ["shown"]
    logging.getLogger("aiohttp.access").setLevel(logging.NOTSET)
    buf = capture("DEBUG", "text")
    logging.getLogger("aiohttp.access").info("GET /api?token=x")
    log.debug("debug shown")
    assert "GET /api" not in buf.getvalue() and "debug shown" in buf.getvalue()


@pytest.mark.asyncio
async def test_debug_shows_no_sql_statement_with_its_parameters(capture, tmp_path) -> None:
    # aiosqlite logs each statement with its parameters at debug: sealed credentials among them.
    buf = capture("DEBUG", "text")
    async with aiosqlite.connect(str(tmp_path / "t.db")) as db:
        await db.execute("SELECT ?", ("sealed-876543219",))
    log.debug("debug shown")
    assert "876543219" not in buf.getvalue() and "debug shown" in buf.getvalue()


def test_setup_replaces_its_handler_and_checks_the_format(capture) -> None:
    capture("INFO", "text")
    buf = capture("INFO", "json")
    log.info("once")
    assert len(json_lines(buf)) == 1
    with pytest.raises(ValueError, match="'text' or 'json'"):
        setup_logging("INFO", "yaml")


BASIC_B64 = "Y2ktYm90OnMzY3IzdC1QQVNTV09SRA=="  # ci-bot:s3cr3t-PASSWORD
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjaSJ9.c2lnbmF0dXJl"


@pytest.mark.parametrize("message, secret, kept", [
    ("sending Authorization: Basic " + BASIC_B64, BASIC_B64, "Authorization: "),
    ("headers {'Authorization': 'Bearer tok-SECRET-1', 'Accept': '*/*'}", "tok-SECRET-1", "'Accept': '*/*'"),
    ('{"authorization": "Bearer tok-SECRET-1", "accept": "x"}', "tok-SECRET-1", '"accept": "x"'),
    ("GET /v2/\r\nAuthorization: Bearer tok-SECRET-1\r\nHost: reg", "tok-SECRET-1", "Host: reg"),
    ("token from server: Bearer abc.DEF-ghi_123", "abc.DEF-ghi_123", "token from server: Bearer "),
    ("retrying with Basic " + BASIC_B64 + " now", BASIC_B64, " now"),
    ("JWT " + JWT, JWT, ""),
    ("a token " + JWT + " in prose", JWT, "in prose"),
    ("login user=ci-bot password=s3cr3t-PASSWORD&x=1", "s3cr3t-PASSWORD", "user=ci-bot"),
    ("password = 's3cr3t PASSWORD' ok", "s3cr3t PASSWORD", "ok"),
    ('body {"username": "ci-bot", "password": "s3cr3t-\\"PASSWORD"}', "s3cr3t", '"username": "ci-bot"'),
    ("auth {'basicauth': {'user': 'u', 'password': 's3cr3t-PASSWORD'}}", "s3cr3t-PASSWORD", "'user': 'u'"),
    ('answer {"token": "tok-SECRET-1", "expires_in": 300}', "tok-SECRET-1", '"expires_in": 300'),
    ("url https://auth.example/t?refresh_token=tok-SECRET-1&scope=x", "tok-SECRET-1", "&scope=x"),
])
def test_redaction(message: str, secret: str, kept: str) -> None:
    redacted = redact(message)
    assert secret not in redacted and REDACTED in redacted
    assert kept in redacted


@pytest.mark.parametrize("message", [
    "the registry asks for Basic credentials and the request has none",
    "the registry's Bearer challenge names no realm",
    'WWW-Authenticate: Bearer realm="https://auth.example/token",service="registry"',
    "token_type must be 'Bearer' or 'JWT'",
    "job 1f0c: copied 3 blobs to http://localhost:5000/v2",
])
def test_redaction_leaves_ordinary_lines_alone(message: str) -> None:
    assert redact(message) == message


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_are_redacted_in_both_formats(capture, fmt: str) -> None:
    buf = capture("INFO", fmt)
    with job_context("job-r"):
        log.info("sending %s", {"Authorization": "Basic " + BASIC_B64})
        log.warning("login password=%s failed", "s3cr3t-PASSWORD")
        try:
            raise RuntimeError('token server said {"password": "s3cr3t-PASSWORD"}')
        except RuntimeError:
            log.exception("Bearer %s refused", "tok-SECRET-1")
    out = buf.getvalue()
    for secret in ("s3cr3t", BASIC_B64, "tok-SECRET-1"):
        assert secret not in out
    assert out.count(REDACTED) >= 4  # the traceback quotes the raising line too
    assert "job-r" in out
    if fmt == "json":
        lines = json_lines(buf)
        assert len(lines) == 3 and "RuntimeError" in lines[2]["exc"]


def test_a_log_call_with_bad_arguments_does_not_raise(capture, capsys: pytest.CaptureFixture[str]) -> None:
    capture("INFO", "json")
    log.info("two %s %s", "one")  # logging reports this itself, on stderr
    assert "not enough arguments" in capsys.readouterr().err
