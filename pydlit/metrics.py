"""Prometheus metrics: bytes moved, retries, registry latency, and jobs by state."""
from __future__ import annotations

from functools import cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()

JOBS = Gauge("pydlit_jobs", "Jobs in the database, by state", ["state"], registry=REGISTRY)
BYTES = Counter("pydlit_bytes", "Blob bytes moved, by direction (download from sources, upload to targets)", ["direction"], registry=REGISTRY)
# Children resolved once: `labels()` costs more than the increment itself, and runs per piece.
DOWNLOADED = BYTES.labels("download")
UPLOADED = BYTES.labels("upload")
RETRIES = Counter("pydlit_retries", "Registry requests retried, by reason", ["reason"], registry=REGISTRY)
LATENCY = Histogram(
    "pydlit_registry_request_seconds",
    "Time to the response headers of a registry request, by operation",
    ["operation"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def render(job_counts: dict[str, int]) -> bytes:
    for state in ("QUEUED", "RUNNING", "FINISHED", "FAILED"):
        JOBS.labels(state).set(job_counts.get(state, 0))
    return generate_latest(REGISTRY)


def request_timer(method: str, path: str) -> Histogram:
    """The latency child for a request's operation."""
    return _latency(operation(method, path))


@cache
def _latency(op: str) -> Histogram:
    return LATENCY.labels(op)


def operation(method: str, path: str) -> str:
    """A low-cardinality name for a registry request, e.g. blob_head or upload_patch."""
    if "/blobs/uploads" in path:
        kind = "upload"
    elif "/blobs/" in path:
        kind = "blob"
    elif "/manifests/" in path:
        kind = "manifest"
    elif path.rstrip("/").endswith("/v2"):
        kind = "ping"
    else:
        kind = "other"
    return f"{kind}_{method.lower()}"
