"""A small Docker token server (the `auth.token` side of distribution), for tests.

Endpoints:
- `GET /token?service=S&scope=...` — the Docker token flow, Basic auth optional (anonymous).
- `POST /token` — the OAuth2 form variant; answers 404 unless `oauth2` is True, so clients must
  fall back to GET as the Docker spec says.
- `GET|POST /auth-json?service=S&scope=...` — the ORIGINAL pydlit "url" auth style: credentials in
  a JSON body `{"username", "password"}` and/or an `X-Api-Key` header, answer `{"token": jwt}`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fnmatch
import json
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from .bgserver import BackgroundServer, BackgroundService
from .certs import make_signing_cert
from .jose import sign_jwt

ANONYMOUS = ""
ANY_USER = "*"
ALL_ACTIONS = "*"
# distribution 2.8 accepts a token until exp + 60 s (token.Leeway): see `reject_after`.
REGISTRY_LEEWAY = 60

Rules = list[tuple[str, frozenset[str]]]


@dataclass(frozen=True)
class TokenRequest:
    method: str
    path: str
    user: str | None  # None = anonymous (or credentials refused)
    service: str | None
    scopes: tuple[str, ...]  # as asked, one entry per single scope
    granted: tuple[dict[str, Any], ...]  # the JWT `access` claim
    status: int


def parse_scopes(values: Iterable[str]) -> list[str]:
    """Each value may hold several space-separated scopes."""
    return [scope for value in values for scope in value.split()]


def split_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """`repository:NAME:ACTIONS`, where NAME may hold ':' (host:port), so split from the right."""
    head, sep, actions = scope.rpartition(":")
    rtype, sep2, name = head.partition(":")
    if not sep or not sep2 or not name:
        return None
    return rtype, name, [a for a in actions.split(",") if a]


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.json_response(body, status=status, headers=headers)


class TokenServer(BackgroundService):
    def __init__(
        self,
        service: str = "pydlit-test-registry",
        issuer: str = "pydlit-test-issuer",
        users: dict[str, str] | None = None,
        token_ttl: int = 300,
    ) -> None:
        self.service = service
        self.issuer = issuer
        self.users: dict[str, str] = dict(users or {})
        self.token_ttl = token_ttl
        # Seconds after issue at which the registry starts refusing a token; None = token_ttl
        # plus the registry's leeway. Set it (with a small token_ttl) to test token refresh.
        self.reject_after: float | None = None
        self.api_keys: dict[str, str] = {}  # X-Api-Key value -> user it stands for
        self.require_api_key = False  # /auth-json refuses requests without a valid key
        self.oauth2 = False
        self._signer = make_signing_cert()
        self._lock = threading.Lock()
        self._acl: dict[str, Rules] = {}
        self._requests: list[TokenRequest] = []
        self._refresh_tokens: dict[str, str] = {}
        self._server = BackgroundServer(self._make_app, "token-server")
        self.reset_acl()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self._server.port:
            raise RuntimeError("TokenServer is not started")
        return f"http://127.0.0.1:{self._server.port}"

    @property
    def realm(self) -> str:
        return self.url + "/token"

    @property
    def cert_pem(self) -> str:
        """The self-signed signing certificate: the registry's `rootcertbundle`."""
        return self._signer.cert_pem

    def auth_json_url(self, *scopes: str, service: str | None = None) -> str:
        """A preconfigured "url" for the original pydlit auth style."""
        query = [("service", service or self.service)] + [("scope", s) for s in scopes]
        return f"{self.url}/auth-json?{urllib.parse.urlencode(query)}"

    # -- access control --------------------------------------------------------------------

    def reset_acl(self) -> None:
        """Known users: pull,push on everything. Anonymous: pull on everything."""
        with self._lock:
            self._acl = {
                ANY_USER: [("*", frozenset({"pull", "push"}))],
                ANONYMOUS: [("*", frozenset({"pull"}))],
            }

    def set_acl(self, user: str | None, rules: Iterable[tuple[str, Iterable[str]]]) -> None:
        """Replace the rules of `user` (None or "" = anonymous, "*" = known users without rules).

        A rule is (fnmatch pattern on the repository name, actions); action "*" means all.
        """
        with self._lock:
            self._acl[user or ANONYMOUS] = [(p, frozenset(a)) for p, a in rules]

    def grant(self, user: str | None, pattern: str, actions: Iterable[str]) -> None:
        with self._lock:
            self._acl.setdefault(user or ANONYMOUS, []).append((pattern, frozenset(actions)))

    def issue_refresh_token(self, user: str) -> str:
        """An OAuth2 refresh token for `user`: what `docker login` keeps as an identity token."""
        refresh = secrets.token_urlsafe(16)
        with self._lock:
            self._refresh_tokens[refresh] = user
        return refresh

    def allowed_actions(self, user: str | None, repo: str) -> frozenset[str]:
        with self._lock:
            if not user:
                rules = self._acl.get(ANONYMOUS, [])
            else:
                rules = self._acl.get(user, self._acl.get(ANY_USER, []))
            allowed: set[str] = set()
            for pattern, actions in rules:
                if fnmatch.fnmatchcase(repo, pattern):
                    allowed |= actions
        return frozenset(allowed)

    def grant_scopes(self, user: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        """The `access` claim: asked ∩ allowed per repository; less than asked is no error."""
        merged: dict[tuple[str, str], list[str]] = {}
        for scope in scopes:
            parts = split_scope(scope)
            if parts is None or parts[0] != "repository":
                continue
            _, name, asked = parts
            allowed = self.allowed_actions(user, name)
            actions = merged.setdefault(("repository", name), [])
            for action in asked:
                if (action in allowed or ALL_ACTIONS in allowed) and action not in actions:
                    actions.append(action)
        return [
            {"type": t, "name": n, "actions": acts} for (t, n), acts in merged.items() if acts
        ]

    # -- tokens ----------------------------------------------------------------------------

    def issue_token(self, user: str | None, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        lifetime = (
            self.token_ttl if self.reject_after is None else self.reject_after - REGISTRY_LEEWAY
        )
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + int(lifetime),
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        key = self._signer.key
        assert isinstance(key, rsa.RSAPrivateKey)
        return sign_jwt(key, self._signer.cert_der, claims)

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot of every request so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- HTTP ------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._get_token)
        app.router.add_post("/token", self._post_token)
        app.router.add_route("GET", "/auth-json", self._auth_json)
        app.router.add_route("POST", "/auth-json", self._auth_json)
        return app

    def _record(
        self,
        request: web.Request,
        user: str | None,
        scopes: list[str],
        granted: list[dict[str, Any]],
        status: int,
        service: str | None,
    ) -> None:
        entry = TokenRequest(
            request.method, request.path, user, service, tuple(scopes), tuple(granted), status
        )
        with self._lock:
            self._requests.append(entry)

    def _check_password(self, user: str, password: str) -> bool:
        expected = self.users.get(user)
        return expected is not None and secrets.compare_digest(
            expected.encode(), password.encode()
        )

    def _basic_user(self, request: web.Request) -> tuple[bool, str | None]:
        """(credentials acceptable, user). No Authorization header means anonymous."""
        header = request.headers.get("Authorization")
        if header is None:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, sep, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        if not sep or not self._check_password(user, password):
            return False, None
        return True, user

    def _token_answer(self, user: str | None, scopes: list[str]) -> tuple[dict[str, Any], list]:
        granted = self.grant_scopes(user, scopes)
        token = self.issue_token(user, granted)
        issued = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.token_ttl,
            "issued_at": issued,
        }
        return body, granted

    async def _get_token(self, request: web.Request) -> web.Response:
        service = request.query.get("service")
        scopes = parse_scopes(request.query.getall("scope", []))
        ok, user = self._basic_user(request)
        if not ok:
            self._record(request, None, scopes, [], 401, service)
            return _error(
                401, "UNAUTHORIZED", "invalid credentials",
                **{"WWW-Authenticate": 'Basic realm="pydlit-test-token"'},
            )
        if service is not None and service != self.service:
            self._record(request, user, scopes, [], 400, service)
            return _error(400, "INVALID_SERVICE", f"unknown service {service!r}")
        body, granted = self._token_answer(user, scopes)
        self._record(request, user, scopes, granted, 200, service)
        return web.json_response(body)

    async def _post_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        service = str(form.get("service", "")) or None
        scopes = parse_scopes([str(form.get("scope", ""))])
        if not self.oauth2:
            self._record(request, None, scopes, [], 404, service)
            return _error(404, "NOT_FOUND", "OAuth2 token endpoint disabled")
        grant_type = form.get("grant_type")
        user: str | None = None
        if grant_type == "password":
            name, password = str(form.get("username", "")), str(form.get("password", ""))
            if self._check_password(name, password):
                user = name
        elif grant_type == "refresh_token":
            with self._lock:
                user = self._refresh_tokens.get(str(form.get("refresh_token", "")))
        if user is None:
            self._record(request, None, scopes, [], 401, service)
            return _error(401, "UNAUTHORIZED", "invalid grant")
        body, granted = self._token_answer(user, scopes)
        del body["token"]
        body["scope"] = " ".join(scopes)
        if form.get("access_type") == "offline":
            body["refresh_token"] = self.issue_refresh_token(user)
        self._record(request, user, scopes, granted, 200, service)
        return web.json_response(body)

    async def _auth_json(self, request: web.Request) -> web.Response:
        service = request.query.get("service")
        scopes = parse_scopes(request.query.getall("scope", []))
        user: str | None = None
        key = request.headers.get("X-Api-Key")
        if key is not None:
            user = self.api_keys.get(key)
            if user is None:
                self._record(request, None, scopes, [], 401, service)
                return _error(401, "UNAUTHORIZED", "invalid API key")
        elif self.require_api_key:
            self._record(request, None, scopes, [], 401, service)
            return _error(401, "UNAUTHORIZED", "X-Api-Key required")
        raw = await request.read()
        if raw.strip():
            try:
                creds = json.loads(raw)
                name, password = str(creds["username"]), str(creds["password"])
            except (ValueError, KeyError, TypeError):
                self._record(request, user, scopes, [], 400, service)
                return _error(400, "BAD_REQUEST", 'expected {"username": .., "password": ..}')
            if not self._check_password(name, password):
                self._record(request, None, scopes, [], 401, service)
                return _error(401, "UNAUTHORIZED", "invalid username or password")
            user = name
        granted = self.grant_scopes(user, scopes)
        self._record(request, user, scopes, granted, 200, service)
        return web.json_response({"token": self.issue_token(user, granted)})
