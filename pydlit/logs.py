"""Logging: text or JSON lines on stderr, each line of a job carrying its id, secrets masked.

A job's id reaches its log lines through `current_job`: the job's asyncio task enters
`job_context(job_id)` first thing, and every task it starts copies that context, so each line
logged while the job runs names it. Log calls outside a job may pass `extra={"job": job_id}`.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TextIO

current_job: ContextVar[str | None] = ContextVar("pydlit_current_job", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "<redacted>"

# The whole value, scheme included, up to the end of the header line or of a quoted value.
_AUTH_HEADER = re.compile(r"""(?i)(\b(?:proxy-)?authorization["']?\s*[:=]\s*["']?)[^"'\r\n,}]+""")
# Challenge parameters (`Bearer realm="…"`) are not secrets and are what one debugs auth with.
_SCHEME_TOKEN = re.compile(
    r"(?i)\b(basic|bearer|jwt)(\s+)(?!(?:realm|service|scope|error)\s*=)([A-Za-z0-9._~+/-]+=*)"
)
_SECRET_KEYS = r"password|passwd|secret|client_secret|token|access_token|refresh_token|identitytoken"
_KEY_EQUALS = re.compile(rf"""(?i)(\b(?:{_SECRET_KEYS})\s*=\s*)("[^"]*"|'[^']*'|[^\s&,;'")}}\]]+)""")
_QUOTED_KEY = re.compile(
    rf"""(?i)((["'])(?:{_SECRET_KEYS})\2\s*:\s*)("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
)
# A JWT is a bearer credential wherever it shows up, whatever it is labelled.
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Log prose says "Basic credentials", "Bearer challenge" or "Bearer or JWT"; a credential is at
# least four characters and has a digit, a capital or a symbol, or is long.
_PROSE_WORD = re.compile(r"[a-z]{1,15}")


def _scheme_token(m: re.Match[str]) -> str:
    token = m.group(3)
    if len(token) < 4 or _PROSE_WORD.fullmatch(token):
        return m.group(0)
    return f"{m.group(1)}{m.group(2)}{REDACTED}"


def redact(text: str) -> str:
    """text with Authorization values, Basic/Bearer/JWT credentials, JWTs and password- or
    token-like key=value and "key": "value" pairs replaced by <redacted>."""
    text = _JWT.sub(REDACTED, text)
    text = _AUTH_HEADER.sub(rf"\1{REDACTED}", text)
    text = _SCHEME_TOKEN.sub(_scheme_token, text)
    text = _KEY_EQUALS.sub(rf"\1{REDACTED}", text)
    return _QUOTED_KEY.sub(lambda m: f"{m.group(1)}{m.group(3)[0]}{REDACTED}{m.group(3)[0]}", text)


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Every line logged inside, and in tasks started inside, carries job_id."""
    token = current_job.set(job_id)
    try:
        yield
    finally:
        current_job.reset(token)


class JobFilter(logging.Filter):
    """Sets record.job from current_job, unless the call passed one in `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job", None) is None:
            record.job = current_job.get()
        return True


class RedactFilter(logging.Filter):
    """The last line of defence: no code path is meant to log a secret, but none may leak one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A log call whose arguments do not fit its format: the handler reports it as such.
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, plus ` job=<id>` when the line belongs to a job and does not name it already."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        job = getattr(record, "job", None)
        return f"{line} job={job}" if job and job not in record.message else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO-8601 UTC), level, logger, msg, and job, exc and stack
    when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job = getattr(record, "job", None)
        if job:
            out["job"] = job
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Sends every log line to stream (stderr) at level and above, as fmt "text" or "json"
    (PYDLIT_LOG_FORMAT), replacing any handler the root logger had."""
    fmt = fmt.lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"the log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(JobFilter())
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Access lines would carry query strings (token urls among them); the job events say what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # At debug, aiosqlite logs every statement with its parameters: sealed credentials among them.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
