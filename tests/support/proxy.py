"""A fault-injecting, byte-counting reverse proxy in front of one (http) registry.

Bodies stream both ways in small chunks (layers can be hundreds of MiB). Faults and rates are set
from the test thread and take effect on the next matching request. Absolute `Location` headers
pointing at the upstream are rewritten to the proxy, so clients stay behind it.

With `referrers_api` on, the proxy also emulates the OCI 1.1 referrers API, which the upstream
(distribution 2.8) lacks: it records manifests PUT with a `subject` and answers
`GET /v2/<repo>/referrers/<digest>` itself.

`serve_manifest` makes it answer GET and HEAD of a manifest itself, with given bytes: a registry
holding a type the upstream refuses to store (the withdrawn OCI artifact manifest).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .bgserver import BackgroundServer, BackgroundService

if TYPE_CHECKING:
    from .registry import Registry

CHUNK = 64 * 1024
LARGE_BODY = 1024 * 1024  # a request body above this counts in ProxyCounters.peak_large
KINDS = (
    "blob_get", "blob_head", "upload_post", "upload_patch", "upload_put", "upload_get",
    "manifest_get", "manifest_head", "manifest_put", "tags_list", "other",
)
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "expect",
})
_ARRIVED = "fault-proxy-arrived"  # request storage key: when the request reached the proxy
_UPLOAD = re.compile(r"^/v2/.+/blobs/uploads/[^/]*$")
_BLOB = re.compile(r"^/v2/.+/blobs/[a-z0-9+._-]+:[a-zA-Z0-9=_-]+$")
_MANIFEST = re.compile(r"^/v2/(.+)/manifests/[^/]+$")
_TAGS = re.compile(r"^/v2/.+/tags/list$")
_REFERRERS = re.compile(r"^/v2/(.+)/referrers/([a-z0-9+._-]+:[a-zA-Z0-9=_-]+)$")
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_ERROR_CODES = {
    400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NOT_FOUND",
    408: "TIMEOUT", 429: "TOOMANYREQUESTS", 500: "UNKNOWN", 502: "UNAVAILABLE",
    503: "UNAVAILABLE", 504: "UNAVAILABLE",
}


def classify(method: str, path: str) -> str:
    if _UPLOAD.match(path):
        kinds = {"POST": "upload_post", "PATCH": "upload_patch", "PUT": "upload_put",
                 "GET": "upload_get"}
        return kinds.get(method, "other")
    if _BLOB.match(path):
        return {"GET": "blob_get", "HEAD": "blob_head"}.get(method, "other")
    if _MANIFEST.match(path):
        return {"GET": "manifest_get", "HEAD": "manifest_head", "PUT": "manifest_put"}.get(
            method, "other"
        )
    if _TAGS.match(path) and method == "GET":
        return "tags_list"
    return "other"


@dataclass
class _Rule:
    remaining: int
    methods: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    status: int = 503
    retry_after: str | None = None
    nbytes: int = 0
    seconds: float = 0.0

    def matches(self, method: str, kind: str) -> bool:
        return (self.methods is None or method in self.methods) and (
            self.kinds is None or kind in self.kinds
        )


@dataclass(frozen=True)
class ProxyRequest:
    method: str
    kind: str
    path: str
    status: int  # 0: the connection was cut before a status was sent
    fault: str | None = None
    arrived: float = 0.0  # time.monotonic() when the request reached the proxy


@dataclass
class ProxyCounters:
    # Request body bytes received from clients, by (method, kind): manifest PUTs count too.
    upload_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)
    downloaded: int = 0  # body bytes of blob GET responses sent to clients
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, kind)
    # The most requests of a kind with a body over LARGE_BODY in flight at once.
    peak_large: Counter[str] = field(default_factory=Counter)

    @property
    def uploaded(self) -> dict[str, int]:
        """Request body bytes by method (PATCH/PUT/POST)."""
        out: Counter[str] = Counter()
        for (method, _), n in self.upload_bytes.items():
            out[method] += n
        return dict(out)


class _UploadCut(Exception):
    pass


def _frozen(values: Iterable[str] | str | None, upper: bool = False) -> frozenset[str] | None:
    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    return frozenset(v.upper() if upper else v for v in items)


class FaultProxy(BackgroundService):
    def __init__(self, upstream: "str | Registry") -> None:
        if isinstance(upstream, str):
            self.upstream_url = upstream.rstrip("/")
            self.user: str | None = None
            self.password: str | None = None
            self.request_auth: dict[str, Any] | None = None
        else:
            self.upstream_url = upstream.url
            self.user, self.password = upstream.user, upstream.password
            self.request_auth = upstream.request_auth
        if not self.upstream_url.startswith("http://"):
            raise ValueError("FaultProxy only fronts plain http registries")
        self.ca_pem: str | None = None
        self.download_rate: float | None = None  # bytes/s over all responses, None = unlimited
        self.upload_rate: float | None = None  # bytes/s over all request bodies
        # Seconds every request waits before it is forwarded: a long link's round trip.
        self.latency_s = 0.0
        # OCI 1.1 referrers API emulation (see the module docstring); page size None: one page.
        self.referrers_api = False
        self.referrers_page_size: int | None = None
        # Added to the end of the Range an upload session's status answers: a registry that
        # misreports what a session holds (Quay's is one past the truth).
        self.upload_range_shift = 0
        self._lock = threading.Lock()
        self._counters = ProxyCounters()
        self._log: deque[ProxyRequest] = deque(maxlen=10_000)
        self._fails: list[_Rule] = []
        self._upload_cuts: list[_Rule] = []
        self._download_cuts: list[_Rule] = []
        self._corruptions: list[_Rule] = []
        self._inflight_large: Counter[str] = Counter()
        self._stalls: list[_Rule] = []
        # (repo, subject digest) -> descriptors of the manifests that name it, in PUT order.
        self._referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._stand_ins: dict[str, tuple[str, bytes]] = {}  # manifest path -> (type, bytes)
        self._next_free = {"up": 0.0, "down": 0.0}
        self._session: aiohttp.ClientSession | None = None
        self._server = BackgroundServer(self._make_app, "fault-proxy")

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        if not self._server.port:
            raise RuntimeError("FaultProxy is not started")
        return f"127.0.0.1:{self._server.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def endpoint(self) -> str:
        return self.url + "/v2"

    def __repr__(self) -> str:
        port = self._server.port or "stopped"
        return f"FaultProxy(127.0.0.1:{port} -> {self.upstream_url})"

    # -- faults (call from the test thread) ------------------------------------------------

    def fail_next(
        self,
        n: int,
        status: int,
        methods: Iterable[str] | str | None = None,
        kinds: Iterable[str] | str | None = None,
        retry_after: int | float | str | None = None,
    ) -> None:
        """The next n matching requests get `status` and a registry-style error, unforwarded."""
        rule = _Rule(n, _frozen(methods, upper=True), _frozen(kinds), status=status,
                     retry_after=None if retry_after is None else str(retry_after))
        with self._lock:
            self._fails.append(rule)

    def cut_upload_after(
        self,
        nbytes: int,
        times: int = 1,
        methods: Iterable[str] | str = ("PATCH", "PUT"),
        kinds: Iterable[str] | str | None = ("upload_patch", "upload_put"),
    ) -> None:
        """The next matching request with a body longer than `nbytes` is forwarded for `nbytes`
        of body, then both connections (to the registry and to the client) are dropped."""
        with self._lock:
            self._upload_cuts.append(
                _Rule(times, _frozen(methods, upper=True), _frozen(kinds), nbytes=nbytes)
            )

    def cut_download_after(self, nbytes: int, times: int = 1) -> None:
        """The next blob GET response longer than `nbytes` is closed after `nbytes` of body."""
        with self._lock:
            self._download_cuts.append(_Rule(times, kinds=frozenset({"blob_get"}), nbytes=nbytes))

    def corrupt_downloads(self, after_bytes: int, times: int = 1) -> None:
        """The next `times` blob GETs longer than `after_bytes` have the byte at that offset
        flipped: same length, wrong digest."""
        with self._lock:
            self._corruptions.append(_Rule(times, kinds=frozenset({"blob_get"}), nbytes=after_bytes))

    def stall_next_download(self, seconds: float, after_bytes: int = CHUNK) -> None:
        """The next blob GET longer than `after_bytes` sends headers and `after_bytes`, then
        nothing for `seconds`, then the rest (if the client is still there)."""
        with self._lock:
            self._stalls.append(
                _Rule(1, kinds=frozenset({"blob_get"}), nbytes=after_bytes, seconds=seconds)
            )

    def rate_limit(
        self, bytes_per_sec: float | None, *, download: bool = True, upload: bool = True
    ) -> None:
        """Throttle response bodies and/or request bodies; None lifts the limit."""
        if download:
            self.download_rate = bytes_per_sec
        if upload:
            self.upload_rate = bytes_per_sec

    def clear_faults(self) -> None:
        with self._lock:
            self._fails.clear()
            self._upload_cuts.clear()
            self._download_cuts.clear()
            self._corruptions.clear()
            self._stalls.clear()
        self.download_rate = self.upload_rate = None

    def serve_manifest(self, repo: str, refs: Iterable[str], media_type: str, data: bytes) -> str:
        """Answer GET and HEAD of the manifest under each of `refs` (tags, or its digest, which is
        returned and always served) with these bytes; the upstream never sees those requests.
        With `referrers_api` on, a manifest with a subject is listed under it."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self._lock:
            for ref in {*refs, digest}:
                self._stand_ins[f"/v2/{repo}/manifests/{ref}"] = (media_type, data)
        if self.referrers_api:
            self._add_referrer(f"/v2/{repo}/manifests/{digest}", media_type, data, digest)
        return digest

    def reset_referrers(self) -> None:
        """Forget the subjects recorded by the referrers emulation (clear_faults keeps them)."""
        with self._lock:
            self._referrers.clear()

    # -- counters --------------------------------------------------------------------------

    def reset_counters(self) -> None:
        with self._lock:
            self._counters = ProxyCounters()
            self._log.clear()

    def counters(self) -> ProxyCounters:
        with self._lock:
            c = self._counters
            return ProxyCounters(Counter(c.upload_bytes), c.downloaded, Counter(c.requests), Counter(c.peak_large))

    def uploaded_bytes(
        self, method: str | None = None, kinds: Iterable[str] | str | None = None
    ) -> int:
        """Request body bytes received, optionally only of one method and/or some kinds."""
        wanted = _frozen(kinds)
        with self._lock:
            return sum(
                n for (m, k), n in self._counters.upload_bytes.items()
                if (method is None or m == method.upper()) and (wanted is None or k in wanted)
            )

    def blob_upload_bytes(self) -> int:
        """Bytes of blob data sent to the registry (upload POST/PATCH/PUT bodies)."""
        return self.uploaded_bytes(kinds=("upload_post", "upload_patch", "upload_put"))

    def downloaded_bytes(self) -> int:
        """Body bytes sent to clients in blob GET responses."""
        with self._lock:
            return self._counters.downloaded

    def count(self, method: str | None = None, kind: str | None = None) -> int:
        with self._lock:
            return sum(
                n for (m, k), n in self._counters.requests.items()
                if (method is None or m == method.upper()) and (kind is None or k == kind)
            )

    @property
    def requests(self) -> list[ProxyRequest]:
        """The last 10 000 requests, oldest first."""
        with self._lock:
            return list(self._log)

    # -- internals -------------------------------------------------------------------------

    def _take(
        self, rules: list[_Rule], method: str, kind: str, body_length: int | None = None
    ) -> _Rule | None:
        """Consume one use of the first matching rule. Cut and stall rules only match bodies
        longer than their byte count (or of unknown length), so small blobs pass untouched."""
        with self._lock:
            for rule in rules:
                too_short = body_length is not None and body_length <= rule.nbytes
                if rule.remaining > 0 and rule.matches(method, kind) and not too_short:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        rules.remove(rule)
                    return rule
        return None

    def _add(self, uploaded: tuple[str, str, int] | None = None, downloaded: int = 0) -> None:
        with self._lock:
            if uploaded:
                method, kind, n = uploaded
                self._counters.upload_bytes[(method, kind)] += n
            self._counters.downloaded += downloaded

    def _record(
        self, request: web.Request, kind: str, status: int, fault: str | None = None
    ) -> None:
        with self._lock:
            self._log.append(ProxyRequest(request.method, kind, request.path, status, fault, request[_ARRIVED]))

    async def _throttle(self, direction: str, nbytes: int) -> None:
        rate = self.download_rate if direction == "down" else self.upload_rate
        if not rate:
            return
        # One budget per direction, shared by all concurrent streams (like a real link).
        now = asyncio.get_running_loop().time()
        start = max(now, self._next_free[direction])
        self._next_free[direction] = start + nbytes / rate
        if self._next_free[direction] > now:
            await asyncio.sleep(self._next_free[direction] - now)

    def _make_app(self) -> web.Application:
        # Uploads stream through request.content; this limit only guards request.read().
        app = web.Application(client_max_size=1 << 20)
        app.cleanup_ctx.append(self._client_session)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _client_session(self, app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            connector=aiohttp.TCPConnector(limit=64),
        )
        yield
        await self._session.close()

    def _fail_response(self, rule: _Rule) -> web.Response:
        code = _ERROR_CODES.get(rule.status, "UNKNOWN")
        body = {"errors": [{"code": code, "message": f"injected {rule.status}",
                            "detail": "injected by FaultProxy"}]}
        headers = {"Docker-Distribution-Api-Version": "registry/2.0"}
        if rule.retry_after is not None:
            headers["Retry-After"] = rule.retry_after
        return web.json_response(body, status=rule.status, headers=headers)

    async def _request_body(
        self, request: web.Request, kind: str, cut: _Rule | None, sent: list[int]
    ) -> AsyncIterator[bytes]:
        method = request.method
        async for chunk in request.content.iter_chunked(CHUNK):
            if cut is not None and sent[0] + len(chunk) >= cut.nbytes:
                piece = chunk[: cut.nbytes - sent[0]]
                self._add(uploaded=(method, kind, len(piece)))
                sent[0] += len(piece)
                if piece:
                    yield piece
                # Give the piece a moment to leave before the upstream connection is dropped.
                await asyncio.sleep(0.05)
                raise _UploadCut()
            self._add(uploaded=(method, kind, len(chunk)))
            await self._throttle("up", len(chunk))
            sent[0] += len(chunk)
            yield chunk
        if cut is not None:
            raise _UploadCut()  # a chunked body ended before nbytes: still cut it at its end

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        request[_ARRIVED] = time.monotonic()
        kind = classify(request.method, request.path)
        large = (request.content_length or 0) > LARGE_BODY
        with self._lock:
            self._counters.requests[(request.method, kind)] += 1
            if large:
                self._inflight_large[kind] += 1
                peak = self._counters.peak_large
                peak[kind] = max(peak[kind], self._inflight_large[kind])
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            return await self._forward(request, kind)
        finally:
            if large:
                with self._lock:
                    self._inflight_large[kind] -= 1

    async def _forward(self, request: web.Request, kind: str) -> web.StreamResponse:
        method = request.method
        rule = self._take(self._fails, method, kind)
        if rule is not None:
            self._record(request, kind, rule.status, "fail")
            return self._fail_response(rule)
        referrers = _REFERRERS.match(request.path) if self.referrers_api else None
        if referrers is not None and method == "GET":
            return self._referrers_page(request, kind, referrers[1], referrers[2])
        stand_in = self._stand_ins.get(request.path) if method in ("GET", "HEAD") else None
        if stand_in is not None:
            self._record(request, kind, 200, "stand-in")
            media_type, data = stand_in
            headers = {"Docker-Content-Digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                       "Content-Type": media_type}
            return web.Response(body=data if method == "GET" else None, headers=headers)

        cut = None
        if request.body_exists:
            cut = self._take(self._upload_cuts, method, kind, request.content_length)
        # A multidict: clients such as skopeo send one Accept line per manifest type.
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        sent = [0]
        body: AsyncIterator[bytes] | bytes | None = None
        if request.body_exists:
            body = self._request_body(request, kind, cut, sent)
            if self.referrers_api and kind == "manifest_put" and cut is None:
                # Manifests are small: buffered, to read the subject once the upstream stored it.
                body = b"".join([chunk async for chunk in body])
        url = URL(self.upstream_url + request.raw_path, encoded=True)
        assert self._session is not None
        try:
            upstream = await self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        except Exception as exc:
            if cut is not None:
                self._record(request, kind, 0, f"upload cut at {sent[0]}")
                self._drop_client(request)
                return web.Response(status=499)
            self._record(request, kind, 502, f"upstream: {exc!r}")
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": f"proxy: {exc!r}"}]}, status=502
            )
        async with upstream:
            if cut is not None:
                # The registry answered before the cut point (short body): still drop the client.
                self._record(request, kind, 0, f"upload cut at {sent[0]}")
                self._drop_client(request)
                return web.Response(status=499)
            extra: dict[str, str] = {}
            if isinstance(body, bytes) and upstream.status == 201:
                stored = upstream.headers.get("Docker-Content-Digest")
                subject = self._add_referrer(request.path, request.content_type, body, stored)
                if subject is not None:
                    extra["OCI-Subject"] = subject
            return await self._relay(request, kind, upstream, extra)

    def _add_referrer(self, path: str, content_type: str, data: bytes, digest: str | None) -> str | None:
        """Record a stored manifest under its subject; returns the subject's digest, if any."""
        try:
            doc = json.loads(data)
        except ValueError:
            return None
        subject = doc.get("subject") if isinstance(doc, dict) else None
        subject_digest = subject.get("digest") if isinstance(subject, dict) else None
        repo = _MANIFEST.match(path)
        if not isinstance(subject_digest, str) or repo is None:
            return None
        descriptor: dict[str, Any] = {
            "mediaType": doc.get("mediaType") or content_type,
            "digest": digest or "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        config = doc.get("config")
        artifact_type = doc.get("artifactType") or (
            config.get("mediaType") if isinstance(config, dict) else None)
        if artifact_type:
            descriptor["artifactType"] = artifact_type
        if "annotations" in doc:
            descriptor["annotations"] = doc["annotations"]
        with self._lock:
            known = self._referrers.setdefault((repo[1], subject_digest), [])
            if all(d["digest"] != descriptor["digest"] for d in known):
                known.append(descriptor)
        return subject_digest

    def _referrers_page(
        self, request: web.Request, kind: str, repo: str, digest: str
    ) -> web.Response:
        page = request.query.get("page", "0")
        if not page.isdecimal():
            self._record(request, kind, 400)
            return web.json_response(
                {"errors": [{"code": "PAGINATION_NUMBER_INVALID", "message": f"page {page!r}"}]},
                status=400,
            )
        with self._lock:
            found = list(self._referrers.get((repo, digest), ()))
        headers = {"Docker-Distribution-Api-Version": "registry/2.0"}
        artifact_type = request.query.get("artifactType")
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
            headers["OCI-Filters-Applied"] = "artifactType"
        size = self.referrers_page_size
        if size is not None:
            start = int(page) * size
            if start + size < len(found):
                query = {"page": str(int(page) + 1)}
                if artifact_type is not None:
                    query["artifactType"] = artifact_type
                headers["Link"] = f'<{request.path}?{urlencode(query)}>; rel="next"'
            found = found[start:start + size]
        index = {"schemaVersion": 2, "mediaType": _OCI_INDEX, "manifests": found}
        self._record(request, kind, 200)
        body = json.dumps(index).encode()
        return web.Response(body=body, content_type=_OCI_INDEX, headers=headers)

    async def _relay(
        self, request: web.Request, kind: str, upstream: aiohttp.ClientResponse,
        extra_headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(extra_headers or {})
        for name, value in upstream.headers.items():
            if name.lower() in _HOP_BY_HOP:
                continue
            if name.lower() == "location" and value.startswith(self.upstream_url):
                value = self.url + value[len(self.upstream_url):]
            if name.lower() == "range" and kind == "upload_get" and self.upload_range_shift:
                start, _, end = value.rpartition("-")
                value = f"{start}-{int(end) + self.upload_range_shift}"
            response.headers.add(name, value)
        is_blob_body = kind == "blob_get" and upstream.status in (200, 206)
        length = upstream.content_length
        cut = self._take(self._download_cuts, "GET", kind, length) if is_blob_body else None
        stall = self._take(self._stalls, "GET", kind, length) if is_blob_body else None
        corrupt = self._take(self._corruptions, "GET", kind, length) if is_blob_body else None
        fault = (f"download cut at {cut.nbytes}" if cut else None) or (
            f"stall {stall.seconds}s at {stall.nbytes}" if stall else None)
        # Recorded (and bytes counted) before they reach the client, so a test that has its
        # answer always sees them.
        self._record(request, kind, upstream.status, fault)
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        written = 0
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                if cut is not None and written + len(chunk) > cut.nbytes:
                    await self._send(response, chunk[: cut.nbytes - written], is_blob_body)
                    # close(), unlike abort(), flushes what was written before closing.
                    self._drop_client(request, flush=True)
                    return response
                if stall is not None and written + len(chunk) > stall.nbytes:
                    piece, chunk = chunk[: stall.nbytes - written], chunk[stall.nbytes - written:]
                    await self._send(response, piece, is_blob_body)
                    written += len(piece)
                    await asyncio.sleep(stall.seconds)
                    stall = None
                if corrupt is not None and written <= corrupt.nbytes < written + len(chunk):
                    at = corrupt.nbytes - written
                    chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1:]
                await self._throttle("down", len(chunk))
                await self._send(response, chunk, is_blob_body)
                written += len(chunk)
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientError):
            # The client went away (or the upstream did): nothing left to deliver.
            self._drop_client(request)
        return response

    async def _send(self, response: web.StreamResponse, data: bytes, count: bool) -> None:
        if count:
            self._add(downloaded=len(data))
        await response.write(data)

    @staticmethod
    def _drop_client(request: web.Request, flush: bool = False) -> None:
        transport = request.transport
        if transport is None:
            return
        if flush:
            transport.close()
        else:
            transport.abort()
