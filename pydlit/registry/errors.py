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
    """The (code, message) of a registry error body; a 4xx body can be anything, so be lenient.
    Every error the body lists is told, the most telling first: distribution answers a manifest
    naming an unknown blob with a 500 whose first errors say only UNKNOWN."""
    try:
        listed = json.loads(body)["errors"]
        errors = list(dict.fromkeys(_error_words(e) for e in listed))
        code, first = next((e for e in errors if e[0] not in (None, "UNKNOWN")), errors[0])
        rest = [f"{c}: {m}" if c else m for c, m in errors if (c, m) != (code, first)]
        return code, "; ".join([first, *rest])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return None, text


def _error_words(error: dict) -> tuple[str | None, str]:
    code = str(error.get("code") or "") or None
    message = str(error.get("message") or "")
    detail = error.get("detail")
    if detail and isinstance(detail, (str, int, float)):
        message = f"{message} ({detail})"
    return code, message
