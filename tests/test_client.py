"""RegistryClient error paths a real registry cannot easily be made to produce (faked with aioresponses),
the client's small pure helpers, and a real registry's answers where they depend on its configuration."""
from __future__ import annotations

import asyncio
import socket
import base64
import email.utils
import functools
import gzip
import hashlib
import json
import re
import time
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aioresponses import CallbackResult
from multidict import CIMultiDict
from support.answers import trickle
from support.mocked import aioresponses
from support.registry import Registry
from support.tokenserver import ANY_USER, TokenServer
from yarl import URL

from pydlit.registry import bodies
from pydlit.registry import client as client_mod
from pydlit.registry.auth import ChallengeCache
from pydlit.registry.client import (
    KnownRepositories,
    RegistryClient,
    RegistryError,
    RetryPolicy,
    parse_retry_after,
    same_origin,
    split_endpoint,
    with_query,
)
from pydlit.registry.errors import parse_error_body
from pydlit.registry.manifests import DOCKER_MANIFEST, OCI_ARTIFACT

BASE = "http://127.0.0.1:5000"
PING = f"{BASE}/v2/"
MANIFEST_URL = f"{BASE}/v2/team/app/manifests/v1"
REALM = "http://127.0.0.1:5999/token"
REALM_RE = re.compile(r"^http://127\.0\.0\.1:5999/token(\?.*)?$")
DIGEST = "sha256:" + "a" * 64
PASSWORD = "s3cr3t-PASSWORD"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "c" * 64, "size": 10},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": DIGEST, "size": 20}],
    }
).encode()
POLICY = RetryPolicy(attempts=4, base_delay=0.001, max_delay=30.0, max_total=300.0)


def errors_body(code: str, message: str) -> str:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})


class _AsyncioWithFakeSleep:
    """client.py's view of asyncio: everything real except sleep, which only records the delay."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def sleep(self, delay: float, *args) -> None:
        self.sleeps.append(delay)

    def __getattr__(self, name: str):
        return getattr(asyncio, name)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    fake = _AsyncioWithFakeSleep()
    monkeypatch.setattr(client_mod, "asyncio", fake)
    return fake.sleeps


def calls(m: aioresponses, method: str, url: str) -> list:
    """Recorded requests to one URL (query included), in order."""
    want = URL(url)
    return [c for (meth, u), cs in m.requests.items() if meth == method and u == want for c in cs]


def sent_headers(call) -> CIMultiDict:
    return CIMultiDict(call.kwargs.get("headers") or {})


def make_client(session: aiohttp.ClientSession, auth: dict | None = None, policy: RetryPolicy = POLICY) -> RegistryClient:
    return RegistryClient(session, f"{BASE}/v2/", auth=auth, policy=policy)


async def registry_answering(aiohttp_server, path: str, handler) -> str:  # type: ignore[no-untyped-def]
    """The /v2/ base of a local server that answers the ping and GET `path` with `handler`:
    for answers a real registry does not give (bodies in pieces, or without end)."""

    async def ping(_: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/v2/", ping)
    app.router.add_get(path, handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/v2/"))


# -- the shared challenge cache ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_challenge_learned_without_verifying_tls_is_not_trusted_by_a_verifying_client() -> None:
    # Over unverified TLS anyone in the middle can name the token realm; a job that verifies
    # must ask the registry itself before it sends credentials anywhere.
    base, shared = "https://registry.test", ChallengeCache()
    with aioresponses() as m:
        m.get(f"{base}/v2/", status=401, repeat=True,
              headers={"WWW-Authenticate": 'Bearer realm="https://auth.test/token",service="registry.test"'})
        m.head(f"{base}/v2/team/app/manifests/v1", status=404, repeat=True)
        m.get(re.compile(r"^https://auth\.test/token"), payload={"token": "t"}, repeat=True)
        async with aiohttp.ClientSession() as s:
            for verify in (False, False, True, True):
                client = RegistryClient(s, f"{base}/v2/", verify_tls=verify, challenges=shared, policy=POLICY)
                assert await client.head_manifest("team/app", "v1") is None
        assert len(calls(m, "GET", f"{base}/v2/")) == 2  # once per way of trusting the registry


# -- retries ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_429_retry_after_seconds_is_honoured(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, status=429, body=errors_body("TOOMANYREQUESTS", "slow down"), headers={"Retry-After": "7"})
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            manifest = await make_client(s).get_manifest("team/app", "v1")
        assert len(calls(m, "GET", MANIFEST_URL)) == 2
    assert manifest.media_type == DOCKER_MANIFEST
    assert sleeps == [7.0]


@pytest.mark.asyncio
async def test_429_retry_after_http_date_is_honoured(sleeps: list[float]) -> None:
    when = email.utils.formatdate(time.time() + 12, usegmt=True)
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, status=429, headers={"Retry-After": when})
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            await make_client(s).get_manifest("team/app", "v1")
        assert len(calls(m, "GET", MANIFEST_URL)) == 2
    [delay] = sleeps
    assert 9.5 <= delay <= 12.5  # the date has whole-second resolution


@pytest.mark.asyncio
async def test_a_retry_after_past_max_delay_is_waited_in_full(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, status=429, headers={"Retry-After": "120"})
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            await make_client(s).get_manifest("team/app", "v1")
        assert len(calls(m, "GET", MANIFEST_URL)) == 2
    assert sleeps == [120.0]  # not max_delay (30 s): a try inside the window only meets another 429


@pytest.mark.asyncio
async def test_a_retry_after_past_the_time_budget_gives_up_at_once(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, status=429, body=errors_body("TOOMANYREQUESTS", "slow down"), headers={"Retry-After": "400"},
              repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s).get_manifest("team/app", "v1")  # a budget of 300 s
        assert len(calls(m, "GET", MANIFEST_URL)) == 1
    assert sleeps == []
    err = caught.value
    assert err.status == 429 and err.code == "TOOMANYREQUESTS" and not err.transient
    assert "slow down" in str(err) and "the registry asked to wait 400 s" in str(err)


@pytest.mark.asyncio
async def test_retry_after_waits_are_counted_against_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _AsyncioWithFakeSleep()
    now = [1000.0]

    async def sleep(delay: float, *args) -> None:
        clock.sleeps.append(delay)
        now[0] += delay

    monkeypatch.setattr(clock, "sleep", sleep)
    monkeypatch.setattr(client_mod, "asyncio", clock)
    monkeypatch.setattr(client_mod, "time", SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, status=429, headers={"Retry-After": "120"}, repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s).get_manifest("team/app", "v1")  # 4 attempts, 300 s
        assert len(calls(m, "GET", MANIFEST_URL)) == 3
    assert clock.sleeps == [120.0, 120.0]
    assert "asked to wait 120 s, longer than the 60 s left" in str(caught.value)


@pytest.mark.asyncio
async def test_503_burst_is_retried_then_succeeds(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, status=503, body="upstream busy", content_type="text/plain")
        m.get(MANIFEST_URL, status=503, body=errors_body("UNAVAILABLE", "busy"))
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            manifest = await make_client(s).get_manifest("team/app", "v1")
        assert len(calls(m, "GET", MANIFEST_URL)) == 3
    assert [b.digest for b in manifest.blobs][-1] == DIGEST
    assert len(sleeps) == 2 and all(0 <= d <= POLICY.max_delay for d in sleeps)


@pytest.mark.asyncio
async def test_connection_drop_is_retried(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, exception=aiohttp.ServerDisconnectedError())
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            await make_client(s).get_manifest("team/app", "v1")
        assert len(calls(m, "GET", MANIFEST_URL)) == 2
    assert len(sleeps) == 1


@pytest.mark.asyncio
async def test_constant_503_gives_up_after_the_policy_attempts(sleeps: list[float]) -> None:
    n = 0

    def busy(url, **kwargs) -> CallbackResult:
        nonlocal n
        n += 1
        return CallbackResult(status=503, body=errors_body("UNAVAILABLE", f"overloaded #{n}"))

    policy = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, max_total=60)
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, callback=busy, repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s, policy=policy).get_manifest("team/app", "v1")
        assert len(calls(m, "GET", MANIFEST_URL)) == 3
    assert len(sleeps) == 2
    err = caught.value
    # The retries were spent here, so callers must not retry it again (no nested retry loops).
    assert err.status == 503 and not err.transient
    text = str(err)
    assert "overloaded #3" in text  # the last reason, not the first
    assert "127.0.0.1:5000" in text and "HTTP 503" in text and "UNAVAILABLE" in text


@pytest.mark.asyncio
async def test_403_denied_is_not_retried(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, status=403, body=errors_body("DENIED", "requested access to the resource is denied"), repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s).get_manifest("team/app", "v1")
        assert len(calls(m, "GET", MANIFEST_URL)) == 1
    assert sleeps == []
    assert caught.value.status == 403 and caught.value.code == "DENIED" and not caught.value.transient


@pytest.mark.asyncio
async def test_400_is_not_retried(sleeps: list[float]) -> None:
    from pydlit.registry.manifests import parse_manifest

    url = f"{BASE}/v2/team/app/manifests/v2"
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.put(url, status=400, body=errors_body("MANIFEST_INVALID", "manifest invalid"), repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s).put_manifest("team/app", "v2", parse_manifest(MANIFEST, DOCKER_MANIFEST))
        puts = calls(m, "PUT", url)
    assert len(puts) == 1
    assert sent_headers(puts[0])["Content-Type"] == DOCKER_MANIFEST
    assert puts[0].kwargs["data"] == MANIFEST  # the bytes as pulled
    assert sleeps == []
    text = str(caught.value)
    assert "push manifest team/app:v2" in text and "HTTP 400" in text and "MANIFEST_INVALID" in text


# distribution 2.8's answer to a manifest naming a blob whose link another writer is rewriting.
BLOB_UNKNOWN_400 = json.dumps({"errors": [
    {"code": "DIGEST_INVALID", "message": "provided digest did not match uploaded content"},
    {"code": "MANIFEST_BLOB_UNKNOWN", "message": "blob unknown to registry", "detail": "sha256:ca02"},
]})


ARTIFACT = json.dumps({"mediaType": OCI_ARTIFACT, "artifactType": "application/x.sig", "blobs": []}).encode()


@pytest.mark.asyncio
@pytest.mark.parametrize("data, media_type", [
    (MANIFEST, DOCKER_MANIFEST),
    (ARTIFACT, OCI_ARTIFACT),  # its own hint (a registry may not take the withdrawn type) is for other refusals
])
async def test_a_manifest_refused_for_an_unknown_blob_is_pushed_again_a_moment_later(
    sleeps: list[float], data: bytes, media_type: str,
) -> None:
    from pydlit.registry.manifests import parse_manifest

    url = f"{BASE}/v2/team/app/manifests/v2"
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.put(url, status=400, body=BLOB_UNKNOWN_400)
        m.put(url, status=201)
        async with aiohttp.ClientSession() as s:
            await make_client(s).put_manifest("team/app", "v2", parse_manifest(data, media_type))
        assert len(calls(m, "PUT", url)) == 2
    assert sleeps == [0.1]


@pytest.mark.asyncio
async def test_a_manifest_whose_blob_stays_unknown_fails_after_three_quick_tries_more(sleeps: list[float]) -> None:
    from pydlit.registry.manifests import parse_manifest

    url = f"{BASE}/v2/team/app/manifests/v2"
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.put(url, status=400, body=BLOB_UNKNOWN_400, repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s).put_manifest("team/app", "v2", parse_manifest(MANIFEST, DOCKER_MANIFEST))
        assert len(calls(m, "PUT", url)) == 4
    assert sleeps == [0.1, 0.3, 0.6]
    assert "HTTP 400: DIGEST_INVALID" in str(caught.value) and "MANIFEST_BLOB_UNKNOWN" in str(caught.value)


@pytest.mark.asyncio
async def test_a_manifest_pushed_by_digest_is_named_repo_at_digest(sleeps: list[float]) -> None:
    from pydlit.registry.manifests import parse_manifest

    manifest = parse_manifest(MANIFEST, DOCKER_MANIFEST)
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.put(f"{BASE}/v2/team/app/manifests/{manifest.digest}", status=400, body=errors_body("DIGEST_INVALID", "provided digest did not match"))
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError, match=f"push manifest team/app@{manifest.digest} failed: HTTP 400: DIGEST_INVALID"):
                await make_client(s).put_manifest("team/app", manifest.digest, manifest)


# -- auth ------------------------------------------------------------------------------------------

BEARER_CHALLENGE = f'Bearer realm="{REALM}",service="reg.local"'


class Tokens:
    def __init__(self, *values: str) -> None:
        self.values = list(values)
        self.calls: list[URL] = []

    def __call__(self, url, **kwargs) -> CallbackResult:
        self.calls.append(url)
        return CallbackResult(payload={"token": self.values[min(len(self.calls), len(self.values)) - 1], "expires_in": 300})


@pytest.mark.asyncio
async def test_401_invalid_token_refreshes_the_token_once_and_retries(sleeps: list[float]) -> None:
    tokens = Tokens("tok-1", "tok-2")
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, callback=tokens, repeat=True)
        m.get(MANIFEST_URL, status=401, body=errors_body("UNAUTHORIZED", "authentication required"),
              headers={"WWW-Authenticate": BEARER_CHALLENGE + ',scope="repository:team/app:pull",error="invalid_token"'})
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            await make_client(s).get_manifest("team/app", "v1")
        gets = calls(m, "GET", MANIFEST_URL)
    assert [sent_headers(c)["Authorization"] for c in gets] == ["Bearer tok-1", "Bearer tok-2"]
    assert len(tokens.calls) == 2
    assert tokens.calls[1].query.getall("scope") == ["repository:team/app:pull"]
    assert sleeps == []  # an auth renewal is not a backoff


@pytest.mark.asyncio
async def test_concurrent_requests_all_fall_back_when_the_static_token_lacks_a_scope(sleeps: list[float]) -> None:
    static_url = "http://127.0.0.1:5999/static"
    challenge = BEARER_CHALLENGE + ',scope="repository:team/app:pull,push",error="insufficient_scope"'
    tokens = Tokens("pushy")

    async def upload(url, **kwargs) -> CallbackResult:
        # The pre-configured token only grants pull; the challenge flow's token grants push.
        if sent_headers(SimpleNamespace(kwargs=kwargs)).get("Authorization") == "Bearer pushy":
            return CallbackResult(status=202, headers={"Location": f"{BASE}/v2/team/app/blobs/uploads/u1"})
        await asyncio.sleep(0.01)  # every request is in flight before the first 401 is handled
        return CallbackResult(status=401, headers={"WWW-Authenticate": challenge})

    with aioresponses() as m:
        m.get(static_url, payload={"token": "pull-only"}, repeat=True)
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, callback=tokens, repeat=True)
        m.post(f"{BASE}/v2/team/app/blobs/uploads/", callback=upload, repeat=True)
        async with aiohttp.ClientSession() as s:
            client = make_client(s, auth={"url": static_url, "basicauth": {"user": "alice", "password": PASSWORD}})
            # Four blobs start their uploads at once and all meet the same 401.
            locations = await asyncio.gather(*(client.start_upload("team/app") for _ in range(4)))
    assert locations == [f"{BASE}/v2/team/app/blobs/uploads/u1"] * 4


@pytest.mark.asyncio
async def test_a_static_token_refused_without_a_reason_is_fetched_again_not_dropped(sleeps: list[float]) -> None:
    # A token url with no basicauth: the registry's own flow would be anonymous. A 401 that does
    # not say why (some registries' answer to an expired token) gets a fresh token from the url.
    static_url = "http://127.0.0.1:5999/static"
    with aioresponses() as m:
        m.post(static_url, payload={"token": "old"})  # a POST: the url takes a JSON payload
        m.post(static_url, payload={"token": "new"})
        m.get(MANIFEST_URL, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE})
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            await make_client(s, auth={"url": static_url, "json": {"username": "alice", "password": PASSWORD}}).get_manifest("team/app", "v1")
        gets = calls(m, "GET", MANIFEST_URL)
    assert [sent_headers(c)["Authorization"] for c in gets] == ["Bearer old", "Bearer new"]


@pytest.mark.asyncio
async def test_a_challenge_naming_another_repository_does_not_widen_the_token(sleeps: list[float]) -> None:
    # insufficient_scope is followed once for more actions on the repository asked for (delete),
    # never for a resource the request did not name.
    tokens = Tokens("tok-1", "tok-2")
    elsewhere = BEARER_CHALLENGE + ',scope="repository:other/app:pull",error="insufficient_scope"'
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, callback=tokens, repeat=True)
        m.get(MANIFEST_URL, status=401, headers={"WWW-Authenticate": elsewhere}, repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}}).get_manifest("team/app", "v1")
    assert len(tokens.calls) == 1 and tokens.calls[0].query.getall("scope") == ["repository:team/app:pull"]
    assert caught.value.status == 401 and "insufficient_scope" in str(caught.value)


@pytest.mark.asyncio
async def test_401_invalid_token_forever_is_bounded_and_reported(sleeps: list[float]) -> None:
    tokens = Tokens("tok-SECRET-1", "tok-SECRET-2", "tok-SECRET-3", "tok-SECRET-4")
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, callback=tokens, repeat=True)
        m.get(MANIFEST_URL, status=401, repeat=True,
              headers={"WWW-Authenticate": BEARER_CHALLENGE + ',error="invalid_token"'})
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}}).get_manifest("team/app", "v1")
        gets = calls(m, "GET", MANIFEST_URL)
    assert 2 <= len(gets) <= 3
    assert caught.value.status == 401 and not caught.value.transient
    assert sleeps == []
    assert "tok-SECRET" not in str(caught.value) and PASSWORD not in str(caught.value)


@pytest.mark.asyncio
async def test_basic_credentials_refused_are_reported_without_the_password(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": 'Basic realm="Registry"'}, repeat=True)
        m.get(MANIFEST_URL, status=401, headers={"WWW-Authenticate": 'Basic realm="Registry"'}, repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}}).get_manifest("team/app", "v1")
        gets = calls(m, "GET", MANIFEST_URL)
    assert len(gets) == 1
    assert sent_headers(gets[0])["Authorization"] == "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    text = str(caught.value)
    assert "127.0.0.1:5000" in text and "read manifest team/app:v1" in text and "HTTP 401" in text
    assert PASSWORD not in text and base64.b64encode(f"alice:{PASSWORD}".encode()).decode() not in text


@pytest.mark.asyncio
async def test_error_text_names_host_step_status_and_code_but_no_secret(sleeps: list[float]) -> None:
    tokens = Tokens("tok-SECRET-123")
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, callback=tokens, repeat=True)
        m.get(MANIFEST_URL, status=403, body=errors_body("DENIED", "requested access to the resource is denied"))
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}}).get_manifest("team/app", "v1")
        gets = calls(m, "GET", MANIFEST_URL)
    assert sent_headers(gets[0])["Authorization"] == "Bearer tok-SECRET-123"
    err = caught.value
    text = str(err)
    for part in ("127.0.0.1:5000", "read manifest team/app:v1", "HTTP 403", "DENIED", "requested access to the resource is denied"):
        assert part in text, (part, text)
    for secret in (PASSWORD, "tok-SECRET-123", base64.b64encode(f"alice:{PASSWORD}".encode()).decode()):
        assert secret not in text and secret not in repr(err.args)


@pytest.mark.asyncio
async def test_token_server_refusal_is_a_401_registry_error_without_secret(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, status=401, repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}}).get_manifest("team/app", "v1")
        assert calls(m, "GET", MANIFEST_URL) == []  # no request went out without a token
    text = str(caught.value)
    assert caught.value.status == 401
    assert "127.0.0.1:5000" in text and "127.0.0.1:5999" in text and "refused the credentials" in text
    assert PASSWORD not in text


# -- redirects -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_blob_redirect_to_another_host_does_not_carry_authorization(sleeps: list[float]) -> None:
    blob_url = f"{BASE}/v2/team/app/blobs/{DIGEST}"
    storage = "http://127.0.0.2:9000/bucket/blob-a?X-Signature=abc%2Fdef"
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": 'Basic realm="Registry"'}, repeat=True)
        m.get(blob_url, status=307, headers={"Location": storage})
        m.get(storage, status=206, body=b"tail-bytes", content_type="application/octet-stream")
        async with aiohttp.ClientSession() as s:
            resp, offset = await make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}}).open_blob("team/app", DIGEST, offset=5)
            async with resp:
                assert await resp.read() == b"tail-bytes"
        [first] = calls(m, "GET", blob_url)
        [second] = [c for (meth, u), cs in m.requests.items() if u.host == "127.0.0.2" for c in cs]
    assert offset == 5
    assert sent_headers(first)["Authorization"].startswith("Basic ")
    assert "Authorization" not in sent_headers(second)
    assert sent_headers(second)["Range"] == "bytes=5-"  # the rest of the request is kept


@pytest.mark.asyncio
async def test_redirect_within_the_registry_keeps_authorization(sleeps: list[float]) -> None:
    blob_url = f"{BASE}/v2/team/app/blobs/{DIGEST}"
    moved = f"{BASE}/v2/team/app/blobs/elsewhere"
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": 'Basic realm="Registry"'}, repeat=True)
        m.get(blob_url, status=302, headers={"Location": "/v2/team/app/blobs/elsewhere"})
        m.get(moved, status=200, body=b"data", content_type="application/octet-stream")
        async with aiohttp.ClientSession() as s:
            resp, offset = await make_client(s, auth={"basicauth": {"user": "alice", "password": "pw"}}).open_blob("team/app", DIGEST)
            resp.release()
        [second] = calls(m, "GET", moved)
    assert offset == 0
    assert sent_headers(second)["Authorization"].startswith("Basic ")


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [401, 403])
async def test_a_refusal_by_the_host_a_redirect_led_to_is_an_error_that_names_it(sleeps: list[float], status: int) -> None:
    # Its challenge is not the registry's: following it would hand the registry's credentials to
    # whatever token realm that host names.
    blob_url = f"{BASE}/v2/team/app/blobs/{DIGEST}"
    storage = "http://127.0.0.2:9000/bucket/blob-a?X-Signature=abc"
    tokens = Tokens("foreign-token")
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": 'Basic realm="Registry"'}, repeat=True)
        m.get(blob_url, status=307, headers={"Location": storage}, repeat=True)
        m.get(storage, status=status, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, callback=tokens, repeat=True)
        async with aiohttp.ClientSession() as s:
            client = make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}})
            with pytest.raises(RegistryError) as caught:
                await client.open_blob("team/app", DIGEST)
            with pytest.raises(RegistryError):
                await client.read_blob("team/app", DIGEST, 10)
        at_storage = [c for (_, u), cs in m.requests.items() if u.host == "127.0.0.2" for c in cs]
    assert tokens.calls == []
    assert len(at_storage) == 2 and not any("Authorization" in sent_headers(c) for c in at_storage)
    err = caught.value
    assert err.status == status and not err.transient
    assert "answered by http://127.0.0.2:9000, not by the registry" in str(err)
    assert "X-Signature" not in str(err) and PASSWORD not in str(err)


@pytest.mark.asyncio
async def test_a_ping_redirected_to_another_host_does_not_learn_its_challenge(sleeps: list[float]) -> None:
    elsewhere = "http://127.0.0.2:9000/v2/"
    tokens = Tokens("foreign-token")
    with aioresponses() as m:
        m.get(PING, status=307, headers={"Location": elsewhere}, repeat=True)
        m.get(elsewhere, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, callback=tokens, repeat=True)
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            await make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}}).get_manifest("team/app", "v1")
        [get] = calls(m, "GET", MANIFEST_URL)
    assert tokens.calls == []
    assert "Authorization" not in sent_headers(get)


UPLOADS = f"{BASE}/v2/team/app/blobs/uploads/"


def authorizations(m: aioresponses, method: str) -> list[str | None]:
    """The Authorization each `method` request carried, in order."""
    return [sent_headers(c).get("Authorization") for (meth, _), cs in m.requests.items() if meth == method for c in cs]


@pytest.mark.asyncio
@pytest.mark.parametrize("challenge", ['Basic realm="Registry"', BEARER_CHALLENGE], ids=["basic", "bearer"])
@pytest.mark.parametrize(
    "elsewhere",
    ["http://127.0.0.2:5000", "http://127.0.0.1:5001", "https://127.0.0.1:5000"],
    ids=["host", "port", "scheme"],
)
async def test_an_upload_location_the_registry_names_on_another_origin_is_sent_its_credentials(
    sleeps: list[float], challenge: str, elsewhere: str
) -> None:
    # Quay, Harbor and distribution build the Location from a configured hostname, which need
    # not be the one the registry is reached by. A host named by one it named is trusted too.
    first, then = f"{elsewhere}/v2/team/app/blobs/uploads/u1?_state=x", "http://127.0.0.3:5000/v2/team/app/blobs/uploads/u1?_state=y"
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": challenge}, repeat=True)
        m.get(REALM_RE, callback=Tokens("tok-1"), repeat=True)
        m.post(UPLOADS, status=202, headers={"Location": first})
        m.patch(first, status=202, headers={"Location": then})
        m.put(re.compile(re.escape(then)), status=201)
        async with aiohttp.ClientSession() as s:
            client = make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}})
            location = await client.start_upload("team/app")
            location = await client.patch_chunk(location, "team/app", b"data", 0, 4)
            await client.finish_upload(location, "team/app", DIGEST)
        [post] = authorizations(m, "POST")
    assert post is not None and post.split()[0] in ("Basic", "Bearer")
    assert authorizations(m, "PATCH") == authorizations(m, "PUT") == [post]


@pytest.mark.asyncio
async def test_the_challenge_of_an_origin_the_registry_names_is_followed(sleeps: list[float]) -> None:
    elsewhere = "http://localhost:5000/v2/team/app/blobs/uploads/u1?_state=x"
    tokens = Tokens("tok-1", "tok-2")
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, callback=tokens, repeat=True)
        m.post(UPLOADS, status=202, headers={"Location": elsewhere})
        m.put(re.compile(re.escape(elsewhere)), status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE + ',error="invalid_token"'})
        m.put(re.compile(re.escape(elsewhere)), status=201)
        async with aiohttp.ClientSession() as s:
            await make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}}).upload_blob("team/app", DIGEST, b"data")
    assert authorizations(m, "PUT") == ["Bearer tok-1", "Bearer tok-2"]


@pytest.mark.asyncio
@pytest.mark.parametrize("challenge", ['Basic realm="Registry"', BEARER_CHALLENGE], ids=["basic", "bearer"])
async def test_an_upload_location_that_drops_tls_is_sent_no_credentials(sleeps: list[float], challenge: str) -> None:
    # They would cross the network in clear where the registry has TLS; nor is a host such a
    # Location's answer names trusted.
    base = "https://registry.test"
    plain, then = "http://registry.test/v2/team/app/blobs/uploads/u1?_state=x", "https://127.0.0.3/v2/team/app/blobs/uploads/u1?_state=y"
    tokens = Tokens("tok-1")
    with aioresponses() as m:
        m.get(f"{base}/v2/", status=401, headers={"WWW-Authenticate": challenge}, repeat=True)
        m.get(REALM_RE, callback=tokens, repeat=True)
        m.post(f"{base}/v2/team/app/blobs/uploads/", status=202, headers={"Location": plain})
        m.patch(plain, status=202, headers={"Location": then})
        m.put(re.compile(re.escape(then)), status=401, headers={"WWW-Authenticate": challenge}, repeat=True)
        async with aiohttp.ClientSession() as s:
            client = RegistryClient(s, base, auth={"basicauth": {"user": "alice", "password": PASSWORD}}, policy=POLICY)
            location = await client.start_upload("team/app")
            location = await client.patch_chunk(location, "team/app", b"data", 0, 4)
            with pytest.raises(RegistryError) as caught:
                await client.finish_upload(location, "team/app", DIGEST)
        [post] = authorizations(m, "POST")
    assert post is not None
    assert authorizations(m, "PATCH") == authorizations(m, "PUT") == [None]
    assert len(tokens.calls) == (1 if challenge == BEARER_CHALLENGE else 0)
    assert caught.value.status == 401 and "answered by https://127.0.0.3, not by the registry" in str(caught.value)


@pytest.mark.asyncio
async def test_a_checkpointed_session_on_an_origin_not_named_to_this_client_is_started_over(sleeps: list[float]) -> None:
    # An earlier process saw the registry name that host; this one has not, and sends it nothing.
    elsewhere = "http://localhost:5000/v2/team/app/blobs/uploads/u1?_state=x"
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, callback=Tokens("tok-1"), repeat=True)
        m.get(elsewhere, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE})
        async with aiohttp.ClientSession() as s:
            client = make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}})
            assert await client.upload_offset(elsewhere, "team/app", expected=4) is None
        [resume] = calls(m, "GET", elsewhere)
    assert "Authorization" not in sent_headers(resume)


@pytest.mark.asyncio
async def test_a_registry_reached_by_another_name_takes_a_chunked_upload_which_a_later_client_told_so_resumes(registries, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # distribution with http.host names itself so in every Location; it is reached here by IP.
    # A restart's client resumes only a checkpoint that says the registry named that host.
    registry = Registry(tmp_path / "named", "token", token_server=registries.token_server)
    registry.name_itself(f"http://localhost:{registry.port}")
    data = b"pydlit" * 500
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with registry:
        async with aiohttp.ClientSession() as s:
            def client() -> RegistryClient:
                return RegistryClient(s, registry.endpoint, auth=registry.request_auth, policy=RetryPolicy(attempts=1), push=True)

            first = client()
            location = await first.start_upload("team/app")
            assert URL(location).host == "localhost"
            location = await first.patch_chunk(location, "team/app", data[:1000], 0, 1000)
            assert await first.upload_offset(location, "team/app") == 1000
            assert first.named(location) and not first.named(registry.url + "/v2/team/app/blobs/uploads/x")
            assert await client().upload_offset(location, "team/app", expected=1000) is None  # sent no credentials

            later = client()
            later.trust_named(location)
            assert await later.upload_offset(location, "team/app", expected=1000) == 1000
            await later.finish_upload(location, "team/app", digest, data[1000:], len(data) - 1000)
            assert await later.head_blob("team/app", digest)


@pytest.mark.asyncio
@pytest.mark.parametrize("may_delete", [True, False], ids=["may-delete", "push-only"])
async def test_an_upload_session_is_given_back_with_the_delete_action_the_registry_asks_for(tmp_path, may_delete) -> None:  # type: ignore[no-untyped-def]
    # distribution's token auth wants `delete` on any DELETE, a session's too: a pull,push token
    # is refused with insufficient_scope, and the client asks once for what the challenge names.
    with TokenServer() as tokens:
        tokens.set_acl(ANY_USER, [("*", ["pull", "push", "delete"] if may_delete else ["pull", "push"])])
        with Registry(tmp_path / "reg", "token", token_server=tokens) as registry:
            async with aiohttp.ClientSession() as s:
                client = RegistryClient(s, registry.endpoint, auth=registry.request_auth, policy=RetryPolicy(attempts=1), push=True)
                location = await client.patch_chunk(await client.start_upload("team/app"), "team/app", b"x" * 1000, 0, 1000)
                asked = len(tokens.requests)
                refused = await client.cancel_upload(location, "team/app")
                scopes = [r.scopes for r in tokens.requests[asked:]]
                gone = await client.upload_offset(location, "team/app") is None
                await client.start_upload("team/app")  # the pull,push token still serves
                fetched = len(tokens.requests) - asked
    assert gone is may_delete and (refused is None) is may_delete
    assert len(scopes) == 1 and "repository:team/app:delete" in " ".join(scopes[0]), scopes
    assert fetched == 1
    if refused is not None:
        assert refused.status == 401 and "insufficient_scope" in str(refused)


@pytest.mark.asyncio
async def test_a_session_whose_chunk_was_cut_is_reported_kept_when_given_back(tmp_path, proxy_factory) -> None:  # type: ignore[no-untyped-def]
    # distribution can neither resume nor delete it (BLOB_UPLOAD_INVALID) and keeps its bytes
    # until its purge: its give-back says so, where a session already gone is no refusal.
    with Registry(tmp_path / "reg", "plain") as registry:
        cutting = proxy_factory(registry)
        async with aiohttp.ClientSession() as s:
            client = RegistryClient(s, cutting.endpoint, policy=RetryPolicy(attempts=1), push=True)
            cut = await client.start_upload("team/app")
            cutting.cut_upload_after(1000)
            with pytest.raises(RegistryError):
                await client.patch_chunk(cut, "team/app", b"x" * 4000, 0, 4000)
            # The registry writes the bytes it got in its own time: a DELETE before that still
            # finds the session whole.
            for _ in range(100):
                if registry.session_bytes("team/app"):
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(RegistryError) as refused:  # asked where it stands, on a restart
                await client.upload_offset(cut, "team/app", expected=0)
            assert refused.value.code == "BLOB_UPLOAD_INVALID"
            kept = await client.cancel_upload(cut, "team/app")
            whole = await client.start_upload("team/app")
            assert await client.cancel_upload(whole, "team/app") is None
            assert await client.cancel_upload(whole, "team/app") is None  # gone: nothing to say
    assert kept is not None and kept.code == "BLOB_UPLOAD_INVALID", kept
    assert registry.session_bytes("team/app") > 0


@pytest.mark.asyncio
async def test_a_mount_refused_to_these_credentials_is_not_asked_again_for_other_blobs(tmp_path, proxy_factory) -> None:  # type: ignore[no-untyped-def]
    # The repository known to hold the blobs is one these credentials may not read.
    with TokenServer() as tokens:
        tokens.set_acl(ANY_USER, [("bobns/*", ["pull", "push"])])
        with Registry(tmp_path / "reg", "token", token_server=tokens) as registry:
            counted = proxy_factory(registry)
            async with aiohttp.ClientSession() as s:
                client = RegistryClient(s, counted.endpoint, auth=registry.request_auth, policy=RetryPolicy(attempts=1), push=True)
                assert not await client.mount_blob("bobns/x", "sha256:" + "a" * 64, "dst/a")
                posts = counted.count("POST")
                assert not await client.mount_blob("bobns/x", "sha256:" + "b" * 64, "dst/a")
                assert counted.count("POST") == posts >= 1
                assert not await client.mount_blob("bobns/x", "sha256:" + "b" * 64, "bobns/y")  # another repository is asked
                assert counted.count("POST") == posts + 1


@pytest.mark.asyncio
async def test_a_named_host_that_would_take_the_credentials_in_clear_is_not_trusted_again() -> None:
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, "https://registry.test", auth={"basicauth": {"user": "alice", "password": PASSWORD}})
        client.trust_named("http://registry.test/v2/team/app/blobs/uploads/u1?_state=x")
        client.trust_named("https://storage.test/v2/team/app/blobs/uploads/u2?_state=y")
        assert not client.named("http://registry.test/v2/team/app/blobs/uploads/u1?_state=x")
        assert client.named("https://storage.test/v2/team/app/blobs/uploads/u2?_state=y")


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("https://registry.test/v2/x", "https://registry.test:443/v2/y?z=1", True),
        ("http://Registry.Test/", "http://registry.test:80/", True),
        ("http://registry.test/", "https://registry.test/", False),
        ("http://registry.test:5000/", "http://registry.test:5001/", False),
        ("http://registry.test/", "http://cdn.registry.test/", False),
    ],
)
def test_same_origin_is_scheme_host_and_port(a: str, b: str, same: bool) -> None:
    assert same_origin(URL(a), URL(b)) is same


# -- helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint, base, name",
    [
        ("http://127.0.0.1:5000/v2/", "http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("http://127.0.0.1:5000/v2", "http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("http://127.0.0.1:5000/", "http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("https://registry.example/mirror/v2/", "https://registry.example/mirror", "registry.example"),
        ("https://registry.example/mirror", "https://registry.example/mirror", "registry.example"),
        ("  https://Registry.Example:8443  ", "https://registry.example:8443", "registry.example:8443"),
    ],
)
def test_split_endpoint(endpoint: str, base: str, name: str) -> None:
    assert split_endpoint(endpoint) == (base, name)


def test_split_endpoint_brackets_an_ipv6_host_in_the_name() -> None:
    base, name = split_endpoint("http://[::1]:5000/v2/")
    assert base == "http://[::1]:5000"
    assert name == "[::1]:5000"


def test_with_query_keeps_a_signed_state_untouched() -> None:
    state = "AbC%2Bd%2Fe%3D%3D.x_y-z"
    location = f"http://127.0.0.1:5000/v2/team/app/blobs/uploads/5f1d?_state={state}"
    url = with_query(location, digest=DIGEST)
    assert str(url) == f"{location}&digest={DIGEST}"
    assert url.raw_query_string == f"_state={state}&digest={DIGEST}"
    assert url.query["digest"] == DIGEST


def test_with_query_on_a_location_without_query() -> None:
    url = with_query("http://127.0.0.1:5000/v2/team/app/blobs/uploads/5f1d", digest=DIGEST)
    assert str(url) == f"http://127.0.0.1:5000/v2/team/app/blobs/uploads/5f1d?digest={DIGEST}"


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    assert parse_retry_after(email.utils.formatdate(time.time() - 3600, usegmt=True)) == 0.0  # already past
    ahead = parse_retry_after(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert ahead is not None and 28.5 <= ahead <= 30.5


def test_retry_policy_obeys_retry_after_in_full_within_the_time_budget() -> None:
    policy = RetryPolicy(attempts=5, base_delay=1.0, max_delay=10.0, max_total=300.0)
    assert policy.delay(1, 4.0) == 4.0
    assert policy.delay(1, 99.0) == 99.0  # past max_delay: the registry said when
    assert policy.delay(1, 99.0, elapsed=250.0) == 50.0  # never past the budget
    assert policy.delay(1, 99.0, elapsed=400.0) == 0.0
    for attempt in range(1, 8):
        assert 0 <= policy.delay(attempt, None) <= min(10.0, 2**attempt)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "endpoint, image, repo",
    [
        ("https://registry-1.docker.io", "alpine", "library/alpine"),
        ("https://index.docker.io/v2/", "alpine", "library/alpine"),
        ("https://docker.io", "busybox", "library/busybox"),
        ("https://registry-1.docker.io", "bitnami/redis", "bitnami/redis"),
        ("http://127.0.0.1:5000", "alpine", "alpine"),
        ("https://ghcr.io", "alpine", "alpine"),
    ],
)
async def test_docker_hub_library_normalisation(endpoint: str, image: str, repo: str) -> None:
    async with aiohttp.ClientSession() as s:
        assert RegistryClient(s, endpoint).repository(image) == repo


@pytest.mark.asyncio
async def test_a_failing_token_server_is_retried_not_taken_for_refused_credentials(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, status=503)
        m.get(REALM_RE, payload={"token": "tok-1", "expires_in": 300})
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            manifest = await make_client(s).get_manifest("team/app", "v1")
    assert manifest.media_type == DOCKER_MANIFEST
    assert len(sleeps) == 1

    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": BEARER_CHALLENGE}, repeat=True)
        m.get(REALM_RE, exception=aiohttp.ClientConnectionError("refused"), repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s).get_manifest("team/app", "v1")
    assert "could not be reached" in str(caught.value)
    assert caught.value.status is None  # not an HTTP 401: nobody refused anything
    assert len(sleeps) == 1 + POLICY.attempts - 1


@pytest.mark.asyncio
async def test_a_token_server_that_refuses_connections_is_said_so_in_words(sleeps: list[float]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        async with aiohttp.ClientSession() as s:
            auth = {"url": f"http://127.0.0.1:{port}/token?secret=s3cr3t", "token_type": "Bearer"}
            with aioresponses(passthrough=[f"http://127.0.0.1:{port}"]) as m:
                m.get(PING, status=200, repeat=True)
                with pytest.raises(RegistryError) as caught:
                    await make_client(s, auth=auth).get_manifest("team/app", "v1")
    text = str(caught.value)
    assert f"the token url 127.0.0.1:{port} could not be reached: cannot connect: " in text, text
    assert "Connect call failed" in text and "s3cr3t" not in text, text


@pytest.mark.parametrize("exc, words", [
    (aiohttp.ServerTimeoutError("Timeout on reading data from socket"), "no byte arrived within the stall timeout (PYDLIT_STALL_TIMEOUT_S)"),
    (asyncio.TimeoutError(), "no byte arrived within the stall timeout (PYDLIT_STALL_TIMEOUT_S)"),
    (aiohttp.ServerDisconnectedError(), "the server closed the connection"),
    (aiohttp.ClientPayloadError("Response payload is not completed"), "the answer broke off"),
    (aiohttp.ClientOSError(104, "Connection reset by peer"), "the connection failed: Connection reset by peer"),
])
def test_a_failed_connection_is_told_in_words(exc: BaseException, words: str) -> None:
    assert bodies.connection_problem(exc) == words


@pytest.mark.asyncio
async def test_a_web_page_where_a_manifest_was_expected_asks_whether_the_endpoint_is_a_registry(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(MANIFEST_URL, status=200, body="<html><body>Welcome to nginx!</body></html>", content_type="text/html")
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError) as caught:
                await make_client(s).get_manifest("team/app", "v1")
    assert str(caught.value).endswith(f"the manifest is not valid JSON (the answer is text/html: is {BASE} a registry?)")


# -- whole blobs and the repository probe ----------------------------------------------------------

TAGS_URL = f"{BASE}/v2/team/app/tags/list?n=1"
BLOB_URL = f"{BASE}/v2/team/app/blobs/{DIGEST}"
UPLOADS_URL = f"{BASE}/v2/team/app/blobs/uploads/"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "body", "known"),
    [
        (404, errors_body("NAME_UNKNOWN", "repository name not known to registry"), False),
        (404, "not found", True),  # a 404 that does not say the name is unknown proves nothing
        (403, errors_body("DENIED", "no listing for you"), True),
        (500, "boom", True),
    ],
)
async def test_repository_known_is_false_only_on_name_unknown(sleeps: list[float], status: int, body: str, known: bool) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(TAGS_URL, status=status, body=body, repeat=True)
        async with aiohttp.ClientSession() as s:
            assert await make_client(s).repository_known("team/app") is known
        assert len(calls(m, "GET", TAGS_URL)) == 1  # a probe the caller can do without: never retried
    assert sleeps == []


@pytest.mark.asyncio
async def test_a_repository_seen_once_is_not_asked_about_again_by_any_client(sleeps: list[float]) -> None:
    shared = KnownRepositories()
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(TAGS_URL, payload={"name": "team/app", "tags": ["v1"]}, repeat=True)
        gone = f"{BASE}/v2/team/gone/tags/list?n=1"
        m.get(gone, status=404, body=errors_body("NAME_UNKNOWN", "repository name not known to registry"), repeat=True)
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                client = RegistryClient(s, f"{BASE}/v2/", policy=POLICY, repos=shared)
                assert await client.repository_known("team/app") is True
                assert await client.repository_known("team/gone") is False
        assert len(calls(m, "GET", TAGS_URL)) == 1
        assert len(calls(m, "GET", gone)) == 2  # an unknown one may be pushed any moment: asked each time


def test_known_repositories_are_bounded_and_forget_the_least_used_first() -> None:
    known = KnownRepositories(max_entries=2)
    known.add("a")
    known.add("b")
    assert "a" in known  # used: b is now the one to go
    known.add("c")
    assert "a" in known and "c" in known and "b" not in known


@pytest.mark.asyncio
async def test_a_tag_list_cut_off_mid_answer_still_says_known_but_is_not_remembered(aiohttp_server) -> None:
    async def tags(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b'{"name":"team/app","tags":[')
        assert request.transport is not None
        request.transport.close()  # the connection breaks before the promised 1000 bytes
        return resp

    base = await registry_answering(aiohttp_server, "/v2/team/app/tags/list", tags)
    known = KnownRepositories()
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, base, policy=POLICY, repos=known)
        assert await client.repository_known("team/app") is True
    assert f"{client.base} team/app" not in known


@pytest.mark.asyncio
async def test_a_long_tag_list_is_not_read_to_its_end(aiohttp_server) -> None:
    # distribution 2.8 ignores n=1 and lists every tag: a probe needs the status, not the list.
    endless = asyncio.Event()

    async def tags(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"name":"team/app","tags":["' + b"t" * 200_000)
        await endless.wait()  # the rest never comes
        return resp

    base = await registry_answering(aiohttp_server, "/v2/team/app/tags/list", tags)
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, base, policy=POLICY)
        assert await asyncio.wait_for(client.repository_known("team/app"), 10) is True
    endless.set()


@pytest.mark.asyncio
async def test_read_blob_cut_short_is_read_again(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(BLOB_URL, status=200, body=b"0123")
        m.get(BLOB_URL, status=200, body=b"0123456789")
        async with aiohttp.ClientSession() as s:
            assert await make_client(s).read_blob("team/app", DIGEST, 10) == b"0123456789"
        assert len(calls(m, "GET", BLOB_URL)) == 2
    assert len(sleeps) == 1


@pytest.mark.asyncio
async def test_read_blob_longer_than_its_descriptor_fails_without_retry(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(BLOB_URL, status=200, body=b"0123456789-and-more", repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError, match="larger than its descriptor"):
                await make_client(s).read_blob("team/app", DIGEST, 10)
        assert len(calls(m, "GET", BLOB_URL)) == 1
    assert sleeps == []


@pytest.mark.asyncio
async def test_upload_blob_whose_session_is_lost_starts_another(sleeps: list[float]) -> None:
    put_lost = re.compile(r"^http://127\.0\.0\.1:5000/v2/team/app/blobs/uploads/lost\?.*digest=")
    put_ok = re.compile(r"^http://127\.0\.0\.1:5000/v2/team/app/blobs/uploads/fresh\?.*digest=")
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.post(UPLOADS_URL, status=202, headers={"Location": "/v2/team/app/blobs/uploads/lost?_state=a"})
        m.post(UPLOADS_URL, status=202, headers={"Location": "/v2/team/app/blobs/uploads/fresh?_state=b"})
        m.put(put_lost, status=404, body=errors_body("BLOB_UPLOAD_UNKNOWN", "blob upload unknown"))
        m.put(put_ok, status=201)
        async with aiohttp.ClientSession() as s:
            await make_client(s).upload_blob("team/app", DIGEST, b"data")
        puts = [(u, c) for (meth, u), cs in m.requests.items() if meth == "PUT" for c in cs]
    assert [u.path.rsplit("/", 1)[1] for u, _ in puts] == ["lost", "fresh"]
    assert all(c.kwargs["data"] == b"data" and u.query["digest"] == DIGEST for u, c in puts)
    assert len(sleeps) == 1


@pytest.mark.asyncio
async def test_head_manifest_without_a_digest_header_reads_the_manifest_once(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.head(MANIFEST_URL, status=200, content_type=DOCKER_MANIFEST)
        m.get(MANIFEST_URL, status=503, body=errors_body("UNAVAILABLE", "busy"))
        m.get(MANIFEST_URL, status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            digest = await make_client(s).head_manifest("team/app", "v1")
        assert len(calls(m, "HEAD", MANIFEST_URL)) == 1  # one HEAD, then the GET and its own retry
        assert len(calls(m, "GET", MANIFEST_URL)) == 2
    assert digest == "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


@pytest.mark.asyncio
@pytest.mark.parametrize("algo", ["sha256", "sha512"])
async def test_a_manifest_asked_for_by_digest_must_hash_to_it(sleeps: list[float], algo: str) -> None:
    # A registry serving other bytes under a digest (a corrupt store, a cache gone wrong) is
    # something no test registry can be made to do.
    right = f"{algo}:" + hashlib.new(algo, MANIFEST).hexdigest()
    wrong = f"{algo}:" + hashlib.new(algo, MANIFEST + b" ").hexdigest()
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        for ref in (right, wrong):
            m.get(f"{BASE}/v2/team/app/manifests/{ref}", status=200, body=MANIFEST, content_type=DOCKER_MANIFEST)
        async with aiohttp.ClientSession() as s:
            client = make_client(s)
            assert (await client.get_manifest("team/app", right)).data == MANIFEST
            with pytest.raises(RegistryError, match=f"the manifest's bytes do not hash to {wrong}"):
                await client.get_manifest("team/app", wrong)


@pytest.mark.parametrize("body, code, message", [
    # distribution 2.8's answer to a manifest whose foreign layer's URL it does not allow
    (b'{"errors":[{"code":"UNKNOWN","message":"unknown error"},{"code":"UNKNOWN","message":"unknown error","detail":{}},'
     b'{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:ca02"}]}',
     "MANIFEST_BLOB_UNKNOWN", "blob unknown to registry (sha256:ca02); UNKNOWN: unknown error"),
    (b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}',
     "DENIED", "requested access to the resource is denied"),
    (b'{"errors":[{"code":"UNKNOWN","message":"unknown error"}]}', "UNKNOWN", "unknown error"),
    (b"<html>502 Bad Gateway</html>", None, "<html>502 Bad Gateway</html>"),
    (b'{"errors":[]}', None, '{"errors":[]}'),
])
def test_an_error_body_tells_every_error_it_lists_the_most_telling_first(body: bytes, code: str | None, message: str) -> None:
    assert parse_error_body(body) == (code, message)


# -- the referrers API: answers the test registries cannot give ---------------------------------------

REFERRERS_URL = f"{BASE}/v2/team/app/referrers/{DIGEST}"


def _index_of(*digests: str) -> dict:
    return {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": 9} for d in digests]}


@pytest.mark.asyncio
@pytest.mark.parametrize("elsewhere", ["http://127.0.0.2:9000/v2/team/app/referrers/x?page=2", "/v2/other/app/referrers/x?page=2"])
async def test_a_referrers_page_elsewhere_is_not_asked_with_the_registrys_credentials(sleeps: list[float], elsewhere: str) -> None:
    with aioresponses() as m:
        m.get(PING, status=401, headers={"WWW-Authenticate": 'Basic realm="Registry"'}, repeat=True)
        m.get(REFERRERS_URL, payload=_index_of("sha256:" + "b" * 64), headers={"Link": f'<{elsewhere}>; rel="next"'})
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError, match="the next page is elsewhere"):
                await make_client(s, auth={"basicauth": {"user": "alice", "password": PASSWORD}}).list_referrers("team/app", DIGEST, 10)
        assert len(m.requests) == 2  # the ping and the first page


@pytest.mark.asyncio
async def test_a_referrers_listing_that_breaks_off_is_an_error_not_a_registry_without_the_api(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(REFERRERS_URL, payload=_index_of("sha256:" + "b" * 64), headers={"Link": f'<{REFERRERS_URL}?page=2>; rel="next"'})
        m.get(f"{REFERRERS_URL}?page=2", status=404)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError, match="the next page of the listing is gone"):
                await make_client(s).list_referrers("team/app", DIGEST, 10)


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [b"<html>sign in</html>", b'{"manifests": [{"digest": "../../x", "size": 1}]}'])
async def test_a_referrers_listing_that_is_no_index_is_refused(sleeps: list[float], body: bytes) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(REFERRERS_URL, body=body, content_type="application/vnd.oci.image.index.v1+json")
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError, match="the referrers listing is not a valid index"):
                await make_client(s).list_referrers("team/app", DIGEST, 10)


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [404, 405, 501])
async def test_a_registry_that_says_it_has_no_referrers_api_is_asked_for_the_tag_schema(sleeps: list[float], status: int) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(REFERRERS_URL, status=status)
        async with aiohttp.ClientSession() as s:
            assert await make_client(s).list_referrers("team/app", DIGEST, 10) is None


@pytest.mark.asyncio
async def test_referrers_pages_that_loop_are_refused(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(REFERRERS_URL, payload=_index_of("sha256:" + "b" * 64), headers={"Link": f'<{REFERRERS_URL}?p=2>; rel="next"'})
        m.get(f"{REFERRERS_URL}?p=2", payload=_index_of("sha256:" + "c" * 64), headers={"Link": f'<{REFERRERS_URL}>; rel="next"'})
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError, match="lead back to a page already read"):
                await make_client(s).list_referrers("team/app", DIGEST, 10)


@pytest.mark.asyncio
async def test_referrers_past_the_limit_stop_the_listing(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(REFERRERS_URL, payload=_index_of(*(f"sha256:{i:064x}" for i in range(3))), headers={"Link": f'<{REFERRERS_URL}?p=2>; rel="next"'})
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError, match="more than 2 referrers; copy the image without them"):
                await make_client(s).list_referrers("team/app", DIGEST, 2)
        assert not calls(m, "GET", f"{REFERRERS_URL}?p=2")


@pytest.mark.asyncio
async def test_a_manifest_that_arrives_in_pieces_is_read_whole(aiohttp_server) -> None:
    # Over TLS a body comes one 16 KiB record at a time; a read that takes the first piece for
    # the whole manifest would fail its digest.
    big = json.loads(MANIFEST)
    big["annotations"] = {f"note.{i}": "x" * 100 for i in range(1_000)}
    data = json.dumps(big).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def manifest(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": DOCKER_MANIFEST, "Content-Length": str(len(data))})
        await resp.prepare(request)
        for at in range(0, len(data), 16 * 1024):
            await resp.write(data[at:at + 16 * 1024])
            await asyncio.sleep(0.005)
        return resp

    base = await registry_answering(aiohttp_server, f"/v2/team/app/manifests/{digest}", manifest)
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, base, policy=POLICY)
        got = await client.get_manifest("team/app", digest)
    assert got.data == data and len(data) > 100_000


ALL_TAGS_URL = f"{BASE}/v2/team/app/tags/list"


@pytest.mark.asyncio
async def test_tags_are_listed_page_by_page(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(f"{ALL_TAGS_URL}?n=1000", payload={"name": "team/app", "tags": ["a", "b"]},
              headers={"Link": '</v2/team/app/tags/list?last=b&n=1000>; rel="next"'})
        m.get(f"{ALL_TAGS_URL}?last=b&n=1000", payload={"name": "team/app", "tags": ["c"]})
        m.get(f"{BASE}/v2/team/none/tags/list?n=1000", status=404, body=errors_body("NAME_UNKNOWN", "repository name not known"))
        m.get(f"{BASE}/v2/team/odd/tags/list?n=1000", payload={"tags": "not a list"})
        async with aiohttp.ClientSession() as s:
            client = make_client(s)
            assert await client.list_tags("team/app", 10) == ["a", "b", "c"]
            assert await client.list_tags("team/none", 10) == []
            with pytest.raises(RegistryError, match="not a list of tags"):
                await client.list_tags("team/odd", 10)


@pytest.mark.asyncio
async def test_tags_past_the_limit_stop_the_listing(sleeps: list[float]) -> None:
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(f"{ALL_TAGS_URL}?n=1000", payload={"tags": ["a", "b", "c"]}, headers={"Link": '</v2/team/app/tags/list?last=c>; rel="next"'})
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError, match="more than 2 tags"):
                await make_client(s).list_tags("team/app", 2)


@pytest.mark.asyncio
async def test_a_listing_that_never_ends_is_cut_off(sleeps: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "MAX_PAGES", 3)

    def page(url: URL, **_: object) -> CallbackResult:
        n = int(url.query.get("p", "0")) + 1
        return CallbackResult(payload={"tags": []}, headers={"Link": f'</v2/team/app/tags/list?p={n}>; rel="next"'})

    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(re.compile(r"^http://127\.0\.0\.1:5000/v2/team/app/tags/list"), callback=page, repeat=True)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(RegistryError, match="goes on past 3 pages"):
                await make_client(s).list_tags("team/app", 10)


# -- uploads: what registries other than distribution answer ------------------------------------------


@pytest.mark.asyncio
async def test_a_chunk_answered_with_201_as_ecr_does_is_accepted(sleeps: list[float]) -> None:
    session = f"{UPLOADS_URL}u1?_state=a"
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.patch(session, status=201, headers={"Location": "/v2/team/app/blobs/uploads/u1?_state=b", "Range": "0-9"})
        async with aiohttp.ClientSession() as s:
            location = await make_client(s).patch_chunk(session, "team/app", b"0123456789", 0, 10)
    assert location == f"{UPLOADS_URL}u1?_state=b"


MIB_16 = 16 * 1024 * 1024


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "expected", "held"),
    [
        ("0-0", None, 0),  # distribution 2.8, an empty session
        ("0--1", None, 0),  # zot, an empty session
        (None, None, 0),
        (f"0-{MIB_16 - 1}", MIB_16, MIB_16),
        (f"bytes=0-{MIB_16}", MIB_16, MIB_16),  # Quay: one past what it holds
        (f"bytes=0-{MIB_16 - 1}", MIB_16, MIB_16),
        (f"0-{MIB_16}", None, MIB_16 + 1),  # nothing to hold it against: the registry's word
        (f"0-{MIB_16 + 1}", MIB_16, MIB_16 + 2),  # not Quay's one byte: the registry's word
    ],
)
async def test_upload_offset_reads_what_registries_answer(sleeps: list[float], answer: str | None, expected: int | None, held: int) -> None:
    session = f"{UPLOADS_URL}u1?_state=a"
    with aioresponses() as m:
        m.get(PING, status=200, repeat=True)
        m.get(session, status=204, headers={"Range": answer} if answer is not None else {})
        async with aiohttp.ClientSession() as s:
            assert await make_client(s).upload_offset(session, "team/app", expected) == held


# -- bodies read whole: broken, trickling, compressed ---------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["reset", "stall"])
@pytest.mark.parametrize(
    ("path", "content_type", "body", "read"),
    [
        ("/v2/team/app/manifests/v1", DOCKER_MANIFEST, MANIFEST, lambda c: c.get_manifest("team/app", "v1")),
        ("/v2/team/app/tags/list", "application/json", b'{"tags": ["v1", "v2"]}', lambda c: c.list_tags("team/app", 10)),
        (f"/v2/team/app/referrers/{DIGEST}", "application/vnd.oci.image.index.v1+json",
         json.dumps(_index_of("sha256:" + "b" * 64)).encode(), lambda c: c.list_referrers("team/app", DIGEST, 10)),
    ],
    ids=["manifest", "tags", "referrers"],
)
async def test_an_answer_broken_off_mid_body_is_asked_again(aiohttp_server, how: str, path: str, content_type: str, body: bytes, read) -> None:  # type: ignore[no-untyped-def]
    asked = 0

    async def answer(request: web.Request) -> web.StreamResponse:
        nonlocal asked
        asked += 1
        resp = web.StreamResponse(headers={"Content-Type": content_type, "Content-Length": str(len(body))})
        await resp.prepare(request)
        if asked > 1:
            await resp.write(body)
            return resp
        await resp.write(body[:10])
        if how == "stall":
            await asyncio.sleep(1)  # past the client's stall timeout
        assert request.transport is not None
        request.transport.close()
        return resp

    base = await registry_answering(aiohttp_server, path, answer)
    async with aiohttp.ClientSession() as s:
        assert await read(RegistryClient(s, base, policy=POLICY, stall_timeout=0.3))
    assert asked == 2


@pytest.mark.asyncio
async def test_an_answer_that_trickles_is_cut_off_by_the_total_timeout(aiohttp_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodies, "ANSWER_TIMEOUT_S", 1.0)
    done = asyncio.Event()

    async def manifest(request: web.Request) -> web.StreamResponse:
        return await trickle(request, DOCKER_MANIFEST, done)

    base = await registry_answering(aiohttp_server, "/v2/team/app/manifests/v1", manifest)
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, base, policy=RetryPolicy(attempts=1), stall_timeout=5.0)
        started = time.monotonic()
        with pytest.raises(RegistryError) as caught:
            await asyncio.wait_for(client.get_manifest("team/app", "v1"), 10)
    done.set()
    assert time.monotonic() - started < 4
    assert "read manifest team/app:v1" in str(caught.value) and "the answer took longer than 1 s" in str(caught.value)


@pytest.mark.asyncio
async def test_a_request_waiting_for_a_pooled_connection_is_not_cut_off_by_the_answer_timeout(aiohttp_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # Long blob streams may hold every connection to a registry: what waits behind them was
    # never sent, and a bound on its answer must not run out meanwhile.
    monkeypatch.setattr(bodies, "ANSWER_TIMEOUT_S", 0.3)
    done = asyncio.Event()

    async def ping(_: web.Request) -> web.Response:
        return web.Response()

    async def manifest(_: web.Request) -> web.Response:
        return web.Response(body=MANIFEST, content_type=DOCKER_MANIFEST)

    app = web.Application()
    app.router.add_get("/v2/", ping)
    app.router.add_get(f"/v2/team/app/blobs/{DIGEST}", functools.partial(trickle, content_type="application/octet-stream", until=done))
    app.router.add_get("/v2/team/app/manifests/v1", manifest)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=1)) as s:
        client = RegistryClient(s, str(server.make_url("/v2/")), policy=RetryPolicy(attempts=1), stall_timeout=5.0)
        blob, _ = await client.open_blob("team/app", DIGEST)
        waiting = asyncio.create_task(client.get_manifest("team/app", "v1"))
        await asyncio.sleep(1.0)
        assert not waiting.done()
        blob.release()
        done.set()
        assert (await asyncio.wait_for(waiting, 5)).data == MANIFEST


@pytest.mark.asyncio
async def test_a_blob_stream_is_not_bound_by_the_total_timeout(aiohttp_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodies, "ANSWER_TIMEOUT_S", 0.3)

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Content-Length": "10"})
        await resp.prepare(request)
        for byte in b"0123456789":
            await resp.write(bytes([byte]))
            await asyncio.sleep(0.1)
        return resp

    base = await registry_answering(aiohttp_server, f"/v2/team/app/blobs/{DIGEST}", blob)
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, base, policy=RetryPolicy(attempts=1), stall_timeout=5.0)
        resp, _ = await client.open_blob("team/app", DIGEST)
        async with resp:
            assert await resp.read() == b"0123456789"
        assert await client.read_blob("team/app", DIGEST, 10) == b"0123456789"


@pytest.mark.asyncio
async def test_no_answer_is_asked_for_compressed(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    # The service's session does not decompress: a proxy that gzips JSON for whoever accepts it
    # would leave the token, the listing and the manifest unreadable.
    seen: list[tuple[str, str]] = []

    def answering(body: bytes, content_type: str):  # type: ignore[no-untyped-def]
        async def answer(request: web.Request) -> web.Response:
            accepted = request.headers.get("Accept-Encoding", "")
            seen.append((request.path, accepted))
            if "gzip" in accepted:  # as nginx with `gzip_types application/json` does
                return web.Response(body=gzip.compress(body), content_type=content_type, headers={"Content-Encoding": "gzip"})
            return web.Response(body=body, content_type=content_type)

        return answer

    async def ping(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Accept-Encoding", "")))
        realm = str(request.url.with_path("/token").with_query(None))
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="reg"'})

    app = web.Application()
    app.router.add_get("/v2/", ping)
    app.router.add_get("/token", answering(b'{"token": "t", "expires_in": 300}', "application/json"))
    app.router.add_get("/v2/team/app/tags/list", answering(b'{"tags": ["v1"]}', "application/json"))
    app.router.add_get("/v2/team/app/manifests/v1", answering(MANIFEST, DOCKER_MANIFEST))
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        client = RegistryClient(s, str(server.make_url("/v2/")), policy=RetryPolicy(attempts=1))
        assert await client.list_tags("team/app", 10) == ["v1"]
        assert (await client.get_manifest("team/app", "v1")).data == MANIFEST
    assert {path for path, _ in seen} == {"/v2/", "/token", "/v2/team/app/tags/list", "/v2/team/app/manifests/v1"}
    assert {accepted for _, accepted in seen} == {"identity"}


@pytest.mark.asyncio
@pytest.mark.parametrize("wrong", ["http to an https registry", "https to an http one"])
async def test_an_endpoint_with_the_wrong_scheme_says_which_to_give_at_once(registries, wrong) -> None:  # type: ignore[no-untyped-def]
    # A HEAD's answer read a plain-text 400 after its head, which aiohttp cannot parse: the
    # target failed "ClientResponseError" after a retry budget's worth of tries.
    registry = registries.tls if wrong.startswith("http to") else registries.source
    scheme = "http" if wrong.startswith("http to") else "https"
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, f"{scheme}://{registry.host}", auth=registry.request_auth, push=True)
        for call in (client.head_manifest("team/app", "v1"), client.get_manifest("team/app", "v1"), client.start_upload("team/app")):
            started = time.monotonic()
            with pytest.raises(RegistryError) as caught:
                await call
            assert time.monotonic() - started < 2  # not retried
            said = "speaks HTTPS at this address: give its endpoint as https://" if scheme == "http" else \
                "does not speak TLS at this address: give its endpoint as http://"
            assert str(caught.value).endswith(said), caught.value
