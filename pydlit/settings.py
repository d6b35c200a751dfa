"""Service settings: defaults, overridden by PYDLIT_* environment variables, then by flags."""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field

from .registry.client import RetryPolicy
from .transfer import Tuning

MiB = 1024 * 1024
# Far beyond any sensible value, yet well inside what timers and sizes can hold.
MAX_SIZE_MIB = 4096
MAX_SECONDS = 86400


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"  # beyond this machine only when asked (the Docker image asks)
    port: int = 5001
    db: str = "./pydlit.db"
    concurrency: int = 16  # jobs running at once (their streamed blobs share tuning.max_streams)
    node: str = field(default_factory=socket.gethostname)
    lease_s: float = 30.0
    heartbeat_s: float = 1.0  # progress flush and lease renewal
    poll_s: float = 1.0  # how often an idle worker looks at the queue unprompted
    stop_grace_s: float = 25.0  # a SIGTERM or a cancel waits this long for the chunks on their way
    stall_timeout_s: float = 60.0  # no byte for this long cuts a connection
    connections_per_host: int = 16
    retry: RetryPolicy = RetryPolicy()
    tuning: Tuning = Tuning()
    log_level: str = "INFO"
    retention_days: float = 30.0
    api_token: str | None = None
    secret_key: str | None = None  # else a key file beside the DB
    credentials: str | None = None  # server-side credentials file
    log_format: str = "text"


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise SystemExit(f"pydlit: {name} must be a number, not {raw!r}")
    return value


def _ranged(
    env: dict[str, str], name: str, default: float, low: float, high: float, unit: str = "", *, above: bool = False
) -> float:
    """A number from low (or, `above`, over it) to high: outside, a value hangs jobs, spins, or
    overflows a timer or a date."""
    value = _float(env, name, default)
    if value < low or (above and value == low) or value > high:
        bounds = f"above {low:g} and at most {high:g}" if above else f"from {low:g} to {high:g}"
        raise SystemExit(f"pydlit: {name} must be a number {bounds}{unit}, not {env.get(name)!r}")
    return value


def _whole(env: dict[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    value = _float(env, name, default)
    if value != int(value) or value < low or (high is not None and value > high):
        bounds = f"at least {low}" + (f" and at most {high}" if high is not None else "")
        raise SystemExit(f"pydlit: {name} must be a whole number of {bounds}, not {env.get(name)!r}")
    return int(value)


def _choice(env: dict[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value.lower() not in choices:
        raise SystemExit(f"pydlit: {name} must be one of {', '.join(choices)}, not {value!r}")
    return value.lower()


def _count(env: dict[str, str], name: str, default: int) -> int:
    """A setting that must be at least 1: a zero there would make every copy wait forever."""
    return _whole(env, name, default, 1)


def from_env(env: dict[str, str] | None = None) -> Settings:
    """Settings with every PYDLIT_* variable applied; a value out of its range stops the start
    with a message naming the variable and the range."""
    env = dict(os.environ if env is None else env)
    base = Settings()
    retry = RetryPolicy(
        attempts=_whole(env, "PYDLIT_RETRY_ATTEMPTS", base.retry.attempts, 1, 100),
        base_delay=_ranged(env, "PYDLIT_RETRY_BASE_DELAY", base.retry.base_delay, 0, 3600, " s"),
        max_delay=_ranged(env, "PYDLIT_RETRY_MAX_DELAY", base.retry.max_delay, 0, 3600, " s"),
        max_total=_ranged(env, "PYDLIT_RETRY_MAX_TOTAL", base.retry.max_total, 0, MAX_SECONDS, " s"),
    )
    # A chunk under one source piece, zero above all, would send empty PATCHes forever.
    chunk_mib = _ranged(env, "PYDLIT_CHUNK_MIB", base.tuning.chunk_size / MiB, base.tuning.piece_size / MiB, MAX_SIZE_MIB, " MiB")
    # Any room at all lets one piece through at a time; none would block every read.
    buffer_mib = _ranged(env, "PYDLIT_BUFFER_MIB", base.tuning.buffer_size / MiB, 0, MAX_SIZE_MIB, " MiB", above=True)
    tuning = Tuning(
        chunk_size=int(chunk_mib * MiB),
        buffer_size=math.ceil(buffer_mib * MiB),
        parallel_blobs=_count(env, "PYDLIT_PARALLEL_BLOBS", base.tuning.parallel_blobs),
        max_streams=_count(env, "PYDLIT_MAX_STREAMS", base.tuning.max_streams),
        detach_after_s=_ranged(env, "PYDLIT_DETACH_AFTER_S", base.tuning.detach_after_s, 0, 3600, " s"),
    )
    return Settings(
        host=env.get("PYDLIT_HOST") or base.host,
        port=_whole(env, "PYDLIT_PORT", base.port, 1, 65535),
        db=env.get("PYDLIT_DB") or base.db,
        concurrency=_whole(env, "PYDLIT_CONCURRENCY", base.concurrency, 0),
        node=env.get("PYDLIT_NODE") or base.node,
        # A lease must outlast a few renewals, or a busy moment hands a live job to another node.
        lease_s=_ranged(env, "PYDLIT_LEASE_S", base.lease_s, 3 * base.heartbeat_s, MAX_SECONDS, " s"),
        stop_grace_s=_ranged(env, "PYDLIT_STOP_GRACE_S", base.stop_grace_s, 0, 3600, " s"),
        stall_timeout_s=_ranged(env, "PYDLIT_STALL_TIMEOUT_S", base.stall_timeout_s, 1, 3600, " s"),
        retry=retry,
        tuning=tuning,
        log_level=_choice(env, "PYDLIT_LOG_LEVEL", base.log_level, ("debug", "info", "warning", "error")).upper(),
        # Up to a century: beyond, the cutoff date overflows and pruning dies quietly each hour.
        retention_days=_ranged(env, "PYDLIT_RETENTION_DAYS", base.retention_days, 0, 36500, " days"),
        api_token=env.get("PYDLIT_API_TOKEN") or None,
        secret_key=env.get("PYDLIT_SECRET_KEY") or None,
        credentials=env.get("PYDLIT_CREDENTIALS") or None,
        log_format=_choice(env, "PYDLIT_LOG_FORMAT", base.log_format, ("text", "json")),
    )
