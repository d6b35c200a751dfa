"""Unique repository names: tests share registries and isolate by repository."""

from __future__ import annotations

import re
import uuid

_INVALID = re.compile(r"[^a-z0-9]+")


def unique_repo(prefix: str = "it") -> str:
    """`prefix` made a valid name (path components kept) plus a random suffix."""
    parts = [_INVALID.sub("-", p.lower()).strip("-")[:40] for p in prefix.split("/")]
    clean = "/".join(p for p in parts if p) or "it"
    return f"{clean}-{uuid.uuid4().hex[:10]}"
