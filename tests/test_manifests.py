"""parse_manifest: the copyable media types, foreign layers, schema1, inferred OCI types, bad input."""
from __future__ import annotations

import json

import pytest

from pydlit.referrers import fallback_tag
from pydlit.registry.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_ARTIFACT,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    ManifestError,
    Tree,
    parse_manifest,
    sha256_digest,
)


def d(ch: str) -> str:
    return "sha256:" + ch * 64


CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d("c"), "size": 1469}
LAYER_1 = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d("1"), "size": 3000}
LAYER_2 = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d("2"), "size": 4000}
FOREIGN = {
    "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "digest": d("f"),
    "size": 99999,
    "urls": ["https://mcr.microsoft.com/v2/windows/blobs/" + d("f")],
}


def image(media_type: str | None, layers: list[dict] = (LAYER_1, LAYER_2), config: dict = CONFIG) -> bytes:
    doc: dict = {"schemaVersion": 2}
    if media_type:
        doc["mediaType"] = media_type
    doc["config"] = config
    doc["layers"] = list(layers)
    return json.dumps(doc, indent=3).encode()


def index(media_type: str | None, children: list[str]) -> bytes:
    doc: dict = {"schemaVersion": 2}
    if media_type:
        doc["mediaType"] = media_type
    doc["manifests"] = [
        {"mediaType": OCI_MANIFEST, "digest": c, "size": 500 + i, "platform": {"os": "linux", "architecture": a}}
        for i, (c, a) in enumerate(zip(children, ["amd64", "arm64", "s390x"]))
    ]
    return json.dumps(doc).encode()


@pytest.mark.parametrize("media_type", [DOCKER_MANIFEST, OCI_MANIFEST])
def test_image_manifest_lists_config_then_layers(media_type: str) -> None:
    data = image(media_type)
    m = parse_manifest(data, media_type)
    assert m.media_type == media_type
    assert m.data == data  # kept byte for byte
    assert m.digest == sha256_digest(data)
    assert m.children == ()
    assert [(b.digest, b.size) for b in m.blobs] == [(d("c"), 1469), (d("1"), 3000), (d("2"), 4000)]
    assert m.blobs[0].media_type == CONFIG["mediaType"]


@pytest.mark.parametrize("media_type", [DOCKER_LIST, OCI_INDEX])
def test_index_lists_its_children(media_type: str) -> None:
    data = index(media_type, [d("a"), d("b")])
    m = parse_manifest(data, media_type)
    assert m.media_type == media_type
    assert m.children == (d("a"), d("b"))
    assert m.blobs == ()
    assert m.digest == sha256_digest(data)


def test_declared_media_type_wins_over_content_type() -> None:
    m = parse_manifest(image(OCI_MANIFEST), "application/json")
    assert m.media_type == OCI_MANIFEST


def test_an_oci_content_type_is_used_when_media_type_is_absent() -> None:
    assert parse_manifest(image(None), OCI_MANIFEST + "; charset=utf-8").media_type == OCI_MANIFEST
    assert parse_manifest(index(None, [d("a")]), OCI_INDEX).media_type == OCI_INDEX


@pytest.mark.parametrize("content_type, shape, inferred", [
    (DOCKER_MANIFEST, "image", OCI_MANIFEST), (DOCKER_LIST, "index", OCI_INDEX),
])
def test_bytes_without_media_type_are_not_taken_for_docker_whatever_the_content_type(content_type, shape, inferred) -> None:
    # Docker's schema2 types require the field: a registry refuses such bytes pushed under them.
    data = image(None) if shape == "image" else index(None, [d("a")])
    assert parse_manifest(data, content_type).media_type == inferred


def test_an_oci_artifact_manifest_lists_its_blobs_and_subject() -> None:
    doc = {"mediaType": OCI_ARTIFACT, "artifactType": "application/vnd.example.sbom",
           "blobs": [LAYER_1, LAYER_2], "subject": {"mediaType": OCI_MANIFEST, "digest": d("5"), "size": 7}}
    for data in (json.dumps(doc).encode(), json.dumps({k: v for k, v in doc.items() if k != "mediaType"}).encode()):
        m = parse_manifest(data, "application/json")
        assert m.media_type == OCI_ARTIFACT and m.data == data
        assert [b.digest for b in m.blobs] == [d("1"), d("2")] and m.children == () and m.subject == d("5")
    assert parse_manifest(json.dumps({"mediaType": OCI_ARTIFACT}).encode(), "").blobs == ()
    with pytest.raises(ManifestError, match="malformed descriptor in blobs"):
        parse_manifest(json.dumps({"mediaType": OCI_ARTIFACT, "blobs": [{"digest": d("1")}]}).encode(), "")


@pytest.mark.parametrize("content_type", ["", "application/json", "application/octet-stream"])
def test_oci_manifest_without_media_type_is_inferred(content_type: str) -> None:
    m = parse_manifest(image(None), content_type)
    assert m.media_type == OCI_MANIFEST
    assert len(m.blobs) == 3


def test_oci_index_without_media_type_is_inferred() -> None:
    m = parse_manifest(index(None, [d("a")]), "")
    assert m.media_type == OCI_INDEX
    assert m.children == (d("a"),)


def test_foreign_layers_are_kept_in_the_manifest_but_not_in_the_tree_blobs() -> None:
    m = parse_manifest(image(DOCKER_MANIFEST, layers=[FOREIGN, LAYER_1]), DOCKER_MANIFEST)
    foreign = next(b for b in m.blobs if b.digest == d("f"))
    assert foreign.foreign and foreign.urls == tuple(FOREIGN["urls"])
    assert not next(b for b in m.blobs if b.digest == d("1")).foreign
    assert [b.digest for b in Tree(m).blobs] == [d("c"), d("1")]


def test_tree_blobs_are_unique_across_children() -> None:
    top = parse_manifest(index(OCI_INDEX, [d("a"), d("b")]), OCI_INDEX)
    amd64 = parse_manifest(image(OCI_MANIFEST, layers=[LAYER_1, LAYER_2]), OCI_MANIFEST)
    arm64 = parse_manifest(image(OCI_MANIFEST, layers=[LAYER_2, FOREIGN]), OCI_MANIFEST)
    blobs = Tree(top, [amd64, arm64]).blobs
    assert [b.digest for b in blobs] == [d("c"), d("1"), d("2")]
    assert sum(b.size for b in blobs) == 1469 + 3000 + 4000


def test_only_a_non_distributable_layer_with_urls_is_foreign() -> None:
    nondistributable = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    assert Blob(d("f"), 1, nondistributable, urls=("https://x",)).foreign
    # Without URLs it can be fetched from nowhere else: copied like any layer.
    assert not Blob(d("f"), 1, nondistributable).foreign
    # A regular layer's URLs are only other places to fetch it from.
    regular = Blob(d("f"), 1, "application/vnd.oci.image.layer.v1.tar+gzip", urls=("https://x",))
    assert not regular.foreign and regular.maybe_elsewhere
    assert not Blob(d("f"), 1, "application/vnd.oci.image.layer.v1.tar+gzip").maybe_elsewhere


SCHEMA1 = {
    "schemaVersion": 1,
    "name": "team/app",
    "tag": "v1",
    "architecture": "amd64",
    "fsLayers": [{"blobSum": d("1")}],
    "history": [{"v1Compatibility": "{}"}],
}


@pytest.mark.parametrize(
    "doc, content_type",
    [
        (SCHEMA1, DOCKER_SCHEMA1_SIGNED),
        (SCHEMA1, DOCKER_SCHEMA1),
        (SCHEMA1, "application/json"),  # recognised by schemaVersion alone
        ({**SCHEMA1, "mediaType": DOCKER_SCHEMA1}, ""),
    ],
)
def test_schema1_is_refused_as_deprecated(doc: dict, content_type: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(doc).encode(), content_type)
    msg = str(caught.value)
    assert "schema1" in msg and "deprecated" in msg


@pytest.mark.parametrize(
    "data, words",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.example.thing+json"}).encode(),
         r"unsupported manifest media type 'application/vnd.example.thing\+json' \(its keys: mediaType, schemaVersion\)"),
        (json.dumps({"schemaVersion": 2}).encode(), "unsupported manifest media type"),
    ],
)
def test_unreadable_or_unknown_manifests_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(ManifestError, match=words):
        parse_manifest(data, "")


@pytest.mark.parametrize(
    "config, layers, where",
    [
        (None, [LAYER_1], "config"),
        ({"digest": d("c")}, [LAYER_1], "config"),  # no size
        ({"size": 10}, [LAYER_1], "config"),  # no digest
        (CONFIG, [{"digest": d("1"), "size": "3000"}], "layers"),  # size as a string
        (CONFIG, [{"digest": 7, "size": 3000}], "layers"),
        (CONFIG, ["sha256:" + "1" * 64], "layers"),  # not an object
        (CONFIG, [LAYER_1, None], "layers"),
        pytest.param(CONFIG, [{"digest": d("1"), "size": -1}], "layers", id="negative-size"),
        pytest.param(CONFIG, [{"digest": d("1"), "size": True}], "layers", id="boolean-size"),  # JSON true is not an integer
        pytest.param(CONFIG, [{"digest": "../../../etc/passwd", "size": 3}], "layers", id="digest-not-algo:hex"),
        pytest.param(CONFIG, [{"digest": "sha256:../../x", "size": 3}], "layers", id="digest-path-traversal"),
    ],
)
def test_malformed_image_descriptors_are_refused(config, layers, where: str) -> None:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": layers}
    if config is not None:
        doc["config"] = config
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(doc).encode(), OCI_MANIFEST)
    assert f"malformed descriptor in {where}" in str(caught.value)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"digest": d("a")}, id="no-size"),
        pytest.param({"size": 3}, id="no-digest"),
        pytest.param("sha256:" + "a" * 64, id="not-an-object"),
        pytest.param({"digest": "not-a-digest", "size": 3}, id="digest-not-algo:hex"),
    ],
)
def test_malformed_index_descriptors_are_refused(entry) -> None:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    with pytest.raises(ManifestError, match="malformed descriptor in manifests"):
        parse_manifest(json.dumps(doc).encode(), OCI_INDEX)


def test_the_referrers_tag_keeps_64_characters_of_the_digest() -> None:
    # The tag schema: <alg>-<ref>, the algorithm cut to 32 characters and the digest to 64.
    assert fallback_tag("sha256:" + "a" * 64) == "sha256-" + "a" * 64
    assert fallback_tag("sha512:" + "b" * 128) == "sha512-" + "b" * 64


def test_a_manifest_names_its_subject_and_a_malformed_one_names_none() -> None:
    subject = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "d" * 64, "size": 3}
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": "x", "digest": "sha256:" + "e" * 64, "size": 2}, "layers": []}
    assert parse_manifest(json.dumps({**doc, "subject": subject}).encode(), "").subject == subject["digest"]
    assert parse_manifest(json.dumps({**doc, "subject": {**subject, "digest": "../x"}}).encode(), "").subject is None
    assert parse_manifest(json.dumps(doc).encode(), "").subject is None
