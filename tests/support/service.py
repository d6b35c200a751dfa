"""The real pydlit service as a subprocess, and the request body it takes."""

from __future__ import annotations

import atexit
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from .registry import free_port, tail

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
POLL_INTERVAL = 0.2
HTTP_TIMEOUT = 10.0
TERMINAL_STATES = ("FINISHED", "FAILED")

_live: "weakref.WeakSet[ServiceProcess]" = weakref.WeakSet()


class ApiEndpoint(Protocol):
    endpoint: str
    request_auth: dict[str, Any] | None


def job_state(status: dict[str, Any]) -> str | None:
    """The job state in a status answer: the original API calls it "value"."""
    state = status.get("value", status.get("state"))
    return state if isinstance(state, str) else None


def job_body(
    src: ApiEndpoint,
    src_repo: str,
    ref: str,
    targets: list[tuple[ApiEndpoint, dict[str, Any]]] | list[ApiEndpoint],
) -> dict[str, Any]:
    """A POST /api/distribute/image body. Targets are registries or (registry, extra fields)."""
    source: dict[str, Any] = {"endpoint": src.endpoint, "image": src_repo, "ref": ref}
    if src.request_auth:
        source["auth"] = copy.deepcopy(src.request_auth)
    entries = []
    for item in targets:
        target, extra = item if isinstance(item, tuple) else (item, {})
        entry: dict[str, Any] = {"endpoint": target.endpoint}
        if target.request_auth:
            entry["auth"] = copy.deepcopy(target.request_auth)
        entry["verify_tls"] = False
        entry.update(extra)
        entries.append(entry)
    return {"source": source, "targets": entries}


def wait_for(predicate: Any, timeout: float = 30.0, step: float = 0.05) -> Any:
    """The predicate's first true value, polled every `step` s for `timeout` s at most."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 1):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")


class ServiceProcess:
    def __init__(
        self,
        workdir: Path,
        env: dict[str, str] | None = None,
        *,
        port: int | None = None,
        db_path: Path | None = None,
        module: str = "pydlit",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.port = port or free_port()
        self.db_path = Path(db_path) if db_path else self.workdir / "pydlit.db"
        self.log_path = self.workdir / "service.log"
        self.module = module
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- process ---------------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, "--host", "127.0.0.1",
                "--port", str(self.port), "--db", str(self.db_path)]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "ServiceProcess":
        """Start (again: same port, same DB) and wait for GET /healthz to answer 200."""
        if self.running:
            return self
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}: {self.command}\n".encode())
            log.flush()
            # Own session: a Ctrl-C aimed at pytest must not reach the service first.
            self._proc = subprocess.Popen(
                self.command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _live.add(self)
        try:
            self._wait_healthy()
        except Exception:
            self.kill()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last: object = None
        for _ in range(int(START_TIMEOUT / 0.1) + 1):
            if not self.running:
                code = self._proc.returncode if self._proc else None
                raise RuntimeError(f"service exited with {code} while starting; log tail:\n"
                                   f"{self.log_tail()}")
            try:
                status, body = self._call("GET", "/healthz", timeout=2.0)
                if status == 200:
                    return
                last = (status, body)
            except OSError as exc:
                last = exc
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise RuntimeError(f"service not healthy within {START_TIMEOUT}s (last: {last!r}); "
                           f"log tail:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the service and wait; SIGKILL when it outlives `timeout`.

        Returns the exit code (negative: killed by that signal)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def kill(self) -> int | None:
        return self.stop(signal.SIGKILL, timeout=10)

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, max_bytes: int = 6000) -> str:
        return tail(self.log_path, max_bytes)

    # -- HTTP API --------------------------------------------------------------------------

    def _call(
        self, method: str, path: str, data: bytes | None = None,
        content_type: str | None = None, timeout: float = HTTP_TIMEOUT,
    ) -> tuple[int, Any]:
        headers = {"Content-Type": content_type} if content_type else {}
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _decode(exc.read())

    def post_raw(self, data: bytes, content_type: str = "application/json") -> tuple[int, Any]:
        return self._call("POST", "/api/distribute/image", data, content_type)

    def get(self, path: str) -> tuple[int, Any]:
        return self._call("GET", path)

    def submit(self, body: dict[str, Any]) -> str:
        status, answer = self.post_raw(json.dumps(body).encode())
        assert status == 201, f"submit answered {status}: {answer!r}"
        assert isinstance(answer, dict) and answer.get("id"), f"no job id in {answer!r}"
        return str(answer["id"])

    def status(self, job_id: str) -> dict[str, Any]:
        status, answer = self.get(f"/api/distribute/image/{job_id}")
        assert status == 200 and isinstance(answer, dict), f"status answered {status}: {answer!r}"
        return answer

    def wait(
        self, job_id: str, timeout: float = 120.0, states: tuple[str, ...] = TERMINAL_STATES
    ) -> dict[str, Any]:
        """Poll the job every 0.2 s until its state is one of `states`; return that status."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        for _ in range(int(timeout / POLL_INTERVAL) + 1):
            if not self.running:
                raise AssertionError(f"service died while waiting for {job_id}; last {last}; "
                                     f"log tail:\n{self.log_tail()}")
            last = self.status(job_id)
            if job_state(last) in states:
                return last
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s; last status "
                             f"{json.dumps(last)}; log tail:\n{self.log_tail()}")


@atexit.register
def _kill_leftovers() -> None:
    for service in list(_live):
        service.kill()
