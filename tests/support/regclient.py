"""A small synchronous Registry V2 client for the fixtures (independent of pydlit's own client).

Handles http and https (with a given CA PEM), Basic auth and the Bearer challenge flow. One
connection per request: fixtures make few requests and this keeps streaming simple.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from .mediatypes import ACCEPT_ALL

READ_CHUNK = 1 << 20
MAX_REDIRECTS = 3
_REPO_IN_PATH = re.compile(r"^/v2/(.+?)/(?:blobs|manifests|tags|referrers)/")
_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


class Endpoint(Protocol):
    """What the helpers need of a Registry (or of a FaultProxy in front of one)."""

    url: str
    ca_pem: str | None
    user: str | None
    password: str | None


class RegistryError(Exception):
    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {url} -> {status}: {body[:500]!r}")
        self.method, self.url, self.status, self.body = method, url, status, body


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="..",service="..",scope="a b"` -> ("bearer", {...}); scheme lower-cased."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _CHALLENGE_PARAM.finditer(rest):
        quoted, bare = m.group(2), m.group(3)
        params[m.group(1).lower()] = quoted.replace('\\"', '"') if quoted is not None else bare
    return scheme.lower(), params


class RegistryHTTP:
    def __init__(
        self,
        url: str,
        *,
        ca_pem: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.base = url.rstrip("/")
        self.user, self.password, self.timeout = user, password, timeout
        self._ssl = ssl.create_default_context(cadata=ca_pem) if ca_pem else None
        self._basic: str | None = None
        self._bearer: dict[str | None, str] = {}  # repository (None: /v2/) -> Authorization
        self.token_fetches = 0

    @classmethod
    def for_endpoint(cls, ep: Endpoint, **kwargs: Any) -> "RegistryHTTP":
        return cls(
            ep.url,
            ca_pem=getattr(ep, "ca_pem", None),
            user=getattr(ep, "user", None),
            password=getattr(ep, "password", None),
            **kwargs,
        )

    # -- transport -------------------------------------------------------------------------

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return self.base + path_or_url

    def _connect(self, parts: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        host, port = parts.hostname or "127.0.0.1", parts.port
        if parts.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _auth_header(self, url: str) -> str | None:
        parts = urllib.parse.urlsplit(url)
        if parts.netloc != urllib.parse.urlsplit(self.base).netloc:
            return None  # never leak credentials to another host (redirects to storage)
        match = _REPO_IN_PATH.match(parts.path)
        return self._bearer.get(match.group(1) if match else None) or self._basic

    @contextmanager
    def open(
        self, method: str, path_or_url: str, headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> Iterator[http.client.HTTPResponse]:
        """Send a request (authenticating on a 401 challenge) and yield the unread response."""
        url = self._url(path_or_url)
        for attempt in range(2 + MAX_REDIRECTS):
            conn, resp = self._send(method, url, headers or {}, body)
            try:
                location = resp.getheader("Location")
                redirect = resp.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD")
                if redirect and location:
                    resp.read()
                    url = urllib.parse.urljoin(url, location)
                    continue
                challenge = resp.getheader("WWW-Authenticate")
                first_401 = resp.status == 401 and attempt == 0
                if first_401 and challenge and self._authenticate(url, challenge):
                    resp.read()
                    continue
                yield resp
                return
            finally:
                resp.close()
                conn.close()
        raise RegistryError(method, url, 0, b"too many redirects or auth rounds")

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urllib.parse.urlsplit(url)
        conn = self._connect(parts)
        all_headers = dict(headers)
        auth = self._auth_header(url)
        if auth and "Authorization" not in all_headers:
            all_headers["Authorization"] = auth
        if body or method in ("PUT", "POST", "PATCH"):
            all_headers.setdefault("Content-Length", str(len(body)))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target, body=body or None, headers=all_headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _authenticate(self, url: str, challenge: str) -> bool:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.user is None:
                return False
            cred = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            self._basic = f"Basic {cred}"
            return True
        if scheme != "bearer" or "realm" not in params:
            return False
        query = [("service", params["service"])] if "service" in params else []
        query += [("scope", s) for s in params.get("scope", "").split()]
        realm = params["realm"]
        token_url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {}
        if self.user is not None:
            cred = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {cred}"
        parts = urllib.parse.urlsplit(token_url)
        conn = self._connect(parts)
        try:
            conn.request("GET", f"{parts.path}?{parts.query}", headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RegistryError("GET", token_url, resp.status, data)
        answer = json.loads(data)
        token = answer.get("access_token") or answer["token"]
        self.token_fetches += 1
        match = _REPO_IN_PATH.match(urllib.parse.urlsplit(url).path)
        self._bearer[match.group(1) if match else None] = f"Bearer {token}"
        return True

    def request(
        self, method: str, path_or_url: str, headers: dict[str, str] | None = None,
        body: bytes = b"", expect: Iterable[int] | None = None,
    ) -> Response:
        with self.open(method, path_or_url, headers, body) as resp:
            data = resp.read()
            result = Response(resp.status, resp.headers, data, self._url(path_or_url))
        if expect is not None and result.status not in tuple(expect):
            raise RegistryError(method, result.url, result.status, data)
        return result

    # -- registry operations ---------------------------------------------------------------

    def blob_size(self, repo: str, digest: str) -> int | None:
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", expect=(200, 404))
        return int(resp.header("Content-Length") or 0) if resp.status == 200 else None

    def read_blob(self, repo: str, digest: str) -> int:
        """Stream a blob, check its sha256 and return its size."""
        hasher, size = hashlib.sha256(), 0
        with self.open("GET", f"/v2/{repo}/blobs/{digest}") as resp:
            if resp.status != 200:
                raise RegistryError("GET", f"blob {digest}", resp.status, resp.read())
            expected = resp.getheader("Content-Length")
            while chunk := resp.read(READ_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest or (expected is not None and int(expected) != size):
            raise AssertionError(f"blob {digest} in {repo} reads back as {actual}, {size} bytes")
        return size

    def _start_upload(self, repo: str) -> str:
        resp = self.request("POST", f"/v2/{repo}/blobs/uploads/", expect=(202,))
        return urllib.parse.urljoin(resp.url, resp.header("Location") or "")

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        sep = "&" if "?" in location else "?"
        return f"{location}{sep}digest={urllib.parse.quote(digest, safe=':')}"

    def upload_monolithic(self, repo: str, data: bytes, digest: str) -> None:
        location = self._start_upload(repo)
        self.request(
            "PUT", self._with_digest(location, digest),
            headers={"Content-Type": "application/octet-stream"}, body=data, expect=(201,),
        )

    def upload_chunked(self, repo: str, chunks: Iterable[bytes]) -> tuple[str, int]:
        """PATCH each chunk, hashing as it goes, then close with PUT ?digest=.

        Returns (digest, size)."""
        location = self._start_upload(repo)
        hasher, offset = hashlib.sha256(), 0
        for chunk in chunks:
            hasher.update(chunk)
            resp = self.request(
                "PATCH", location,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                },
                body=chunk, expect=(202,),
            )
            location = urllib.parse.urljoin(location, resp.header("Location") or "")
            offset += len(chunk)
        digest = "sha256:" + hasher.hexdigest()
        self.request("PUT", self._with_digest(location, digest), expect=(201,))
        return digest, offset

    def put_manifest(self, repo: str, ref: str, media_type: str, data: bytes) -> str:
        resp = self.request(
            "PUT", f"/v2/{repo}/manifests/{ref}", headers={"Content-Type": media_type},
            body=data, expect=(201,),
        )
        return resp.header("Docker-Content-Digest") or ""

    def get_manifest(self, repo: str, ref: str) -> tuple[str, bytes, str]:
        """(media type, exact bytes, Docker-Content-Digest)."""
        resp = self.request(
            "GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL}, expect=(200,)
        )
        media_type = (resp.header("Content-Type") or "").split(";")[0].strip()
        return media_type, resp.body, resp.header("Docker-Content-Digest") or ""

    def head_manifest(self, repo: str, ref: str) -> str | None:
        resp = self.request(
            "HEAD", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL},
            expect=(200, 404),
        )
        return resp.header("Docker-Content-Digest") if resp.status == 200 else None

    def tags(self, repo: str) -> list[str]:
        resp = self.request("GET", f"/v2/{repo}/tags/list", expect=(200, 404))
        return list(resp.json().get("tags") or []) if resp.status == 200 else []
