"""Referrers (OCI 1.1 signatures, SBOMs, attestations) copied with their image, through the real
service and real docker-registry processes. distribution 2.8 has no referrers API, so these
registries hold referrers under the tag schema's `sha256-<hex>` index, as cosign and notation
leave them there; a FaultProxy with `referrers_api` on stands in for a registry with the API.
"""

from __future__ import annotations

import json
import random
from typing import Any

from support import mediatypes as mt
from support.images import Image, assert_same_tree, list_tags, push_image, read_back, sha256_digest
from support.referrers import Referrer, add_to_tag_index, fallback_tag, push_digest_tag, push_referrer, tag_index
from support.regclient import RegistryHTTP
from support.service import ServiceProcess, job_body, job_state

LAYERS = (2_048, 40_001)
SIG = "application/vnd.dev.sigstore.bundle.v0.3+json"
SBOM = "application/spdx+json"
JOB_TIMEOUT = 60.0


def _run(service: ServiceProcess, body: dict[str, Any], referrers: bool = True) -> dict:
    status = service.wait(service.submit({**body, "referrers": referrers}), timeout=JOB_TIMEOUT)
    return status


def _finished(status: dict) -> None:
    assert job_state(status) == "FINISHED", json.dumps(status, indent=1)
    assert all(t["state"] == "FINISHED" for t in status["targets"]), json.dumps(status, indent=1)


def _subject(image: Image, digest: str | None = None) -> tuple[str, str, int]:
    digest = digest or image.digest
    media_type, data = image.manifests[digest]
    return digest, media_type, len(data)


def _signed_image(reg, repo: str) -> tuple[Image, dict[str, Referrer]]:
    """An OCI index of 2 platforms with a signature and an SBOM on the index, a signature on the
    SBOM, and an attestation on one platform's manifest."""
    image = push_image(reg, repo, "v1", "oci_index", LAYERS, seed=random.getrandbits(48), platforms=2)
    child = next(d for d in image.manifests if d != image.digest)
    refs = {"sig": push_referrer(reg, repo, _subject(image), SIG, b'{"sig":"' + repo.encode() + b'"}',
                                 annotations={"org.opencontainers.image.created": "2026-01-01T00:00:00Z"})}
    refs["sbom"] = push_referrer(reg, repo, _subject(image), SBOM, b'{"spdxVersion":"SPDX-2.3","name":"' + repo.encode() + b'"}')
    refs["sbom_sig"] = push_referrer(reg, repo, (refs["sbom"].digest, mt.OCI_MANIFEST, refs["sbom"].size), SIG, b'{"sig":"sbom"}')
    refs["att"] = push_referrer(reg, repo, _subject(image, child), "application/vnd.in-toto+json", b'{"_type":"statement"}')
    return image, refs


def _assert_referrer_at(reg, repo: str, ref: Referrer) -> None:
    client = RegistryHTTP.for_endpoint(reg)
    media_type, data, _ = client.get_manifest(repo, ref.digest)
    assert (media_type, data) == (mt.OCI_MANIFEST, ref.data), f"{ref.digest} differs at {reg}"
    for digest in ref.blobs:
        client.read_blob(repo, digest)


def test_referrers_travel_with_the_image_and_land_before_its_tag(service, registries, repo_name):
    image, refs = _signed_image(registries.source, repo_name)
    referrer_bytes = sum({d: s for r in refs.values() for d, s in r.blobs.items()}.values())

    status = _run(service, job_body(registries.source, repo_name, "v1", list(registries.targets)))

    _finished(status)
    for t in status["targets"]:
        assert t["bytes_done"] == t["bytes_total"] == image.total_bytes + referrer_bytes
    for reg in registries.targets:
        assert_same_tree(image, read_back(reg, repo_name, "v1"))
        for ref in refs.values():
            _assert_referrer_at(reg, repo_name, ref)
        # Each subject's index is the source's, byte for byte: the target had none.
        for subject in (image.digest, refs["sbom"].digest, _attested(refs)):
            assert tag_index(reg, repo_name, subject) == tag_index(registries.source, repo_name, subject)


def _attested(refs: dict[str, Referrer]) -> str:
    return json.loads(refs["att"].data)["subject"]["digest"]


def test_referrers_stay_behind_unless_asked_for(service, registries, proxy_factory, repo_name):
    image, refs = _signed_image(registries.source, repo_name)
    source = proxy_factory(registries.source)

    _finished(_run(service, job_body(source, repo_name, "v1", [registries.target_a]), referrers=False))

    assert_same_tree(image, read_back(registries.target_a, repo_name, "v1"))
    assert list_tags(registries.target_a, repo_name) == ["v1"]
    assert RegistryHTTP.for_endpoint(registries.target_a).head_manifest(repo_name, refs["sig"].digest) is None
    # Not even looked for: the image's manifests and blobs are all the source was asked.
    asked = [r.path for r in source.requests if r.path != "/v2/"]
    assert len(asked) == len(image.manifests) + len(image.blobs), asked
    assert not [p for p in asked if "/referrers/" in p or "sha256-" in p], asked


def test_a_second_run_sends_only_the_new_signature(service, registries, proxy_factory, repo_name):
    image, _ = _signed_image(registries.source, repo_name)
    target = proxy_factory(registries.target_a)
    body = job_body(registries.source, repo_name, "v1", [target])
    _finished(_run(service, body))

    # Signed again after the copy: the next run brings only that.
    late = push_referrer(registries.source, repo_name, _subject(image), SIG, b'{"sig":"late"}')
    target.reset_counters()
    _finished(_run(service, body))

    _assert_referrer_at(registries.target_a, repo_name, late)
    assert tag_index(registries.target_a, repo_name, image.digest) == tag_index(registries.source, repo_name, image.digest)
    # The late signature's payload (its empty config is there already), its manifest, the index.
    assert target.count("POST", "upload_post") == 1
    assert target.count("PUT", "manifest_put") == 2
    assert target.count("GET", "blob_get") == 0
    # Only the new payload is looked for: the image's blobs and those of referrers already
    # there are known to be there.
    assert target.count("HEAD", "blob_head") == 1

    # Nothing new: nothing sent.
    target.reset_counters()
    _finished(_run(service, body))
    assert target.count("POST", "upload_post") == 0 and target.count("PUT", "manifest_put") == 0


def test_the_targets_own_referrers_stay_listed(service, registries, repo_name):
    image, refs = _signed_image(registries.source, repo_name)
    # The target already has the image and a signature of its own for it.
    _finished(_run(service, job_body(registries.source, repo_name, "v1", [registries.target_b]), referrers=False))
    theirs = push_referrer(registries.target_b, repo_name, _subject(image), SIG, b'{"sig":"theirs"}')

    _finished(_run(service, job_body(registries.source, repo_name, "v1", [registries.target_b])))

    listed = [d["digest"] for d in json.loads(tag_index(registries.target_b, repo_name, image.digest))["manifests"]]
    assert listed == [theirs.digest, refs["sig"].digest, refs["sbom"].digest]
    _assert_referrer_at(registries.target_b, repo_name, refs["sbom_sig"])


def test_through_the_referrers_api_at_both_ends(service, registries, proxy_factory, repo_name):
    source = proxy_factory(registries.source)
    target = proxy_factory(registries.target_a)
    source.referrers_api = target.referrers_api = True
    source.referrers_page_size = 1  # the listing comes in pages: every page must be followed
    image = push_image(registries.source, repo_name, "v1", "oci", LAYERS, seed=random.getrandbits(48))
    # Pushed through the proxy, which indexes them as an API registry does: no tag index anywhere.
    sig = push_referrer(source, repo_name, _subject(image), SIG, b'{"sig":"api"}', tag_index=False)
    sbom = push_referrer(source, repo_name, _subject(image), SBOM, b'{"spdxVersion":"SPDX-2.3"}', tag_index=False)

    _finished(_run(service, job_body(source, repo_name, "v1", [target])))

    for ref in (sig, sbom):
        _assert_referrer_at(registries.target_a, repo_name, ref)
    # The subject first, by digest; then what refers to it; the tag last.
    puts = [r.path.rsplit("/", 1)[1] for r in target.requests if r.kind == "manifest_put"]
    assert puts[0] == image.digest and puts[-1] == "v1" and sorted(puts[1:-1]) == sorted([sig.digest, sbom.digest]), puts
    listed = RegistryHTTP.for_endpoint(target).request("GET", f"/v2/{repo_name}/referrers/{image.digest}", expect=(200,)).json()
    assert sorted(d["digest"] for d in listed["manifests"]) == sorted([sig.digest, sbom.digest])
    # The target indexed them itself (OCI-Subject): no tag index was written.
    assert list_tags(registries.target_a, repo_name) == ["v1"]

    # Again with nothing new: the target's own listing says it has them all; nothing is pushed.
    target.reset_counters()
    _finished(_run(service, job_body(source, repo_name, "v1", [target])))
    assert target.count("PUT", "manifest_put") == 0 and list_tags(registries.target_a, repo_name) == ["v1"]


def test_an_artifact_manifest_referrer_a_target_refuses_fails_it_saying_whose_it_is(service, registries, proxy_factory, repo_name):
    # ORAS wrote the withdrawn artifact manifest type for a while; distribution 2.8 stores none,
    # so the source's referrers API (emulated) lists one served by a stand-in.
    source = proxy_factory(registries.source)
    source.referrers_api = True
    image = push_image(registries.source, repo_name, "v1", "oci", LAYERS, seed=random.getrandbits(48))
    payload = b'{"sig":"artifact"}'
    RegistryHTTP.for_endpoint(registries.source).upload_monolithic(repo_name, payload, sha256_digest(payload))
    digest, media_type, size = _subject(image)
    sig = json.dumps({"mediaType": mt.OCI_ARTIFACT, "artifactType": SIG,
                      "blobs": [{"mediaType": SIG, "size": len(payload), "digest": sha256_digest(payload)}],
                      "subject": {"mediaType": media_type, "digest": digest, "size": size}}).encode()
    sig_digest = source.serve_manifest(repo_name, [], mt.OCI_ARTIFACT, sig)

    status = _run(service, job_body(source, repo_name, "v1", [registries.target_a]))

    assert job_state(status) == "FAILED", json.dumps(status, indent=1)
    error = status["targets"][0]["error"]
    assert f"push manifest {repo_name}@{sig_digest} (a referrer of {image.digest}; copy without referrers" in error, error
    assert f"MANIFEST_INVALID: manifest invalid; the registry may not take {mt.OCI_ARTIFACT}" in error, error
    # Its tag is never there without its signatures.
    assert RegistryHTTP.for_endpoint(registries.target_a).head_manifest(repo_name, "v1") is None


def test_a_referrer_the_source_cannot_serve_fails_the_job_with_its_digest(service, registries, repo_name):
    _, refs = _signed_image(registries.source, repo_name)
    payload = next(d for d in refs["sbom"].blobs if refs["sbom"].blobs[d] > 2)
    RegistryHTTP.for_endpoint(registries.source).request("DELETE", f"/v2/{repo_name}/blobs/{payload}", expect=(202,))

    status = _run(service, job_body(registries.source, repo_name, "v1", [registries.target_a]))

    assert job_state(status) == "FAILED"
    error = status["targets"][0]["error"]
    assert payload[:19] in error and "BLOB_UNKNOWN" in error, error
    assert RegistryHTTP.for_endpoint(registries.target_a).head_manifest(repo_name, "v1") is None


def test_a_tag_in_the_referrers_namespace_that_is_no_index_is_left_alone(service, registries, repo_name):
    image, _ = _signed_image(registries.source, repo_name)
    other = push_image(registries.target_a, repo_name, fallback_tag(image.digest), "oci", (1_000,), seed=random.getrandbits(48))

    status = _run(service, job_body(registries.source, repo_name, "v1", [registries.target_a]))

    assert job_state(status) == "FAILED"
    assert "not a referrers index" in status["targets"][0]["error"], status["targets"][0]["error"]
    assert RegistryHTTP.for_endpoint(registries.target_a).head_manifest(repo_name, fallback_tag(image.digest)) == other.digest
    assert RegistryHTTP.for_endpoint(registries.target_a).head_manifest(repo_name, "v1") is None


def test_an_unreadable_referrers_index_is_skipped_at_the_source_and_left_alone_at_a_target(service, registries, repo_name):
    no_list = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX}).encode()
    image, _ = _signed_image(registries.source, repo_name)
    child = next(d for d in image.manifests if d != image.digest)
    # At the source, the tag-schema index of one platform lists nothing readable: that platform
    # has no referrers to copy, and the rest of the image and its referrers still go.
    RegistryHTTP.for_endpoint(registries.source).put_manifest(repo_name, fallback_tag(child), mt.OCI_INDEX, no_list)
    RegistryHTTP.for_endpoint(registries.target_b).put_manifest(repo_name, fallback_tag(image.digest), mt.OCI_INDEX, no_list)

    status = _run(service, job_body(registries.source, repo_name, "v1", list(registries.targets)))

    assert job_state(status) == "FAILED", json.dumps(status, indent=1)
    a, b = status["targets"]
    assert a["state"] == "FINISHED", json.dumps(status, indent=1)
    assert tag_index(registries.target_a, repo_name, image.digest) == tag_index(registries.source, repo_name, image.digest)
    assert tag_index(registries.target_a, repo_name, child) is None
    assert b["state"] == "FAILED" and "index that cannot be read" in b["error"], b["error"]
    assert tag_index(registries.target_b, repo_name, image.digest) == no_list
    assert RegistryHTTP.for_endpoint(registries.target_b).head_manifest(repo_name, "v1") is None


def test_an_image_asked_for_by_digest_is_there_before_its_referrers(service, registries, proxy_factory, repo_name):
    image, refs = _signed_image(registries.source, repo_name)
    target = proxy_factory(registries.target_a)

    _finished(_run(service, job_body(registries.source, repo_name, image.digest, [target])))

    puts = [r.path.rsplit("/", 1)[1] for r in target.requests if r.kind == "manifest_put"]
    assert puts.count(image.digest) == 1 and puts.index(image.digest) < puts.index(refs["sig"].digest), puts
    assert "v1" not in list_tags(registries.target_a, repo_name)
    assert tag_index(registries.target_a, repo_name, image.digest) == tag_index(registries.source, repo_name, image.digest)


def test_what_the_source_lists_but_cannot_show_to_be_a_referrer_stays_behind(service, registries, repo_name):
    image, refs = _signed_image(registries.source, repo_name)
    src = RegistryHTTP.for_endpoint(registries.source)
    # A signature deleted since it was listed (the tag-schema index is not updated by a delete),
    # and a manifest listed that names no subject: neither is a referrer to copy.
    gone = push_referrer(registries.source, repo_name, _subject(image), SIG, b'{"sig":"deleted"}')
    stray = push_image(registries.source, repo_name, "stray", "oci", (1_000,), seed=random.getrandbits(48))
    add_to_tag_index(registries.source, repo_name, image.digest,
                     {"mediaType": mt.OCI_MANIFEST, "digest": stray.digest, "size": len(stray.manifest_bytes)})
    src.request("DELETE", f"/v2/{repo_name}/manifests/{gone.digest}", expect=(202,))

    _finished(_run(service, job_body(registries.source, repo_name, "v1", [registries.target_a])))

    for ref in refs.values():
        _assert_referrer_at(registries.target_a, repo_name, ref)
    dst = RegistryHTTP.for_endpoint(registries.target_a)
    assert dst.head_manifest(repo_name, stray.digest) is None
    listed = [d["digest"] for d in json.loads(tag_index(registries.target_a, repo_name, image.digest))["manifests"]]
    assert listed == [refs["sig"].digest, refs["sbom"].digest]


def test_cosigns_digest_tags_go_along_and_a_targets_own_is_kept_unless_overwritten(service, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "oci_index", LAYERS, seed=random.getrandbits(48), platforms=2)
    child = next(d for d in image.manifests if d != image.digest)
    sig = push_digest_tag(registries.source, repo_name, image.digest, "sig", b'{"critical":{"image":"top"}}')
    att = push_digest_tag(registries.source, repo_name, child, "att", b'{"payloadType":"in-toto"}')
    # Named after a digest that is not this image's: not this image's attachment.
    push_digest_tag(registries.source, repo_name, "sha256:" + "0" * 64, "sig", b'{"critical":{"image":"other"}}')
    theirs = push_digest_tag(registries.target_b, repo_name, image.digest, "sig", b'{"critical":{"image":"theirs"}}')
    body = job_body(registries.source, repo_name, "v1", list(registries.targets))

    _finished(_run(service, body))

    sig_tag, att_tag = f"{fallback_tag(image.digest)}.sig", f"{fallback_tag(child)}.att"
    a, b = (RegistryHTTP.for_endpoint(r) for r in registries.targets)
    assert sorted(list_tags(registries.target_a, repo_name)) == sorted(["v1", sig_tag, att_tag])
    assert a.get_manifest(repo_name, sig_tag)[1] == sig.data and a.get_manifest(repo_name, att_tag)[1] == att.data
    for digest in [*sig.blobs, *att.blobs]:
        a.read_blob(repo_name, digest)
    assert b.head_manifest(repo_name, sig_tag) == theirs.digest  # overwrite is false
    assert b.head_manifest(repo_name, att_tag) == att.digest

    body["targets"][1]["overwrite"] = True
    _finished(_run(service, body))
    assert b.head_manifest(repo_name, sig_tag) == sig.digest


def test_a_cosign_signature_added_at_the_source_reaches_a_target_that_had_the_first(service, registries, repo_name):
    image = push_image(registries.source, repo_name, "v1", "oci", LAYERS, seed=random.getrandbits(48))
    first = b'{"critical":{"signer":"ci"}}'
    push_digest_tag(registries.source, repo_name, image.digest, "sig", first)
    body = job_body(registries.source, repo_name, "v1", [registries.target_a])
    _finished(_run(service, body))

    # cosign signs again by re-tagging .sig with one more layer: the target's copy is an older
    # one, replaced even though overwrite is false.
    again = push_digest_tag(registries.source, repo_name, image.digest, "sig", first, b'{"critical":{"signer":"release"}}')
    _finished(_run(service, body))

    tag = f"{fallback_tag(image.digest)}.sig"
    assert RegistryHTTP.for_endpoint(registries.target_a).get_manifest(repo_name, tag)[1] == again.data


def test_a_source_that_will_not_list_its_tags_is_asked_for_each_attachment(service, registries, proxy_factory, repo_name):
    image, refs = _signed_image(registries.source, repo_name)
    sig = push_digest_tag(registries.source, repo_name, image.digest, "sig", b'{"critical":{}}')
    source = proxy_factory(registries.source)
    source.fail_next(100, 403, kinds="tags_list")  # may pull, may not list

    _finished(_run(service, job_body(source, repo_name, "v1", [registries.target_a])))

    for ref in refs.values():
        _assert_referrer_at(registries.target_a, repo_name, ref)
    assert RegistryHTTP.for_endpoint(registries.target_a).head_manifest(repo_name, f"{fallback_tag(image.digest)}.sig") == sig.digest
    assert source.count("GET", "tags_list") >= 1


def test_asking_for_referrers_of_an_image_without_any_costs_two_requests(service, registries, proxy_factory, repo_name):
    image = push_image(registries.source, repo_name, "v1", "oci_index", LAYERS, seed=random.getrandbits(48), platforms=2)
    source = proxy_factory(registries.source)

    _finished(_run(service, job_body(source, repo_name, "v1", [registries.target_a])))

    asked = [r.path for r in source.requests if r.path != "/v2/"]
    # The tag list (no sha256-<hex> index, no digest tag in it) and one referrers API probe.
    assert len(asked) == len(image.manifests) + len(image.blobs) + 2, asked
    assert sum("/referrers/" in p for p in asked) == 1 and sum(p.endswith("/tags/list") for p in asked) == 1, asked


def test_a_signature_copied_by_itself_is_listed_among_its_subjects_referrers(service, registries, proxy_factory, repo_name):
    # The OCI spec asks a client pushing a manifest with a subject to a registry that does not
    # answer OCI-Subject to add it to the subject's tag-schema index; it was copied unlisted.
    image = push_image(registries.source, repo_name, "v1", "oci", LAYERS, seed=random.getrandbits(48))
    sig = push_referrer(registries.source, repo_name, _subject(image), SIG, b'{"sig":"alone"}',
                        annotations={"org.opencontainers.image.created": "2026-01-01T00:00:00Z"})
    RegistryHTTP.for_endpoint(registries.source).put_manifest(repo_name, "sig", mt.OCI_MANIFEST, sig.data)
    _finished(_run(service, job_body(registries.source, repo_name, "v1", [registries.target_a]), referrers=False))
    theirs = push_referrer(registries.target_a, repo_name, _subject(image), SIG, b'{"sig":"theirs"}')

    _finished(_run(service, job_body(registries.source, repo_name, "sig", [registries.target_a]), referrers=False))

    listed = json.loads(tag_index(registries.target_a, repo_name, image.digest))["manifests"]
    assert listed == [theirs.descriptor, sig.descriptor]
    _assert_referrer_at(registries.target_a, repo_name, sig)

    # A run that pushed it and ended before it listed it: the next finds the tag current, and lists it.
    client = RegistryHTTP.for_endpoint(registries.target_a)
    client.request("DELETE", f"/v2/{repo_name}/manifests/{sha256_digest(tag_index(registries.target_a, repo_name, image.digest))}", expect=(202,))
    _finished(_run(service, job_body(registries.source, repo_name, "sig", [registries.target_a]), referrers=False))
    assert json.loads(tag_index(registries.target_a, repo_name, image.digest))["manifests"] == [sig.descriptor]

    # A target that indexes subjects itself gets no tag index.
    api = proxy_factory(registries.target_b)
    api.referrers_api = True
    _finished(_run(service, job_body(registries.source, repo_name, "sig", [api]), referrers=False))
    assert list_tags(registries.target_b, repo_name) == ["sig"]
