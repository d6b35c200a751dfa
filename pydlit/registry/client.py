"""One registry as seen through one set of credentials: authenticated requests, redirects without
leaking credentials, error wording, retries, and the V2 operations a copier needs."""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hmac
import json
import logging
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, Union
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from ..metrics import RETRIES, request_timer
from .auth import REDIRECTS, Authenticator, AuthError, ChallengeCache, TokenCache, merge_scopes, parse_challenges, resources, scope_for
from . import bodies
from .bodies import CONNECT_TIMEOUT_S, NO_COMPRESSION, connection_problem, read_body, request_timeout
from .errors import TRANSIENT_STATUSES, RegistryError, parse_error_body
from .manifests import (
    ACCEPT, DIGEST, MAX_MANIFEST_BYTES, OCI_ARTIFACT, OCI_INDEX,
    Manifest, ManifestError, digest_matches, image_ref, index_descriptors, parse_manifest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Body = Union[bytes, AsyncIterable[bytes], None]
# The slowest upload link the response timeout allows for, once a body sits in kernel buffers.
MIN_UPLOAD_RATE = 64 * 1024
DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})
MAX_REDIRECTS = 5
MAX_PAGES = 1000  # of one listing (tags, referrers)
# Keys RegistryClient.account: equal credentials give equal accounts in this process, and the
# account, were it ever shown, says nothing of them.
_ACCOUNT_KEY = os.urandom(32)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and in total time per step."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_total: float = 300.0

    def delay(self, attempt: int, retry_after: float | None, elapsed: float = 0.0) -> float:
        """How long to wait after failed try `attempt`, `elapsed` s into the step. A registry's
        Retry-After is obeyed in full, past max_delay too: a try inside the window it asked for
        only meets another 429 and spends an attempt. It never reaches past what is left of
        max_total; `retrying` gives up at once where the whole wait does not fit."""
        if retry_after is not None:
            return min(retry_after, max(0.0, self.max_total - elapsed))
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


async def retrying(policy: RetryPolicy, op: Callable[[], Awaitable[T]], on_retry: Callable[[RegistryError], None] | None = None) -> T:
    """Run `op` until it succeeds, fails for good, or the policy's attempts or time run out."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return await op()
        except RegistryError as exc:
            attempt += 1
            elapsed = time.monotonic() - started
            if not exc.transient or attempt >= policy.attempts:
                raise
            refused = out_of_budget(policy, exc, elapsed)
            if refused is not None:
                raise refused from None
            delay = policy.delay(attempt, exc.retry_after, elapsed)
            if elapsed + delay > policy.max_total:
                raise
            RETRIES.labels(f"http_{exc.status}" if exc.status else "connection").inc()
            if on_retry:
                on_retry(exc)
            log.info("retrying in %.1fs after: %s", delay, exc)
            await asyncio.sleep(delay)


def out_of_budget(policy: RetryPolicy, exc: RegistryError, elapsed: float) -> RegistryError | None:
    """The error to fail with at once when the registry asks to wait (Retry-After) longer than
    the step has left of its time budget; None when the wait fits."""
    if exc.retry_after is None or elapsed + exc.retry_after <= policy.max_total:
        return None
    left = max(0.0, policy.max_total - elapsed)
    return RegistryError(
        exc.registry, exc.step,
        f"{exc.message} (the registry asked to wait {exc.retry_after:.0f} s, longer than the {left:.0f} s left to retry this step)",
        status=exc.status, code=exc.code, retry_after=exc.retry_after,
    )


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """('scheme://host[:port][/prefix]', 'host[:port]') from an endpoint given with or without /v2."""
    url = URL(endpoint.strip())
    path = url.path.rstrip("/")
    if path.endswith("/v2"):
        path = path[: -len("/v2")]
    base = str(url.with_path(path or "/").with_query(None).with_fragment(None)).rstrip("/")
    host = f"[{url.host}]" if url.host and ":" in url.host else str(url.host)
    return base, host if url.explicit_port is None else f"{host}:{url.port}"


def same_origin(a: URL, b: URL) -> bool:
    """Whether two URLs share scheme, host and port, a scheme's default port counted (yarl's
    origin() tells `https://h` and `https://h:443` apart)."""
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def repository_name(base: str, image: str) -> str:
    """The repository an image name means at a registry: on Docker Hub a one-part name is an
    official image under library/."""
    if (URL(base).host or "") in DOCKER_HUB_HOSTS and "/" not in image:
        return f"library/{image}"
    return image


def ssl_for(verify_tls: bool, ca_cert: str | None) -> ssl.SSLContext | bool:
    if not verify_tls:
        return False
    ctx = ssl.create_default_context()
    if ca_cert:
        trust(ctx, ca_cert)
    return ctx


def trust(ctx: ssl.SSLContext, ca_cert: str) -> None:
    """Add the PEM certificate(s) to what the context trusts; ValueError when they cannot be loaded."""
    try:
        ctx.load_verify_locations(cadata=ca_cert)
    except (ssl.SSLError, ValueError):
        raise ValueError("ca_cert is not a PEM certificate that can be loaded") from None


def broken_stream(registry: str, step: str, at: int, exc: BaseException) -> RegistryError:
    return RegistryError(registry, step, f"connection broke at byte {at}: {connection_problem(exc)}", transient=True)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def with_query(location: str, **params: str) -> URL:
    """Add query parameters to an upload Location without re-encoding its signed `_state`."""
    sep = "&" if "?" in location else "?"
    return URL(location + sep + urlencode(params, safe=":"), encoded=True)


# What HTTPS servers answer a request sent in plain HTTP (Go's net/http, nginx).
_HTTPS_ONLY_ANSWERS = ("HTTP request to an HTTPS server", "plain HTTP request was sent to HTTPS port")
HTTPS_ONLY = "the registry speaks HTTPS at this address: give its endpoint as https://"
PLAIN_ONLY = "the registry does not speak TLS at this address: give its endpoint as http://"


def _speaks_https(url: URL, answer: str) -> bool:
    return url.scheme == "http" and any(text in answer for text in _HTTPS_ONLY_ANSWERS)


# The waits before pushing again a manifest refused for naming a blob unknown (see put_manifest).
RACED_PUT_WAITS = (0.1, 0.3, 0.6)


class KnownRepositories:
    """Repositories registries were seen to hold, shared by a service's clients, so that a new
    tag in a repository that exists costs no tags/list each time. Repositories are seldom
    deleted, and one that was costs only a HEAD per blob where none was needed."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max = max_entries
        self._known: dict[str, None] = {}

    def __contains__(self, key: str) -> bool:
        if key not in self._known:
            return False
        self.add(key)  # in use: the last to be forgotten
        return True

    def add(self, key: str) -> None:
        self._known.pop(key, None)
        self._known[key] = None
        if len(self._known) > self._max:
            del self._known[next(iter(self._known))]


class RegistryClient:
    """Talks to one registry (scheme, host, port) with one set of credentials."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        *,
        auth: dict[str, Any] | None = None,
        verify_tls: bool = False,
        ca_cert: str | None = None,
        policy: RetryPolicy = RetryPolicy(),
        stall_timeout: float = 60.0,
        challenges: ChallengeCache | None = None,
        tokens: TokenCache | None = None,
        repos: KnownRepositories | None = None,
        push: bool = False,
    ) -> None:
        """`challenges`, `tokens` (anonymous ones), `repos`: what a service's clients share;
        `push`: the client uploads (a target), so its tokens are asked with push from the first."""
        self.session = session
        self.base, self.name = split_endpoint(endpoint)
        self._origin = URL(self.base)
        self.policy = policy
        self._auth = Authenticator(auth, push=push, shared=tokens, stall_timeout=stall_timeout)
        # The registry and who it takes this client for: clients of one account may link blobs
        # from each other's repositories, where another account's mount may be refused. A digest,
        # never the credentials themselves.
        who = hmac.new(_ACCOUNT_KEY, json.dumps(auth, sort_keys=True, default=str).encode(), "sha256").hexdigest() if auth else ""
        self.account = f"{self.base} {who}"
        self._unmountable: set[str] = set()  # repositories a mount from was refused to these credentials
        self._ssl = ssl_for(verify_tls, ca_cert)
        self._stall = stall_timeout
        self._timeout = request_timeout(stall_timeout)
        self._challenges = challenges or ChallengeCache()
        self._repos = repos if repos is not None else KnownRepositories()
        # A challenge learned over TLS nobody verified must not tell a verifying job where to
        # send its credentials: the cache is per endpoint and per way of trusting it.
        self._challenge_key = f"{self.base} {'verify' if verify_tls else 'no-verify'} {ca_cert or ''}"
        self._pinged = False
        self._ping_lock = asyncio.Lock()
        # Origins trusted with the credentials: the registry's own, and those it names for itself
        # in upload Locations (see _location).
        self._trusted: list[URL] = [self._origin]
        # Told of each transient failure about to be retried: a job shows what it is waiting out.
        self.on_retry: Callable[[RegistryError], None] | None = None

    @property
    def key(self) -> str:
        """Identifies the registry itself (not the credentials): where a blob can be mounted from."""
        return self.base

    def repository(self, image: str) -> str:
        return repository_name(self.base, image)

    def url(self, path: str) -> URL:
        return URL(f"{self.base}/v2/{path}", encoded=False)

    # -- the request core ---------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: URL | str,
        *,
        step: str,
        scope: str,
        expect: tuple[int, ...],
        headers: dict[str, str] | None = None,
        body: Callable[[], Body] | Body = None,
    ) -> aiohttp.ClientResponse:
        """One authenticated request; the caller owns (and must release) the response.

        `body` may be a factory, so that the request can be sent again after an auth challenge;
        a one-shot stream that meets a challenge fails as transient, for the caller to resume.
        """
        url = url if isinstance(url, URL) else URL(url)
        ours = self._trusts(url)
        await self._ensure_ping(step)
        tries = 0
        while True:
            tries += 1
            hdrs = dict(headers or {})
            # Several requests may meet the same 401 at once: each judges it by what it sent.
            sent_static = self._auth.uses_static_token
            authz = await self._authorization(scope, step) if ours else None
            if authz:
                hdrs["Authorization"] = authz
            data = body() if callable(body) else body
            if data is not None and not isinstance(data, bytes):
                data = _WatchedBody(data)
            resp = await self._send(method, url, step=step, headers=hdrs, data=data)
            # A 401 from an origin not trusted (the storage a blob GET was redirected to) is not
            # the registry's challenge: following it would send the registry's credentials to the
            # token realm that host names. It is an error like any other (see _error).
            if resp.status == 401 and tries < 3 and ours and same_origin(resp.url, url):
                challenges = parse_challenges(resp.headers.getall("WWW-Authenticate", []))
                resp.release()
                scope = self._on_challenge(challenges, scope, step, sent_static)
                if data is not None and not isinstance(data, bytes) and not callable(body):
                    raise RegistryError(self.name, step, "authentication had to be renewed mid-stream", status=401, transient=True)
                continue
            if resp.status in expect:
                return resp
            raise await self._error(resp, step)

    async def _authorization(self, scope: str, step: str) -> str | None:
        try:
            return await self._auth.header_for(self.session, scope, self._ssl)
        except AuthError as exc:
            if exc.transient:
                raise RegistryError(self.name, step, str(exc), transient=True) from None
            raise RegistryError(self.name, step, str(exc), status=401, code="UNAUTHORIZED") from None

    def _trusts(self, url: URL) -> bool:
        """Whether credentials may go to `url`, and its 401 be taken for the registry's challenge."""
        return any(same_origin(url, origin) for origin in self._trusted)

    async def _send(
        self, method: str, url: URL, *, step: str, headers: dict[str, str], data: Any
    ) -> aiohttp.ClientResponse:
        timer = request_timer(method, url.path)
        headers = {**headers, **NO_COMPRESSION}
        timeout = self._timeout
        if data is not None and not isinstance(data, bytes):
            # The response timer starts once the body is in the kernel's buffers, which a slow
            # link may take a while to drain: allow for that on top of the stall timeout.
            length = int(headers.get("Content-Length") or 0)
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=self._stall + length / MIN_UPLOAD_RATE
            )
        for _ in range(MAX_REDIRECTS + 1):
            started = time.monotonic()
            try:
                request = self.session.request(
                    method, url, headers=headers, data=data, ssl=self._ssl, allow_redirects=False, timeout=timeout
                )
                resp = await (request if data is None or isinstance(data, bytes) else self._watch_upload(request, data, step))
                timer.observe(time.monotonic() - started)
            except aiohttp.ClientConnectorCertificateError as exc:
                raise RegistryError(self.name, step, f"TLS certificate verification failed: {exc.certificate_error}") from None
            except aiohttp.ClientSSLError as exc:
                reason = exc.os_error
                if getattr(reason, "reason", None) == "WRONG_VERSION_NUMBER":  # a plain-HTTP answer to the handshake
                    raise RegistryError(self.name, step, PLAIN_ONLY) from None
                raise RegistryError(self.name, step, f"TLS handshake failed: {reason}") from None
            except aiohttp.ClientResponseError as exc:
                if _speaks_https(url, exc.message):  # its plain-text 400 follows a HEAD's head: not HTTP
                    raise RegistryError(self.name, step, HTTPS_ONLY, status=exc.status or None) from None
                raise RegistryError(self.name, step, connection_problem(exc), transient=True) from None
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise RegistryError(self.name, step, connection_problem(exc), transient=True) from None
            if resp.status in REDIRECTS and method in ("GET", "HEAD") and "Location" in resp.headers:
                url = URL(str(resp.url)).join(URL(resp.headers["Location"]))
                resp.release()
                if not same_origin(url, self._origin):
                    # Blob storage on another host must never see the registry's credentials.
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                continue
            return resp
        raise RegistryError(self.name, step, "too many redirects")

    async def _watch_upload(self, request: Awaitable[aiohttp.ClientResponse], body: _WatchedBody, step: str) -> aiohttp.ClientResponse:
        """Cut an upload whose peer stopped taking bytes for the stall timeout (a slow source,
        which keeps the body waiting on us, is not a stall)."""
        task = asyncio.ensure_future(request)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(1.0, self._stall))
                if done:
                    return task.result()
                if body.blocked_for() > self._stall:
                    raise RegistryError(self.name, step, f"upload stalled: the registry took no bytes for {self._stall:g} s", transient=True)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _on_challenge(self, challenges: list, scope: str, step: str, sent_static: bool) -> str:
        """Adapt to a 401 and say which scope to ask for next; raise when retrying cannot help."""
        auth = self._auth
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None
        )
        if chosen is None:
            raise RegistryError(self.name, step, "the registry refused the request and offered no way to authenticate", status=401)
        if sent_static:
            error = chosen.params.get("error")
            if auth.uses_static_token and (error == "invalid_token" or (error is None and not auth.has_credentials)):
                auth.forget(scope)  # expired or revoked (some registries do not say which): a fresh one
            elif not auth.has_credentials:
                # The registry's own flow would be anonymous: the configured token stays in use
                # for the requests it covers, and this one fails (a mount, say, is not done).
                raise RegistryError(self.name, step, "the configured token does not cover this request", status=401, code="UNAUTHORIZED")
            else:
                # The pre-configured token lacks this scope (push, mount): use the registry's own flow.
                auth.drop_static()
            auth.challenge = chosen
            return merge_scopes([scope, chosen.params.get("scope", "")])
        if chosen.scheme == "basic":
            if not auth.has_credentials:
                raise RegistryError(self.name, step, "authentication required and the request has no credentials", status=401, code="UNAUTHORIZED")
            if auth.challenge is not None and auth.challenge.scheme == "basic":
                raise RegistryError(self.name, step, "the registry refused the user name or password", status=401, code="UNAUTHORIZED")
            auth.challenge = chosen
            return scope
        error = chosen.params.get("error")
        wider = merge_scopes([scope, chosen.params.get("scope", "")])
        # A token refused for its scope is asked for again only when the registry names more
        # actions on the resources asked for (distribution wants `delete` to end an upload
        # session), never other resources; the token held stays good for what it covers.
        widening = error == "insufficient_scope" and wider != merge_scopes([scope]) and resources(wider) == resources(scope)
        if auth.challenge is not None and auth.challenge.scheme == "bearer" and error not in ("invalid_token", None) and not widening:
            who = "the given credentials" if auth.has_credentials else "anonymous access"
            raise RegistryError(self.name, step, f"access denied for {who} ({error})", status=401, code="UNAUTHORIZED")
        auth.challenge = chosen
        if not widening:
            auth.forget(scope)
        return wider

    async def _ensure_ping(self, step: str) -> None:
        """Learn the auth scheme once, so that no request carrying a body meets a challenge."""
        if self._pinged or self._auth.uses_static_token:
            return
        async with self._ping_lock:
            if self._pinged:
                return
            known, challenge = self._challenges.get(self._challenge_key)
            if known:
                self._auth.challenge = challenge
                self._pinged = True
                return

            async def ping() -> None:
                resp = await self._send("GET", self.url(""), step=step, headers={}, data=None)
                async with resp:
                    # Only the registry's own challenge counts (see request()), not that of a
                    # host the ping was redirected to.
                    if resp.status == 401 and same_origin(resp.url, self._origin):
                        found = parse_challenges(resp.headers.getall("WWW-Authenticate", []))
                        self._auth.challenge = next((c for c in found if c.scheme == "bearer"), None) or next(
                            (c for c in found if c.scheme == "basic"), None
                        )
                    elif resp.status in TRANSIENT_STATUSES:
                        raise await self._error(resp, step)

            # No retry loop of its own: every caller of request() runs inside one already.
            await ping()
            self._challenges.put(self._challenge_key, self._auth.challenge)
            self._pinged = True

    async def _error(self, resp: aiohttp.ClientResponse, step: str) -> RegistryError:
        try:
            body = await read_body(resp, 64 * 1024) if resp.method != "HEAD" else b""
        except (aiohttp.ClientError, asyncio.TimeoutError):
            body = b""
        finally:
            resp.release()
        code, message = parse_error_body(body)
        if not message:
            message = {401: "authentication failed", 403: "access denied", 404: "not found"}.get(resp.status, resp.reason or "")
        if resp.status == 400 and _speaks_https(resp.url, message):
            message = HTTPS_ONLY
        if not self._trusts(resp.url):
            # A redirect's host, or a Location's not trusted: a refusal there is not the registry's.
            message = f"{message} (answered by {resp.url.origin()}, not by the registry)"
        return RegistryError(
            self.name,
            step,
            message,
            status=resp.status,
            code=code,
            transient=resp.status in TRANSIENT_STATUSES,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )

    async def _read_answer(self, resp: aiohttp.ClientResponse, limit: int, step: str) -> bytes:
        """read_body, where a connection that breaks, stalls or trickles mid-body is a transient
        error, as it is on a blob's stream."""
        try:
            return await read_body(resp, limit)
        except aiohttp.ClientError as exc:  # the stall timeout's error included
            raise broken_stream(self.name, step, resp.content.total_bytes, exc) from None
        except asyncio.TimeoutError:
            took = bodies.ANSWER_TIMEOUT_S
            raise RegistryError(self.name, step, f"the answer took longer than {took:g} s", transient=True) from None

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await retrying(self.policy, op, self.on_retry)
        except RegistryError as exc:
            raise exc.spent() from None

    # -- manifests ------------------------------------------------------------------------------

    async def get_manifest(self, repo: str, ref: str) -> Manifest:
        step = f"read manifest {image_ref(repo, ref)}"

        async def op() -> Manifest:
            resp = await self.request(
                "GET", self.url(f"{repo}/manifests/{ref}"), step=step, scope=scope_for(repo, "pull"),
                expect=(200,), headers={"Accept": ACCEPT},
            )
            async with resp:
                data = await self._read_answer(resp, MAX_MANIFEST_BYTES, step)
                content_type = resp.headers.get("Content-Type", "")
            if len(data) > MAX_MANIFEST_BYTES:
                raise RegistryError(self.name, step, "the manifest is larger than 4 MiB")
            try:
                manifest = parse_manifest(data, content_type)
            except ManifestError as exc:
                said = str(exc)
                if "json" not in content_type.lower() and "JSON" in said:
                    # A web page where a registry was expected: the endpoint is likely wrong.
                    said += f" (the answer is {content_type or 'untyped'}: is {self.base} a registry?)"
                raise RegistryError(self.name, step, said) from None
            if DIGEST.fullmatch(ref) and not digest_matches(ref, data):
                raise RegistryError(self.name, step, f"the manifest's bytes do not hash to {ref}")
            return manifest

        return await self._call(op)

    async def head_manifest(self, repo: str, ref: str) -> str | None:
        """The digest a tag or digest resolves to, or None when the registry has no such manifest."""
        step = f"check manifest {image_ref(repo, ref)}"

        async def op() -> str | None:
            resp = await self.request(
                "HEAD", self.url(f"{repo}/manifests/{ref}"), step=step, scope=scope_for(repo, "pull"),
                expect=(200, 404), headers={"Accept": ACCEPT},
            )
            async with resp:
                return None if resp.status == 404 else resp.headers.get("Docker-Content-Digest", "")

        digest = await self._call(op)
        if digest == "":
            # No digest header (it is optional): the bytes say it. Outside op(), so that this
            # GET's retries are not repeated by the HEAD's.
            return (await self.get_manifest(repo, ref)).digest
        return digest

    async def find_manifest(self, repo: str, ref: str) -> Manifest | None:
        """The manifest, or None when the registry has none under this reference."""
        try:
            return await self.get_manifest(repo, ref)
        except RegistryError as exc:
            if exc.status == 404:
                return None
            raise

    async def put_manifest(self, repo: str, ref: str, manifest: Manifest) -> str | None:
        """Push the manifest's bytes; returns the subject the registry says it indexed the manifest
        under (OCI-Subject), which only a registry with the referrers API answers."""

        async def op() -> str | None:
            resp = await self.request(
                "PUT", self.url(f"{repo}/manifests/{ref}"), step=f"push manifest {image_ref(repo, ref)}",
                scope=scope_for(repo, "pull,push"), expect=(200, 201),
                headers={"Content-Type": manifest.media_type}, body=manifest.data,
            )
            resp.release()
            return resp.headers.get("OCI-Subject")

        waits = iter(RACED_PUT_WAITS)
        while True:
            try:
                return await self._call(op)
            except RegistryError as exc:
                unknown = "MANIFEST_BLOB_UNKNOWN" in f"{exc.code}: {exc.message}"
                if unknown and any(b.urls and b.digest in exc.message for b in manifest.blobs):
                    exc.message += (
                        "; that layer is left to its URLs, which this registry does not accept: allow them in its "
                        "configuration (distribution: validation.manifests.urls.allow)"
                    )
                elif unknown and exc.status == 400 and (wait := next(waits, None)) is not None:
                    # A manifest is pushed once all it names is in place. Distribution truncates
                    # a blob's or child's link before it writes it again, so while anyone else
                    # puts the same blob into the repository (another job, another tool), a
                    # manifest naming it may find it unknown for an instant.
                    log.info("retrying in %.1fs after: %s", wait, exc)
                    await asyncio.sleep(wait)
                    continue
                elif manifest.media_type == OCI_ARTIFACT and exc.status in (400, 415) and not unknown:
                    exc.message += f"; the registry may not take {OCI_ARTIFACT}, a type withdrawn before OCI 1.1"
                raise

    async def list_referrers(self, repo: str, digest: str, limit: int) -> list[dict[str, Any]] | None:
        """The descriptors of the manifests whose subject is `digest`, from the referrers API, or
        None when the registry has no such API (404, or 405/501 from registries that say so
        plainly): the caller falls back to the tag schema. More than `limit` is an error."""
        step = f"list referrers of {repo}@{digest[:19]}"
        found: dict[str, dict[str, Any]] = {}
        pages = self._pages(self.url(f"{repo}/referrers/{digest}"), repo, step, (404, 405, 501), {"Accept": OCI_INDEX})
        async for data in pages:
            if data is None:
                return None
            try:
                for d in index_descriptors(data):
                    found.setdefault(d["digest"], d)
            except ManifestError as exc:
                raise RegistryError(self.name, step, f"the referrers listing is not a valid index: {exc}") from None
            if len(found) > limit:
                raise RegistryError(self.name, step, f"there are more than {limit} referrers; copy the image without them")
        return list(found.values())

    async def list_tags(self, repo: str, limit: int) -> list[str]:
        """Every tag of the repository, none where the registry does not know it. More than
        `limit` is an error."""
        step = f"list tags of {repo}"
        tags: list[str] = []
        async for data in self._pages(self.url(f"{repo}/tags/list").with_query(n="1000"), repo, step, (404,), {}):
            if data is None:
                return []
            try:
                page = json.loads(data).get("tags") or []
            except (ValueError, AttributeError):
                page = None
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise RegistryError(self.name, step, "the registry answered something that is not a list of tags")
            tags += page
            if len(tags) > limit:
                raise RegistryError(self.name, step, f"the repository has more than {limit} tags")
        return tags

    async def _pages(
        self, url: URL, repo: str, step: str, absent: tuple[int, ...], headers: dict[str, str],
    ) -> AsyncIterator[bytes | None]:
        """The bodies of a listing's pages, as long as `Link: <...>; rel="next"` names another;
        a lone None when the first page is answered with a status in `absent`."""
        asked: set[URL] = set()
        next_url: URL | None = url
        while next_url is not None:
            if next_url in asked:
                raise RegistryError(self.name, step, "the listing's pages lead back to a page already read")
            if len(asked) == MAX_PAGES:
                raise RegistryError(self.name, step, f"the listing goes on past {MAX_PAGES} pages")
            asked.add(next_url)

            async def op(page_url: URL = next_url) -> tuple[bytes, str | None] | None:
                resp = await self.request(
                    "GET", page_url, step=step, scope=scope_for(repo, "pull"), expect=(200, *absent), headers=headers,
                )
                async with resp:
                    if resp.status != 200:
                        return None
                    return await self._read_answer(resp, MAX_MANIFEST_BYTES, step), resp.headers.get("Link")

            page = await self._call(op)
            if page is None:
                if len(asked) > 1:  # after a page: the listing broke off
                    raise RegistryError(self.name, step, "the next page of the listing is gone")
                yield None
                return
            data, link = page
            if len(data) > MAX_MANIFEST_BYTES:
                raise RegistryError(self.name, step, "a page of the listing is larger than 4 MiB")
            yield data
            next_url = _next_page(self.name, step, next_url, link)

    # -- blobs ----------------------------------------------------------------------------------

    async def repository_known(self, repo: str) -> bool:
        """False only when the registry says it has no repository of this name (NAME_UNKNOWN);
        any other answer, or none, counts as known. Tried once: callers can do without it. A
        repository seen once is not asked about again (see KnownRepositories)."""
        key = f"{self.base} {repo}"
        if key in self._repos:
            return True
        try:
            resp = await self.request(
                "GET", self.url(f"{repo}/tags/list").with_query(n="1"), step=f"list tags of {repo}",
                scope=scope_for(repo, "pull"), expect=(200,),
            )
        except RegistryError as exc:
            return exc.code != "NAME_UNKNOWN"
        try:
            async with resp:
                # Read to the end, the connection is kept; but distribution 2.8 ignores n=1 and
                # lists every tag: past 64 KiB, dropping the connection is the cheaper loss.
                await read_body(resp, 64 * 1024)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return True  # the answer was a 200 all the same; not remembered on a broken read
        self._repos.add(key)
        return True

    async def head_blob(self, repo: str, digest: str) -> bool:
        async def op() -> bool:
            resp = await self.request(
                "HEAD", self.url(f"{repo}/blobs/{digest}"), step=f"check blob {digest[:19]} in {repo}",
                scope=scope_for(repo, "pull"), expect=(200, 404),
            )
            resp.release()
            return resp.status == 200

        return await self._call(op)

    async def open_blob(
        self, repo: str, digest: str, offset: int = 0, size: int | None = None,
    ) -> tuple[aiohttp.ClientResponse, int]:
        """A streaming response for the blob from `offset`, and the offset it really starts at
        (0 when the registry ignores Range). With `size`, the descriptor's, a length that
        disagrees is an error before any byte is read."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        step = f"read blob {digest[:19]} from {repo}"

        async def op() -> tuple[aiohttp.ClientResponse, int]:
            resp = await self.request(
                "GET", self.url(f"{repo}/blobs/{digest}"), step=step,
                scope=scope_for(repo, "pull"), expect=(200, 206), headers=headers,
            )
            at = offset if resp.status == 206 else 0
            if size is not None:
                self._check_length(resp, at, size, step)
            return resp, at

        return await self._call(op)

    def mountable(self, from_repo: str) -> bool:
        """False once a mount from `from_repo` was refused to these credentials."""
        return from_repo not in self._unmountable

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Ask the registry to link a blob it holds in another repository; False when it won't."""
        if not self.mountable(from_repo):
            return False
        step = f"mount blob {digest[:19]} from {from_repo} into {repo}"
        scope = merge_scopes([scope_for(repo, "pull,push"), scope_for(from_repo, "pull")])

        async def op() -> bool:
            try:
                resp = await self.request(
                    "POST", self.url(f"{repo}/blobs/uploads/").with_query(mount=digest, **{"from": from_repo}),
                    step=step, scope=scope, expect=(201, 202), headers={"Content-Length": "0"},
                )
            except RegistryError as exc:
                # Some registries (Harbor) answer 401/403/404 to a mount they will not do. A
                # refusal of these credentials stands for the repository's other blobs too.
                if exc.status in (401, 403):
                    self._unmountable.add(from_repo)
                if exc.status in (401, 403, 404, 405):
                    return False
                raise
            async with resp:
                if resp.status == 201:
                    return True
                location = self._location(resp)
            await self.cancel_upload(location, repo)
            return False

        return await self._call(op)

    async def read_blob(self, repo: str, digest: str, size: int) -> bytes:
        """A blob small enough to hold in memory, whole: exactly `size` bytes, or an error."""
        step = f"read blob {digest[:19]} from {repo}"

        async def op() -> bytes:
            resp = await self.request(
                "GET", self.url(f"{repo}/blobs/{digest}"), step=step, scope=scope_for(repo, "pull"), expect=(200,),
            )
            pieces: list[bytes] = []
            held = 0
            async with resp:
                self._check_length(resp, 0, size, step)
                try:
                    async for piece in resp.content.iter_any():
                        held += len(piece)
                        if held > size:
                            raise RegistryError(self.name, step, "the blob is larger than its descriptor says")
                        pieces.append(piece)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise broken_stream(self.name, step, held, exc) from None
            if held < size:
                raise RegistryError(self.name, step, f"the stream ended at byte {held} of {size}", transient=True)
            return b"".join(pieces)  # the one copy: the pieces are joined, never grown

        return await self._call(op)

    def _check_length(self, resp: aiohttp.ClientResponse, at: int, size: int, step: str) -> None:
        # A manifest whose descriptor misstates a blob's size: said plainly, not as a short read
        # retried until a Range past the real end is refused.
        if resp.content_length is not None and at + resp.content_length != size:
            resp.release()
            raise RegistryError(
                self.name, step, f"the blob is {at + resp.content_length} bytes, but the manifest's descriptor "
                f"says {size}: the image's manifest is wrong (push it again with the right size)",
            )

    async def start_upload(self, repo: str) -> str:
        return await self._call(lambda: self._open_upload(repo))

    async def _open_upload(self, repo: str) -> str:
        resp = await self.request(
            "POST", self.url(f"{repo}/blobs/uploads/"), step=f"start upload to {repo}",
            scope=scope_for(repo, "pull,push"), expect=(202,), headers={"Content-Length": "0"},
        )
        async with resp:
            return self._location(resp)

    async def upload_blob(
        self, repo: str, digest: str, data: bytes, location: str | None = None,
        carry: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
    ) -> None:
        """A blob held in memory, in two requests: open a session, commit it with the bytes. A
        failure of either (a lost session too) is retried as the pair. `location`: a session
        opened already, which the first try commits to; `carry`: what each try runs inside (a
        copy that stops waits for the requests carrying bytes, not for the retries' waits)."""
        opened = [location] if location else []

        async def op() -> None:
            # A retry's session is opened inside `carry` too: none is opened once the copy stops.
            with carry() if carry is not None else contextlib.nullcontext():
                session = opened.pop() if opened else await self._open_upload(repo)
                try:
                    await self.finish_upload(session, repo, digest, data, len(data))
                except RegistryError as exc:
                    if exc.code in ("BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID"):
                        exc.transient = True
                    else:
                        # Refused or cut, its session is of no use: a retry opens its own, and a
                        # failure would leave it to the registry's purge.
                        await self.cancel_upload(session, repo)
                    raise

        await self._call(op)

    async def upload_offset(self, location: str, repo: str, expected: int | None = None) -> int | None:
        """How many bytes an upload session holds, or None when the session is gone. One the
        registry still holds but refuses to go on with (distribution's BLOB_UPLOAD_INVALID: a
        chunk of it was cut) is a RegistryError with that code.

        `expected`: the offset checkpointed for the session. Quay's upload status names one byte
        more than the session holds (`bytes=0-<count>`, an exclusive end there while its PATCH
        answers are inclusive): a claim of exactly `expected` + 1 is taken for `expected`.
        """
        url = URL(location, encoded=True)
        step = f"resume upload to {repo}"

        async def op() -> int | None:
            try:
                resp = await self.request(
                    "GET", url, step=step, scope=scope_for(repo, "pull,push"), expect=(204, 404, 400),
                )
            except RegistryError as exc:
                # A checkpointed session on a host this client does not trust (one that would take
                # the credentials in clear, or a checkpoint older than `named`) was sent none:
                # the blob starts over in a new session.
                if exc.status == 401 and not self._trusts(url):
                    return None
                raise
            if resp.status != 204:
                refused = await self._error(resp, step)
                if refused.code == "BLOB_UPLOAD_INVALID":
                    raise refused
                return None
            async with resp:
                held = _range_end(resp.headers.get("Range"))
            return expected if expected is not None and held == expected + 1 else held

        return await self._call(op)

    async def patch_chunk(self, location: str, repo: str, body: Body, start: int, length: int) -> str:
        """Append one chunk; the answer's Location supersedes the old one (it signs the offset)."""
        resp = await self.request(
            "PATCH", URL(location, encoded=True), step=f"upload chunk to {repo}", scope=scope_for(repo, "pull,push"),
            expect=(201, 202), body=body,  # ECR answers 201
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + length - 1}",
                "Content-Length": str(length),
            },
        )
        async with resp:
            return self._location(resp)

    async def finish_upload(self, location: str, repo: str, digest: str, body: Body = b"", length: int = 0) -> None:
        """Commit an upload, optionally with its (last) bytes: `length` of them from `body`."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        resp = await self.request(
            "PUT", with_query(location, digest=digest), step=f"commit blob {digest[:19]} to {repo}",
            scope=scope_for(repo, "pull,push"), expect=(201, 204), headers=headers, body=body,
        )
        resp.release()

    async def cancel_upload(self, location: str, repo: str) -> RegistryError | None:
        """Give an upload session back: None once the registry no longer holds it (or never
        will), else why it still does. Never raised: the session is only left to its purge."""
        try:
            resp = await self.request(
                "DELETE", URL(location, encoded=True), step=f"cancel upload to {repo}",
                scope=scope_for(repo, "pull,push"), expect=(204, 405),
            )
            resp.release()
        except RegistryError as exc:
            # Gone already, but for distribution's BLOB_UPLOAD_INVALID: a session whose chunk was
            # cut, which it neither resumes nor deletes, and keeps on disk until its purge.
            if exc.status in (400, 404) and exc.code != "BLOB_UPLOAD_INVALID":
                return None
            log.debug("cancelling an upload failed: %s", exc)
            return exc
        return None

    def _location(self, resp: aiohttp.ClientResponse) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(self.name, "upload", "the registry answered without a Location", status=resp.status)
        # Relative Locations are resolved against the request URL, keeping the signed query as is.
        url = URL(str(resp.url)).join(URL(loc, encoded=True))
        # Quay, Harbor and distribution name themselves in Locations by a configured hostname,
        # not always the one they are reached by: such an origin is the registry's own. Except
        # where credentials would go in clear to a registry that has TLS: that upload fails
        # with the host's 401 rather than leak them.
        if self._trusts(resp.url):
            self._adopt(url)
        return str(url)

    def _adopt(self, url: URL) -> None:
        if self._origin.scheme == "https" and url.scheme != "https":
            return
        if not self._trusts(url):
            self._trusted.append(url.origin())

    def named(self, location: str) -> bool:
        """Whether `location` is on a host the registry named for itself (see _location), not the
        one it is reached by: a checkpoint records that, for the client of a later process."""
        url = URL(location, encoded=True)
        return self._trusts(url) and not same_origin(url, self._origin)

    def trust_named(self, location: str) -> None:
        """Trust the host of a checkpointed Location that an earlier process saw the registry name
        for itself (`named`), as that process did: its session resumes, or is given back, with the
        registry's credentials. A host that would take them in clear is never trusted."""
        self._adopt(URL(location, encoded=True))


class _WatchedBody:
    """An upload body that knows how long it has waited for the connection to take a piece."""

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self._body = body
        self._handed_at: float | None = None

    def blocked_for(self) -> float:
        return 0.0 if self._handed_at is None else time.monotonic() - self._handed_at

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self._body:
            self._handed_at = time.monotonic()
            yield piece
            self._handed_at = None


_RANGE = re.compile(r"\s*(?:bytes=)?\s*\d+\s*-\s*(-?\d+)\s*")


def _range_end(value: str | None) -> int:
    """Bytes held, from an upload's `Range: 0-END` (inclusive end; absent, 0-0 or 0--1 on an
    empty one), Quay's `bytes=` prefix allowed."""
    match = _RANGE.fullmatch(value or "")
    if not match:
        return 0
    end = int(match.group(1))
    # 2.8 answers "0-0" both for empty and for 1 byte, an empty session being the common case;
    # zot answers "0--1" for an empty one.
    return 0 if end <= 0 else end + 1


_LINK_NEXT = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)


def _next_page(registry: str, step: str, url: URL, link: str | None) -> URL | None:
    """The next page a `Link: <...>; rel="next"` header names. It must be the same listing (host
    and path): the request carries the registry's credentials."""
    match = _LINK_NEXT.search(link or "")
    if not match:
        return None
    nxt = url.join(URL(match.group(1), encoded=True))
    if not same_origin(nxt, url) or nxt.path != url.path:
        raise RegistryError(registry, step, f"the next page is elsewhere ({nxt.origin()}{nxt.path}), not read")
    return nxt

