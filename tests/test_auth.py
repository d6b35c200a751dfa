"""WWW-Authenticate parsing, scope merging and the token flows of Authenticator (faked with aioresponses)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import re
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aioresponses import CallbackResult
from multidict import CIMultiDict
from support.answers import trickle
from support.mocked import aioresponses
from yarl import URL

from pydlit.registry import auth as auth_mod
from pydlit.registry import bodies
from pydlit.registry.auth import (
    Authenticator,
    AuthError,
    Challenge,
    merge_scopes,
    parse_challenges,
)
from pydlit.registry.client import RegistryClient, RegistryError, RetryPolicy

REALM = "http://127.0.0.1:5999/token"
REALM_RE = re.compile(r"^http://127\.0\.0\.1:5999/token(\?.*)?$")
SCOPE = "repository:team/app:pull"




# -- parse_challenges ------------------------------------------------------------------------------


def test_basic_challenge() -> None:
    assert parse_challenges(['Basic realm="Registry Realm"']) == [Challenge("basic", {"realm": "Registry Realm"})]


def test_bearer_challenge_with_quoted_commas_and_escaped_quotes() -> None:
    value = (
        'Bearer realm="https://auth.example/token?a=1,b=2",service="registry.example",'
        'scope="repository:team/app:pull,push repository:other:pull",error="insufficient_scope",'
        'error_description="say \\"hi\\", then \\\\ go"'
    )
    [c] = parse_challenges([value])
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token?a=1,b=2",
        "service": "registry.example",
        "scope": "repository:team/app:pull,push repository:other:pull",
        "error": "insufficient_scope",
        "error_description": 'say "hi", then \\ go',
    }


def test_unquoted_params_and_spaces_around_separators() -> None:
    [c] = parse_challenges(['Bearer realm = "http://t/token" , service=reg.local ,error=invalid_token'])
    assert c.params == {"realm": "http://t/token", "service": "reg.local", "error": "invalid_token"}


def test_several_challenges_in_one_value() -> None:
    found = parse_challenges(['Basic realm="r1", Bearer realm="http://t/token",service="s", Basic realm="r, 2"'])
    assert [c.scheme for c in found] == ["basic", "bearer", "basic"]
    assert found[0].params == {"realm": "r1"}
    assert found[1].params == {"realm": "http://t/token", "service": "s"}
    assert found[2].params == {"realm": "r, 2"}


def test_challenges_across_header_values() -> None:
    found = parse_challenges(['Basic realm="one"', 'Bearer realm="http://t/token",service="two"'])
    assert found == [Challenge("basic", {"realm": "one"}), Challenge("bearer", {"realm": "http://t/token", "service": "two"})]


@pytest.mark.parametrize("scheme", ["BEARER", "bearer", "BeArEr"])
def test_scheme_is_case_insensitive(scheme: str) -> None:
    [c] = parse_challenges([f'{scheme} Realm="http://t/token",SERVICE="s"'])
    assert c.scheme == "bearer"
    assert c.params == {"realm": "http://t/token", "service": "s"}


def test_no_header_no_challenge() -> None:
    assert parse_challenges([]) == []
    assert parse_challenges([""]) == []


# -- merge_scopes ----------------------------------------------------------------------------------


def test_merge_scopes_unites_actions_per_repository() -> None:
    merged = merge_scopes(["repository:dst:push", "repository:dst:pull repository:src:pull", "repository:dst:pull"])
    assert merged == "repository:dst:pull,push repository:src:pull"


def test_merge_scopes_splits_host_port_names_from_the_right() -> None:
    merged = merge_scopes(["repository:127.0.0.1:5000/team/app:pull", "repository:127.0.0.1:5000/team/app:push,pull"])
    assert merged == "repository:127.0.0.1:5000/team/app:pull,push"


def test_merge_scopes_ignores_empty_parts() -> None:
    assert merge_scopes(["repository:a:pull", ""]) == "repository:a:pull"
    assert merge_scopes(["repository:a:pull,,push"]) == "repository:a:pull,push"


# -- the Bearer flow -------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """auth.py's own view of time.monotonic (the event loop keeps the real clock)."""
    t = FakeTime()
    monkeypatch.setattr(auth_mod, "time", SimpleNamespace(monotonic=t.monotonic))
    return t


@contextlib.asynccontextmanager
async def answering(
    url: re.Pattern[str] = REALM_RE, *, get: Callable[..., CallbackResult] | None = None,
    post: Callable[..., CallbackResult] | None = None,
) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session whose GETs and POSTs to `url` the given callbacks answer."""
    with aioresponses() as m:
        if get is not None:
            m.get(url, callback=get, repeat=True)
        if post is not None:
            m.post(url, callback=post, repeat=True)
        async with aiohttp.ClientSession() as s:
            yield s


def bearer(auth: dict | None = None, push: bool = False, **params: str) -> Authenticator:
    a = Authenticator(auth, push=push)
    a.challenge = Challenge("bearer", {"realm": REALM, "service": "reg.local", **params})
    return a


class TokenServer:
    """Answers each token request with the next body, and records what was asked."""

    def __init__(self, *bodies: dict, status: int = 200) -> None:
        self.bodies = list(bodies)
        self.status = status
        self.calls: list[tuple[URL, CIMultiDict]] = []

    def __call__(self, url: URL, **kwargs) -> CallbackResult:
        self.calls.append((url, CIMultiDict(kwargs.get("headers") or {})))
        body = self.bodies[min(len(self.calls), len(self.bodies)) - 1]
        return CallbackResult(status=self.status, payload=body)


@pytest.mark.asyncio
async def test_bearer_token_is_fetched_with_service_scope_and_basic_credentials(fake_time: FakeTime) -> None:
    server = TokenServer({"token": "t1", "expires_in": 300})
    a = bearer({"basicauth": {"user": "alice", "password": "pw"}})
    async with answering(get=server) as s:
        assert await a.header_for(s, "repository:dst:pull,push repository:src:pull", False) == "Bearer t1"
    [(url, headers)] = server.calls
    assert url.query.get("service") == "reg.local"
    assert url.query.getall("scope") == ["repository:dst:pull,push", "repository:src:pull"]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"alice:pw").decode()


@pytest.mark.asyncio
@pytest.mark.parametrize("realm", ["pydlit", "/token", "ftp://auth.example/token"])
async def test_a_realm_that_is_no_web_url_fails_at_once_saying_so(fake_time: FakeTime, realm: str) -> None:
    # An endpoint pointing at another service (pydlit's own API: realm="pydlit") used to fail
    # "could not be reached: InvalidUrlClientError", a transient error, retried a budget long.
    a = Authenticator(None)
    a.challenge = Challenge("bearer", {"realm": realm})
    async with aiohttp.ClientSession() as s:
        with pytest.raises(AuthError) as caught:
            await a.header_for(s, "repository:app:pull", False)
    assert str(caught.value) == "the registry's Bearer challenge names no token server: its realm is not an http(s) URL"
    assert not caught.value.transient


@pytest.mark.asyncio
async def test_anonymous_token_request_carries_no_authorization(fake_time: FakeTime) -> None:
    server = TokenServer({"token": "anon"})
    async with answering(get=server) as s:
        assert await bearer().header_for(s, SCOPE, False) == "Bearer anon"
    assert "Authorization" not in server.calls[0][1]


@pytest.mark.asyncio
async def test_token_is_cached_per_scope_and_refreshed_before_expiry(fake_time: FakeTime) -> None:
    server = TokenServer({"token": "t1", "expires_in": 300}, {"token": "t2", "expires_in": 300}, {"token": "t3", "expires_in": 300})
    a = bearer()
    async with answering(get=server) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer t1"
        fake_time.now += 200
        assert await a.header_for(s, SCOPE, False) == "Bearer t1"  # cached
        assert len(server.calls) == 1
        # Another scope is another token.
        assert await a.header_for(s, "repository:other:pull", False) == "Bearer t2"
        assert len(server.calls) == 2
        # 300 s tokens are renewed 30 s before they expire: at 271 s of age, not at 300.
        fake_time.now += 71
        assert await a.header_for(s, SCOPE, False) == "Bearer t3"
        assert len(server.calls) == 3


@pytest.mark.asyncio
async def test_expires_in_defaults_to_60_seconds(fake_time: FakeTime) -> None:
    server = TokenServer({"token": "t1"}, {"token": "t2"})
    a = bearer()
    async with answering(get=server) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer t1"
        fake_time.now += 29  # a 60 s token is renewed at half its life (30 s)
        assert await a.header_for(s, SCOPE, False) == "Bearer t1"
        fake_time.now += 2
        assert await a.header_for(s, SCOPE, False) == "Bearer t2"
    assert len(server.calls) == 2


@pytest.mark.asyncio
async def test_access_token_is_preferred_over_token(fake_time: FakeTime) -> None:
    server = TokenServer({"token": "legacy", "access_token": "oauth2", "expires_in": 120})
    async with answering(get=server) as s:
        assert await bearer().header_for(s, SCOPE, False) == "Bearer oauth2"


@pytest.mark.asyncio
async def test_only_anonymous_tokens_are_shared(fake_time: FakeTime) -> None:
    server = TokenServer(*({"token": f"t{i}", "expires_in": 300} for i in range(1, 5)))
    shared = auth_mod.TokenCache()
    alice = {"basicauth": {"user": "alice", "password": "pw"}}

    def made(auth: dict | None, service: str = "reg.local") -> Authenticator:
        a = Authenticator(auth, shared=shared)
        a.challenge = Challenge("bearer", {"realm": REALM, "service": service})
        return a

    async with answering(get=server) as s:
        assert await made(None).header_for(s, SCOPE, False) == "Bearer t1"
        assert await made(None).header_for(s, SCOPE, False) == "Bearer t1"  # another job
        assert await made(None, "other.registry").header_for(s, SCOPE, False) == "Bearer t2"
        assert await made(alice).header_for(s, SCOPE, False) == "Bearer t3"
        assert await made(dict(alice)).header_for(s, SCOPE, False) == "Bearer t4"  # asked again
    assert [c[1].get("Authorization") is not None for c in server.calls] == [False, False, True, True]


def test_token_cache_keeps_the_newest_entries() -> None:
    cache = auth_mod.TokenCache(max_entries=2)
    tokens = [auth_mod.Token(f"t{i}", time.monotonic() + 300, 300) for i in range(3)]
    for i, token in enumerate(tokens):
        cache.put(("realm", "svc", "who", f"scope{i}"), token)
    assert cache.get(("realm", "svc", "who", "scope0")) is None
    assert [cache.get(("realm", "svc", "who", f"scope{i}")) for i in (1, 2)] == tokens[1:]


def pusher() -> Authenticator:
    return bearer({"basicauth": {"user": "alice", "password": "pw"}}, push=True)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "make, forgotten",
    # A pushing client's token, asked with push, also stands for the pull scope: forgetting it
    # under the push scope (the registry called it invalid) forgets it under both.
    [(bearer, SCOPE), (pusher, "repository:team/app:pull,push")],
    ids=["same scope", "wider scope"],
)
async def test_forget_drops_the_cached_token(fake_time: FakeTime, make, forgotten: str) -> None:
    server = TokenServer({"token": "t1", "expires_in": 300}, {"token": "t2", "expires_in": 300})
    a = make()
    async with answering(get=server) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer t1"
        a.forget(forgotten)
        assert await a.header_for(s, SCOPE, False) == "Bearer t2"


@pytest.mark.asyncio
async def test_a_pushing_client_asks_its_first_token_with_push(fake_time: FakeTime) -> None:
    server = TokenServer({"token": "t1", "expires_in": 300}, {"token": "t2", "expires_in": 300})
    a = pusher()
    async with answering(get=server) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer t1"
        assert await a.header_for(s, "repository:team/app:pull,push", False) == "Bearer t1"
        # A scope of several repositories (a mount) is asked as it is.
        mount = "repository:team/app:pull,push repository:base:pull"
        assert await a.header_for(s, mount, False) == "Bearer t2"
    assert [set(c[0].query.getall("scope")) for c in server.calls] == [
        {"repository:team/app:pull,push"}, {"repository:team/app:pull,push", "repository:base:pull"}]


@pytest.mark.asyncio
async def test_a_token_server_failing_for_a_while_is_still_asked_for_push(fake_time: FakeTime) -> None:
    answers = [CallbackResult(status=503, payload={}), CallbackResult(status=200, payload={"token": "t1", "expires_in": 300})]
    asked: list[list[str]] = []

    def server(url: URL, **kwargs) -> CallbackResult:
        asked.append(url.query.getall("scope"))
        return answers[len(asked) - 1]

    a = pusher()
    async with answering(get=server) as s:
        with pytest.raises(AuthError) as err:
            await a.header_for(s, SCOPE, False)
        assert err.value.transient
        assert await a.header_for(s, SCOPE, False) == "Bearer t1"
    assert asked == [["repository:team/app:pull,push"]] * 2


@pytest.mark.asyncio
async def test_a_token_server_refusing_push_is_asked_for_pull_alone(fake_time: FakeTime) -> None:
    asked: list[list[str]] = []

    def server(url: URL, **kwargs) -> CallbackResult:
        asked.append(url.query.getall("scope"))
        if any(scope.endswith("push") for scope in asked[-1]):
            return CallbackResult(status=403, payload={"details": "no push for you"})
        return CallbackResult(status=200, payload={"token": f"t{len(asked)}", "expires_in": 300})

    a = pusher()
    async with answering(get=server) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer t2"
        assert await a.header_for(s, "repository:other:pull", False) == "Bearer t3"
    assert asked == [["repository:team/app:pull,push"], [SCOPE], ["repository:other:pull"]]


def identity(token: str = "refresh-me") -> Authenticator:
    return bearer({"basicauth": {"user": "<token>", "password": token}})


class FormServer:
    """Records each POSTed form and answers with (status, body)."""

    def __init__(self, status: int, body: dict) -> None:
        self.status, self.body = status, body
        self.forms: list[tuple[dict, CIMultiDict]] = []

    def __call__(self, url: URL, **kwargs) -> CallbackResult:
        self.forms.append((dict(kwargs.get("data") or {}), CIMultiDict(kwargs.get("headers") or {})))
        return CallbackResult(status=self.status, payload=self.body)


@pytest.mark.asyncio
async def test_an_identity_token_is_traded_with_the_oauth2_refresh_grant(fake_time: FakeTime) -> None:
    server = FormServer(200, {"access_token": "acc", "expires_in": 300})
    a = identity()
    async with answering(post=server) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer acc"
    [(form, headers)] = server.forms
    assert form == {"grant_type": "refresh_token", "refresh_token": "refresh-me", "client_id": "pydlit",
                    "scope": SCOPE, "service": "reg.local"}
    assert "Authorization" not in headers


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [404, 405, 400, 401, 403, 307])
async def test_where_the_oauth2_grant_fails_the_identity_token_goes_as_basic(fake_time: FakeTime, status: int) -> None:
    # No OAuth2 endpoint (404, 405), or one that refuses what the GET flow takes (ACR answers 400,
    # Artifactory 401), or a redirect that would carry the refresh token elsewhere.
    form = FormServer(status, {"errors": []})
    server = TokenServer({"token": "t1", "expires_in": 300}, {"token": "t2", "expires_in": 300})
    a = identity()
    async with answering(post=form, get=server) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer t1"
        assert await a.header_for(s, "repository:other:pull", False) == "Bearer t2"
    assert len(form.forms) == 1  # once the GET has worked, the POST is not tried again
    assert server.calls[0][1]["Authorization"] == "Basic " + base64.b64encode(b"<token>:refresh-me").decode()


@pytest.mark.asyncio
async def test_an_identity_token_refused_both_ways_is_an_auth_error_that_does_not_show_it(fake_time: FakeTime) -> None:
    a = identity("s3cret-refresh")
    async with answering(post=FormServer(400, {"error": "invalid_grant"}), get=TokenServer({}, status=401)) as s:
        with pytest.raises(AuthError) as err:
            await a.header_for(s, SCOPE, False)
    assert "refused the credentials (HTTP 401)" in str(err.value)
    assert "s3cret-refresh" not in str(err.value) and not err.value.transient


@pytest.mark.asyncio
async def test_a_failing_oauth2_endpoint_is_retried_not_abandoned(fake_time: FakeTime) -> None:
    a = identity()
    async with answering(post=FormServer(503, {})) as s:
        with pytest.raises(AuthError) as err:
            await a.header_for(s, SCOPE, False)
    assert err.value.transient and "answered HTTP 503" in str(err.value)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "status, body, words",
    [
        (401, {"details": "bad"}, "refused the credentials (HTTP 401)"),
        (500, {}, "answered HTTP 500"),
        (200, {"nothing": "here"}, "answered no token"),
        (200, ["not", "a", "dict"], "not a token"),
    ],
)
async def test_token_server_failures_are_auth_errors_without_secrets(fake_time: FakeTime, status: int, body, words: str) -> None:
    server = TokenServer(body, status=status)
    a = bearer({"basicauth": {"user": "alice", "password": "s3cr3t-PASSWORD"}})
    async with answering(get=server) as s:
        with pytest.raises(AuthError) as caught:
            await a.header_for(s, SCOPE, False)
    assert words in str(caught.value)
    assert "127.0.0.1:5999" in str(caught.value)
    assert "s3cr3t-PASSWORD" not in str(caught.value)


@pytest.mark.asyncio
async def test_a_token_answer_that_is_not_json_is_an_auth_error(fake_time: FakeTime) -> None:
    async with answering(get=lambda url, **kw: CallbackResult(status=200, body="<html>sign in</html>")) as s:
        with pytest.raises(AuthError) as err:
            await bearer().header_for(s, SCOPE, False)
    assert "answered something that is not a token" in str(err.value)


@pytest.mark.asyncio
async def test_basic_challenge_without_credentials_is_an_auth_error() -> None:
    a = Authenticator(None)
    a.challenge = Challenge("basic", {"realm": "r"})
    async with aiohttp.ClientSession() as s:
        with pytest.raises(AuthError):
            await a.header_for(s, SCOPE, False)
    b = Authenticator({"basicauth": {"user": "bob", "password": "pw"}})
    b.challenge = Challenge("basic", {"realm": "r"})
    async with aiohttp.ClientSession() as s:
        assert await b.header_for(s, SCOPE, False) == "Basic " + base64.b64encode(b"bob:pw").decode()


@pytest.mark.asyncio
async def test_no_challenge_means_no_authorization() -> None:
    async with aiohttp.ClientSession() as s:
        assert await Authenticator({"basicauth": {"user": "u", "password": "p"}}).header_for(s, SCOPE, False) is None


# -- the original pydlit `url` flow ----------------------------------------------------------------

STATIC = "http://127.0.0.1:5998/api/token?project=x"
STATIC_RE = re.compile(r"^http://127\.0\.0\.1:5998/api/token")


class Recorder:
    def __init__(self, body: str | dict, status: int = 200) -> None:
        self.body = body
        self.status = status
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, url: URL, **kwargs) -> CallbackResult:
        self.calls.append((str(url), kwargs))
        if isinstance(self.body, dict):
            return CallbackResult(status=self.status, payload=self.body)
        return CallbackResult(status=self.status, body=self.body, content_type="text/plain")


@pytest.mark.asyncio
async def test_url_flow_posts_the_json_payload_with_headers(fake_time: FakeTime) -> None:
    rec = Recorder({"token": "static-1", "expires_in": 600})
    a = Authenticator({"url": STATIC, "header": {"X-Api-Key": "k-123"}, "json": {"user": "svc", "scopes": ["pull"]}})
    assert a.uses_static_token
    async with answering(STATIC_RE, post=rec) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer static-1"
        assert await a.header_for(s, "repository:other:pull,push", False) == "Bearer static-1"  # one token for all
    assert len(rec.calls) == 1
    url, kwargs = rec.calls[0]
    assert url == STATIC
    assert kwargs["json"] == {"user": "svc", "scopes": ["pull"]}
    assert CIMultiDict(kwargs["headers"])["X-Api-Key"] == "k-123"


@pytest.mark.asyncio
async def test_url_flow_gets_without_json_and_sends_basic_credentials(fake_time: FakeTime) -> None:
    rec = Recorder({"access_token": "static-2"})
    a = Authenticator({"url": STATIC, "basicauth": {"user": "svc", "password": "pw"}})
    async with answering(STATIC_RE, get=rec) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer static-2"
    [(_, kwargs)] = rec.calls
    assert CIMultiDict(kwargs["headers"])["Authorization"] == "Basic " + base64.b64encode(b"svc:pw").decode()
    assert kwargs.get("json") is None


@pytest.mark.asyncio
@pytest.mark.parametrize("token_type", ["JWT", "jwt", "Jwt"])
async def test_url_flow_jwt_token_type(fake_time: FakeTime, token_type: str) -> None:
    rec = Recorder("eyJhbGciOi.bare.token\n")  # some token endpoints answer the bare token
    a = Authenticator({"url": STATIC, "token_type": token_type})
    async with answering(STATIC_RE, get=rec) as s:
        assert await a.header_for(s, SCOPE, False) == "JWT eyJhbGciOi.bare.token"


@pytest.mark.asyncio
async def test_url_flow_token_is_refreshed_before_expiry(fake_time: FakeTime) -> None:
    tokens = iter(["s1", "s2"])

    def answer(url: URL, **kwargs) -> CallbackResult:
        return CallbackResult(payload={"token": next(tokens), "expires_in": 100})

    a = Authenticator({"url": STATIC})
    async with answering(STATIC_RE, get=answer) as s:
        assert await a.header_for(s, SCOPE, False) == "Bearer s1"
        fake_time.now += 69  # renewed at 70 s of a 100 s life
        assert await a.header_for(s, SCOPE, False) == "Bearer s1"
        fake_time.now += 2
        assert await a.header_for(s, SCOPE, False) == "Bearer s2"


@pytest.mark.asyncio
async def test_url_flow_failure_names_the_host_only(fake_time: FakeTime) -> None:
    a = Authenticator({"url": "http://127.0.0.1:5998/api/token?key=QUERY-SECRET", "header": {"X-Api-Key": "HDR-SECRET"}})
    async with answering(STATIC_RE, get=lambda url, **kw: CallbackResult(status=403)) as s:
        with pytest.raises(AuthError) as caught:
            await a.header_for(s, SCOPE, False)
    msg = str(caught.value)
    assert "127.0.0.1:5998" in msg and "HTTP 403" in msg
    assert "QUERY-SECRET" not in msg and "HDR-SECRET" not in msg


def test_drop_static_switches_to_the_challenge_flow() -> None:
    a = Authenticator({"url": STATIC})
    assert a.uses_static_token
    a.drop_static()
    assert not a.uses_static_token



@pytest.mark.asyncio
async def test_a_token_server_that_answers_without_end_is_read_only_as_far_as_a_token_goes(aiohttp_server) -> None:
    # The realm comes from the registry's challenge: a registry can name any server there.
    sent = []

    async def token(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 64 MiB at most, far past what a token may be
                await resp.write(b" " * (1024 * 1024))
                sent.append(1)
        return resp

    async def v2(request: web.Request) -> web.Response:
        realm = str(request.url.with_path("/token").with_query(None))
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="reg"'})

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_get("/v2/", v2)
    app.router.add_route("HEAD", "/v2/team/app/manifests/v1", v2)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, str(server.make_url("/v2/")), policy=RetryPolicy(attempts=1))
        with pytest.raises(RegistryError, match="answered something that is not a token"):
            await asyncio.wait_for(client.head_manifest("team/app", "v1"), 30)
    assert len(sent) < 64


@pytest.mark.asyncio
@pytest.mark.parametrize(("body", "header"), [
    (b"bare-token-123\n", "Bearer bare-token-123"),  # some token urls answer the token alone
    (b'{"token": "json-token"}', "Bearer json-token"),
    (b"ab\xff\xfecd", None),  # not ASCII: it could not go into a header as it is
    (b'{"token": "broken', None),
    (b"x" * (64 * 1024 + 1), None),
])
async def test_what_a_token_url_answers_is_a_token_or_a_clear_error(fake_time: FakeTime, body: bytes, header: str | None) -> None:
    a = Authenticator({"url": STATIC})
    async with answering(STATIC_RE, get=lambda url, **kw: CallbackResult(body=body)) as s:
        if header is not None:
            assert await a.header_for(s, SCOPE, False) == header
        else:
            with pytest.raises(AuthError, match="answered something that is not a token"):
                await a.header_for(s, SCOPE, False)


@pytest.mark.asyncio
async def test_an_oauth2_endpoint_that_answers_nothing_leaves_the_get_flow_to_try(fake_time: FakeTime) -> None:
    server = TokenServer({"token": "t1", "expires_in": 300})
    async with answering(post=lambda url, **kw: CallbackResult(status=200, body=b""), get=server) as s:
        assert await identity().header_for(s, SCOPE, False) == "Bearer t1"


@pytest.mark.asyncio
@pytest.mark.parametrize("payload", [{"username": "alice", "password": "s3cr3t-PASSWORD"}, None], ids=["post", "get"])
async def test_a_token_url_that_redirects_is_not_followed(aiohttp_server, payload: dict | None) -> None:  # type: ignore[no-untyped-def]
    # aiohttp would carry the JSON payload (on a 307) and the custom headers wherever it points.
    reached: list[str] = []

    async def grab(request: web.Request) -> web.Response:
        reached.append(await request.text())
        return web.json_response({"token": "grabbed"})

    elsewhere = web.Application()
    elsewhere.router.add_route("*", "/grab", grab)
    grabber = await aiohttp_server(elsewhere)

    async def token(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(str(grabber.make_url("/grab")))

    app = web.Application()
    app.router.add_route("*", "/token", token)
    server = await aiohttp_server(app)
    a = Authenticator({"url": str(server.make_url("/token")), "header": {"X-Api-Key": "API-KEY-123"}, "json": payload})
    async with aiohttp.ClientSession() as s:
        with pytest.raises(AuthError) as err:
            await a.header_for(s, SCOPE, False)
    assert reached == []
    msg = str(err.value)
    assert "answered with a redirect (HTTP 307), which is not followed" in msg and not err.value.transient
    assert "API-KEY-123" not in msg and "s3cr3t-PASSWORD" not in msg


@pytest.mark.asyncio
async def test_token_requests_ask_for_answers_that_are_not_compressed(fake_time: FakeTime) -> None:
    # The service's session does not decompress: a token gzipped by a proxy could not be read.
    asked: list[str | None] = []

    def record(url: URL, **kwargs) -> CallbackResult:
        asked.append(CIMultiDict(kwargs.get("headers") or {}).get("Accept-Encoding"))
        return CallbackResult(payload={"access_token": "t", "expires_in": 300})

    async with answering(get=record, post=record) as s:
        await bearer().header_for(s, SCOPE, False)  # GET realm
        await identity().header_for(s, SCOPE, False)  # the OAuth2 POST
    async with answering(STATIC_RE, get=record, post=record) as s:
        await Authenticator({"url": STATIC}).header_for(s, SCOPE, False)
        await Authenticator({"url": STATIC, "json": {"user": "svc"}, "header": {"X-Api-Key": "k"}}).header_for(s, SCOPE, False)
    assert asked == ["identity"] * 4


@pytest.mark.asyncio
@pytest.mark.parametrize("flow", ["challenge", "url"])
async def test_a_token_server_that_trickles_is_given_up_on(aiohttp_server, monkeypatch: pytest.MonkeyPatch, flow: str) -> None:  # type: ignore[no-untyped-def]
    # Each byte comes well inside the stall timeout: only a bound on the whole answer ends it.
    monkeypatch.setattr(bodies, "ANSWER_TIMEOUT_S", 1.0)
    done = asyncio.Event()

    app = web.Application()
    app.router.add_get("/token", functools.partial(trickle, content_type="application/json", until=done))
    server = await aiohttp_server(app)
    url = str(server.make_url("/token"))
    if flow == "url":
        a = Authenticator({"url": url})
    else:
        a = Authenticator(None)
        a.challenge = Challenge("bearer", {"realm": url, "service": "reg"})
    async with aiohttp.ClientSession() as s:
        with pytest.raises(AuthError) as err:
            await asyncio.wait_for(a.header_for(s, SCOPE, False), 10)
    done.set()
    assert err.value.transient and "did not answer in time" in str(err.value)
