"""Real `docker-registry serve` (distribution 2.8) processes on loopback ports.

Three kinds: "plain" (http, no auth), "tls_htpasswd" (https with a cert from a throw-away CA plus
htpasswd Basic auth) and "token" (http, Bearer tokens from a `TokenServer`).
"""

from __future__ import annotations

import atexit
import http.client
import json
import socket
import ssl
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import bcrypt

from .certs import make_ca, make_server_cert

if TYPE_CHECKING:
    from .tokenserver import TokenServer

REGISTRY_BIN = "/usr/bin/docker-registry"
KINDS = ("plain", "tls_htpasswd", "token")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# Fixed so upload sessions (their signed `_state`) survive restart().
HTTP_SECRET = "pydlit-test-http-secret"
# ':' and '/' in the password catch clients that build Basic credentials or URLs naively.
DEFAULT_USERS = {"pydlit": "p@ss:w0rd/+1"}

_live: "weakref.WeakSet[Registry]" = weakref.WeakSet()


def free_port() -> int:
    """A port that was free a moment ago (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<no log: {exc}>"
    return data[-max_bytes:].decode(errors="replace")


class Registry:
    """One registry process. Files live in `dir`: config.yml, storage/, registry.log, certs."""

    def __init__(
        self,
        base_dir: Path,
        kind: str = "plain",
        *,
        token_server: TokenServer | None = None,
        users: dict[str, str] | None = None,
        schema1: bool = False,
        allow_urls: bool = True,
        port: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown registry kind {kind!r}, expected one of {KINDS}")
        if kind == "token" and token_server is None:
            raise ValueError("a token registry needs a token_server")
        self.dir = Path(base_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.schema1 = schema1
        self.allow_urls = allow_urls
        self.token_server = token_server
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        scheme = "https" if kind == "tls_htpasswd" else "http"
        self.url = f"{scheme}://{self.host}"
        self.endpoint = self.url + "/v2"
        self.log_path = self.dir / "registry.log"
        self.config_path = self.dir / "config.yml"
        self.storage_dir = self.dir / "storage"
        self.users: dict[str, str] = dict(users or DEFAULT_USERS) if kind != "plain" else {}
        self.user: str | None = next(iter(self.users), None)
        self.password: str | None = self.users[self.user] if self.user else None
        self.ca_pem: str | None = None
        self.ca_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    # -- public API -------------------------------------------------------------------------

    @property
    def request_auth(self) -> dict[str, Any] | None:
        """The "auth" object pydlit's API takes for this registry."""
        if self.user is None:
            return None
        return {"basicauth": {"user": self.user, "password": self.password}}

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca_pem is None:
            return None
        return ssl.create_default_context(cadata=self.ca_pem)

    def start(self) -> "Registry":
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        _live.add(self)
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        return proc.returncode

    def restart(self) -> "Registry":
        """Same port, storage and http.secret: upload sessions stay resumable."""
        self.stop()
        return self.start()

    def log_tail(self, max_bytes: int = 4000) -> str:
        return tail(self.log_path, max_bytes)

    def name_itself(self, url: str) -> "Registry":
        """Have the registry name itself `url` in the Locations it gives (distribution's
        http.host), as one reached by another name does; from its next start."""
        config = json.loads(self.config_path.read_text())
        config["http"]["host"] = url
        self.config_path.write_text(json.dumps(config))
        return self

    def session_bytes(self, repo: str) -> int:
        """Bytes held in the repository's upload sessions (a DELETE leaves a session's 108-byte
        hash state behind, not its data)."""
        root = self.storage_dir / "docker/registry/v2/repositories" / repo / "_uploads"
        return sum(f.stat().st_size for f in root.glob("*/data"))

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Registry({self.kind}, {self.url})"

    # -- internals ----------------------------------------------------------------------------

    def _write_config(self) -> None:
        http_cfg: dict[str, Any] = {"addr": self.host, "secret": HTTP_SECRET}
        config: dict[str, Any] = {
            "version": "0.1",
            # The access log ignores the level; disabled so big runs keep small logs.
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                # As in Debian's packaged config.yml and distribution's example config: without
                # it every blob HEAD, GET and manifest check reads link files from disk again.
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": http_cfg,
        }
        if self.allow_urls:
            # 2.8 refuses every descriptor `urls` (foreign layers) unless an allow list is set.
            config["validation"] = {"manifests": {"urls": {"allow": ["^https?://"]}}}
        if self.kind == "tls_htpasswd":
            ca = make_ca()
            server = make_server_cert(ca)
            self.ca_pem = ca.cert_pem
            self.ca_path = self.dir / "ca.pem"
            self.ca_path.write_text(ca.cert_pem)
            (self.dir / "server.pem").write_text(server.cert_pem)
            (self.dir / "server.key").write_text(server.key_pem)
            (self.dir / "server.key").chmod(0o600)
            http_cfg["tls"] = {
                "certificate": str(self.dir / "server.pem"),
                "key": str(self.dir / "server.key"),
            }
            htpasswd = self.dir / "htpasswd"
            htpasswd.write_text(
                "".join(
                    f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
                    for u, p in self.users.items()
                )
            )
            config["auth"] = {"htpasswd": {"realm": "pydlit-test", "path": str(htpasswd)}}
        elif self.kind == "token":
            assert self.token_server is not None
            self.token_server.users.update(self.users)
            bundle = self.dir / "token-signer.pem"
            bundle.write_text(self.token_server.cert_pem)
            config["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.token_server.service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(bundle),
                }
            }
        if self.schema1:
            config["compatibility"] = {"schema1": {"enabled": True}}
        # JSON is valid YAML, and saves a YAML dependency.
        self.config_path.write_text(json.dumps(config, indent=2))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        for _ in range(int(START_TIMEOUT / 0.05) + 1):
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc else None
                raise RuntimeError(
                    f"{self!r} exited with {code} while starting; log tail:\n{self.log_tail()}"
                )
            try:
                self._probe()
                return
            except (OSError, http.client.HTTPException) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"{self!r} did not answer GET /v2/ within {START_TIMEOUT}s ({last_error!r}); "
            f"log tail:\n{self.log_tail()}"
        )

    def _probe(self) -> None:
        conn: http.client.HTTPConnection
        if self.ca_pem is not None:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=2, context=self.ssl_context()
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/v2/")
            conn.getresponse().read()
        finally:
            conn.close()


def start_registry(
    tmp_dir: Path,
    kind: str = "plain",
    token_server: TokenServer | None = None,
    users: dict[str, str] | None = None,
    *,
    schema1: bool = False,
    allow_urls: bool = True,
) -> Registry:
    """Start a registry in a fresh sub-directory of `tmp_dir`.

    `schema1=True` sets `compatibility.schema1.enabled`, without which 2.8 refuses schema1 PUTs;
    `allow_urls=False` leaves out the allow list without which it refuses a layer's `urls`.
    """
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix=f"registry-{kind}-", dir=tmp_dir))
    return Registry(base, kind, token_server=token_server, users=users, schema1=schema1, allow_urls=allow_urls).start()


@atexit.register
def _stop_leftovers() -> None:
    # A crashed fixture must not leave registry processes behind.
    for reg in list(_live):
        reg.stop()
