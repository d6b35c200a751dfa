"""Integration tests of the copy itself: jobs go through the real service's HTTP API, and every
target is read back from the real docker-registry processes (manifests and blobs byte for byte).

Each test uses its own repositories and, where bytes are counted, its own layer seed: the
session registries and the session service are shared by every test.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest
from support import mediatypes as mt
from support.images import (
    assert_same_tree,
    list_tags,
    manifest_digest,
    push_image,
    read_back,
    sha256_digest,
    shared_layer_images,
)
from support.regclient import RegistryHTTP
from support.registry import free_port
from support.service import ServiceProcess, job_body, job_state

SMALL_LAYERS = (2_048, 40_001, 120_007)
JOB_TIMEOUT = 60.0


def _seed() -> int:
    """A fresh layer seed: no blob of this test exists anywhere yet (no HEAD hit, no mount)."""
    return random.getrandbits(48)


def _run(service: ServiceProcess, body: dict[str, Any], timeout: float = JOB_TIMEOUT) -> dict:
    job_id = service.submit(body)
    return service.wait(job_id, timeout=timeout)


def _dump(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=1)


def _assert_all_finished(status: dict[str, Any], blob_bytes: int) -> None:
    """Job and every target FINISHED, every target's progress complete at the image's size."""
    assert job_state(status) == "FINISHED", _dump(status)
    assert status["error"] is None, _dump(status)
    endpoints = [t["endpoint"] for t in status["targets"]]
    assert sorted(status["finished_endpoints"]) == sorted(endpoints), _dump(status)
    assert status["skipped_clusters"] == [], _dump(status)
    for t in status["targets"]:
        assert t["state"] == "FINISHED" and t["error"] is None, _dump(status)
        assert t["bytes_done"] == t["bytes_total"] == blob_bytes, _dump(status)
    assert status["bytes_total"] == status["bytes_done"] == blob_bytes * len(endpoints), _dump(
        status
    )


def _token_requests_for(
    token_server, repo: str, path: str | None = None, since: int = 0
) -> list:
    """Token requests naming `repo`, from request number `since` on (the fixtures ask too)."""
    return [
        r for r in token_server.requests[since:]
        if (path is None or r.path == path)
        and any(s.startswith(f"repository:{repo}:") for s in r.scopes)
    ]


def _granted_actions(request, repo: str) -> set[str]:
    return {a for g in request.granted if g["name"] == repo for a in g["actions"]}


# -- every manifest type --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, media_type, n_manifests",
    [
        ("schema2", mt.DOCKER_MANIFEST, 1),
        ("docker_list", mt.DOCKER_LIST, 4),
        ("oci", mt.OCI_MANIFEST, 1),
        ("oci_index", mt.OCI_INDEX, 4),
    ],
)
def test_copies_every_manifest_type_to_two_targets(
    service, registries, repo_name, kind, media_type, n_manifests
):
    image = push_image(registries.source, repo_name, "v1", kind, SMALL_LAYERS, seed=_seed(),
                       platforms=3)
    assert image.media_type == media_type and len(image.manifests) == n_manifests

    status = _run(service, job_body(registries.source, repo_name, "v1", list(registries.targets)))

    _assert_all_finished(status, image.total_bytes)
    assert status["finished_endpoints"] == [registries.target_a.endpoint,
                                            registries.target_b.endpoint]
    for target in registries.targets:
        tree = read_back(target, repo_name, "v1")
        assert_same_tree(image, tree)
        assert tree.media_type == media_type


def test_an_index_of_indexes_is_pushed_from_the_bottom_up(service, registries, repo_name):
    # outer -> [inner index, one of inner's platforms]: that platform is named at two depths.
    inner = push_image(registries.source, repo_name, "inner", "oci_index", SMALL_LAYERS, seed=_seed(), platforms=3)
    platform = json.loads(inner.manifest_bytes)["manifests"][0]
    outer = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_INDEX, "digest": inner.digest, "size": len(inner.manifest_bytes)}, platform,
    ]}).encode()
    RegistryHTTP.for_endpoint(registries.source).put_manifest(repo_name, "v1", mt.OCI_INDEX, outer)

    status = _run(service, job_body(registries.source, repo_name, "v1", list(registries.targets)))

    _assert_all_finished(status, inner.total_bytes)
    for target in registries.targets:
        tree = read_back(target, repo_name, "v1")
        assert tree.manifests[tree.digest] == outer
        assert inner.digest in tree.manifests and len(tree.manifests) == 1 + 1 + 3


def test_ref_given_as_digest_copies_the_tree_by_digest(service, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "oci_index", SMALL_LAYERS,
                       seed=_seed(), platforms=3)

    status = _run(service, job_body(registries.source, repo_name, image.digest,
                                    [registries.target_a]))

    _assert_all_finished(status, image.total_bytes)
    assert status["targets"][0]["ref"] == image.digest
    tree = read_back(registries.target_a, repo_name, image.digest)
    assert_same_tree(image, tree)
    # Asked by digest, nothing is tagged at the target.
    assert list_tags(registries.target_a, repo_name) == []


def test_a_target_digest_that_is_not_the_images_fails_before_any_blob_goes(service, registries, repo_name, proxy_factory):
    image = push_image(registries.source, repo_name, "v1", "oci", SMALL_LAYERS, seed=_seed())
    target = proxy_factory(registries.target_a)
    wrong = "sha256:" + "0" * 64

    status = _run(service, job_body(registries.source, repo_name, "v1", [(target, {"ref": wrong})]))

    assert job_state(status) == "FAILED", _dump(status)
    error = status["targets"][0]["error"]
    assert f"push manifest {repo_name}@{wrong} failed: the source image is {image.digest}" in error, error
    assert target.count("POST", "upload_post") == target.count("PUT") == 0, target.requests


def test_target_image_and_ref_copy_under_another_name(service, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())
    other = f"{repo_name}/mirror"

    status = _run(service, job_body(registries.source, repo_name, "v1",
                                    [(registries.target_a, {"image": other, "ref": "renamed"})]))

    _assert_all_finished(status, image.total_bytes)
    assert (status["targets"][0]["image"], status["targets"][0]["ref"]) == (other, "renamed")
    assert_same_tree(image, read_back(registries.target_a, other, "renamed"))
    assert manifest_digest(registries.target_a, other, "v1") is None
    assert manifest_digest(registries.target_a, repo_name, "v1") is None
    assert manifest_digest(registries.target_a, repo_name, "renamed") is None


def test_foreign_layer_is_not_copied(service, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "foreign", SMALL_LAYERS, seed=_seed())
    (foreign_digest,) = image.foreign

    status = _run(service, job_body(registries.source, repo_name, "v1", [registries.target_a]))

    # The progress counts only the blobs that are copied.
    _assert_all_finished(status, image.total_bytes)
    tree = read_back(registries.target_a, repo_name, "v1")
    assert_same_tree(image, tree)
    assert tree.foreign == image.foreign
    assert RegistryHTTP.for_endpoint(registries.target_a).blob_size(repo_name,
                                                                    foreign_digest) is None


def test_a_layer_naming_urls_is_copied_when_the_source_holds_it(service, registries, repo_name):
    # `urls` only says where else a layer may be fetched: a mirror must still hold what the
    # source holds, unless the layer is non-distributable (not uploaded, as the image spec asks).
    src = RegistryHTTP.for_endpoint(registries.source)
    held, absent, nondistributable, config = (secrets.token_bytes(n) for n in (700, 900, 800, 300))
    for blob in (held, nondistributable, config):
        src.upload_monolithic(repo_name, blob, sha256_digest(blob))

    def layer(media_type: str, data: bytes) -> dict:
        digest = sha256_digest(data)
        return {"mediaType": media_type, "size": len(data), "digest": digest,
                "urls": [f"https://blobs.example.com/{digest}"]}

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "size": len(config), "digest": sha256_digest(config)},
        "layers": [layer(mt.OCI_LAYER, held), layer(mt.OCI_LAYER, absent),
                   layer(mt.OCI_NONDISTRIBUTABLE_LAYER, nondistributable)],
    }).encode()
    src.put_manifest(repo_name, "v1", mt.OCI_MANIFEST, manifest)

    status = _run(service, job_body(registries.source, repo_name, "v1", [registries.target_a]))

    _assert_all_finished(status, len(held) + len(config))
    target = RegistryHTTP.for_endpoint(registries.target_a)
    assert target.get_manifest(repo_name, "v1")[1] == manifest
    sizes = {name: target.blob_size(repo_name, sha256_digest(b))
             for name, b in (("held", held), ("absent", absent), ("nondistributable", nondistributable))}
    assert sizes == {"held": len(held), "absent": None, "nondistributable": None}
    # Again, with the tag already there: the progress still counts only what is copied.
    again = _run(service, job_body(registries.source, repo_name, "v1", [registries.target_a]))
    _assert_all_finished(again, len(held) + len(config))


def test_a_target_refusing_a_foreign_layers_urls_says_what_to_allow(service_factory, registries, registry_factory, repo_name):
    # distribution's own default: no allow list, so a layer's URLs are refused with a 500 whose
    # first errors say only UNKNOWN.
    target = registry_factory(allow_urls=False)
    image = push_image(registries.source, repo_name, "v1", "foreign", SMALL_LAYERS, seed=_seed())
    (foreign_digest,) = image.foreign
    svc = service_factory(env={"PYDLIT_RETRY_ATTEMPTS": "2", "PYDLIT_RETRY_MAX_DELAY": "0.2"})

    status = _run(svc, job_body(registries.source, repo_name, "v1", [target]))

    assert job_state(status) == "FAILED", _dump(status)
    error = status["targets"][0]["error"]
    assert f"push manifest {repo_name}:v1 failed: HTTP 500: MANIFEST_BLOB_UNKNOWN" in error, error
    assert foreign_digest in error and "validation.manifests.urls.allow" in error, error


def test_an_oci_artifact_manifest_is_read_and_a_target_refusing_it_says_so(service, registries, repo_name, proxy_factory):
    # distribution 2.8 stores no artifact manifest: the source serves one through a stand-in,
    # its blobs from the real registry behind it.
    source = proxy_factory(registries.source)
    blobs = [secrets.token_bytes(n) for n in (500, 40_000)]
    for blob in blobs:
        RegistryHTTP.for_endpoint(registries.source).upload_monolithic(repo_name, blob, sha256_digest(blob))
    artifact = json.dumps({
        "mediaType": mt.OCI_ARTIFACT, "artifactType": "application/vnd.example.sbom.v1",
        "blobs": [{"mediaType": "application/json", "size": len(b), "digest": sha256_digest(b)} for b in blobs],
    }).encode()
    source.serve_manifest(repo_name, ["v1"], mt.OCI_ARTIFACT, artifact)

    status = _run(service, job_body(source, repo_name, "v1", [registries.target_a]))

    assert job_state(status) == "FAILED", _dump(status)
    error = status["targets"][0]["error"]
    assert f"push manifest {repo_name}:v1 failed: HTTP 400: MANIFEST_INVALID" in error, error
    assert f"the registry may not take {mt.OCI_ARTIFACT}" in error, error
    # Read, and its blobs sent, byte for byte: only the manifest's type is what the target refuses.
    target = RegistryHTTP.for_endpoint(registries.target_a)
    assert [target.blob_size(repo_name, sha256_digest(b)) for b in blobs] == [len(b) for b in blobs]
    assert status["targets"][0]["bytes_done"] == sum(map(len, blobs)), _dump(status)


@pytest.mark.parametrize("size, off_by", [(3_000, 1), (3 * 1024 * 1024, -1)], ids=["read-whole", "streamed"])
def test_a_descriptor_that_misstates_a_blobs_size_fails_saying_so(service, registries, repo_name, size, off_by):
    # distribution 2.8 takes such a manifest; a copy of it cannot be right.
    src = RegistryHTTP.for_endpoint(registries.source)
    layer, config = secrets.token_bytes(size), secrets.token_bytes(200)
    for blob in (layer, config):
        src.upload_monolithic(repo_name, blob, sha256_digest(blob))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "size": len(config), "digest": sha256_digest(config)},
        "layers": [{"mediaType": mt.OCI_LAYER, "size": size + off_by, "digest": sha256_digest(layer)}],
    }).encode()
    src.put_manifest(repo_name, "v1", mt.OCI_MANIFEST, manifest)

    status = _run(service, job_body(registries.source, repo_name, "v1", [registries.target_a]))

    assert job_state(status) == "FAILED", _dump(status)
    error = status["targets"][0]["error"]
    said = f"the blob is {size} bytes, but the manifest's descriptor says {size + off_by}"
    assert said in error and f"{registries.source.host}: read blob {sha256_digest(layer)[:19]}" in error, error


def test_schema1_source_fails_saying_it_is_deprecated(service, registries, repo_name):
    push_image(registries.schema1_source, repo_name, "v1", "schema1", (1_000, 2_000),
               seed=_seed())

    status = _run(service, job_body(registries.schema1_source, repo_name, "v1",
                                    [registries.target_a]))

    assert job_state(status) == "FAILED", _dump(status)
    error = status["error"] or ""
    assert "schema1" in error and "deprecated" in error, _dump(status)
    assert status["targets"][0]["state"] == "FAILED", _dump(status)
    assert status["finished_endpoints"] == []
    assert manifest_digest(registries.target_a, repo_name, "v1") is None


# -- auth -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["json", "header", "header_and_json"])
def test_source_with_token_url_auth(service, registries, repo_name, style):
    reg, ts = registries.token, registries.token_server
    image = push_image(reg, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())
    key = secrets.token_hex(12)
    ts.api_keys[key] = reg.user
    auth: dict[str, Any] = {"url": ts.auth_json_url(f"repository:{repo_name}:pull"),
                            "token_type": "Bearer"}
    if style == "header":
        auth["header"] = f"X-Api-Key: {key}"  # the one-line form
    if style == "header_and_json":
        auth["header"] = {"X-Api-Key": key}
    if style in ("json", "header_and_json"):
        auth["json"] = {"username": reg.user, "password": reg.password}
    body = job_body(reg, repo_name, "v1", [registries.target_a])
    body["source"]["auth"] = auth
    since = len(ts.requests)

    status = _run(service, body)

    _assert_all_finished(status, image.total_bytes)
    assert_same_tree(image, read_back(registries.target_a, repo_name, "v1"))
    used = _token_requests_for(ts, repo_name, "/auth-json", since)
    assert used, f"the token url was never asked; token server saw {ts.requests[-5:]}"
    for request in used:
        assert request.status == 200 and request.user == reg.user, request
        assert request.method == ("GET" if style == "header" else "POST"), request
        assert "pull" in _granted_actions(request, repo_name), request
    # The pre-configured token was enough: the registry's own token flow was never needed.
    assert _token_requests_for(ts, repo_name, "/token", since) == []
    # No secret in the status document.
    assert reg.password not in json.dumps(status) and key not in json.dumps(status)


def test_source_read_anonymously_through_bearer_challenge(service, registries, repo_name):
    reg, ts = registries.token, registries.token_server
    image = push_image(reg, repo_name, "v1", "oci", SMALL_LAYERS, seed=_seed())
    body = job_body(reg, repo_name, "v1", [registries.target_a])
    body["source"].pop("auth", None)
    since = len(ts.requests)

    status = _run(service, body)

    _assert_all_finished(status, image.total_bytes)
    assert_same_tree(image, read_back(registries.target_a, repo_name, "v1"))
    asked = _token_requests_for(ts, repo_name, "/token", since)
    anonymous = [r for r in asked if r.user is None]
    assert anonymous == asked, asked
    assert anonymous, f"no anonymous token for {repo_name}; token server saw {ts.requests[-5:]}"
    assert all(r.status == 200 for r in anonymous)
    assert any("pull" in _granted_actions(r, repo_name) for r in anonymous)


def test_token_auth_target_with_basicauth(service, registries, repo_name):
    reg, ts = registries.token, registries.token_server
    image = push_image(registries.source, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())
    since = len(ts.requests)

    status = _run(service, job_body(registries.source, repo_name, "v1", [reg]))

    _assert_all_finished(status, image.total_bytes)
    # One token for the whole job: the first one, for the tag's HEAD, was asked with push.
    asked = _token_requests_for(ts, repo_name, since=since)
    assert len(asked) == 1, asked
    assert asked[0].user == reg.user and _granted_actions(asked[0], repo_name) == {"pull", "push"}, asked
    assert_same_tree(image, read_back(reg, repo_name, "v1"))
    assert reg.password not in json.dumps(status)


def test_jobs_share_anonymous_tokens_and_no_others(service, registries, repo_name):
    reg, ts = registries.token, registries.token_server
    image = push_image(reg, repo_name, "v1", "oci", SMALL_LAYERS, seed=_seed())

    def from_token_registry(target, anonymous: bool) -> dict[str, Any]:
        body = job_body(reg, repo_name, "v1", [(target, {"image": f"{repo_name}-{secrets.token_hex(3)}"})])
        if anonymous:
            del body["source"]["auth"]
        return body

    def token_requests_of(body: dict[str, Any]) -> list:
        since = len(ts.requests)
        _assert_all_finished(_run(service, body), image.total_bytes)
        return _token_requests_for(ts, repo_name, since=since)

    # A public image read anonymously: the second job uses the first one's token.
    assert [r.user for r in token_requests_of(from_token_registry(registries.target_a, True))] == [None]
    assert token_requests_of(from_token_registry(registries.target_b, True)) == []
    # Read with credentials: every job has the token server judge them.
    for target in (registries.target_a, registries.target_b):
        assert [r.user for r in token_requests_of(from_token_registry(target, False))] == [reg.user]


def test_an_identity_token_is_traded_through_oauth2(service, registries, repo_name):
    reg, ts = registries.token, registries.token_server
    image = push_image(registries.source, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())
    identity = ts.issue_refresh_token(reg.user)  # what `docker login` keeps for such a registry
    body = job_body(registries.source, repo_name, "v1", [reg])
    body["targets"][0]["auth"] = {"basicauth": {"user": "<token>", "password": identity}}
    ts.oauth2 = True
    try:
        since = len(ts.requests)
        status = _run(service, body)
        asked = _token_requests_for(ts, repo_name, since=since)
    finally:
        ts.oauth2 = False

    _assert_all_finished(status, image.total_bytes)
    assert_same_tree(image, read_back(reg, repo_name, "v1"))
    assert [(r.method, r.user, r.status) for r in asked] == [("POST", reg.user, 200)], asked
    assert identity not in json.dumps(status) and identity not in service.log_text()


@pytest.mark.parametrize("mode", ["no_verify", "verify_unknown_ca", "verify_with_ca_cert"])
def test_tls_htpasswd_target(service, registries, repo_name, mode):
    tls = registries.tls
    image = push_image(registries.source, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())
    extra: dict[str, Any] = {"verify_tls": mode != "no_verify"}
    if mode == "verify_with_ca_cert":
        extra["ca_cert"] = tls.ca_pem

    status = _run(service, job_body(registries.source, repo_name, "v1", [(tls, extra)]))

    if mode == "verify_unknown_ca":
        assert job_state(status) == "FAILED", _dump(status)
        target = status["targets"][0]
        assert target["state"] == "FAILED", _dump(status)
        assert re.search(r"certificate|TLS|SSL", target["error"] or ""), _dump(status)
        assert status["finished_endpoints"] == []
        assert manifest_digest(tls, repo_name, "v1") is None
    else:
        _assert_all_finished(status, image.total_bytes)
        assert_same_tree(image, read_back(tls, repo_name, "v1"))


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
def test_wrong_password_fails_the_target_and_never_shows(service, registries, repo_name, kind):
    reg = registries.tls if kind == "htpasswd" else registries.token
    push_image(registries.source, repo_name, "v1", "schema2", (1_000, 3_000), seed=_seed())
    wrong = f"Wr0ng-{secrets.token_hex(8)}"
    target = {"auth": {"basicauth": {"user": reg.user, "password": wrong}}}

    started = time.monotonic()
    status = _run(service, job_body(registries.source, repo_name, "v1", [(reg, target)]))
    elapsed = time.monotonic() - started

    assert job_state(status) == "FAILED", _dump(status)
    error = status["targets"][0]["error"] or ""
    assert status["targets"][0]["state"] == "FAILED", _dump(status)
    assert re.search(r"401|UNAUTHORIZED|refused", error), _dump(status)
    assert elapsed < 15, f"an auth failure is final, yet the job took {elapsed:.1f}s"
    assert manifest_digest(reg, repo_name, "v1") is None
    assert wrong not in json.dumps(status)
    log = service.log_text()
    assert wrong not in log, "the wrong password is in the service log"
    assert reg.password not in log, "a registry password is in the service log"


# -- overwrite ------------------------------------------------------------------------------------


def test_overwrite_false_skips_a_different_tag(service, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())
    there = push_image(registries.target_a, repo_name, "v1", "oci", (1_000, 2_000), seed=_seed())
    assert there.digest != image.digest

    status = _run(service, job_body(registries.source, repo_name, "v1",
                                    [(registries.target_a, {"overwrite": False})]))

    assert job_state(status) == "FINISHED", _dump(status)
    assert status["skipped_clusters"] == [registries.target_a.endpoint], _dump(status)
    assert status["finished_endpoints"] == [], _dump(status)
    assert status["targets"][0]["state"] == "SKIPPED", _dump(status)
    assert manifest_digest(registries.target_a, repo_name, "v1") == there.digest
    assert_same_tree(there, read_back(registries.target_a, repo_name, "v1"))


def test_overwrite_true_replaces_a_different_tag(service, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "docker_list", SMALL_LAYERS,
                       seed=_seed(), platforms=2)
    there = push_image(registries.target_a, repo_name, "v1", "oci", (1_000, 2_000), seed=_seed())

    status = _run(service, job_body(registries.source, repo_name, "v1",
                                    [(registries.target_a, {"overwrite": True})]))

    _assert_all_finished(status, image.total_bytes)
    assert manifest_digest(registries.target_a, repo_name, "v1") == image.digest != there.digest
    assert_same_tree(image, read_back(registries.target_a, repo_name, "v1"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_identical_tag_finishes_with_nothing_uploaded(
    service, registries, repo_name, proxy_factory, overwrite
):
    image = push_image(registries.source, repo_name, "v1", "oci_index", SMALL_LAYERS,
                       seed=_seed(), platforms=2)
    first = _run(service, job_body(registries.source, repo_name, "v1", [registries.target_a]))
    _assert_all_finished(first, image.total_bytes)
    proxy = proxy_factory(registries.target_a)

    status = _run(service, job_body(registries.source, repo_name, "v1",
                                    [(proxy, {"overwrite": overwrite})]))

    _assert_all_finished(status, image.total_bytes)
    assert status["finished_endpoints"] == [proxy.endpoint]
    assert proxy.blob_upload_bytes() == 0, proxy.counters()
    assert proxy.count("POST", "upload_post") == 0, proxy.requests
    assert proxy.count("PUT", "manifest_put") == 0, proxy.requests
    assert proxy.uploaded_bytes() == 0, proxy.counters()
    assert manifest_digest(registries.target_a, repo_name, "v1") == image.digest


# -- requests per blob ----------------------------------------------------------------------------


def test_a_new_repository_is_not_asked_blob_by_blob(service, registries, repo_name, proxy_factory):
    image = push_image(registries.source, repo_name, "v1", "oci_index", SMALL_LAYERS, seed=_seed(),
                       platforms=2)
    proxy = proxy_factory(registries.target_a)

    status = _run(service, job_body(registries.source, repo_name, "v1", [proxy]))

    _assert_all_finished(status, image.total_bytes)
    assert_same_tree(image, read_back(registries.target_a, repo_name, "v1"))
    tag_lists = [r for r in proxy.requests if r.path == f"/v2/{repo_name}/tags/list"]
    assert [r.status for r in tag_lists] == [404], proxy.requests  # NAME_UNKNOWN: nothing to find
    assert proxy.count("HEAD", "blob_head") == 0, proxy.requests
    assert proxy.count("HEAD", "manifest_head") == 1, proxy.requests  # the tag only, no child
    assert proxy.count("POST", "upload_post") == proxy.count("PUT", "upload_put") == len(image.blobs)
    assert proxy.count("PUT", "manifest_put") == len(image.manifests)

    # Now the repository exists: another tag of the same image asks for every blob and uploads none.
    proxy.reset_counters()
    status = _run(service, job_body(registries.source, repo_name, "v1",
                                     [(proxy, {"ref": "again"})]))
    _assert_all_finished(status, image.total_bytes)
    assert proxy.count("HEAD", "blob_head") == len(image.blobs), proxy.requests
    assert proxy.blob_upload_bytes() == 0 and proxy.count("POST", "upload_post") == 0, proxy.requests
    assert proxy.count("PUT", "manifest_put") == 1, proxy.requests  # children are there: the tag only
    assert manifest_digest(registries.target_a, repo_name, "again") == image.digest


def test_a_repository_known_to_exist_is_not_listed_again(service, registries, repo_name, proxy_factory):
    # A new tag in a repository the service has seen: no tags/list (which distribution 2.8
    # answers with every tag, whatever n says), straight to a HEAD per blob.
    first = push_image(registries.source, repo_name, "v1", "oci", SMALL_LAYERS, seed=_seed())
    second = push_image(registries.source, repo_name, "v2", "oci", SMALL_LAYERS, seed=_seed())
    proxy = proxy_factory(registries.target_a)
    _assert_all_finished(_run(service, job_body(registries.source, repo_name, "v1", [proxy])), first.total_bytes)
    _assert_all_finished(_run(service, job_body(registries.source, repo_name, "v1", [(proxy, {"ref": "v1b"})])), first.total_bytes)
    proxy.reset_counters()

    status = _run(service, job_body(registries.source, repo_name, "v2", [proxy]))

    _assert_all_finished(status, second.total_bytes)
    assert_same_tree(second, read_back(registries.target_a, repo_name, "v2"))
    assert not [r for r in proxy.requests if r.kind == "tags_list"], proxy.requests
    assert proxy.count("HEAD", "blob_head") == len(second.blobs)


def test_small_blobs_upload_sessions_open_while_the_source_is_read(service, registries, repo_name, proxy_factory):
    image = push_image(registries.source, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())
    source, target = proxy_factory(registries.source), proxy_factory(registries.target_a)
    source.latency_s = 0.4  # every source answer is this late: a far-away source
    assert len(image.blobs) <= 4  # PYDLIT_PARALLEL_BLOBS: every blob's read and session at once

    status = _run(service, job_body(source, repo_name, "v1", [target]))

    _assert_all_finished(status, image.total_bytes)
    assert_same_tree(image, read_back(registries.target_a, repo_name, "v1"))
    reads = [r for r in source.requests if r.kind == "blob_get"]
    posts = [r for r in target.requests if r.kind == "upload_post"]
    assert len(reads) == len(posts) == len(image.blobs), (reads, posts)
    # Every session was asked for before the first blob read could have been answered.
    answered = min(r.arrived for r in reads) + source.latency_s
    assert max(p.arrived for p in posts) < answered, (reads, posts)


# -- shared layers --------------------------------------------------------------------------------


def test_shared_layers_same_repo_are_not_uploaded_again(
    service, registries, repo_name, proxy_factory
):
    first, second = shared_layer_images(registries.source, repo_name,
                                        layer_sizes=(60_000, 90_000, 30_000), seed=_seed())
    proxy = proxy_factory(registries.target_a)
    status = _run(service, job_body(registries.source, repo_name, "v1", [proxy]))
    _assert_all_finished(status, first.total_bytes)
    assert proxy.blob_upload_bytes() == first.total_bytes, proxy.counters()
    proxy.reset_counters()

    status = _run(service, job_body(registries.source, repo_name, "v2", [proxy]))

    _assert_all_finished(status, second.total_bytes)
    shared = first.blobs.keys() & second.blobs.keys()
    new = {d: s for d, s in second.blobs.items() if d not in shared}
    assert len(shared) == 2 and len(new) == 2  # two shared layers; one layer + config are new
    assert proxy.blob_upload_bytes() == sum(new.values()), proxy.counters()
    assert proxy.count("POST", "upload_post") == len(new), proxy.requests
    assert proxy.count("HEAD", "blob_head") >= len(second.blobs), proxy.requests
    for tag, image in (("v1", first), ("v2", second)):
        assert_same_tree(image, read_back(registries.target_a, repo_name, tag))


def test_shared_layers_other_repo_are_mounted(service, registries, repo_name, proxy_factory):
    repo_b = f"{repo_name}-b"
    first, second = shared_layer_images(registries.source, repo_name,
                                        layer_sizes=(60_000, 90_000, 30_000), seed=_seed(),
                                        repo_b=repo_b)
    proxy = proxy_factory(registries.target_a)
    status = _run(service, job_body(registries.source, repo_name, "v1", [proxy]))
    _assert_all_finished(status, first.total_bytes)
    proxy.reset_counters()

    status = _run(service, job_body(registries.source, repo_b, "v2", [proxy]))

    _assert_all_finished(status, second.total_bytes)
    shared = first.blobs.keys() & second.blobs.keys()
    new = {d: s for d, s in second.blobs.items() if d not in shared}
    assert len(shared) == 2 and len(new) == 2
    posts = [r for r in proxy.requests if r.kind == "upload_post"]
    mounted = [r for r in posts if r.status == 201]  # a plain upload start answers 202
    assert len(mounted) == len(shared), posts
    assert all(r.path == f"/v2/{repo_b}/blobs/uploads/" for r in posts), posts
    assert proxy.uploaded_bytes("PATCH") == 0, proxy.counters()
    assert proxy.blob_upload_bytes() == sum(new.values()), proxy.counters()
    assert_same_tree(second, read_back(registries.target_a, repo_b, "v2"))
    assert_same_tree(first, read_back(registries.target_a, repo_name, "v1"))


def test_targets_on_one_registry_take_the_bytes_once(service, registries, repo_name, proxy_factory):
    # One layer over 1 MiB (streamed) and the rest read whole: both paths send once per registry.
    image = push_image(registries.source, repo_name, "v1", "oci", (1_500_000, 40_001, 120_007), seed=_seed())
    repo_b = f"{repo_name}-b"
    proxy = proxy_factory(registries.target_a)
    targets = [(proxy, {}), (proxy, {"image": repo_b}), (proxy, {"ref": "v1-again"})]

    status = _run(service, job_body(registries.source, repo_name, "v1", targets))

    _assert_all_finished(status, image.total_bytes)
    assert proxy.blob_upload_bytes() == image.total_bytes, proxy.counters()
    posts = [r for r in proxy.requests if r.kind == "upload_post"]
    mounted = [r for r in posts if r.status == 201]  # a plain upload start answers 202
    assert len(mounted) == len(image.blobs), posts
    assert all(r.path == f"/v2/{repo_b}/blobs/uploads/" for r in mounted), posts
    for repo, tag in ((repo_name, "v1"), (repo_b, "v1"), (repo_name, "v1-again")):
        assert_same_tree(image, read_back(registries.target_a, repo, tag))


def test_two_tags_of_one_repository_link_each_blob_and_push_each_manifest_once(service, registries, repo_name, proxy_factory):
    # The registry already holds the blobs in another repository. Two targets writing the same
    # links at once made distribution refuse one tag's index now and then (MANIFEST_BLOB_UNKNOWN):
    # each blob is mounted once and each child manifest pushed once, the tags one after the other.
    image = push_image(registries.source, repo_name, "v1", "oci_index", SMALL_LAYERS, seed=_seed(), platforms=4)
    proxy = proxy_factory(registries.target_a)
    _assert_all_finished(_run(service, job_body(registries.source, repo_name, "v1", [proxy])), image.total_bytes)
    proxy.reset_counters()
    repo_b = f"{repo_name}-b"
    status = _run(service, job_body(registries.source, repo_name, "v1",
                                    [(proxy, {"image": repo_b, "ref": "1.0"}), (proxy, {"image": repo_b, "ref": "latest"})]))

    _assert_all_finished(status, image.total_bytes)
    mounts = [r for r in proxy.requests if r.kind == "upload_post"]
    assert len(mounts) == len(image.blobs) and all(r.status == 201 for r in mounts), mounts
    pushed = Counter(r.path.rsplit("/", 1)[1] for r in proxy.requests if r.kind == "manifest_put")
    children = [d for d in image.manifests if d != image.digest]
    assert len(children) == 4 and pushed == {**{d: 1 for d in children}, "1.0": 1, "latest": 1}, pushed
    for tag in ("1.0", "latest"):
        assert_same_tree(image, read_back(registries.target_a, repo_b, tag))


def test_jobs_copying_to_one_registry_at_once_send_each_blob_once(service, registries, repo_name, proxy_factory):
    # Separate jobs, one image, three repositories of one registry, all under way together (a
    # slow link keeps each upload going while the others start): one job sends each blob, the
    # others wait for it and mount it.
    image = push_image(registries.source, repo_name, "v1", "oci", (1_500_000, 1_200_000, 40_001), seed=_seed())
    proxy = proxy_factory(registries.target_a)
    proxy.rate_limit(1024 * 1024, download=False, upload=True)  # ~2.7 s for the image
    repos = [f"{repo_name}-{i}" for i in range(3)]

    jobs = [service.submit(job_body(registries.source, repo_name, "v1", [(proxy, {"image": r})])) for r in repos]

    for job in jobs:
        _assert_all_finished(service.wait(job, timeout=JOB_TIMEOUT), image.total_bytes)
    assert proxy.blob_upload_bytes() == image.total_bytes, proxy.counters()
    mounted = [r for r in proxy.requests if r.kind == "upload_post" and r.status == 201]
    assert len(mounted) == 2 * len(image.blobs), proxy.requests
    for repo in repos:
        assert_same_tree(image, read_back(registries.target_a, repo, "v1"))


def test_a_target_linking_from_its_registry_is_not_held_to_another_registrys_pace(
    service, registries, repo_name, proxy_factory
):
    image = push_image(registries.source, repo_name, "v1", "oci", (1_500_000, 40_001), seed=_seed())
    slow = proxy_factory(registries.target_b)
    slow.rate_limit(400 * 1024, download=False, upload=True)  # ~4 s for the image
    targets = [(registries.target_a, {}), (registries.target_a, {"image": f"{repo_name}-b"}), (slow, {})]
    started = time.monotonic()
    job = service.submit(job_body(registries.source, repo_name, "v1", targets))
    ended: dict[int, float] = {}
    for _ in range(1200):
        status = service.status(job)
        for i, t in enumerate(status["targets"]):
            if t["state"] in ("FINISHED", "FAILED"):
                ended.setdefault(i, time.monotonic() - started)
        if job_state(status) in ("FINISHED", "FAILED"):
            break
        time.sleep(0.05)

    _assert_all_finished(status, image.total_bytes)
    assert ended[1] < ended[2] / 2, ended
    assert_same_tree(image, read_back(registries.target_a, f"{repo_name}-b", "v1"))


def test_a_target_with_other_credentials_uploads_beside_its_peer(service, registries, repo_name):
    reg, ts = registries.token, registries.token_server
    image = push_image(registries.source, repo_name, "v1", "schema2", (1_500_000, 40_001), seed=_seed())
    repo_b = f"{repo_name}-b"
    # A second user who may push to repo_b but not read the first target's repository.
    ts.users["other"] = "other-pass"
    ts.set_acl("other", [(repo_b, ["pull", "push"])])
    since = len(ts.requests)
    try:
        other = {"basicauth": {"user": "other", "password": "other-pass"}}
        status = _run(service, job_body(registries.source, repo_name, "v1", [reg, (reg, {"image": repo_b, "auth": other})]))
    finally:
        del ts.users["other"]
        ts.reset_acl()

    _assert_all_finished(status, image.total_bytes)
    # Its credentials may not read the first target's repository: it does not wait for that
    # upload to be refused a mount from it, it uploads beside it.
    asked = [r for r in _token_requests_for(ts, repo_name, since=since) if r.user == "other"]
    assert asked == [], asked
    assert any(r.user == "other" and "push" in _granted_actions(r, repo_b) for r in ts.requests[since:])
    for repo in (repo_name, repo_b):
        assert_same_tree(image, read_back(reg, repo, "v1"))


# -- failures -------------------------------------------------------------------------------------


def test_unreachable_target_fails_alone(service_factory, registries, repo_name):
    svc = service_factory(env={"PYDLIT_RETRY_ATTEMPTS": "2", "PYDLIT_RETRY_MAX_DELAY": "0.2"})
    image = push_image(registries.source, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())
    closed = f"http://127.0.0.1:{free_port()}/v2"

    started = time.monotonic()
    status = _run(svc, job_body(registries.source, repo_name, "v1",
                                [registries.target_a, (registries.target_a, {"endpoint": closed})]))
    elapsed = time.monotonic() - started

    assert job_state(status) == "FAILED", _dump(status)
    good, bad = status["targets"]
    assert good["endpoint"] == registries.target_a.endpoint and bad["endpoint"] == closed
    assert good["state"] == "FINISHED", _dump(status)
    assert good["bytes_done"] == good["bytes_total"] == image.total_bytes, _dump(status)
    assert status["finished_endpoints"] == [registries.target_a.endpoint], _dump(status)
    assert bad["state"] == "FAILED", _dump(status)
    assert "cannot connect" in (bad["error"] or ""), _dump(status)
    assert elapsed < 20, f"two quick retries took {elapsed:.1f}s"
    assert_same_tree(image, read_back(registries.target_a, repo_name, "v1"))


def test_a_cancel_lets_the_one_put_of_a_blob_end_and_leaves_no_session(service, registries, repo_name, proxy_factory):
    # 4 MiB: streamed (over 1 MiB), yet under one chunk, so one PUT carries it. Cut, it would
    # leave distribution a session it neither commits nor deletes.
    push_image(registries.source, repo_name, "v1", "schema2", [4 * 1024 * 1024], seed=_seed())
    slow = proxy_factory(registries.target_a)
    slow.rate_limit(1024 * 1024, download=False, upload=True)
    job = service.submit(job_body(registries.source, repo_name, "v1", [slow]))
    deadline = time.monotonic() + 20
    while slow.uploaded_bytes("PUT", "upload_put") < 256 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)

    request = urllib.request.Request(f"{service.url}/api/distribute/image/{job}", method="DELETE")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    status = service.wait(job, timeout=10)

    assert status["error"] == "cancelled", _dump(status)
    assert [r.status for r in slow.requests if r.kind == "upload_put"] == [201, 201], slow.requests  # config, layer
    assert slow.count("DELETE") == 0, slow.requests  # the session ended with its commit
    assert registries.target_a.session_bytes(repo_name) == 0


@pytest.mark.parametrize("missing", ["tag", "repo"])
def test_missing_source_image_fails_fast(service, registries, repo_name, missing):
    if missing == "tag":
        push_image(registries.source, repo_name, "v1", "schema2", (1_000, 2_000), seed=_seed())
    started = time.monotonic()
    status = _run(service, job_body(registries.source, repo_name, "nope",
                                    [registries.target_a, registries.target_b]))
    elapsed = time.monotonic() - started

    assert job_state(status) == "FAILED", _dump(status)
    error = status["error"] or ""
    assert re.search(r"MANIFEST_UNKNOWN|NAME_UNKNOWN|not found", error), _dump(status)
    assert repo_name in error, _dump(status)
    # A 404 is final: no retries (the default budget is 6 attempts, 300 s).
    assert elapsed < 8, f"a missing image took {elapsed:.1f}s to fail"
    assert [t["state"] for t in status["targets"]] == ["FAILED", "FAILED"], _dump(status)
    assert status["finished_endpoints"] == []
    for target in registries.targets:
        assert manifest_digest(target, repo_name, "nope") is None


# -- progress -------------------------------------------------------------------------------------


def test_progress_during_and_after_the_job(service, registries, repo_name, proxy_factory):
    image = push_image(registries.source, repo_name, "v1", "schema2", (100_000, 400_000, 300_000),
                       seed=_seed())
    slow = proxy_factory(registries.target_a)
    slow.rate_limit(250_000, download=False, upload=True)  # ~3 s for ~800 KB

    job_id = service.submit(job_body(registries.source, repo_name, "v1",
                                     [slow, registries.target_b]))
    seen: list[tuple[str | None, int, int | None]] = []
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        status = service.status(job_id)
        slow_target = status["targets"][0]
        seen.append((slow_target["state"], slow_target["bytes_done"], slow_target["bytes_total"]))
        totals = [t["bytes_total"] or 0 for t in status["targets"]]
        assert status["bytes_total"] == sum(totals), _dump(status)
        assert status["bytes_done"] == sum(t["bytes_done"] for t in status["targets"])
        for t in status["targets"]:
            if t["bytes_total"]:
                assert t["bytes_total"] == image.total_bytes, _dump(status)
                assert 0 <= t["bytes_done"] <= t["bytes_total"], _dump(status)
        if job_state(status) in ("FINISHED", "FAILED"):
            break
        time.sleep(0.1)

    _assert_all_finished(status, image.total_bytes)
    done = [d for _, d, _ in seen]
    assert done == sorted(done), f"bytes_done went backwards: {seen}"
    partial = [s for s in seen if s[0] == "RUNNING" and 0 < s[1] < image.total_bytes]
    assert partial, f"never saw the slow target part-way: {seen}"
    for target in registries.targets:
        assert_same_tree(image, read_back(target, repo_name, "v1"))


def test_token_url_lacking_push_falls_back_to_the_challenge_flow(service, registries, repo_name):
    reg, ts = registries.token, registries.token_server
    image = push_image(registries.source, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())
    # The pre-configured token only grants pull: enough to look at the tag, not to push.
    auth = {
        "url": ts.auth_json_url(f"repository:{repo_name}:pull"),
        "token_type": "Bearer",
        "json": {"username": reg.user, "password": reg.password},
        "basicauth": {"user": reg.user, "password": reg.password},
    }
    body = job_body(registries.source, repo_name, "v1", [reg])
    body["targets"][0]["auth"] = auth
    since = len(ts.requests)

    status = _run(service, body)

    _assert_all_finished(status, image.total_bytes)
    assert_same_tree(image, read_back(reg, repo_name, "v1"))
    assert _token_requests_for(ts, repo_name, "/auth-json", since), "the token url was never used"
    pushers = [r for r in _token_requests_for(ts, repo_name, "/token", since)
               if r.user == reg.user and "push" in _granted_actions(r, repo_name)]
    assert pushers, "no push token from the registry's own token flow"


def test_a_token_url_that_does_not_cover_a_mount_leaves_the_target_its_own_token(service, registries, repo_name):
    # The original API's token url with JSON credentials and no basicauth: the token covers the
    # job's repository only. A mount from another repository is refused; the copy goes on with
    # the configured token (it used to fall back to anonymous tokens, and the target failed).
    reg, ts = registries.token, registries.token_server
    image = push_image(registries.source, repo_name, "v1", "schema2", SMALL_LAYERS, seed=_seed())

    def copy_to(*repos: str) -> dict[str, Any]:
        body = job_body(registries.source, repo_name, "v1", [(reg, {"image": repo}) for repo in repos])
        for target, repo in zip(body["targets"], repos):
            target["auth"] = {"url": ts.auth_json_url(f"repository:{repo}:pull,push"),
                              "json": {"username": reg.user, "password": reg.password}}
        return _run(service, body)

    _assert_all_finished(copy_to(f"{repo_name}-a"), image.total_bytes)
    since = len(ts.requests)
    second = copy_to(f"{repo_name}-b")  # the blobs are known in -a: a mount is tried first
    both = copy_to(f"{repo_name}-c", f"{repo_name}-d")

    flow = [r for r in ts.requests[since:] if r.path == "/token" and any(repo_name in scope for scope in r.scopes)]
    assert flow == []  # the registry's own flow, which would have had no credentials, was never taken
    for status in (second, both):
        _assert_all_finished(status, image.total_bytes)
    for repo in ("b", "c", "d"):
        assert_same_tree(image, read_back(reg, f"{repo_name}-{repo}", "v1"))


def test_tokens_are_renewed_during_a_long_upload(service_factory, registries, repo_name, proxy_factory):
    reg, ts = registries.token, registries.token_server
    image = push_image(registries.source, repo_name, "v1", "schema2", [5 * 1024 * 1024, 2048], seed=_seed())
    slow = proxy_factory(reg)
    slow.rate_limit(1024 * 1024, download=False, upload=True)  # ~5 s of upload
    svc = service_factory(env={"PYDLIT_CHUNK_MIB": "1"})
    saved = ts.token_ttl, ts.reject_after
    # Tokens live 2 s and the registry refuses them after that: a 5 s upload outlives several.
    ts.token_ttl, ts.reject_after = 2, 2
    since = len(ts.requests)
    try:
        status = svc.wait(svc.submit(job_body(registries.source, repo_name, "v1", [slow])), timeout=60)
    finally:
        ts.token_ttl, ts.reject_after = saved

    _assert_all_finished(status, image.total_bytes)
    assert_same_tree(image, read_back(reg, repo_name, "v1"))
    pushers = [r for r in _token_requests_for(ts, repo_name, "/token", since)
               if "push" in _granted_actions(r, repo_name)]
    assert len(pushers) >= 3, f"only {len(pushers)} push token(s) over a ~5 s upload"


def test_a_slow_target_holds_the_others_back_by_at_most_the_buffer(service_factory, registries, repo_name, proxy_factory):
    mib = 1024 * 1024
    image = push_image(registries.source, repo_name, "v1", "schema2", [16 * mib], seed=_seed())
    slow = proxy_factory(registries.target_b)
    slow.rate_limit(4 * mib, download=False, upload=True)
    # Detaching off: this is the bound of the shared read itself.
    svc = service_factory(env={"PYDLIT_CHUNK_MIB": "1", "PYDLIT_BUFFER_MIB": "4", "PYDLIT_DETACH_AFTER_S": "0"})
    job = svc.submit(job_body(registries.source, repo_name, "v1", [registries.target_a, slow]))

    leads = []
    for _ in range(400):
        status = svc.status(job)
        # Both counts from one heartbeat's flush: a target's end is written at once, and beside
        # it the other's count would be up to a heartbeat old.
        if all(t["state"] == "RUNNING" for t in status["targets"]):
            fast_done, slow_done = (t["bytes_done"] for t in status["targets"])
            leads.append(fast_done - slow_done)
        if job_state(status) in ("FINISHED", "FAILED"):
            break
        time.sleep(0.05)

    _assert_all_finished(status, image.total_bytes)
    # The fast target runs ahead (it is not held in lock step) ...
    assert max(leads) >= 2 * mib, leads
    # ... but never further than the buffer plus the chunk each side has in flight.
    assert max(leads) <= 4 * mib + 2 * mib, leads


def test_a_target_that_keeps_the_others_waiting_reads_on_its_own(service_factory, registries, repo_name, proxy_factory):
    mib = 1024 * 1024
    image = push_image(registries.source, repo_name, "v1", "schema2", [12 * mib], seed=_seed())
    source = proxy_factory(registries.source)
    slow = proxy_factory(registries.target_b)
    slow.rate_limit(3 * mib, download=False, upload=True)  # ~4 s; the other target takes well under 1 s
    svc = service_factory(env={"PYDLIT_CHUNK_MIB": "1", "PYDLIT_BUFFER_MIB": "2", "PYDLIT_DETACH_AFTER_S": "0.5"})
    job = svc.submit(job_body(source, repo_name, "v1", [registries.target_a, slow]))

    fast_finished_while_slow_had = None
    for _ in range(600):
        status = svc.status(job)
        fast, slow_t = status["targets"]
        if fast["state"] == "FINISHED" and fast_finished_while_slow_had is None:
            fast_finished_while_slow_had = slow_t["bytes_done"]
        if job_state(status) in ("FINISHED", "FAILED"):
            break
        time.sleep(0.05)

    _assert_all_finished(status, image.total_bytes)
    for target in registries.targets:
        assert_same_tree(image, read_back(target, repo_name, "v1"))
    # The fast target got its tag while the slow one was still far from done (held in step by
    # the shared read, it would have had all but the buffer and a chunk: about 8 of 12 MiB) ...
    assert fast_finished_while_slow_had is not None and fast_finished_while_slow_had < image.total_bytes // 2, (
        fast_finished_while_slow_had, _dump(status))
    assert "on its own" in svc.log_text()
    # ... and the source was read again only for what the slow target had not yet been fed.
    read = source.downloaded_bytes()
    assert image.total_bytes < read < 2 * image.total_bytes, read


@pytest.mark.parametrize(("max_streams", "overlap"), [(1, False), (4, True)])
def test_streamed_blobs_of_every_job_share_the_service_limit(
    service_factory, registries, repo_name, proxy_factory, max_streams, overlap
):
    mib = 1024 * 1024
    repos = [f"{repo_name}-{i}" for i in range(2)]
    images = [push_image(registries.source, repo, "v1", "schema2", [3 * mib, 3 * mib + 1], seed=_seed())
              for repo in repos]
    slow = proxy_factory(registries.target_a)
    slow.rate_limit(8 * mib, download=False, upload=True)  # uploads last long enough to overlap
    svc = service_factory(env={"PYDLIT_CONCURRENCY": "2", "PYDLIT_MAX_STREAMS": str(max_streams)})

    jobs = [svc.submit(job_body(registries.source, repo, "v1", [slow])) for repo in repos]

    for job, image in zip(jobs, images, strict=True):
        _assert_all_finished(svc.wait(job, timeout=JOB_TIMEOUT), image.total_bytes)
    peak = slow.counters().peak_large["upload_put"]
    # With a limit of 1 the four layers of two jobs go one at a time; with 4 they overlap.
    assert (peak >= 2) if overlap else (peak == 1), slow.counters()


def test_a_job_to_a_slow_registry_gives_its_stream_to_a_job_for_another(
    service_factory, registries, repo_name, proxy_factory
):
    # One stream for the whole service, held by a job whose registry takes its first layer in
    # about 6 s: another job's layer, for another registry, gets the stream long before that.
    mib = 1024 * 1024
    slow_image = push_image(registries.source, repo_name, "v1", "schema2", [3 * mib + 1, 3 * mib], seed=_seed())
    quick_repo = f"{repo_name}-quick"
    quick_image = push_image(registries.source, quick_repo, "v1", "schema2", [2 * mib], seed=_seed())
    slow = proxy_factory(registries.target_a)
    slow.rate_limit(mib // 2, download=False, upload=True)
    svc = service_factory(env={"PYDLIT_MAX_STREAMS": "1", "PYDLIT_PARALLEL_BLOBS": "1", "PYDLIT_DETACH_AFTER_S": "0.5"})

    slow_job = svc.submit(job_body(registries.source, repo_name, "v1", [slow]))
    for _ in range(100):  # until its first layer's session is open: the stream is taken next
        if slow.count("POST", "upload_post"):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    quick_job = svc.submit(job_body(registries.source, quick_repo, "v1", [registries.target_b]))
    quick = svc.wait(quick_job, timeout=JOB_TIMEOUT)
    slow_commits = [r for r in slow.requests if r.kind == "upload_put"]  # answered ones only

    _assert_all_finished(quick, quick_image.total_bytes)
    # The slow job had not yet finished its first layer, whose read held the stream at first.
    assert slow_commits == [], slow_commits
    _assert_all_finished(svc.wait(slow_job, timeout=JOB_TIMEOUT), slow_image.total_bytes)
    assert_same_tree(slow_image, read_back(registries.target_a, repo_name, "v1"))
    assert_same_tree(quick_image, read_back(registries.target_b, quick_repo, "v1"))
    assert "gives its stream slot" in svc.log_text()
