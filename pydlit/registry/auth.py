"""Registry auth: WWW-Authenticate parsing, Basic, the Bearer token flow, and the original
pydlit's pre-configured token `url`."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from .bodies import NO_COMPRESSION, connection_problem, read_body, request_timeout

# A token is refreshed this long before it expires, so that a request never carries a token
# that dies on the wire (Docker Hub's live 300 s; a multi-GB upload outlives several).
REFRESH_MARGIN_S = 30.0
DEFAULT_TOKEN_TTL_S = 60.0
MAX_TOKEN_BYTES = 64 * 1024  # a token server's answer: real ones are a few KiB, and no registry takes a header this long
# Docker's name for a user whose password is an identity token: an OAuth2 refresh token that
# `docker login` keeps (and credential helpers hand out) instead of a password.
IDENTITY_TOKEN_USER = "<token>"
OAUTH2_CLIENT_ID = "pydlit"
REDIRECTS = (301, 302, 303, 307, 308)

_SCHEME = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)\s*")
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-cased: "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Every challenge in the given WWW-Authenticate header values (one value may hold several)."""
    found: list[Challenge] = []
    for value in values:
        pos = 0
        while pos < len(value):
            m = _SCHEME.match(value, pos)
            if not m:
                break
            scheme, pos = m.group(1).lower(), m.end()
            params: dict[str, str] = {}
            while pos < len(value):
                pm = _PARAM.match(value, pos)
                if not pm:
                    break
                raw = pm.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[pm.group(1).lower()] = raw
                pos = pm.end()
            found.append(Challenge(scheme, params))
    return found


def scope_for(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


def merge_scopes(scopes: list[str]) -> str:
    """One space-separated scope value with each repository once and its actions united."""
    merged: dict[str, set[str]] = {}
    order: list[str] = []
    for scope in " ".join(scopes).split():
        # NAME may itself hold ':' (host:port), so split from the right.
        head, _, actions = scope.rpartition(":")
        if head not in merged:
            merged[head] = set()
            order.append(head)
        merged[head].update(a for a in actions.split(",") if a)
    return " ".join(f"{head}:{','.join(sorted(merged[head]))}" for head in order)


def resources(scope: str) -> set[str]:
    """The resources (`repository:NAME`, …) a scope value names, without their actions."""
    return {part.rpartition(":")[0] for part in scope.split()}


def with_push(scope: str) -> str:
    """One repository's scope with push added; a scope of several repositories as it is."""
    if len(scope.split()) != 1 or not scope.startswith("repository:"):
        return scope
    return merge_scopes([scope, f"{scope.rpartition(':')[0]}:push"])


@dataclass
class Token:
    value: str
    expires_at: float
    ttl: float

    def fresh(self, now: float) -> bool:
        # A short-lived token is renewed at half its life rather than never being fresh.
        return now < self.expires_at - min(REFRESH_MARGIN_S, self.ttl / 2)


class TokenCache:
    """Bearer tokens by token server (realm and service) and scope. A service's jobs share one
    for their anonymous tokens (public images: Docker Hub's anonymous pulls), which any job could
    ask for alike; a token asked with credentials stays with its job, so that the token server
    judges every job's credentials as they are now."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._max = max_entries
        self._tokens: dict[tuple[str, ...], Token] = {}

    def get(self, key: tuple[str, ...]) -> Token | None:
        return self._tokens.get(key)

    def put(self, key: tuple[str, ...], token: Token) -> None:
        self._tokens.pop(key, None)  # re-inserted last: the oldest entries go first
        self._tokens[key] = token
        if len(self._tokens) > self._max:
            now = time.monotonic()
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > now}
            while len(self._tokens) > self._max:
                del self._tokens[next(iter(self._tokens))]

    def drop(self, key: tuple[str, ...]) -> None:
        """Forget the token under `key`, and under every other key it also stands for."""
        gone = self._tokens.pop(key, None)
        if gone is not None:
            self._tokens = {k: t for k, t in self._tokens.items() if t is not gone}


class ChallengeCache:
    """What each registry answered to GET /v2/, shared by every job, so that a registry is
    pinged once in a while rather than once per job. A stale entry only costs a 401 round trip.
    The key names the registry and how its TLS was trusted (see RegistryClient)."""

    def __init__(self, ttl_s: float = 300.0) -> None:
        self._ttl = ttl_s
        self._known: dict[str, tuple[Challenge | None, float]] = {}

    def get(self, registry: str) -> tuple[bool, Challenge | None]:
        entry = self._known.get(registry)
        if entry is None or entry[1] < time.monotonic():
            return False, None
        return True, entry[0]

    def put(self, registry: str, challenge: Challenge | None) -> None:
        self._known[registry] = (challenge, time.monotonic() + self._ttl)


class AuthError(Exception):
    """Credentials were refused or a token could not be had; never carries a secret.
    `transient` when the token server was unreachable or failing, not refusing."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class Authenticator:
    """Holds one registry's credentials and the tokens it has been granted, per scope."""

    def __init__(
        self, auth: dict[str, Any] | None, push: bool = False, shared: TokenCache | None = None, stall_timeout: float = 60.0
    ) -> None:
        """`shared`: where anonymous tokens are kept, for every job to use; `stall_timeout`: how
        long a token server may send nothing before it is given up on."""
        auth = auth or {}
        # A target's first token is asked with push: the pull-only requests that come before
        # its first upload (the tag, the blob checks) then cost no token of their own.
        self.push = push
        basic = auth.get("basicauth") or {}
        self.user: str | None = basic.get("user")
        self.password: str | None = basic.get("password")
        self.static_url: str | None = auth.get("url")
        self.static_scheme = "JWT" if str(auth.get("token_type", "")).upper() == "JWT" else "Bearer"
        self.static_headers: dict[str, str] = dict(auth.get("header") or {})
        self.static_json: Any = auth.get("json")
        self.challenge: Challenge | None = None
        self._static: Token | None = None
        self._static_failed = False
        self._tokens = shared if shared is not None and not self.has_credentials else TokenCache()
        self._lock = asyncio.Lock()
        self._oauth2 = self.user == IDENTITY_TOKEN_USER and bool(self.password)
        self._timeout = request_timeout(stall_timeout)

    @property
    def has_credentials(self) -> bool:
        return self.user is not None

    def basic_header(self) -> str:
        raw = f"{self.user}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    @property
    def uses_static_token(self) -> bool:
        return self.static_url is not None and not self._static_failed

    def drop_static(self) -> None:
        """The pre-configured token lacked a scope: use the registry's challenge flow from now on."""
        self._static_failed = True

    def forget(self, scope: str) -> None:
        if self.challenge is not None:
            self._tokens.drop(self._key(scope))
        self._static = None

    def _key(self, scope: str) -> tuple[str, ...]:
        assert self.challenge is not None
        params = self.challenge.params
        return (params.get("realm", ""), params.get("service", ""), scope)

    async def header_for(self, session: aiohttp.ClientSession, scope: str, ssl: Any) -> str | None:
        """The Authorization value for a request needing `scope`, fetching a token if need be."""
        now = time.monotonic()
        if self.uses_static_token:
            async with self._lock:
                if self._static is None or not self._static.fresh(now):
                    self._static = await self._fetch_static(session, ssl)
            return f"{self.static_scheme} {self._static.value}"
        if self.challenge is None:
            return None
        if self.challenge.scheme == "basic":
            if not self.has_credentials:
                raise AuthError("the registry asks for Basic credentials and the request has none")
            return self.basic_header()
        async with self._lock:
            token = self._tokens.get(self._key(scope))
            if token is None or not token.fresh(now):
                token = await self._fetch_for(session, scope, ssl)
        return f"Bearer {token.value}"

    async def _fetch_for(self, session: aiohttp.ClientSession, scope: str, ssl: Any) -> Token:
        wider = with_push(scope) if self.push else scope
        if wider != scope:
            try:
                token = await self._fetch_bearer(session, wider, ssl)
            except AuthError as exc:
                if exc.transient:
                    raise
                # A token server that refuses what it will not grant, instead of granting less:
                # from now on ask for what each request needs.
                self.push = False
            else:
                self._tokens.put(self._key(scope), token)
                self._tokens.put(self._key(wider), token)
                return token
        token = await self._fetch_bearer(session, scope, ssl)
        self._tokens.put(self._key(scope), token)
        return token

    async def _fetch_bearer(self, session: aiohttp.ClientSession, scope: str, ssl: Any) -> Token:
        assert self.challenge is not None
        realm = self.challenge.params.get("realm")
        if not realm:
            raise AuthError("the registry's Bearer challenge names no realm")
        if not _web_url(realm):
            # Not a registry, most often: the endpoint points at some other service.
            raise AuthError("the registry's Bearer challenge names no token server: its realm is not an http(s) URL")
        service = self.challenge.params.get("service")
        if self._oauth2:
            token = await self._fetch_oauth2(session, realm, service, scope, ssl)
            if token is not None:
                return token
        query: list[tuple[str, str]] = []
        if service is not None:
            query.append(("service", service))
        query.extend(("scope", s) for s in scope.split())
        headers = dict(NO_COMPRESSION)
        if self.has_credentials:
            headers["Authorization"] = self.basic_header()
        refused = "refused the credentials" if self.has_credentials else "refused anonymous access"
        request = session.get(realm, params=query, headers=headers, ssl=ssl, timeout=self._timeout)
        body = await _ask(request, realm, refusals=(401, 403), refused=refused)
        token = _token_from(body, realm)
        # Where the POST did not work, this token server takes the identity token as Basic
        # credentials: ask it this way from now on.
        self._oauth2 = False
        return token

    async def _fetch_oauth2(
        self, session: aiohttp.ClientSession, realm: str, service: str | None, scope: str, ssl: Any
    ) -> Token | None:
        """Trade the identity token for an access token (OAuth2 refresh_token grant, POSTed as
        a form), or None where that did not work and the GET flow, with the identity token as
        Basic credentials, is worth a try. Some token servers have no OAuth2 endpoint (404, 405),
        and some refuse the POST (ACR with 400, Artifactory with 401) but take the GET."""
        form = {"grant_type": "refresh_token", "refresh_token": self.password or "", "client_id": OAUTH2_CLIENT_ID,
                "scope": scope}
        if service is not None:
            form["service"] = service
        # No redirects: a 307/308 would carry the form, refresh token and all, to another host.
        request = session.post(realm, data=form, headers=NO_COMPRESSION, ssl=ssl, allow_redirects=False, timeout=self._timeout)
        body = await _ask(request, realm, absent=(*REDIRECTS, 400, 401, 403, 404, 405))
        return None if body is None else _token_from(body, realm)

    async def _fetch_static(self, session: aiohttp.ClientSession, ssl: Any) -> Token:
        assert self.static_url is not None
        url = self.static_url
        headers = {**self.static_headers, **NO_COMPRESSION}
        if self.has_credentials:
            headers.setdefault("Authorization", self.basic_header())
        # No redirects, as in the OAuth2 flow: aiohttp would carry the JSON payload (a password,
        # often) and the custom headers (an API key) to wherever the redirect points.
        options: dict[str, Any] = {"headers": headers, "ssl": ssl, "allow_redirects": False, "timeout": self._timeout}
        try:
            if self.static_json is not None:
                ctx = session.post(url, json=self.static_json, **options)
            else:
                ctx = session.get(url, **options)
            async with ctx as resp:
                if resp.status in REDIRECTS:
                    raise AuthError(
                        f"the token url {_host(url)} answered with a redirect (HTTP {resp.status}), which is not followed: "
                        "the credentials and headers sent to it would go along; configure the URL it redirects to"
                    )
                if resp.status != 200:
                    raise AuthError(f"the token url {_host(url)} answered HTTP {resp.status}", transient=resp.status >= 500 or resp.status == 429)
                raw = await read_body(resp, MAX_TOKEN_BYTES)
        except aiohttp.ClientError as exc:
            raise AuthError(f"the token url {_host(url)} could not be reached: {connection_problem(exc)}", transient=True) from None
        except asyncio.TimeoutError:
            raise AuthError(f"the token url {_host(url)} did not answer in time", transient=True) from None
        try:
            if len(raw) > MAX_TOKEN_BYTES:
                raise ValueError("too large")
            text = raw.decode("ascii").strip()  # a token goes into a header: ASCII or nothing
            body = json.loads(text) if text[:1] in ("{", "[", '"') else {"token": text}  # some answer the bare token
        except ValueError:  # UnicodeDecodeError included
            raise AuthError(f"the token url {_host(url)} answered something that is not a token") from None
        return _token_from(body, url)


def _web_url(text: str) -> bool:
    try:
        url = URL(text)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.host)


async def _ask(
    request: Any, realm: str, *, refusals: tuple[int, ...] = (), refused: str = "", absent: tuple[int, ...] = ()
) -> Any:
    """A token server's JSON answer to `request` (an aiohttp request context): an AuthError
    saying `refused` for a status in `refusals`, None for one in `absent` (another way to ask
    may work)."""
    try:
        async with request as resp:
            if resp.status in absent:
                return None
            if resp.status in refusals:
                raise AuthError(f"the token server {_host(realm)} {refused} (HTTP {resp.status})")
            if resp.status != 200:
                raise AuthError(f"the token server {_host(realm)} answered HTTP {resp.status}", transient=resp.status >= 500 or resp.status == 429)
            # The realm comes from a registry's challenge: its answer is read only as far as a token goes.
            raw = await read_body(resp, MAX_TOKEN_BYTES)
            if not raw.strip():
                return None  # no answer at all: for the OAuth2 POST, another way to ask may work
            try:
                if len(raw) > MAX_TOKEN_BYTES:
                    raise ValueError("too large")
                return json.loads(raw)
            except ValueError:
                raise AuthError(f"the token server {_host(realm)} answered something that is not a token") from None
    except aiohttp.ClientError as exc:
        raise AuthError(f"the token server {_host(realm)} could not be reached: {connection_problem(exc)}", transient=True) from None
    except asyncio.TimeoutError:
        raise AuthError(f"the token server {_host(realm)} did not answer in time", transient=True) from None


def _token_from(body: Any, url: str) -> Token:
    if not isinstance(body, dict):
        raise AuthError(f"the token server {_host(url)} answered something that is not a token")
    value = body.get("access_token") or body.get("token")
    if not value or not isinstance(value, str):
        raise AuthError(f"the token server {_host(url)} answered no token")
    try:
        ttl = float(body.get("expires_in") or DEFAULT_TOKEN_TTL_S)
    except (TypeError, ValueError):
        ttl = DEFAULT_TOKEN_TTL_S
    return Token(value, time.monotonic() + ttl, ttl)


def _host(url: str) -> str:
    try:
        u = URL(url)
        return f"{u.host}:{u.port}" if u.port else str(u.host)
    except ValueError:
        return "?"
