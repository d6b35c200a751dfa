"""Shared fixtures: real registries (started on first use), fault proxies, the service process.

Tests share the session registries and isolate by repository name (`repo_name`, `unique_repo`).
A test that restarts, kills or reconfigures something gets its own via a *_factory fixture.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The helpers are imported as `support.*` whether or not tests/ is ever made a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.names import unique_repo  # noqa: E402
from support.proxy import FaultProxy  # noqa: E402
from support.registry import Registry, start_registry  # noqa: E402
from support.service import ServiceProcess  # noqa: E402
from support.tokenserver import TokenServer  # noqa: E402


class Registries:
    """Lazy session registries: each starts on first access and stops at session end."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._started: dict[str, Registry] = {}
        self._token_server: TokenServer | None = None

    def _get(self, name: str, kind: str = "plain", **options: Any) -> Registry:
        if name not in self._started:
            self._started[name] = start_registry(self._base / name, kind, **options)
        return self._started[name]

    @property
    def source(self) -> Registry:
        return self._get("source")

    @property
    def target_a(self) -> Registry:
        return self._get("target_a")

    @property
    def target_b(self) -> Registry:
        return self._get("target_b")

    @property
    def targets(self) -> tuple[Registry, Registry]:
        return self.target_a, self.target_b

    @property
    def tls(self) -> Registry:
        return self._get("tls", "tls_htpasswd")

    @property
    def token_server(self) -> TokenServer:
        if self._token_server is None:
            self._token_server = TokenServer().start()
        return self._token_server

    @property
    def token(self) -> Registry:
        return self._get("token", "token", token_server=self.token_server)

    @property
    def schema1_source(self) -> Registry:
        """Accepts schema1 PUTs (compatibility.schema1.enabled); other registries refuse them."""
        return self._get("schema1_source", schema1=True)

    @property
    def schema1_target(self) -> Registry:
        return self._get("schema1_target", schema1=True)

    def stop_all(self) -> None:
        for registry in self._started.values():
            registry.stop()
        self._started.clear()
        if self._token_server is not None:
            self._token_server.stop()
            self._token_server = None


@pytest.fixture(scope="session")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    regs = Registries(tmp_path_factory.mktemp("registries"))
    yield regs
    regs.stop_all()


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A fresh repository name derived from the test's name, e.g. it/test-copy-oci-1a2b3c4d5e."""
    return unique_repo(f"it/{request.node.name}")


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """start_registry(kind="plain", token_server=None, users=None, schema1=False, allow_urls=True)
    for this test."""
    started: list[Registry] = []

    def make(kind: str = "plain", token_server: TokenServer | None = None,
             users: dict[str, str] | None = None, *, schema1: bool = False, allow_urls: bool = True) -> Registry:
        registry = start_registry(tmp_path / "registries", kind, token_server, users,
                                  schema1=schema1, allow_urls=allow_urls)
        started.append(registry)
        return registry

    yield make
    for registry in started:
        registry.stop()


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., FaultProxy]]:
    """A started FaultProxy (or subclass `cls`) in front of a registry (or an http URL),
    stopped after the test."""
    started: list[FaultProxy] = []

    def make(upstream: Registry | str, cls: type[FaultProxy] = FaultProxy) -> FaultProxy:
        proxy = cls(upstream).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Lets teardown see whether the test failed, to print the service log only then.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is None or report.failed


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One pydlit process for the whole session (tests that stop or kill use service_factory)."""
    proc = ServiceProcess(tmp_path_factory.mktemp("service")).start()
    yield proc
    proc.stop(timeout=15)


@pytest.fixture
def service_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ServiceProcess]]:
    """service_factory(env=None, start=True, db_path=None) -> a ServiceProcess of this test."""
    made: list[ServiceProcess] = []

    def make(env: dict[str, str] | None = None, start: bool = True,
             db_path: Path | None = None) -> ServiceProcess:
        proc = ServiceProcess(tmp_path / f"service{len(made)}", env, db_path=db_path)
        made.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in made:
        proc.stop(timeout=10)
        if _failed(request):
            print(f"--- {proc.log_path} (tail) ---\n{proc.log_tail()}")
