"""The client side of the `pydlit` command.

submit, status and jobs talk to a running service with the standard library's HTTP client, so
they need no event loop; copy runs the transfer engine right here, without a service. Both kinds
show progress through one renderer fed with the service's job status shape.
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from .openapi import JOB_STATES, LIST_LIMIT_MAX, TARGET_STATES
from .registry.client import RegistryClient
from .registry.manifests import image_ref
from .schema import ENDPOINT_PATTERN, IMAGE_MAX_LENGTH, IMAGE_PATTERN, REF_PATTERN
from .transfer import ImageCopy, MemoryEvents, Source, SourceError, Stopped, Target

EXIT_OK = 0
EXIT_FAILED = 1  # the job or copy ran and failed
EXIT_USAGE = 2  # bad input, or the service could not be asked
EXIT_TIMEOUT = 3  # gave up waiting; the job goes on

POLL_INTERVAL_S = 0.5
WAIT_TIMEOUT_S = 3600.0
HTTP_TIMEOUT_S = 30.0
# Jobs survive a service restart, so a waiting client rides out a short outage rather than
# reporting an error for a job that is about to resume.
RECONNECT_GRACE_S = 30.0
COPY_REFRESH_S = 0.2
GIVE_BACK_S = 10.0  # how long `pydlit copy` waits for registries to drop the sessions it leaves
# How long an interrupted `copy` lets the chunks on their way end (a hung registry's would not).
COPY_STOP_GRACE_S = 25.0
INTERRUPTED = "interrupted"  # an interrupted copy's error
RATE_WINDOW_S = 5.0
BAR_WIDTH = 20
DEFAULT_COLUMNS = 80

JOBS_PATH = "/api/distribute/image"
TERMINAL_STATES = ("FINISHED", "FAILED")
USER_AGENT = "pydlit/2"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Plain http by default only where TLS is rare and nothing crosses the network.
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# These names front Docker Hub but do not serve the V2 API themselves.
_DOCKER_HUB_ALIASES = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
_REFERENCE_FORM = "[http[s]://]HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]"


class CommandError(Exception):
    """Something to tell the user before exiting with `code`; `status` is the service's HTTP
    answer when there was one."""

    code = EXIT_USAGE

    def __init__(self, msg: str, status: int | None = None) -> None:
        super().__init__(msg)
        self.status = status


class Unreachable(CommandError):
    pass


class WaitTimedOut(CommandError):
    code = EXIT_TIMEOUT


# -- talking to the service --------------------------------------------------------------------


def _server_url(server: str) -> str:
    server = server.strip().rstrip("/")
    return server if "://" in server else f"http://{server}"


def _job_path(job_id: str) -> str:
    return f"{JOBS_PATH}/{urllib.parse.quote(job_id, safe='')}"


def _reason(reason: object) -> str:
    text = (reason.strerror if isinstance(reason, OSError) else None) or str(reason)
    return text[:1].lower() + text[1:]


def _call(
    server: str,
    method: str,
    path: str,
    token: str | None,
    *,
    ok: tuple[int, ...] = (200,),
    body: bytes | None = None,
    query: dict[str, str | int] | None = None,
) -> Any:
    """The decoded JSON answer; CommandError for anything but an `ok` status."""
    url = server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except urllib.error.URLError as exc:
        raise Unreachable(f"cannot reach pydlit at {server}: {_reason(exc.reason)}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"lost the connection to pydlit at {server}: {_reason(exc)}") from None
    except ValueError as exc:  # a malformed URL or header value, refused before anything is sent
        raise CommandError(f"cannot send a request to {server}: {exc}") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        raise CommandError(f"{server} answered HTTP {status} with something other than JSON; is it pydlit?", status) from None
    if status in ok:
        return answer
    if status == 401:
        raise CommandError("the service refused the API token" if token else "the service requires an API token", status)
    msg = answer.get("msg") if isinstance(answer, dict) else None
    raise CommandError(f"the service answered HTTP {status}: {msg or 'no reason given'}", status)


def _fail(exc: CommandError) -> int:
    # To stderr, whatever `out` is: `JOB=$(pydlit submit req.json)` holds a job id or nothing.
    print(f"pydlit: {exc}", file=sys.stderr, flush=True)
    return exc.code


def _read_request(request_file: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if request_file == "-" else Path(request_file).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {request_file}: {_reason(exc)}") from None


def submit(
    server: str,
    request_file: str,
    wait: bool,
    token: str | None,
    out: TextIO = sys.stdout,
    *,
    timeout: float = WAIT_TIMEOUT_S,
    interval: float = POLL_INTERVAL_S,
) -> int:
    """POST the request in `request_file` ('-': stdin) and print the job id.

    With `wait`, follow the job until it ends: exit 0 when FINISHED, 1 when FAILED, 3 when
    `timeout` seconds pass first; 2 when the request is refused or the service cannot be reached.
    """
    server = _server_url(server)
    try:
        accepted = _call(server, "POST", JOBS_PATH, token, ok=(201,), body=_read_request(request_file))
        job_id = accepted.get("id") if isinstance(accepted, dict) else None
        if not isinstance(job_id, str):
            raise CommandError(f"{server} accepted the request but answered no job id")
        print(job_id, file=out, flush=True)
        if not wait:
            return EXIT_OK
        view = _wait(server, job_id, token, out, timeout, interval)
    except CommandError as exc:
        return _fail(exc)
    return _outcome(view, out)


def _wait(server: str, job_id: str, token: str | None, out: TextIO, timeout: float, interval: float) -> dict[str, Any]:
    printer = ProgressPrinter(out, f"job {job_id}")
    deadline = time.monotonic() + timeout
    lost_since: float | None = None
    state = "unknown"
    try:
        while True:
            try:
                view = _call(server, "GET", _job_path(job_id), token)
            except Unreachable as exc:
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    printer.note(f"pydlit: {exc}; retrying for up to {RECONNECT_GRACE_S:g} s")
                elif now - lost_since > RECONNECT_GRACE_S:
                    raise
            else:
                lost_since = None
                state = view["value"]
                printer.update(view)
                if state in TERMINAL_STATES:
                    return view
            if time.monotonic() + interval > deadline:
                raise WaitTimedOut(f"gave up waiting after {timeout:g} s; job {job_id} is {state} and goes on")
            time.sleep(interval)
    finally:
        printer.close()


def status(server: str, job_id: str, token: str | None, out: TextIO = sys.stdout, *, as_json: bool = False) -> int:
    """Print one job's status, readable or (`as_json`) as the service answered it.

    Exit 1 when the job FAILED, else 0; 2 when it cannot be asked for (unknown id included).
    """
    try:
        view = _call(_server_url(server), "GET", _job_path(job_id), token)
    except CommandError as exc:
        return _fail(exc)
    out.write(json.dumps(view, indent=2) + "\n" if as_json else render_status(view))
    out.flush()
    return EXIT_FAILED if view.get("value") == "FAILED" else EXIT_OK


def jobs(server: str, state: str | None, limit: int, token: str | None, out: TextIO = sys.stdout) -> int:
    """List up to `limit` jobs (only those in `state` when given), newest first, one per line."""
    if state is not None:
        state = state.upper()
        if state not in JOB_STATES:
            return _fail(CommandError(f"state must be one of {', '.join(JOB_STATES)}"))
    if limit < 1:
        return _fail(CommandError("limit must be at least 1"))
    server = _server_url(server)
    query: dict[str, str | int] = {"state": state} if state else {}
    found: list[dict[str, Any]] = []
    try:
        # The service pages at most LIST_LIMIT_MAX jobs at a time; follow its cursor for more.
        while len(found) < limit:
            query["limit"] = min(limit - len(found), LIST_LIMIT_MAX)
            page = _call(server, "GET", JOBS_PATH, token, query=query)
            found.extend(page["jobs"])
            if not page.get("next"):
                break
            query["cursor"] = page["next"]
    except CommandError as exc:
        if exc.status in (404, 405):
            exc = CommandError(f"the service at {server} cannot list jobs (it predates GET {JOBS_PATH})")
        return _fail(exc)
    for job in sorted(found[:limit], key=lambda j: j.get("created_at") or "", reverse=True):
        print(_job_line(job), file=out)
    out.flush()
    return EXIT_OK


# -- showing jobs ------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _amount(done: int, total: int | None) -> str:
    if not total:
        return _size(done)
    return f"{min(done, total) * 100 // total}% {_size(done)}/{_size(total)}"


def _target_name(target: dict[str, Any]) -> str:
    return f"{target['endpoint']} {image_ref(target['image'], target['ref'])}"


def _state_counts(targets: list[dict[str, Any]]) -> str:
    counts = Counter(t["state"] for t in targets)
    return ", ".join(f"{counts[s]} {s}" for s in TARGET_STATES if counts[s])


def render_progress(view: dict[str, Any], rate: float | None = None, bar_width: int = BAR_WIDTH) -> str:
    """One line for a job status: bar, percent, bytes done/total, rate, and how many targets are
    in each state. The job's own state is left to the lines printed when it changes, so that the
    line fits an 80-column terminal."""
    done, total = view.get("bytes_done") or 0, view.get("bytes_total") or 0
    filled = min(done, total) * bar_width // total if total else 0
    parts = [f"[{'#' * filled}{'-' * (bar_width - filled)}]", _amount(done, total)]
    if rate is not None:
        parts.append(f"{_size(rate)}/s")
    counts = _state_counts(view.get("targets") or [])
    if counts:
        parts.append(counts)
    return "  ".join(parts)


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(out: TextIO) -> int:
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return DEFAULT_COLUMNS


class ProgressPrinter:
    """Shows a job as its status changes: on a terminal, a line per state change above a bar
    redrawn in place; elsewhere (logs, pipes) only the state-change lines, so no carriage
    returns end up in files."""

    def __init__(self, out: TextIO, label: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.label = label
        self.tty = _isatty(out)
        self._clock = clock
        self._job_state: str | None = None
        self._target_states: dict[int, str] = {}
        self._samples: deque[tuple[float, int]] = deque()
        self._bar_shown = False

    def rate(self) -> float | None:
        """Bytes per second over the last RATE_WINDOW_S seconds of updates."""
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def update(self, view: dict[str, Any]) -> None:
        now = self._clock()
        self._samples.append((now, view.get("bytes_done") or 0))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        lines = []
        if view["value"] != self._job_state:
            self._job_state = view["value"]
            lines.append(f"{self.label}: {view['value']}  {_amount(view.get('bytes_done') or 0, view.get('bytes_total'))}")
        for idx, target in enumerate(view.get("targets") or []):
            # Every target starts PENDING: only what happens to it is worth a line.
            if target["state"] != self._target_states.get(idx, "PENDING"):
                self._target_states[idx] = target["state"]
                amount = _amount(target["bytes_done"], target["bytes_total"])
                lines.append(f"  {_target_name(target)}: {target['state']}  {amount}")
        if self.tty:
            bar = render_progress(view, self.rate())[: _columns(self.out) - 1]
            self.out.write("\r\x1b[K" + "".join(f"{line}\n" for line in lines) + bar)
            self._bar_shown = True
        else:
            self.out.write("".join(f"{line}\n" for line in lines))
        self.out.flush()

    def note(self, text: str) -> None:
        """A line of its own, kept clear of the bar."""
        self.out.write(("\r\x1b[K" if self._bar_shown else "") + text + "\n")
        self._bar_shown = False
        self.out.flush()

    def close(self) -> None:
        """End the bar's line, so that what follows starts on a fresh one."""
        if self._bar_shown:
            self.out.write("\n")
            self.out.flush()
            self._bar_shown = False


def _outcome(view: dict[str, Any], out: TextIO) -> int:
    targets = view.get("targets") or []
    counts = Counter(t["state"] for t in targets)
    if view["value"] == "FINISHED":
        # "hold": a target whose tag already held the image finishes too, with nothing sent.
        print(f"FINISHED: {counts['FINISHED']} target(s) hold the image, {counts['SKIPPED']} skipped", file=out)
        for t in targets:
            if t["state"] == "SKIPPED":
                print(f"  skipped {_target_name(t)}: {t['error']}", file=out)
        out.flush()
        return EXIT_OK
    reason = view.get("error") or f"{counts['FAILED']} of {len(targets)} target(s) failed"
    print(f"FAILED: {reason}", file=out)
    for t in targets:
        if t["state"] == "FAILED":
            print(f"  {_target_name(t)}: {t['error']}", file=out)
    out.flush()
    return EXIT_FAILED


def render_status(view: dict[str, Any]) -> str:
    """A job status document as lines for people."""
    rows = [
        ("job", view["id"]),
        ("state", f"{view['value']} (attempt {view.get('attempt', 0)})"
                  + (", cancelling" if view.get("cancel_requested") and view["value"] in ("QUEUED", "RUNNING") else "")),
        ("source", view.get("source") or ""),
        ("created", view.get("created_at") or "-"),
        ("started", view.get("started_at") or "-"),
        ("finished", view.get("finished_at") or "-"),
        ("progress", _amount(view.get("bytes_done") or 0, view.get("bytes_total"))),
    ]
    if view.get("error"):
        rows.append(("error", view["error"]))
    lines = [f"{name:<9}{value}" for name, value in rows]
    lines.append("targets")
    for t in view.get("targets") or []:
        lines.append(f"  {t['state']:<9}{_target_name(t)}  {_amount(t['bytes_done'], t['bytes_total'])}")
        if t.get("error"):
            lines.append(f"           {t['error']}")
    return "\n".join(lines) + "\n"


def _job_line(job: dict[str, Any]) -> str:
    progress = _amount(job.get("bytes_done") or 0, job.get("bytes_total")) if job.get("bytes_total") else "-"
    return f"{job['id']}  {job['value']:<8}  {job.get('created_at') or '-'}  {progress}  {job.get('source', '')}"


# -- copying without a service -----------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    scheme: str  # http or https
    host: str  # host[:port] as the registry is addressed; IPv6 in brackets
    repository: str
    ref: str  # a tag or a digest

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}"

    def __str__(self) -> str:
        return f"{self.endpoint}/{image_ref(self.repository, self.ref)}"


def parse_reference(text: str, default: ImageRef | None = None) -> ImageRef:
    """Parse `[http[s]://]HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]`.

    The scheme defaults to https, or http for localhost, 127.0.0.1 and [::1]. Without `default`
    (a source) the tag defaults to latest; with it (a target) a missing repository or tag is
    taken from `default`, as in the service's API. Raises ValueError saying what is wrong.
    """

    def bad(problem: str) -> ValueError:
        return ValueError(f"bad image reference {text!r}: {problem}")

    rest = text.strip()
    scheme = None
    match = _SCHEME.match(rest)
    if match:
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            raise bad("the scheme must be http or https")
        rest = rest[match.end():]
    host, slash, path = rest.partition("/")
    # Only a target may name just the registry; "alpine:3.19" is no source without one.
    if not host or (not slash and default is None):
        raise bad(f"expected {_REFERENCE_FORM}")
    host = _DOCKER_HUB_ALIASES.get(host.lower(), host)
    try:
        parts = urllib.parse.urlsplit(f"//{host}")
        port = parts.port
    except ValueError:
        raise bad(f"{host!r} is not a registry host[:port]") from None
    if port == 0 or not re.fullmatch(ENDPOINT_PATTERN, f"http://{host}"):
        raise bad(f"{host!r} is not a registry host[:port]")
    if scheme is None:
        scheme = "http" if parts.hostname in _LOOPBACK else "https"

    path = path.rstrip("/")
    ref: str | None = None
    if "@" in path:
        path, _, ref = path.partition("@")
        if ":" in path:
            raise bad("give a tag or a digest, not both")
    elif ":" in path:
        path, _, ref = path.partition(":")
    if not path:
        if default is None or ref is not None:
            raise bad(f"no repository; expected {_REFERENCE_FORM}")
        path = default.repository
    if ref is None:
        ref = default.ref if default is not None else "latest"
    if len(path) > IMAGE_MAX_LENGTH or not re.fullmatch(IMAGE_PATTERN, path):
        raise bad(f"{path!r} is not a repository name (lowercase components of letters and digits"
                  " separated by '.', '_', '__' or '-', joined by '/')")
    if not re.fullmatch(REF_PATTERN, ref):
        raise bad(f"{ref!r} is neither a tag nor a digest (sha256:<64 hex> or sha512:<128 hex>)")
    return ImageRef(scheme, host, path, ref)


def _copy_view(
    value: str, source: ImageRef, targets: list[ImageRef], events: MemoryEvents, error: str | None = None
) -> dict[str, Any]:
    rows = [
        {
            "endpoint": ref.endpoint,
            "image": ref.repository,
            "ref": ref.ref,
            "state": events.states.get(idx, "PENDING"),
            "error": events.errors.get(idx),
            "bytes_done": events.done(idx),
            "bytes_total": events.totals.get(idx),
        }
        for idx, ref in enumerate(targets)
    ]
    return {
        "value": value,
        "source": str(source),
        "error": error,
        "bytes_done": sum(r["bytes_done"] for r in rows),
        "bytes_total": sum(r["bytes_total"] or 0 for r in rows),
        "targets": rows,
    }


async def _refresh(printer: ProgressPrinter, view: Callable[[], dict[str, Any]]) -> None:
    while True:
        printer.update(view())
        await asyncio.sleep(COPY_REFRESH_S)


async def copy(
    src: str, targets: list[str], *, overwrite: bool, verify_tls: bool, referrers: bool = False, out: TextIO = sys.stdout,
) -> int:
    """Copy the image `src` to every reference in `targets` with the service's engine, here.

    Exit 0 when every target finished or was skipped, 1 when the source could not be read or a
    target failed, 2 for a bad reference, 128 + the signal when interrupted (130: Ctrl-C; 143: SIGTERM).
    """
    try:
        source_ref = parse_reference(src)
        target_refs = [parse_reference(t, default=source_ref) for t in targets]
    except ValueError as exc:
        return _fail(CommandError(str(exc)))
    if not target_refs:
        return _fail(CommandError("name at least one target"))
    printer = ProgressPrinter(out, f"copy {source_ref}")
    with _Interrupts() as interrupts:
        try:
            view = await _copy(source_ref, target_refs, overwrite, verify_tls, referrers, printer, interrupts.stop)
        except asyncio.CancelledError:
            if not interrupts.forced:
                raise
            printer.close()
            print("pydlit: quit at once: upload sessions on their way are left to the registries' purge", file=sys.stderr)
            return interrupts.exit_code
    printer.update(view)
    printer.close()
    code = _outcome(view, out)
    return interrupts.exit_code if view["error"] == INTERRUPTED else code


class _Interrupts:
    """Ctrl-C or SIGTERM in `copy`: the first lets the chunks on their way end, so that the
    registries can delete the sessions (distribution can neither resume nor delete one whose
    chunk was cut); a second, or the grace running out, quits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.forced = False
        self.signum = 0  # the first signal's
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._deadline: asyncio.TimerHandle | None = None
        self._before: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # as a shell reports a process the signal ended

    def __enter__(self) -> _Interrupts:
        for sig in self.SIGNALS:
            self._before[sig] = signal.getsignal(sig)  # asyncio.run's own Ctrl-C handling, for one
            self._loop.add_signal_handler(sig, self._interrupted, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig in self.SIGNALS:
            self._loop.remove_signal_handler(sig)
            if self._before[sig] is not None:
                signal.signal(sig, self._before[sig])
        if self._deadline is not None:
            self._deadline.cancel()

    def _interrupted(self, sig: int) -> None:
        if self.stop.is_set():
            self._force()
            return
        self.signum = sig
        self.stop.set()
        print("pydlit: interrupted: ending the chunks on their way, then giving the upload sessions back"
              " (again to quit at once)", file=sys.stderr)
        self._deadline = self._loop.call_later(COPY_STOP_GRACE_S, self._force)

    def _force(self) -> None:
        if self._task is not None and not self.forced:
            self.forced = True
            self._task.cancel()


async def _copy(
    source_ref: ImageRef, target_refs: list[ImageRef], overwrite: bool, verify_tls: bool, referrers: bool,
    printer: ProgressPrinter, stop: asyncio.Event,
) -> dict[str, Any]:
    """The copy's final view; a target that failed, or every target of an interrupted copy, gives
    its upload sessions back."""
    events = MemoryEvents()
    error = None
    async with aiohttp.ClientSession(auto_decompress=False, headers={"User-Agent": USER_AGENT}) as session:

        def client(ref: ImageRef, push: bool = False) -> RegistryClient:
            return RegistryClient(session, ref.endpoint, verify_tls=verify_tls, push=push)

        def target(idx: int, ref: ImageRef) -> Target:
            c = client(ref, push=True)
            return Target(idx, c, c.repository(ref.repository), ref.ref, overwrite)

        source_client = client(source_ref)
        job = ImageCopy(
            Source(source_client, source_client.repository(source_ref.repository), source_ref.ref),
            [target(idx, ref) for idx, ref in enumerate(target_refs)],
            events,
            stop,
            referrers=referrers,
        )
        ticker = asyncio.create_task(_refresh(printer, lambda: _copy_view("RUNNING", source_ref, target_refs, events)))
        try:
            await job.run()
        except SourceError as exc:
            error = f"cannot read the source: {exc}"
        except Stopped:
            error = INTERRUPTED
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        # No later run resumes a session: a copy keeps no checkpoints.
        for idx, reasons in sorted((await job.give_back(GIVE_BACK_S)).items()):
            print(f"pydlit: {len(reasons)} upload session(s) at {target_refs[idx]} not given back: {reasons[0]}", file=sys.stderr)
    failed = error is not None or "FAILED" in events.states.values()
    return _copy_view("FAILED" if failed else "FINISHED", source_ref, target_refs, events, error)
