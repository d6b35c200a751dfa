"""The one error type of the registry client, worded for the person reading a job's status."""
from __future__ import annotations

import json

# Statuses worth another try; every other 4xx is the caller's or the registry's final word.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RegistryError(Exception):
    """A failed registry operation: which registry, which step, the HTTP status and error code."""

    def __init__(
        self,
        registry: str,
        step: str,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        transient: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.registry = registry
        self.step = step
        self.message = message
        self.status = status
        self.code = code
        self.transient = transient
        self.retry_after = retry_after

    def spent(self) -> RegistryError:
        """Mark the error final: the retries it deserved were already made at a lower level."""
        self.transient = False
        return self

    def __str__(self) -> str:
        parts = [f"{self.registry}: {self.step} failed"]
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.code:
            parts.append(self.code)
        return ": ".join(parts) + f": {self.message}"


def parse_error_body(body: bytes) -> tuple[str | None, str]:
    """The first (code, message) of a registry error body; a 4xx body can be anything, so be lenient."""
    try:
        errors = json.loads(body)["errors"]
        first = errors[0]
        code = str(first.get("code") or "") or None
        message = str(first.get("message") or "")
        detail = first.get("detail")
        if detail and isinstance(detail, (str, int, float)):
            message = f"{message} ({detail})"
        return code, message
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return None, text
