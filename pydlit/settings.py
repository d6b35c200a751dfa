"""Service settings: defaults, overridden by PYDLIT_* environment variables, then by flags."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from .registry.client import RetryPolicy
from .transfer import Tuning


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 5001
    db: str = "./pydlit.db"
    concurrency: int = 16  # jobs running at once (their streamed blobs share tuning.max_streams)
    node: str = field(default_factory=socket.gethostname)
    lease_s: float = 30.0
    heartbeat_s: float = 1.0  # progress flush and lease renewal
    poll_s: float = 1.0  # how often an idle worker looks at the queue unprompted
    stop_grace_s: float = 25.0  # a SIGTERM waits this long for chunk boundaries
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
        return float(raw)
    except ValueError:
        raise SystemExit(f"pydlit: {name} must be a number, not {raw!r}") from None


def _count(env: dict[str, str], name: str, default: int) -> int:
    """A setting that must be at least 1: a zero there would make every copy wait forever."""
    value = _float(env, name, default)
    if value < 1 or value != int(value):
        raise SystemExit(f"pydlit: {name} must be a whole number of at least 1, not {env.get(name)!r}")
    return int(value)


def from_env(env: dict[str, str] | None = None) -> Settings:
    """Settings with every PYDLIT_* variable applied."""
    env = dict(os.environ if env is None else env)
    base = Settings()
    retry = RetryPolicy(
        attempts=int(_float(env, "PYDLIT_RETRY_ATTEMPTS", base.retry.attempts)),
        base_delay=_float(env, "PYDLIT_RETRY_BASE_DELAY", base.retry.base_delay),
        max_delay=_float(env, "PYDLIT_RETRY_MAX_DELAY", base.retry.max_delay),
        max_total=_float(env, "PYDLIT_RETRY_MAX_TOTAL", base.retry.max_total),
    )
    mib = 1024 * 1024
    tuning = Tuning(
        chunk_size=int(_float(env, "PYDLIT_CHUNK_MIB", base.tuning.chunk_size / mib) * mib),
        buffer_size=int(_float(env, "PYDLIT_BUFFER_MIB", base.tuning.buffer_size / mib) * mib),
        parallel_blobs=_count(env, "PYDLIT_PARALLEL_BLOBS", base.tuning.parallel_blobs),
        max_streams=_count(env, "PYDLIT_MAX_STREAMS", base.tuning.max_streams),
        detach_after_s=_float(env, "PYDLIT_DETACH_AFTER_S", base.tuning.detach_after_s),
    )
    return Settings(
        host=env.get("PYDLIT_HOST") or base.host,
        port=int(_float(env, "PYDLIT_PORT", base.port)),
        db=env.get("PYDLIT_DB") or base.db,
        concurrency=int(_float(env, "PYDLIT_CONCURRENCY", base.concurrency)),
        node=env.get("PYDLIT_NODE") or base.node,
        lease_s=_float(env, "PYDLIT_LEASE_S", base.lease_s),
        stop_grace_s=_float(env, "PYDLIT_STOP_GRACE_S", base.stop_grace_s),
        stall_timeout_s=_float(env, "PYDLIT_STALL_TIMEOUT_S", base.stall_timeout_s),
        retry=retry,
        tuning=tuning,
        log_level=(env.get("PYDLIT_LOG_LEVEL") or base.log_level).upper(),
        retention_days=_float(env, "PYDLIT_RETENTION_DAYS", base.retention_days),
        api_token=env.get("PYDLIT_API_TOKEN") or None,
        secret_key=env.get("PYDLIT_SECRET_KEY") or None,
        credentials=env.get("PYDLIT_CREDENTIALS") or None,
        log_format=(env.get("PYDLIT_LOG_FORMAT") or base.log_format).lower(),
    )
